"""The HTTP API: AUTOMATIC1111's `/sdapi/v1/*`, OpenAI's `/v1/images/generations`, and the web page.

`create_app(pipe, config)` builds the FastAPI app around one `ModelWorker` (imagine/server/worker.py),
which owns the pipeline; request handlers only validate, queue a job and wait for it. So the
event loop never runs a forward pass, a full queue answers 429 at once, and a client that
goes away has its job cancelled (if it waits) or its batch stopped (if it ran alone).

Errors on `/sdapi/*` (and the page's own `/imagine/*`) have AUTOMATIC1111's shape
`{"error", "detail", ...}`; on `/v1/*` OpenAI's `{"error": {"message", "type", "param", "code"}}`,
so each client library raises its own exception type with the message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import io
import json
import math
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagine import preprocessors
from imagine.diffusion import check_level
from imagine.images import A1111_INFOTEXT_DEFAULTS, RESIZE_MODES, controlnet_unit_text, fit_picture
from imagine.samplers import (  # AUTOMATIC1111's labels and ways of our samplers
    A1111_SAMPLERS,
    A1111_SCHEDULE_NAMES,
    TIMESTEP_RULE,
    a1111_guidance_scale,
    a1111_named_pick,
    is_cfg_pp,
    a1111_schedule,
    a1111_settings,
    default_guidance_scale,
)
from imagine.schedules import COMPVIS_SCHEDULES, MODEL_SIGMA_SCHEDULES, SCHEDULE_LABELS, SIGMA_SCHEDULES, check_downcast
from imagine.server.worker import (Hires, Interrupted, Job, JobCancelled,
                                   ModelWorker, QueueFull, Settings, ShuttingDown)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SEED = 2**32 - 1
MAX_SD_UPSCALE_TILES = 256  # img2img runs one SD upscale request may make (tiles x n_iter)
# AUTOMATIC1111's random number generator sources as imagine's rng ("GPU" draws with torch on the device: the CPU here)
A1111_RNG_SOURCES = {"GPU": "cpu", "CPU": "cpu", "NV": "nv"}
# the override_settings the API reads
A1111_OVERRIDES_READ = ("emphasis", "randn_source", "eta_noise_seed_delta", "sd_noise_schedule",
                        "use_downcasted_alpha_bar", "use_old_scheduling", "pad_cond_uncond", "pad_cond_uncond_v0",
                        "refiner_switch_by_sample_steps", "eta_ddim", "eta_ancestral", "CLIP_stop_at_last_layers")
A1111_NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")  # its sd_noise_schedule
# A1111's samplers with an eta and the option that gives it when a request sends none (its Sampler.initialize reads
# eta_option_field), with the default at which its infotext writes none: its CompVis DDIM (and DDIM CFG++) read
# eta_ddim ("Eta DDIM", 0); its k-diffusion samplers that take an eta read eta_ancestral ("Eta", 1)
A1111_ETA_OPTIONS = {**dict.fromkeys(("ddim", "ddim_cfgpp"), ("eta_ddim", 0.0)),
                     **dict.fromkeys(("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde",
                                      "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive"),
                                     ("eta_ancestral", 1.0))}
# A1111's StableDiffusionProcessingTxt2Img.denoising_strength default: its API's hires strength (its UI's slider: 0.7)
A1111_HIRES_DENOISING = 0.75


@dataclass
class ServerConfig:
    """Limits and queue settings; every limit is checked before a job is queued (422 past it)."""

    max_width: int | None = None  # None: twice the model's own size (1024 for SD 1.x, 2048 for SDXL)
    max_height: int | None = None
    max_steps: int = 150
    max_images: int = 8  # per request: batch_size * n_iter, or OpenAI's n
    max_prompt_length: int = 2000  # characters, prompt and negative prompt each
    # None: room for four base64 pictures of the largest size, uncompressed RGBA (an img2img picture, its mask and
    # ControlNet pictures), at least 8 MiB: a photo of the model's own size fits in any of the APIs
    max_body_bytes: int | None = None
    queue_size: int = 16  # jobs waiting (the running batch not counted)
    max_batch: int = 8  # images per forward pass
    max_controlnet_units: int = 8  # per request (each runs a ControlNet at every step; A1111's extension shows 3)

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v is None and k in ("max_width", "max_height", "max_body_bytes"):
                continue  # the model's own size, twice, and room for its pictures (create_app)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ServerConfig.{k} must be a positive integer; got {v!r}")


# -- samplers: AUTOMATIC1111's names -> ours (imagine.samplers.A1111_SAMPLERS: A1111 name, its aliases,
# our sampler). Only those whose sampler exists here are offered.
# A1111's schedule types of ours (align_your_steps picks SDXL's levels for an SDXL model, as A1111 does; the CompVis
# ones and ComfyUI's linear_quadratic are not its)
SCHEDULE_TYPES = tuple(s for s in SIGMA_SCHEDULES if s not in ("align_your_steps_sdxl", "linear_quadratic")
                       and s not in COMPVIS_SCHEDULES)
_FALLBACK_SAMPLERS = ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_a", "heun"]


def our_sampler_names() -> list[str]:
    """The sampler registry's names (imagine/samplers.py)."""
    try:
        from imagine import samplers as registry
    except ImportError:
        return list(_FALLBACK_SAMPLERS)
    for attr in ("SAMPLERS", "REGISTRY", "samplers"):
        table = getattr(registry, attr, None)
        if isinstance(table, dict) and table:
            return sorted(table)
    names = getattr(registry, "names", None) or getattr(registry, "available", None)
    if callable(names):
        return sorted(names())
    return list(_FALLBACK_SAMPLERS)


class SamplerTable:
    def __init__(self, ours: list[str]):
        self.ours = sorted(ours)
        self.a1111 = [(name, aliases, s) for name, aliases, s in A1111_SAMPLERS if s in ours]
        self._lookup: dict[str, str] = {}
        for s in self.ours:
            self._lookup[s.lower()] = s
        for name, aliases, s in self.a1111:
            for key in [name, *aliases]:
                self._lookup[key.lower()] = s
        self._a1111_of = {s: name for name, _, s in self.a1111}

    def resolve(self, name: str) -> tuple[str, bool | None]:
        """An A1111 or imagine name -> (our sampler, karras). A1111's old "... Karras" names
        (e.g. "DPM++ 2M Karras") select Karras sigmas."""
        key = name.strip().lower()
        karras = None
        if key not in self._lookup and key.endswith(" karras"):
            key, karras = key[: -len(" karras")].strip(), True
        if key not in self._lookup:
            try:  # the registry's own aliases (k-diffusion's and diffusers' names)
                from imagine.samplers import resolve_sampler

                canonical, _, implied = resolve_sampler(name)
                if canonical in self.ours:
                    return canonical, True if implied else None
            except (ImportError, ValueError, TypeError):
                pass
            raise LookupError(f"unknown sampler {name!r}; valid: {', '.join(self.names())}")
        return self._lookup[key], karras

    def a1111_name(self, ours: str) -> str:
        return self._a1111_of.get(ours, ours)

    def names(self) -> list[str]:
        return [n for n, _, _ in self.a1111] + [s for s in self.ours if s not in self._a1111_of]


# -- request bodies --------------------------------------------------------------------------
class Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111's txt2img body. Fields not declared here are accepted, not used, and listed
    in the response's info as `ignored_fields`."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []  # A1111's prompt styles (`imagine serve --styles CSV`), merged into the texts in order
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's deprecated name field; used if sampler_name is absent
    scheduler: str | None = None  # "automatic" (the model's) or one of SCHEDULE_TYPES, by name or A1111's label
    eta: float | None = None  # noise scale of DDIM / the ancestral and SDE samplers (None: the sampler's default)
    s_tmin: float | None = None  # the SDE samplers' noise band [s_tmin, s_tmax] (A1111: s_tmax 0 = no upper end),
    s_tmax: float | None = None  # and the band of Euler's, Heun's and DPM2's churn
    s_churn: float | None = None  # Karras et al. 2022's S_churn for Euler, Heun, DPM2 (0: none, A1111's default)
    s_noise: float | None = None  # the churn's noise scale (A1111's default 1)
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False  # A1111's hires. fix: width x height first, then upscaled by hr_scale
    hr_scale: float = 2.0
    hr_resize_x: int = 0  # A1111's "resize width to" / "height to": either non-zero, the hires size, not hr_scale
    hr_resize_y: int = 0
    hr_second_pass_steps: int = 0  # 0: the first pass's steps
    hr_upscaler: str | None = None  # A1111's name: a latent upscale mode ("Latent", its default, ...) or None / Lanczos
    denoising_strength: float | None = None  # the hires pass's (A1111's API default there: 0.75)
    hr_prompt: str = ""  # the hires pass's prompt ("": the prompt)
    hr_negative_prompt: str = ""  # the hires pass's negative prompt ("": the negative prompt)
    hr_sampler_name: str | None = None  # the hires pass's sampler (None or "Use same sampler": sampler_name's)
    hr_scheduler: str | None = None  # the hires pass's schedule type (None or "Use same scheduler": scheduler's)
    send_images: bool = True
    force_task_id: str | None = None  # lets /sdapi/v1/progress?id_task= follow this request
    subseed: int = -1  # A1111's variation seed (-1: random), image i's is subseed + i
    subseed_strength: float = 0.0  # how far each image's start noise moves towards its variation seed's
    seed_resize_from_h: int = -1  # A1111's "resize seed from" (pixels; 0 or less: off): the seeds' noise at that
    seed_resize_from_w: int = -1  # size goes in the middle of this size's (TextToImagePipeline.generate)
    refiner_checkpoint: str | None = None  # SDXL's refiner: the one loaded with `imagine serve --refiner`
    refiner_switch_at: float | None = None  # the fraction of the steps after which it takes over (default 0.8)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """A1111's API fields are all Optional (its modules/api/models.py makes each Optional[...]), and clients built
        from its schema send null for a field left at its default: a null is read as not sent (seed -1, styles [],
        negative_prompt "", batch_size 1, ...)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class DetectRequest(BaseModel):
    """The ControlNet extension's /controlnet/detect body (its other fields are accepted, not used)."""

    model_config = ConfigDict(extra="allow")
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


class PngInfoRequest(BaseModel):
    """A1111's /sdapi/v1/png-info body: a base64 picture (a data: prefix allowed)."""

    image: str = ""


class ExtrasRequest(BaseModel):
    """AUTOMATIC1111's Extras fields (ExtrasBaseRequest), with its defaults."""

    model_config = ConfigDict(extra="allow")
    resize_mode: int = 0  # 0: upscaling_resize times; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class ExtrasSingleRequest(ExtrasRequest):
    image: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list = []  # noqa: N815 (A1111's name)


class InfotextRequest(BaseModel):
    """/imagine/v1/infotext body: an infotext as text (pasted from a PNG Info tab or a model site)."""

    text: str = ""


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img body: txt2img's, plus the pictures and how far from them to go, and A1111's inpainting:
    `mask` (white: paint anew) with its options, in A1111's defaults, and `resize_mode` (0 just resize, 1 crop and
    resize, 2 resize and fill, 3 just resize (latent upscale): imagine.images.fit_picture). Its other fields are
    accepted, not used, and listed in info.ignored_fields (the inpainting options too when no mask is sent)."""

    init_images: list[str] = []
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None  # an instruct-pix2pix model's guidance on the picture (not given: 1)
    mask: str | None = None  # base64 picture (a data: prefix allowed); "" or null: no mask
    mask_blur: int | None = None  # A1111: sets mask_blur_x and mask_blur_y both
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "Only masked"
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0  # 1: "Inpaint not masked" (black is painted anew)


# a picture's info entries about its file, not its generation (A1111's IGNORED_INFO_KEYS, left out of png-info's items)
_PICTURE_INFO_KEYS = frozenset({"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                                "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                                "photoshop"})
# A1111's infotext labels of its inpainting_fill (it writes none for 1, "original")
A1111_FILL_LABELS = {0: "fill", 2: "latent noise", 3: "latent nothing"}
# A1111's inpainting_fill -> the pipeline's masked_content (0, "fill", is done on the picture before: "original")
A1111_MASKED_CONTENT = {0: "original", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
INPAINTING_FIELDS = ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                     "inpaint_full_res_padding", "inpainting_mask_invert")
SAMPLER_FIELDS = ("eta", "s_tmin", "s_tmax", "s_churn", "s_noise")  # A1111's fields a sampler may or may not take
HIRES_FIELDS = ("enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_upscaler",
                "hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler")
MAX_MASK_BLUR = 256  # pixels (A1111's slider stops at 64; its API has no limit)


MAX_PICTURE_PIXELS = 2**26  # 67 M pixels (8192 x 8192): a camera's picture fits; a 20 kB PNG that decodes to GBs not


@contextlib.contextmanager
def _opened_picture(raw: bytes, field: str, unreadable: str, status: int = 422):
    """The picture in `raw`, opened (not decoded) and its size checked before anything decodes its pixels: over
    MAX_PICTURE_PIXELS (a decompression bomb among them) or unreadable, a `status` error naming `field` (`unreadable`
    says what to send)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_PICTURE_PIXELS:
                raise ApiError(status, f"{field}: a picture of {im.width}x{im.height} pixels; up to "
                                       f"{MAX_PICTURE_PIXELS:,} pixels are read (resize it first)", field)
            yield im
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ApiError(status, f"{field}: {unreadable} ({type(e).__name__})", field) from None


def _decode_image(data: str, field: str, rgb: bool = True):
    """A base64 picture (A1111 clients may prefix it with data:image/png;base64,) -> RGB PIL image, its transparency
    laid on white (`_flatten`; `rgb` False: as stored, its transparency kept for a ControlNet preprocessor), or 422."""
    if not isinstance(data, str):
        raise ApiError(422, f"{field} must hold base64 strings", field)
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    with _opened_picture(base64.b64decode(raw, validate=False), field, "not a base64 image Pillow can read") as im:
        return _flatten(im) if rgb else (im.copy() if im.mode in ("RGB", "RGBA", "LA", "L", "P")
                                         else im.convert("RGBA"))


def _flatten(im):
    """An RGB picture of `im`, its transparency (RGBA, LA, PA, a palette's or colour key's) laid on white:
    AUTOMATIC1111 flattens img2img's pictures onto its img2img_background_color, #ffffff (images.flatten in
    StableDiffusionProcessingImg2Img.init), where convert("RGB") would show the colour hidden under transparent
    pixels (often black)."""
    from PIL import Image

    # (A1111's fix_png_transparency makes RGBA of an RGB or palette picture whose transparency is per-entry bytes;
    # flatten lays RGBA alone on the colour: an LA picture or a single transparent index becomes plain RGB)
    if im.mode != "RGBA" and not (im.mode in ("RGB", "P") and isinstance(im.info.get("transparency"), bytes)):
        return im.convert("RGB")
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    background.paste(im, mask=im)  # (A1111's flatten: the picture pasted over the colour through its alpha)
    return background.convert("RGB")


def _decode_mask(data: str, field: str = "mask"):
    """A1111's mask (create_binary_mask, its mask_round on): a base64 picture -> grey "L" mask of 0 and 255, 255
    where the grey level (or, for a picture with transparency, the alpha) is over 128; or 422."""
    if not isinstance(data, str):
        raise ApiError(422, f"{field} must be a base64 string", field)
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    with _opened_picture(base64.b64decode(raw, validate=False), field, "not a base64 image Pillow can read; send a "
                         "picture, white where it is painted anew, black where it is kept") as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            alpha = im.getchannel("A")
            grey = alpha if alpha.getextrema() != (255, 255) else im.convert("L")
        else:
            grey = im.convert("L")
    return grey.point(lambda v: 255 if v > 128 else 0)


# AUTOMATIC1111's ControlNet extension (alwayson_scripts.controlnet.args: one dict per unit): the fields used
# ("input_image" and "guidance" are its older names of "image" and "guidance_end"); others are accepted, not used
CONTROLNET_USED = ("enabled", "image", "input_image", "model", "weight", "module", "guidance_start", "guidance_end",
                   "guidance", "processor_res", "threshold_a", "threshold_b", "pixel_perfect", "resize_mode",
                   "control_mode")
# the extension's control modes (its labels, or 0-2) -> imagine's (imagine.models.controlnet.CONTROL_MODES)
A1111_CONTROL_MODES = {"balanced": "balanced", "my prompt is more important": "prompt",
                       "controlnet is more important": "controlnet", "0": "balanced", "1": "prompt", "2": "controlnet"}
CONTROLNET_MAX_WEIGHT = 2.0  # the extension's bound on a unit's weight


def controlnet_hash(source: str | None) -> str | None:
    """AUTOMATIC1111's short model hash, which its ControlNet extension shows after a model's name ("name [hash]"):
    sha256 of the 64 KiB at 1 MiB into the file, 8 hex digits. A folder: its weights file's. None when unknown."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        from imagine.models.io import WEIGHT_NAMES

        path = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), path / WEIGHT_NAMES[0])
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except OSError:
        return None


def _unit_picture(value, where: str) -> tuple[str | None, list[str]]:
    """A unit's image in the extension's forms (a base64 string; {"image": b64, "mask": ...}; [image, mask]; a
    list of one such dict) -> (the base64 picture or None, the parts not used)."""
    if value is None or value == "":
        return None, []
    if isinstance(value, str):
        return value, []
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and isinstance(value[0], dict):
            return _unit_picture(value[0], where)
        if len(value) == 2 and all(isinstance(v, str) or v is None for v in value):
            return value[0] or None, [f"{where}[1]"] if value[1] else []
        raise ApiError(422, f"{where}: one control picture per unit (a base64 string, or {{\"image\": ...}}); got a "
                            f"list of {len(value)}", where)
    if isinstance(value, dict):
        picture, _ = _unit_picture(value.get("image"), f"{where}.image")
        return picture, [f"{where}.{k}" for k in value if k != "image" and value[k] is not None]
    raise ApiError(422, f"{where} must be a base64 picture; got {type(value).__name__}", where)


@dataclass
class _Inpainting:
    """One img2img request's A1111 inpainting, made ready for the pipeline (`prepare_inpainting`): per picture, what
    the model gets (picture and mask, at the generation size) and how its result goes back (`finish`)."""

    blur: int  # mask_blur_x
    fill: int  # 0 fill, 1 original
    full_res: bool  # "Only masked" (False also when the mask was blank: A1111 then runs plain img2img)
    padding: int
    invert: int
    inits: list  # per picture: the picture the model starts from (width x height)
    masks: list  # per picture: the mask the model gets (width x height, blurred; the pipeline cuts it at 0.5)
    originals: list  # per picture: what the result is laid over
    overlays: list  # per picture: the mask the result is laid over it with (blurred; x2 without "Only masked")
    boxes: list  # per picture: the crop (left, top, right, bottom) for "Only masked", else None
    blur_y: int | None = None  # mask_blur_y (None: as blur)

    @property
    def mask_blur(self) -> int | None:
        """A1111's mask_blur property: the radius when x and y agree, else None (its infotext then has none)."""
        return self.blur if self.blur_y in (None, self.blur) else None

    def finish(self, image, k: int):
        """Picture k's result -> A1111's answer: pasted back into the crop (resized to it) for "Only masked", then
        laid over the original with the blurred mask, so the kept part is the original's own pixels."""
        from imagine.inpainting import paste_over

        box, original = self.boxes[k], self.originals[k]
        if box is not None:
            whole = original.copy()
            # (A1111's apply_overlay: `image = images.resize_image(1, image, w, h)`, crop and resize, then paste)
            whole.paste(fit_picture(image.convert("RGB"), box[2] - box[0], box[3] - box[1], "crop_and_resize"),
                        box[:2])
            image = whole
        return paste_over(image, original, self.overlays[k])

    def parameters(self) -> dict:
        """For the infotext (imagine.images.a1111_parameters)."""
        return {"inpainting": True, "mask_blur": self.mask_blur, "inpaint_full_res": self.full_res,
                "inpaint_full_res_padding": self.padding, "masked_content": A1111_FILL_LABELS.get(self.fill),
                "mask_invert": bool(self.invert)}

    def extra_generation_params(self) -> dict:
        """What A1111 puts in its info's extra_generation_params for this inpainting."""
        out = {}
        if self.invert:
            out["Mask mode"] = "Inpaint not masked"
        if (self.blur > 0 or (self.blur_y or 0) > 0) and self.mask_blur is not None:
            out["Mask blur"] = self.mask_blur
        if self.full_res:
            out["Inpaint area"] = "Only masked"
            out["Masked area padding"] = self.padding
        if self.fill in A1111_FILL_LABELS:
            out["Masked content"] = A1111_FILL_LABELS[self.fill]
        return out


def prepare_inpainting(pictures: list, mask, width: int, height: int, *, blur: int, fill: int, full_res: bool,
                       padding: int, invert: int, resize_mode: str = "just_resize",
                       blur_y: int | None = None) -> _Inpainting | None:
    """AUTOMATIC1111's img2img inpainting (its StableDiffusionProcessingImg2Img.init) around imagine's pipeline:
    the binary mask (`_decode_mask`) inverted if asked, blurred (`blur_mask`: `blur` along x, `blur_y` along y,
    else `blur`); then either "Only masked" (the crop
    around the mask, grown by `padding` and to width:height, `crop_region`, brought to width x height by "resize
    and fill" and its result pasted back by "crop and resize", as A1111's resize_image(2, ...) and
    resize_image(1, ...)) or the whole picture and the mask brought to width x height by `resize_mode`
    (`fit_picture`; its overlay mask doubled, as A1111's, so the result shows fully from mid-blur inward); every
    `fill` but 1 ("original") fills the part to paint with the colours around it (`fill_masked`) before encoding,
    as A1111 does. None when "Only masked" finds a blank mask: A1111 then runs plain img2img."""
    from PIL import Image, ImageOps

    from imagine.inpainting import blur_mask, crop_region, fill_masked

    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, blur, blur_y)
    if full_res and mask.getbbox() is None:
        return None
    out = _Inpainting(blur=blur, fill=fill, full_res=full_res, padding=padding, invert=invert, inits=[], masks=[],
                      originals=[], overlays=[], boxes=[], blur_y=blur_y)
    for picture in pictures:
        picture = picture.convert("RGB")
        if full_res:
            overlay = mask if mask.size == picture.size else mask.resize(picture.size, Image.LANCZOS)
            box = crop_region(overlay, width, height, padding) or (0, 0, *picture.size)
            # (A1111: `images.resize_image(2, crop, self.width, self.height)`, resize and fill, picture and mask)
            start = fit_picture(picture.crop(box), width, height, "resize_and_fill")
            model_mask = fit_picture(overlay.crop(box), width, height, "resize_and_fill")
        else:
            box = None
            picture = fit_picture(picture, width, height, resize_mode)
            model_mask = fit_picture(mask, width, height, resize_mode)
            overlay = model_mask.point(lambda v: min(255, 2 * v))
            start = picture
        if fill != 1:  # A1111: `if self.inpainting_fill != 1: image = masking.fill(image, latent_mask)`
            start = fill_masked(start, model_mask)
        out.inits.append(start)
        out.masks.append(model_mask)
        out.originals.append(picture)
        out.overlays.append(overlay)
        out.boxes.append(box)
    return out


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate body, plus our own optional fields (send them as extra_body)."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    model: str | None = None
    output_format: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers, self.kind = status, message, field, headers, kind


class _ClientGone(Exception):
    pass


_A1111_SCRIPTS = {"txt2img": [], "img2img": ["sd upscale"]}  # (A1111 lists its scripts by lower-case title)
_EMPTY_LISTS = ["hypernetworks", "face-restorers", "artist-categories", "artists"]


def _openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error_response(request: Request, status: int, message: str, field: str | None = None,
                    headers: dict | None = None, kind: str | None = None, errors: Any = None) -> JSONResponse:
    if _openai_path(request):
        # OpenAI answers a request it will not run (a bad n, size, prompt, a body it cannot read) with 400, which its
        # client raises as BadRequestError; 422 is our A1111 API's
        status = 400 if status == 422 else status
        otype = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind or otype, "param": field, "code": None}}
    else:
        body = {"error": kind or _status_kind(status), "detail": message}
        if field is not None:
            body["field"] = field
        if errors is not None:
            body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def _status_kind(status: int) -> str:
    return {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Interrupted", 413: "TooLarge",
            422: "ValidationError", 429: "QueueFull", 499: "ClientClosedRequest", 503: "Unavailable"}.get(
        status, "ServerError")


def _describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors -> one sentence that names each field, and the first field."""
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            err = (e.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({err})" if err else "the body is not valid JSON")
            continue
        name = ".".join(loc) or "body"
        first = first or name
        if e.get("type") == "missing":
            parts.append(f"{name} is required")
        else:
            parts.append(f"{name}: {e.get('msg', 'invalid')} (got {e.get('input')!r})" if "input" in e and loc
                         else f"{name}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first


def a1111_model_name(name: str, is_file: bool) -> str:
    """A1111's model_name of a checkpoint named `name` (its path in the models folder): without a file's suffix, path
    separators as "_" (sub/base.safetensors -> sub_base)."""
    stem = name.rsplit(".", 1)[0] if is_file and "." in name else name
    return re.sub(r"[/\\]", "_", stem)


def model_fingerprint(source: str) -> str:
    """A stable fingerprint of the weights: sha256 over each weight file's name, size, and first
    and last 64 KiB (hashing gigabytes at start-up would delay serving by many seconds). It
    stands where AUTOMATIC1111 shows a checkpoint's hash."""
    h = hashlib.sha256()
    root = Path(source)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
    for p in files:
        if p.suffix not in (".safetensors", ".ckpt", ".bin", ".pt", ".json"):
            continue
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 16))
            if size > 1 << 17:
                f.seek(-(1 << 16), 2)
                h.update(f.read())
    if not files:
        h.update(source.encode())
    return h.hexdigest()


def png_bytes(img, infotext: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _b64_png(img, infotext: str | None = None) -> str:
    return base64.b64encode(png_bytes(img, infotext)).decode("ascii")


def _png_texts(data: str) -> dict[str, str]:
    """The text chunks of a base64 picture (a PNG's generation parameters), which A1111's Extras carry over."""
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    with Image.open(io.BytesIO(base64.b64decode(raw, validate=False))) as im:
        return {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}


def _b64_png_texts(img, texts: dict[str, str]) -> str:
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _infotext(prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, w: int, h: int,
              model: str, model_hash: str, version: str, vae: str | None = None, schedule: str | None = None,
              clip_skip: int = 0, strength: float | None = None, hires: Hires | None = None,
              inpainting: dict | None = None, controlnets: list | None = None,
              refiner: tuple | None = None, image_cfg: float | None = None, variation: tuple | None = None,
              seed_resize: tuple | None = None, rng: str = "cpu", noise_seed_delta: int = 0,
              eta: float | None = None, zero_terminal_snr: bool = False,
              sampler_options: dict | None = None, downcast_alphas_cumprod: bool = False,
              old_prompt_editing: bool = False, hires_sampling: dict | None = None,
              hires_schedule: str | None = None, pad_conds: str | None = None,
              run_record: dict | None = None) -> str:
    """AUTOMATIC1111's parameters text, so its PNG-info tab (and tools that read it) understand our PNGs:
    the CLI's writer (imagine.images.a1111_parameters), with the server's model hash and version."""
    from imagine.images import a1111_parameters
    from imagine.pipelines.text_to_image import HIRES_UPSCALERS

    return a1111_parameters({"prompt": prompt, "negative_prompt": negative, "steps": steps, "sampler": sampler,
                             "schedule_type": schedule, "guidance_scale": cfg, "seed": seed, "width": w,
                             "height": h, "model_hash": model_hash[:10], "model": model, "vae": vae,
                             "clip_skip": clip_skip, "strength": strength,
                             **({"hires_scale": hires.scale, "hires_steps": hires.steps or steps,
                                 "hires_resize": hires.resize and f"{hires.resize[0]}x{hires.resize[1]}",
                                 "hires_upscaler": (HIRES_UPSCALERS[hires.upscaler] if isinstance(hires.upscaler, str)
                                                    else hires.upscaler.a1111_name), "hires_prompt": hires.prompt,
                                 "hires_negative_prompt": hires.negative_prompt} if hires else {}),
                             **({"hires_sampling": hires_sampling, "a1111_hires_schedule": hires_schedule}
                                if hires_sampling else {}),
                             **(inpainting or {}), "controlnet_units": controlnets or None,
                             **({"refiner": refiner[0], "refiner_switch_at": refiner[1],
                                 "refiner_switch_by_steps": refiner[2]} if refiner else {}),
                             "image_guidance_scale": image_cfg,
                             **({"subseed": variation[0], "subseed_strength": variation[1]} if variation else {}),
                             **({"seed_resize_from": f"{seed_resize[1]}x{seed_resize[0]}"} if seed_resize else {}),
                             "rng": rng, "noise_seed_delta": noise_seed_delta, "eta": eta,
                             "zero_terminal_snr": zero_terminal_snr, "sampler_options": sampler_options or None,
                             "downcast_alphas_cumprod": downcast_alphas_cumprod,
                             "old_prompt_editing": old_prompt_editing,
                             "pad_conds": pad_conds, "padded_conds": pad_conds is not None,
                             **(run_record or {}), "version": f"imagine {version}"})


class _BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before the app reads them: by Content-Length, and a chunked body (no
    length given) by counting it as it comes. Every body but a form's is read here (up to the limit), whatever its
    content type, and handed on whole; one holding NaN or Infinity, which Python's json reads but JSON has not (the app
    could not echo it back: a 500, or a stored option that breaks /options), is a 422 (400 on OpenAI's paths). A plain
    ASGI middleware: after the body, `receive` is the server's own, so disconnect detection still works."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, scope, send, status: int, message: str) -> None:
        openai = scope.get("path", "").startswith("/v1/")
        status = 400 if openai and status == 422 else status  # (OpenAI's status for a bad request: _error_response)
        error = ({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
                 if openai else {"error": _status_kind(status), "detail": message})
        body = json.dumps(error).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, send, 413, f"request body of {int(length)} bytes exceeds the server's "
                                                        f"limit of {self.limit} bytes")
        chunked = length is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        # (every body but a form's is read here: FastAPI and request.json() read a body of any other content type, or
        # none, as JSON, so NaN would pass with text/plain; a form's files are not JSON and its fields not read so)
        form = kind in (b"multipart/form-data", b"application/x-www-form-urlencoded")
        if not chunked and (form or length in (None, b"0")):
            return await self.app(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # (the client went away)
                return await self.app(scope, lambda m=message: _received(m), send)
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                return await self._refuse(scope, send, 413, f"request body of more than {self.limit} bytes exceeds "
                                                            "the server's limit")
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        if b"NaN" in body or b"Infinity" in body:
            try:
                json.loads(body, parse_constant=_not_json)
            except _NotJson as e:
                return await self._refuse(scope, send, 422, f"the body holds {e}, which is not a JSON number (JSON has "
                                                            "no NaN or Infinity)")
            except ValueError:
                pass  # (another fault: the app names it)
        whole = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()
        return await self.app(scope, replay, send)


class _NotJson(ValueError):
    pass


def _not_json(constant: str):
    raise _NotJson(constant)


async def _received(message):
    return message


def _own_size(pipe) -> tuple[int, int]:
    """The model's own (height, width): its defaults, else the U-Net's sample size times the VAE's factor, else
    512 x 512."""
    d = getattr(pipe, "defaults", {}) or {}
    if d.get("height") and d.get("width"):  # (a pixel cascade names its size: it has no one U-Net)
        return int(d["height"]), int(d["width"])
    try:
        sample = pipe.unet.config.sample_size or 64
        sample = (sample[0], sample[-1]) if isinstance(sample, (tuple, list)) else (sample, sample)
        return int(d.get("height") or pipe.scale * sample[0]), int(d.get("width") or pipe.scale * sample[1])
    except (AttributeError, TypeError, IndexError):
        return int(d.get("height") or 512), int(d.get("width") or 512)


def create_app(pipe, config: ServerConfig | None = None, *, worker: ModelWorker | None = None,
               model_name: str | None = None, styles: dict | None = None,
               comfyui=None) -> FastAPI:
    """The app around `pipe` (a TextToImagePipeline, or anything with its generate/decode/
    check_size/defaults). The worker thread starts with the app and stops with it. `styles`: A1111's prompt
    styles by name (`imagine.styles.read_styles`), which requests name in `styles`. `comfyui`: ComfyUI's API state
    (imagine.server.comfyui.ComfyState, shared by a checkpoint server's models) or the folder of its output, input and
    temp folders (None: a new temporary folder)."""
    import imagine

    cfg = config or ServerConfig()
    if cfg.max_width is None or cfg.max_height is None:
        own = _own_size(pipe)
        cfg = replace(cfg, max_width=cfg.max_width or 2 * own[1], max_height=cfg.max_height or 2 * own[0])
    if cfg.max_body_bytes is None:
        cfg = replace(cfg, max_body_bytes=max(8 << 20, 4 * (4 * cfg.max_width * cfg.max_height) * 4 // 3))
    worker = worker or ModelWorker(pipe, queue_size=cfg.queue_size, max_batch=cfg.max_batch)
    # (a cascade's own samplers: imagine.server.cascade.ImagenServing.sampler_names)
    samplers = SamplerTable(getattr(pipe, "sampler_names", None) or our_sampler_names())
    source = str(getattr(getattr(pipe, "c", None), "source", "") or "")
    name = model_name or (Path(source).name if source else "") or "default"
    if source and Path(source).is_file():  # (A1111's hash of a checkpoint: its sha256, the infotext's 10 digits)
        from imagine.loading.hashes import file_sha256

        fingerprint = file_sha256(source)
    else:  # (a folder, which A1111 does not load: a fingerprint of its files in that place)
        fingerprint = model_fingerprint(source) if source else hashlib.sha256(name.encode()).hexdigest()
    title = f"{name} [{fingerprint[:10]}]"
    checkpoint_model_name = a1111_model_name(name, bool(source) and Path(source).is_file())
    version = imagine.__version__
    defaults = _model_defaults(pipe, samplers)
    # (SD 2.1 unCLIP's decoder for a picture's embedding; with a diffusion prior the model makes images from text)
    prior_model = getattr(getattr(pipe, "c", None), "prior", None) is not None  # (unCLIP's text to image)
    unclip_model = getattr(getattr(pipe, "c", None), "image_embedder", None) is not None and not prior_model
    # the samplers run on the model's own levels, as diffusers runs them (unCLIP's prior and decoder; an Imagen
    # cascade's stages), not on AUTOMATIC1111's k-diffusion levels
    own_levels = prior_model or bool(getattr(pipe, "own_levels", False))
    schedule_types = tuple(pipe.schedule_types) if hasattr(pipe, "schedule_types") else SCHEDULE_TYPES
    # CLIP layers skipped at load (imagine serve --clip-skip; diffusers' numbering, A1111's is 1 + it)
    clip_skip = int(getattr(getattr(pipe, "text_encoder", None), "clip_skip", 0) or 0)
    vae_source = str(getattr(getattr(pipe, "c", None), "vae_source", "") or "")
    vae_name = Path(vae_source).name if vae_source else None  # a VAE given in place of the model's own
    options: dict[str, Any] = {
        "sd_model_checkpoint": title, "sd_checkpoint_hash": fingerprint, "samples_format": "png",
        "live_previews_enable": True, "show_progress_every_n_steps": 1, "CLIP_stop_at_last_layers": 1 + clip_skip,
        "sd_vae": vae_name or "Automatic", "emphasis": "Original", "eta_ddim": 0.0, "eta_ancestral": 1.0,
        "randn_source": "GPU", "eta_noise_seed_delta": 0, "sd_noise_schedule": "Default",
        "use_downcasted_alpha_bar": False, "use_old_scheduling": False, "pad_cond_uncond": False,
        "pad_cond_uncond_v0": False, "refiner_switch_by_sample_steps": False,
    }
    active: dict[str, list[Job]] = {}  # the jobs submitted and not yet answered, by id (for POST /imagine/v1/cancel)
    cancel_asked: set[Job] = set()  # those cancelled by POST /imagine/v1/cancel (their answer says so)
    preview_lock = threading.Lock()
    # the live previews of the current sampler step, by the batch row shown (clients polling different jobs of one
    # batch see different rows: one decode per row and step, however many pollers)
    preview_cache: dict[str, Any] = {"step": None, "rows": {}}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="imagine", version=version, lifespan=lifespan,
                  description="Text-to-image diffusion: AUTOMATIC1111- and OpenAI-compatible API")
    app.state.worker, app.state.config, app.state.pipe = worker, cfg, pipe
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)
    if hasattr(pipe, "vae_mode") and not prior_model:  # ComfyUI's API (latent text to image; unCLIP's nodes)
        from imagine.server import comfyui as comfy

        shared = comfyui if isinstance(comfyui, comfy.ComfyState) else comfy.new_state(comfyui)
        served = comfy.Served(pipe, worker, name, cfg.max_steps, cfg.max_width, cfg.max_height)
        comfy.add_routes(app, served, shared, version)

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(request, e.status, e.message, e.field, e.headers, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        message, field = _describe_validation(list(e.errors()))
        return _error_response(request, 422, message, field, errors=jsonable_encoder(e.errors(), exclude={"url"})
                               if not _openai_path(request) else None)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, e: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return _error_response(request, 500, f"internal error: {type(e).__name__}: {e}")

    # -- shared validation -------------------------------------------------------------------
    def check_prompt(field: str, text: str) -> None:
        if len(text) > cfg.max_prompt_length:
            raise ApiError(422, f"{field} is {len(text)} characters; the server's limit is {cfg.max_prompt_length}",
                           field)
        # A1111's <lora:name:s> must name a LoRA merged at start (imagine serve --lora) or a file of --lora-dir;
        # checked here, so that one request's bad tag cannot fail a batch of others
        check_tags = getattr(pipe, "loras_asked", None) or getattr(pipe, "_without_lora_tags", None)
        if check_tags is not None:
            try:
                check_tags([text] if check_tags.__name__ == "loras_asked" else text)
            except ValueError as e:
                raise ApiError(422, str(e), field) from None

    def prompt_loras(*texts: str) -> tuple:
        """The LoRAs of --lora-dir the prompts ask for, as the batching key: jobs batch only with the same set."""
        asked = getattr(pipe, "loras_asked", None)
        if asked is None:
            return ()
        try:
            return tuple((n, str(p), s) for n, p, s in asked([t for t in texts if t]))
        except ValueError as e:
            raise ApiError(422, str(e), "prompt") from None

    def check_int(field: str, v: int, lo: int, hi: int, hint: str = "") -> None:
        if not lo <= v <= hi:
            raise ApiError(422, f"{field} must be between {lo} and {hi}{hint}; got {v}", field)

    def check_size(height: int, width: int) -> None:
        check_int("width", width, 1, cfg.max_width, " (the server's limit)")
        check_int("height", height, 1, cfg.max_height, " (the server's limit)")
        try:
            pipe.check_size(height, width)
        except ValueError as e:
            field = "width" if str(e).startswith("width") else "height"
            raise ApiError(422, str(e), field) from None

    def request_overrides(req) -> dict:
        """The request's override_settings (A1111's per-request settings; not a dict: none)."""
        override = (req.model_extra or {}).get("override_settings")
        return override if isinstance(override, dict) else {}

    def setting(req, name: str, default):
        """An A1111 setting for this request: its override_settings' value, else the server's option, else `default`."""
        return request_overrides(req).get(name, options.get(name, default))

    def a1111_emphasis(req) -> bool | str:
        """AUTOMATIC1111's "emphasis" setting (the request's override_settings, else the server's options) as
        generate's `emphasis`: "Original" True, "None" False (brackets as text), "No norm" and "Ignore" by name; another
        value is a 422 naming A1111's four."""
        from imagine.emphasis import EMPHASIS_MODES

        mode = str(setting(req, "emphasis", "Original"))
        if mode not in EMPHASIS_MODES:
            raise ApiError(422, f"override_settings.emphasis must be one of {', '.join(EMPHASIS_MODES)} "
                                f"(AUTOMATIC1111's); got {mode!r}", "override_settings")
        return {"Original": True, "None": False}.get(mode, mode)

    def a1111_old_scheduling(req) -> bool:
        """AUTOMATIC1111's "use_old_scheduling" ("Old prompt editing timelines", before its 1.6: a when under 1 a
        fraction of the steps, else a step; imagine.prompt_editing)."""
        return setting(req, "use_old_scheduling", False)

    def a1111_pad_conds(req) -> str | None:
        """AUTOMATIC1111's "pad_cond_uncond_v0" and "pad_cond_uncond" (its denoiser tries v0 first) as generate's
        pad_conds (imagine.guidance.PaddedConds)."""
        return "v0" if setting(req, "pad_cond_uncond_v0", False) else \
            "empty" if setting(req, "pad_cond_uncond", False) else None

    def a1111_noise(req) -> tuple[str, int, bool, bool]:
        """The images' noise as AUTOMATIC1111's settings make it (the request's override_settings, else the
        server's options): its "randn_source" ("GPU", its default, is torch's generator on the device: this server's
        CPU; "CPU"; "NV", an NVIDIA GPU's draws) as imagine's rng, its "eta_noise_seed_delta" (ENSD), whether its
        "sd_noise_schedule" is "Zero Terminal SNR", and its "use_downcasted_alpha_bar" ("Downcast alphas_cumprod")."""
        # (with the server's options: a pair that cannot run may come half from each)
        check_noise_settings({**options, **request_overrides(req)}, "override_settings")
        return (A1111_RNG_SOURCES[setting(req, "randn_source", "GPU")], int(setting(req, "eta_noise_seed_delta", 0)),
                setting(req, "sd_noise_schedule", "Default") == "Zero Terminal SNR",
                setting(req, "use_downcasted_alpha_bar", False))

    def check_noise_settings(settings: dict, field: str) -> dict:
        """A1111's randn_source and eta_noise_seed_delta among `settings` (a request's override_settings, or options
        being set) checked, or 422 naming `field`; a whole-number float delta (31337.0) is taken as the int."""
        source = settings.get("randn_source", "GPU")
        if source not in A1111_RNG_SOURCES:
            raise ApiError(422, f"randn_source must be one of {', '.join(A1111_RNG_SOURCES)} (AUTOMATIC1111's random "
                                f"number generator source); got {source!r}", field)
        delta = settings.get("eta_noise_seed_delta", 0)
        if isinstance(delta, float) and delta.is_integer():  # (a JSON client may send 31337.0)
            delta = settings["eta_noise_seed_delta"] = int(delta)
        if isinstance(delta, bool) or not isinstance(delta, int) or delta < 0:
            raise ApiError(422, f"eta_noise_seed_delta must be an integer >= 0 (AUTOMATIC1111's ENSD, e.g. 31337); "
                                f"got {delta!r}", field)
        if settings.get("sd_noise_schedule", "Default") not in A1111_NOISE_SCHEDULES:
            raise ApiError(422, f"sd_noise_schedule must be one of {', '.join(A1111_NOISE_SCHEDULES)} (AUTOMATIC1111's "
                                f"noise schedule for sampling); got {settings['sd_noise_schedule']!r}", field)
        for key in ("eta_ddim", "eta_ancestral"):  # (A1111's sliders: 0 to 1; its API takes any number)
            v = settings.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ApiError(422, f"{key} must be a finite number >= 0 (AUTOMATIC1111's eta for "
                                    f"{'DDIM' if key == 'eta_ddim' else 'its ancestral and SDE samplers'} when a "
                                    f"request sends none); got {v!r}", field)
        if "CLIP_stop_at_last_layers" in settings:
            settings["CLIP_stop_at_last_layers"] = check_clip_stop(settings["CLIP_stop_at_last_layers"], field)
        for key, label in (("use_downcasted_alpha_bar", "Downcast alphas_cumprod"),
                           ("use_old_scheduling", "Old prompt editing timelines"),
                           ("pad_cond_uncond", "Pad prompt/negative prompt"),
                           ("pad_cond_uncond_v0", "Pad prompt/negative prompt (v0)"),
                           ("refiner_switch_by_sample_steps", "Refiner switch by sampling steps")):
            if not isinstance(settings.get(key, False), bool):
                raise ApiError(422, f"{key} must be true or false (AUTOMATIC1111's '{label}'); got {settings[key]!r}",
                               field)
        if settings.get("use_downcasted_alpha_bar") and settings.get("sd_noise_schedule") == "Zero Terminal SNR":
            raise ApiError(422, "use_downcasted_alpha_bar with sd_noise_schedule 'Zero Terminal SNR': A1111 starts such "
                                "a run from an infinite noise level (sigma_max overflows float16); use one of the two",
                           field)
        return settings

    def clip_stop_most() -> int | None:
        """The largest CLIP_stop_at_last_layers the text encoder takes (its clip_skip setter's bound, plus one: A1111
        counts the last layer as 1), or None for a text encoder without clip skip (not CLIP)."""
        from imagine.models.text_encoders import SDXLCLIPTower

        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None or not hasattr(encoder, "clip_skip"):
            return None
        most = []
        for tower in getattr(encoder, "towers", None) or [encoder]:
            layers = int(getattr(getattr(getattr(tower, "model", None), "config", None), "num_hidden_layers", 0) or 0)
            most.append(layers - (1 if isinstance(tower, SDXLCLIPTower) else 0) if layers else 12)
        return min(most)

    def check_clip_stop(v, field: str) -> int:
        """A1111's CLIP_stop_at_last_layers (1: the last layer's states, 2: the one before, ...) checked against the
        text encoder, or 422 naming `field`: a text encoder without clip skip takes the server's own value only."""
        if isinstance(v, float) and v.is_integer():  # (a JSON client may send 2.0)
            v = int(v)
        most = clip_stop_most()
        if most is None and v != 1 + clip_skip:
            kind = getattr(getattr(pipe, "text_encoder", None), "kind", "not CLIP")
            raise ApiError(422, f"CLIP_stop_at_last_layers {v!r}: this server's text encoder ({kind}) has no clip skip "
                                f"to change; the server's value is {1 + clip_skip}", field)
        if most is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most):
            raise ApiError(422, f"CLIP_stop_at_last_layers must be an integer from 1 (the last layer) to {most} (this "
                                f"model's text encoder); got {v!r}", field)
        return v

    def a1111_ignores_clip_skip() -> bool:
        """A1111 reads CLIP_stop_at_last_layers for SD 1.x's CLIP alone: SD 2.x's OpenCLIP tower (exact GELU, where
        OpenAI's CLIP has quick GELU) always takes its penultimate layer (sd_hijack_open_clip), and SDXL's towers skip
        only under its sdxl_clip_l_skip option, off by default."""
        from imagine.models.text_encoders import loaded_family

        return loaded_family(getattr(pipe, "text_encoder", None)) in ("openclip", "sdxl")

    def a1111_clip_skip(req) -> int | None:
        """The text encoder's clip_skip for this request (diffusers' numbering: A1111's CLIP_stop_at_last_layers - 1),
        from the request's override_settings, else the server's options, as A1111 reads it per run; set for the job
        (ModelWorker._using_clip_skip). None for a text encoder without one, and where A1111 ignores the option (SD
        2.x, SDXL: the server's own clip skip, `serve --clip-skip`, stays)."""
        v = check_clip_stop(setting(req, "CLIP_stop_at_last_layers", 1 + clip_skip), "override_settings")
        return None if clip_stop_most() is None or a1111_ignores_clip_skip() else v - 1

    def a1111_eta(req, sampler: str, eta: float | None) -> tuple[float | None, float | None]:
        """(the eta a pass of `sampler` runs with, the eta its infotext writes), as A1111's Sampler.initialize sets
        them: the request's eta, else its eta_ddim option for DDIM (and DDIM CFG++) and its eta_ancestral for its
        ancestral and SDE samplers (the request's override_settings, else the server's options), written as "Eta DDIM"
        / "Eta" where not at A1111's default (0 / 1). Our own samplers: the eta sent, written as sent."""
        if sampler not in A1111_ETA_OPTIONS:
            return eta, eta
        option, default = A1111_ETA_OPTIONS[sampler]
        if eta is None:
            eta = float(setting(req, option, default))
        return eta, (eta if eta != default else None)

    def image_guidance(req, inits) -> float | None:
        """img2img's image_cfg_scale for an instruct-pix2pix model (A1111's "Image CFG scale"; not given: 1, plain
        guidance with the picture in both passes, as A1111 runs it); None for any other model (not used)."""
        if not getattr(pipe, "edits", False):
            return None
        if inits is None:
            raise ApiError(422, "this server's model is an instruct-pix2pix model: it edits a picture; use "
                                "/sdapi/v1/img2img with init_images", "init_images")
        v = getattr(req, "image_cfg_scale", None)
        v = 1.0 if v is None else v
        if not math.isfinite(v) or not 0 <= v <= 100:
            raise ApiError(422, f"image_cfg_scale must be a finite number between 0 and 100; got {v}", "image_cfg_scale")
        return float(v)

    def check_refiner(req) -> tuple[str, float, bool] | None:
        """A1111's refiner fields -> (the loaded refiner's name, switch at, whether it switches by sampling steps, its
        refiner_switch_by_sample_steps setting) or None: `refiner_checkpoint` must name the refiner the server loaded
        (`imagine serve --refiner`); empty or "None" is none."""
        asked = (req.refiner_checkpoint or "").strip()
        if not asked or asked == "None":  # (refiner_switch_at then does nothing, as in A1111)
            return None
        refiner = getattr(pipe, "refiner", None)
        if refiner is None:
            raise ApiError(422, f"refiner_checkpoint {asked!r}: this server has no refiner (start it with "
                                "imagine serve --refiner PATH)", "refiner_checkpoint")
        name = Path(refiner.c.source).name
        stem = Path(refiner.c.source).stem
        if asked.split(" [")[0] not in (name, stem):  # A1111 names checkpoints "name [hash]"
            raise ApiError(422, f"refiner_checkpoint {asked!r} is not this server's refiner; valid: {stem!r}",
                           "refiner_checkpoint")
        if getattr(pipe, "image_conditioned", False):
            raise ApiError(422, "an inpainting model's U-Net takes the mask at every step and the refiner would not: "
                                "no refiner with this model", "refiner_checkpoint")
        switch = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
        if not isinstance(switch, (int, float)) or not 0 < switch <= 1:
            raise ApiError(422, f"refiner_switch_at must be in (0, 1], the fraction of the noise levels done when the "
                                f"refiner takes over (1: never); got {switch!r}", "refiner_switch_at")
        return stem, float(switch), bool(setting(req, "refiner_switch_by_sample_steps", False))

    def hires_target(req, height: int, width: int) -> tuple[int, int] | None:
        """A1111's hires. fix size fields checked (the size is text_to_image.hires_target's, A1111's
        calculate_target_resolution): hr_scale in [1, 4], or hr_resize_x / hr_resize_y in pixels in place of it; the
        size it gives within the server's limits. -> (hr_resize_x, hr_resize_y) where a size is asked, else None; 422
        naming the field."""
        from imagine.pipelines.text_to_image import hires_target as target

        f = _size_multiple(pipe)
        rx, ry = req.hr_resize_x, req.hr_resize_y
        check_int("hr_resize_x", rx, 0, cfg.max_width, " (pixels, the server's limit; 0: from hr_resize_y or hr_scale)")
        check_int("hr_resize_y", ry, 0, cfg.max_height, " (pixels, the server's limit; 0: from hr_resize_x or "
                  "hr_scale)")
        scale = req.hr_scale
        if not rx and not ry and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale <= 4):
            raise ApiError(422, f"hr_scale must be in [1, 4] (1: a second pass at the same size); got {scale!r}",
                           "hr_scale")
        resize = (rx, ry) if rx or ry else None
        (up_h, up_w), (cut_h, cut_w) = target(height, width, scale, resize, f)
        final = (up_h - cut_h * f, up_w - cut_w * f)
        field = "hr_resize_x" if rx else "hr_resize_y" if ry else "hr_scale"
        if final[0] > cfg.max_height or final[1] > cfg.max_width or up_h * up_w > MAX_PICTURE_PIXELS:
            raise ApiError(422, f"{field}: the hires size {final[1]}x{final[0]} (upscaled from {width}x{height}) is "
                                f"past the server's limit of {cfg.max_width}x{cfg.max_height}", field)
        return resize

    def hires_upscaler(name: str | None):
        """A1111's hr_upscaler -> text_to_image.HIRES_UPSCALERS' key: its latent upscale modes, None / Lanczos /
        Nearest (case aside), "latent" when none is given (A1111's latent_upscale_default_mode); or an upscaler
        model in `serve --upscaler-dir` by A1111's name for it (imagine.upscalers.UpscaleModel); another is a 422
        naming the valid ones, as A1111 refuses a name it does not have."""
        from imagine.pipelines.text_to_image import HIRES_UPSCALERS, hires_upscaler_key

        if name in (None, ""):
            return "latent"
        try:
            return hires_upscaler_key(name)
        except ValueError:
            model = upscaler_model(name, "hr_upscaler")
            if model is not None:
                return model
            valid = ", ".join([*HIRES_UPSCALERS.values(), *upscaler_models()])
            raise ApiError(422, f"hr_upscaler {name!r} is not an upscaler this server runs; valid: {valid}",
                           "hr_upscaler") from None

    def upscaler_models() -> list[str]:
        """The names A1111 lists the models of `serve --upscaler-dir` under (imagine.upscalers.A1111_NAMES
        for Real-ESRGAN's published files, else the file's stem)."""
        from imagine.upscalers import A1111_NAMES, find_upscalers

        folder = getattr(pipe, "upscaler_dir", None)
        return [] if folder is None else [A1111_NAMES.get(stem, stem) for stem in find_upscalers(folder)]

    def upscaler_model(name: str, field: str):
        """The upscaler model `name` (A1111's name, or the file's stem) in `serve --upscaler-dir`, loaded (once per
        file version); None when there is none of that name; a file that is no upscaler model: 422."""
        from imagine.upscalers import upscaler_named

        folder = getattr(pipe, "upscaler_dir", None)
        if folder is None or Path(name).name != name:  # (a name, never a path from a client)
            return None
        try:
            model = upscaler_named(name, folder)
        except (ValueError, OSError) as e:
            raise ApiError(422, f"{field}: {e}", field) from None
        # (in the served model's precision: serve --precision fast runs its upscalers in bf16 too)
        return None if model is None else model.with_precision(getattr(pipe, "precision", None) or "exact")

    def check_guidance(field: str, v: float) -> None:
        if not math.isfinite(v) or not 0 <= v <= 100:
            raise ApiError(422, f"{field} must be a finite number between 0 and 100; got {v}", field)

    def resolve_sampler(field: str, name: str | None, scheduler: str | None = None,
                        scheduler_field: str = "scheduler") -> tuple[str, str | None]:
        """-> (our sampler, its noise-level schedule: None for the model's own, or one of SCHEDULE_TYPES)."""
        try:
            sampler, karras = samplers.resolve(name) if name else (defaults["sampler"], None)
        except LookupError as e:
            raise ApiError(422, str(e), field) from None
        schedule = "karras" if karras else None
        if scheduler:
            try:  # (A1111 takes a name or its label: "Align Your Steps")
                schedule = a1111_schedule(scheduler) or schedule
            except (ValueError, TypeError) as e:
                raise ApiError(422, str(e), scheduler_field) from None
        return sampler, schedule

    def a1111_run(sampler: str, asked: str | None, eta: float | None, options: tuple) -> tuple[dict, str | None]:
        """`sampler` with schedule type `asked` (None: "Automatic") as AUTOMATIC1111 runs it (samplers.a1111_settings:
        the schedule type its "Automatic" picks, the model's whole range, x_T = z sigma_max, DPM2 / DPM2 a / DPM++ 3M
        SDE's discarded level, k-diffusion's 3M warm-up), with the request's eta and options (sampler_settings): (the
        pass's sampling keywords, Settings' and generate's, the schedule type its infotext names: none where
        "Automatic" left k-diffusion's own levels, "uniform", or the sampler is one of its CompVis ones, DDIM, PLMS
        and UniPC, which A1111 runs on their own timesteps; a type named for them is applied here, and named)."""
        a1111 = a1111_settings(sampler, asked)
        if own_levels:  # (diffusers' way: such a pipeline takes no other start or range)
            a1111 = {"sampler": sampler, "sigma_schedule": asked, "sigma_range": "spaced"}
        schedule = a1111["sigma_schedule"]
        run = {"sampler": sampler, "sigma_schedule": schedule,
               # (A1111's eta_ancestral, 1, for DPM fast and DPM adaptive, whose own default is 0)
               "eta": a1111.get("eta") if eta is None else eta,
               "sampler_options": tuple(sorted({**dict(options), **a1111.get("sampler_options", {})}.items())),
               "sigma_range": a1111["sigma_range"], "start": a1111.get("start", "noise"),
               "discard_penultimate_sigma": a1111.get("discard_penultimate_sigma", False),
               "strength_rule": a1111.get("strength_rule", "diffusers")}
        return run, asked or (a1111_named_pick(sampler) if not own_levels else None)

    def sampler_settings(sampler: str, eta, s_tmin, s_tmax, s_churn=None, s_noise=None
                         ) -> tuple[float | None, tuple, list[str]]:
        """A1111's eta / s_tmin / s_tmax / s_churn / s_noise -> (eta, the sampler's options, fields it has no use for).
        Clients such as webuiapi send them with every request (eta 0 or 1, s_tmin 0, s_tmax 0 = no upper end, s_churn
        0, s_noise 1), so a field the sampler does not take is listed in ignored_fields, not refused."""
        from imagine.samplers import option_names, takes_eta

        unused = []
        if eta is not None:
            if not math.isfinite(eta) or eta < 0:
                raise ApiError(422, f"eta must be a finite number >= 0; got {eta}", "eta")
            if not takes_eta(sampler):
                eta, unused = None, ["eta"]
        band = {}
        accepted = option_names(sampler)
        for name, v in (("s_tmin", s_tmin), ("s_tmax", s_tmax)):
            if v is None:
                continue
            if not math.isfinite(v) or v < 0:
                raise ApiError(422, f"{name} must be a finite number >= 0; got {v}", name)
            if name not in accepted:
                unused.append(name)
            elif not (name == "s_tmax" and v == 0) and not (name == "s_tmin" and v == 0):
                band[name] = float(v)  # A1111: s_tmax 0 means no upper end, s_tmin 0 no lower one
        if band.get("s_tmin", 0.0) > band.get("s_tmax", math.inf):
            raise ApiError(422, f"need s_tmin <= s_tmax; got {s_tmin} and {s_tmax}", "s_tmin")
        for name, v, default in (("s_churn", s_churn, 0.0), ("s_noise", s_noise, 1.0)):
            if v is None:
                continue
            if not math.isfinite(v) or v < 0:
                raise ApiError(422, f"{name} must be a finite number >= 0; got {v}", name)
            # (A1111 passes s_noise to k-diffusion's samplers only, not to its Restart nor to DPM adaptive)
            if name not in accepted or (name == "s_noise" and sampler in ("restart", "dpm_adaptive")):
                if v != default:  # (A1111's default sent to a sampler without it: nothing to say)
                    unused.append(name)
            elif v != default:
                band[name] = float(v)
        return eta, tuple(sorted(band.items())), unused

    def check_seed(field: str, seed: int) -> int:
        if seed < -1 or seed > MAX_SEED:
            raise ApiError(422, f"{field} must be -1 (random) or between 0 and {MAX_SEED}; got {seed}", field)
        return random.randint(0, MAX_SEED) if seed == -1 else seed

    hashes: dict[int, str | None] = {}  # id(model) -> AUTOMATIC1111's short hash of its file

    def controlnet_titles() -> dict[str, str]:
        """The loaded ControlNets (imagine serve --controlnet): name -> "name [hash]", as the extension lists them."""
        out = {}
        for n, net in worker.controlnets():
            if id(net) not in hashes:
                hashes[id(net)] = controlnet_hash(getattr(net, "source", None))
            h = hashes[id(net)]
            out[n] = f"{n} [{h}]" if h else n
        return out

    def check_controlnet(req, img2img: bool) -> tuple[list[dict], list[str]]:
        """AUTOMATIC1111's ControlNet extension's units (alwayson_scripts.controlnet.args) -> the enabled ones as
        {"name", "title", "weight", "start", "end", "image" (base64, or None in img2img: the init picture),
        "field"}, and the
        fields accepted but not used; 422 naming the field for what imagine cannot do."""
        scripts = (req.model_extra or {}).get("alwayson_scripts")
        if scripts is None:
            return [], []
        if not isinstance(scripts, dict):
            raise ApiError(422, "alwayson_scripts must be an object: script name -> {\"args\": [...]}",
                           "alwayson_scripts")
        ignored, args = [], None
        for key, value in scripts.items():
            if str(key).lower() == "controlnet":
                args = value.get("args") if isinstance(value, dict) else None
                if not isinstance(args, list):
                    raise ApiError(422, "alwayson_scripts.controlnet must be {\"args\": [unit, ...]}, one object per "
                                        "ControlNet unit", "alwayson_scripts.controlnet")
            else:
                ignored.append(f"alwayson_scripts.{key}")
        if len(args or []) > cfg.max_controlnet_units:
            raise ApiError(422, f"alwayson_scripts.controlnet.args holds {len(args)} units; this server takes up to "
                                f"{cfg.max_controlnet_units} a request", "alwayson_scripts.controlnet.args")
        units = []
        titles = None
        for i, unit in enumerate(args or []):
            where = f"alwayson_scripts.controlnet.args[{i}]"
            if not isinstance(unit, dict):
                raise ApiError(422, f"{where} must be an object (a ControlNet unit: model, image, weight, ...)", where)
            if not unit.get("enabled", True):
                continue
            titles = controlnet_titles() if titles is None else titles
            model = unit.get("model")
            if not titles:
                raise ApiError(422, f"{where}: no ControlNet is loaded; start the server with imagine serve "
                                    "--controlnet PATH", f"{where}.model")
            base = str(model).split(" [")[0].strip() if isinstance(model, str) else ""
            name = base if base in titles else next((n for n in titles if n.lower() == base.lower()), None)
            if name is None:
                raise ApiError(422, f"{where}.model: {model!r} is not a loaded ControlNet; loaded: "
                                    f"{', '.join(titles.values())}", f"{where}.model")
            try:
                module = preprocessors.find_preprocessor(unit.get("module"))
            except ValueError as e:
                raise ApiError(422, f"{where}.module: {e}", f"{where}.module") from None
            mode = A1111_CONTROL_MODES.get(str(unit.get("control_mode", "Balanced")).strip().lower())
            if mode is None:
                raise ApiError(422, f"{where}.control_mode must be 'Balanced', 'My prompt is more important' or "
                                    f"'ControlNet is more important' (or 0, 1, 2); got {unit.get('control_mode')!r}",
                               f"{where}.control_mode")
            resize = unit.get("resize_mode", "Crop and Resize")  # the extension's default
            resize = preprocessors.A1111_RESIZE_MODES.get(str(resize).strip().lower())
            if resize is None:
                raise ApiError(422, f"{where}.resize_mode must be 'Just Resize', 'Crop and Resize' or 'Resize and Fill' "
                                    f"(or 0, 1, 2); got {unit.get('resize_mode')!r}", f"{where}.resize_mode")
            numbers = {}
            for key in ("processor_res", "threshold_a", "threshold_b"):
                v = unit.get(key, -1)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ApiError(422, f"{where}.{key} must be a number (-1: the preprocessor's default); got {v!r}",
                                   f"{where}.{key}")
                numbers[key] = v
            weight = unit.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and 0 <= weight <= CONTROLNET_MAX_WEIGHT):
                raise ApiError(422, f"{where}.weight must be a number between 0 and {CONTROLNET_MAX_WEIGHT:g}; got "
                                    f"{weight!r}", f"{where}.weight")
            end_key = "guidance_end" if "guidance_end" in unit or "guidance" not in unit else "guidance"
            window = []
            for key, default in (("guidance_start", 0.0), (end_key, 1.0)):
                v = unit.get(key, default)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ApiError(422, f"{where}.{key} must be a number between 0 and 1 (the fraction of the steps); "
                                        f"got {v!r}", f"{where}.{key}")
                window.append(float(v))
            if window[0] > window[1]:  # (the extension refuses only start > end: start == end is one step)
                raise ApiError(422, f"{where}.guidance_start ({window[0]:g}) must not be above guidance_end "
                                    f"({window[1]:g})", f"{where}.guidance_start")
            key = "image" if unit.get("image") not in (None, "") or "input_image" not in unit else "input_image"
            image, unused = _unit_picture(unit.get(key), f"{where}.{key}")
            if image is None and not img2img:
                raise ApiError(422, f"{where}.image: the unit needs a control picture (base64: edges, depth, pose...)",
                               f"{where}.image")
            ignored += unused + [f"{where}.{k}" for k in unit if k not in CONTROLNET_USED and unit[k] is not None]
            units.append({"name": name, "title": titles[name], "weight": float(weight), "start": window[0],
                          "end": window[1], "image": image, "field": f"{where}.{key}", "module": module, "mode": mode,
                          "resize": resize, "pixel_perfect": bool(unit.get("pixel_perfect", False)), **numbers})
        return units, ignored

    def control_pictures(units: list[dict], pictures: list, n: int, starts: list | None,
                         inpaint: "_Inpainting | None", width: int, height: int,
                         resize_mode: str = "just_resize", hires_size: tuple[int, int] | None = None
                         ) -> tuple[list[list], list[list] | None]:
        """Per unit, its map for each of the n images: the unit's own picture through its preprocessor, fitted to
        the image's size by its resize mode; a unit without a picture (img2img) reads the picture the image starts
        from, as the extension takes the init image, fitted by img2img's `resize_mode` (its get_input_data:
        `resize_mode_from_value(p.resize_mode)`; latent upscale, which it does not know, stretches: "Just Resize").
        For "Only masked" inpainting the extension crops before it preprocesses: the picture brought to the init
        picture's size by the unit's resize mode, cut to the same crop, brought to the image's size by "Resize and
        fill" (A1111's resize_image each time), and then preprocessed. Each unit records the settings of its first
        map (its infotext). With `hires_size` (a hires. fix's second pass, width x height) also the maps for that
        pass: the same preprocessed map fitted to that size by the same mode (the extension's hr_hint_cond), else
        None."""
        out, hires_out = [], ([] if hires_size else None)
        for unit, picture in zip(units, pictures):
            made: dict[tuple, object] = {}
            crops: dict[tuple, object] = {}  # (held here: `made` keys on the crops' ids)

            def prepared(source, size, mode, fit_to=None):
                """The preprocessed map of `source` for an image of `size` (made once per picture and size), fitted
                to `fit_to` (default: size), each once: n images of one picture share it."""
                key, fit_to = (id(source), size, mode), fit_to or size
                if key + (fit_to,) in made:
                    return made[key + (fit_to,)]
                if key not in made:
                    res, free = unit["processor_res"], False
                    if unit["pixel_perfect"]:  # (its resolution is not held to the slider's range)
                        res, free = max(1, preprocessors.pixel_perfect_resolution(source, *size, mode)), True
                    used = preprocessors.settings(unit["module"], res, unit["threshold_a"], unit["threshold_b"], free)
                    unit.setdefault("settings", used)
                    try:
                        m = preprocessors.preprocess(unit["module"], source, res, unit["threshold_a"],
                                                     unit["threshold_b"], free)
                    except ValueError as e:
                        raise ApiError(422, f"{unit['field']}: {e}", unit["field"]) from None
                    made[key] = m
                made[key + (fit_to,)] = preprocessors.fit(made[key], *fit_to, mode)
                return made[key + (fit_to,)]

            init_mode = "just_resize" if resize_mode == "latent_upscale" else resize_mode
            per_image, hires_maps = [], []
            for i in range(n):
                own = picture is not None
                k = i % len(inpaint.boxes) if inpaint is not None else None
                if inpaint is not None and inpaint.boxes[k] is not None:
                    source, box = (picture if own else inpaint.originals[k]), inpaint.boxes[k]
                    mode = unit["resize"] if own else "just_resize"
                    if (id(source), box) not in crops:
                        whole = fit_picture(source, *inpaint.originals[k].size, mode)
                        crops[id(source), box] = fit_picture(whole.crop(box), width, height, "resize_and_fill")
                    per_image.append(prepared(crops[id(source), box], (width, height), mode))
                else:
                    source = picture if own else starts[i % len(starts)]
                    mode = unit["resize"] if own else init_mode
                    per_image.append(prepared(source, (width, height), mode))
                    if hires_size:
                        hires_maps.append(prepared(source, (width, height), mode, hires_size))
            out.append(per_image)
            if hires_size:
                hires_out.append(hires_maps)
        return out, hires_out

    async def run_job(request: Request, job: Job):
        """The job's result from the worker; None if it was interrupted before it began. A client that went
        away raises _ClientGone (answered 499 by its handler); the worker's refusals become ApiErrors."""
        try:
            future = worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e)) from None
        waiting = asyncio.wrap_future(future)
        active.setdefault(job.id, []).append(job)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    worker.cancel(job)
                    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
                    raise _ClientGone
            try:
                return waiting.result()
            except ValueError as e:  # the pipeline refused the parameters
                raise ApiError(422, str(e)) from None
            except JobCancelled as e:
                if job in cancel_asked:
                    raise ApiError(499, f"the job was cancelled (POST /imagine/v1/cancel?id_task={job.id}) before it "
                                        "finished") from None
                raise ApiError(499, str(e)) from None
            except ShuttingDown as e:
                raise ApiError(503, str(e)) from None
            except Interrupted:
                return None
            except Exception as e:  # the pipeline failed on this job: an answer, not a dropped request
                raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None
        finally:
            mine = active.get(job.id, [])
            if job in mine:
                mine.remove(job)
            if not mine:
                active.pop(job.id, None)
            cancel_asked.discard(job)

    # -- AUTOMATIC1111 -----------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await a1111_generate(req, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        """A1111's img2img: `init_images` (base64, with or without a data: prefix; one for every image, or one per
        image of the batch), `denoising_strength` as the pipeline's strength (imagine: SDEdit, diffusers' rule);
        with `mask`, A1111's inpainting (`check_inpainting`, `prepare_inpainting`)."""
        if not req.init_images:
            if req.mask:
                raise ApiError(422, "mask needs init_images: give the picture (base64) whose black part is kept; "
                                    "init_images holds none", "init_images")
            raise ApiError(422, "init_images must hold at least one base64 image", "init_images")
        if not isinstance(req.denoising_strength, (int, float)) or not 0 < req.denoising_strength <= 1:
            raise ApiError(422, f"denoising_strength must be in (0, 1]; got {req.denoising_strength!r}",
                           "denoising_strength")
        if len(req.init_images) > max(1, req.batch_size):
            raise ApiError(422, f"init_images holds {len(req.init_images)} pictures for a batch_size of "
                                f"{req.batch_size}; give one (for every image) or at most batch_size (one each, as "
                                "AUTOMATIC1111)", "init_images")
        if isinstance(req.resize_mode, bool) or req.resize_mode not in range(len(RESIZE_MODES)):
            raise ApiError(422, f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 "
                                f"(just resize, latent upscale); got {req.resize_mode!r}", "resize_mode")
        mask_options = check_inpainting(req) if req.mask else None
        script = (req.model_extra or {}).get("script_name")
        if isinstance(script, str) and script.strip().lower() == "sd upscale":
            return await sd_upscale_script(req, request)
        inits = await run_in_threadpool(lambda: [_decode_image(x, "init_images") for x in req.init_images])
        mask = await run_in_threadpool(_decode_mask, req.mask) if req.mask else None
        return await a1111_generate(req, request, inits, float(req.denoising_strength), mask, mask_options)

    async def sd_upscale_script(req, request: Request):
        """A1111's "SD upscale" img2img script (scripts/sd_upscale.py; `script_name: "SD upscale"`, `script_args:
        [info, overlap, upscaler (index into /sdapi/v1/upscalers, or its name), scale_factor]`): the picture enlarged
        by the upscaler (Upscaler.upscale), cut into width x height tiles overlapping by `overlap`
        (imagine.upscalers.split_grid), each tile run through img2img, and the tiles put back (combine_grid). Seeds
        as A1111's: round n of n_iter starts at seed + n, each batch of batch_size tiles after the first starts at the
        seed of the one before plus 1. The answer's pictures carry the first batch's infotext, with "SD upscale
        overlap" and "SD upscale upscaler"."""
        from imagine.upscalers import a1111_upscale, combine_grid, split_grid

        if req.mask:
            raise ApiError(422, "script SD upscale enlarges the whole picture: send it without a mask", "mask")
        args = list((req.model_extra or {}).get("script_args") or [])
        overlap = args[1] if len(args) > 1 else 64
        chosen = args[2] if len(args) > 2 else 0
        scale = args[3] if len(args) > 3 else 2.0
        names = [u["name"] for u in upscalers()]
        if isinstance(chosen, str):
            index = next((i for i, n in enumerate(names) if n.lower() == chosen.strip().lower()), None)
        elif isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < len(names):
            index = chosen
        else:
            index = None
        if index is None:
            raise ApiError(422, f"script_args[2]: the upscaler (an index into /sdapi/v1/upscalers or a name); got "
                                f"{chosen!r}; valid: {', '.join(f'{i}: {n}' for i, n in enumerate(names))}",
                           "script_args")
        label = names[index]
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 8:
            raise ApiError(422, f"script_args[3]: the scale factor, a number in (0, 8]; got {scale!r}", "script_args")
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < min(req.width, req.height):
            raise ApiError(422, f"script_args[1]: the tiles' overlap in pixels, 0 up to less than the tile's side "
                                f"({req.width}x{req.height}); got {overlap!r}", "script_args")
        upscaler = None if label == "None" else label if label in ("Lanczos", "Nearest") else \
            upscaler_model(label, "script_args")
        picture = await run_in_threadpool(_decode_image, req.init_images[0], "init_images")
        if int(picture.width * scale) * int(picture.height * scale) > MAX_PICTURE_PIXELS:
            raise ApiError(422, f"init_images: enlarged {scale:g} times the picture would be past "
                                f"{MAX_PICTURE_PIXELS:,} pixels", "init_images")

        def enlarge(_pipe, run):
            run.check()
            return picture if upscaler is None else a1111_upscale(picture, scale, upscaler)

        big = await run_job(request, Job(prompts=[""], negative_prompts=[""], seeds=[0], call=enlarge,
                                         settings=Settings(height=0, width=0, steps=1, sampler="euler",
                                                           guidance_scale=1.0)))
        if big is None:
            raise ApiError(409, "interrupted before the picture was enlarged")
        grid = split_grid(big, req.width, req.height, overlap)
        tiles = [tile for _, row in grid.rows for _, tile in row]
        if len(tiles) * req.n_iter > MAX_SD_UPSCALE_TILES:
            raise ApiError(422, f"script SD upscale: {len(tiles)} tiles of {req.width}x{req.height} x n_iter "
                                f"{req.n_iter}; up to {MAX_SD_UPSCALE_TILES} img2img runs a request: take larger "
                                "tiles (width, height) or a smaller scale", "script_args")
        seed = req.seed if req.seed is not None and req.seed >= 0 else random.randint(0, MAX_SEED)
        batch = max(1, req.batch_size)
        extra = {"sd_upscale_overlap": overlap, "sd_upscale_upscaler": label}
        base = {k: v for k, v in req.model_dump().items() if k not in ("script_name", "script_args")}
        pictures, first = [], None
        for n in range(req.n_iter):
            s, done = seed + n, []
            for j in range(0, len(tiles), batch):
                part = tiles[j:j + batch]
                sub = Img2ImgRequest(**{**base, "seed": s, "n_iter": 1, "batch_size": len(part),
                                        "init_images": ["-"] * len(part), "send_images": True})
                answer = await a1111_generate(sub, request, part, float(req.denoising_strength), extra_params=extra)
                info = json.loads(answer["info"])
                if first is None:
                    first = (answer, info)
                if info["interrupted"] and len(answer["images"]) < len(part):
                    raise ApiError(409, "interrupted while the tiles ran")
                done += [_decode_image(b, "tile") for b in answer["images"]]
                s = info["seed"] + 1  # (A1111: p.seed = processed.seed + 1)
            k = iter(done)
            rows = [(y, [(x, next(k)) for x, _ in row]) for y, row in grid.rows]
            pictures.append(combine_grid(replace(grid, rows=rows)))
        answer, info = first
        infotext = info["infotexts"][0]
        info = {**info, "seed": seed, "all_seeds": [seed + n for n in range(req.n_iter)], "width": big.width,
                "height": big.height, "infotexts": [infotext] * len(pictures), "n_iter": req.n_iter,
                "batch_size": req.batch_size, "extra_generation_params": {
                    **info.get("extra_generation_params", {}), "SD upscale overlap": overlap,
                    "SD upscale upscaler": label}}
        encoded = await run_in_threadpool(lambda: [_b64_png(p, infotext) for p in pictures]) if req.send_images else []
        return {"images": encoded, "parameters": answer["parameters"], "info": json.dumps(info)}

    def check_inpainting(req) -> dict:
        """A1111's inpainting options -> prepare_inpainting's keywords, or 422 naming the field. mask_blur sets
        both radii, as in A1111; else mask_blur_x and mask_blur_y (4 each) blur along x and y."""
        if req.mask_blur is not None:
            blur = blur_y = req.mask_blur
            check_int("mask_blur", blur, 0, MAX_MASK_BLUR, " (pixels)")
        else:
            check_int("mask_blur_x", req.mask_blur_x, 0, MAX_MASK_BLUR, " (pixels)")
            check_int("mask_blur_y", req.mask_blur_y, 0, MAX_MASK_BLUR, " (pixels)")
            blur, blur_y = req.mask_blur_x, req.mask_blur_y
        if req.inpainting_fill not in (0, 1, 2, 3):
            raise ApiError(422, f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent "
                                f"nothing); got {req.inpainting_fill!r}", "inpainting_fill")
        if req.inpainting_mask_invert not in (0, 1):
            raise ApiError(422, f"inpainting_mask_invert must be 0 (paint the white part) or 1 (paint the black "
                                f"part); got {req.inpainting_mask_invert!r}", "inpainting_mask_invert")
        if req.inpaint_full_res_padding < 0:
            raise ApiError(422, f"inpaint_full_res_padding must be a number of pixels >= 0; got "
                                f"{req.inpaint_full_res_padding}", "inpaint_full_res_padding")
        return {"blur": int(blur), "blur_y": int(blur_y), "fill": int(req.inpainting_fill), "full_res": bool(req.inpaint_full_res),
                "padding": int(req.inpaint_full_res_padding), "invert": int(req.inpainting_mask_invert),
                "resize_mode": RESIZE_MODES[req.resize_mode]}

    async def a1111_generate(req, request: Request, inits: list | None = None, strength: float | None = None,
                             mask=None, mask_options: dict | None = None, extra_params: dict | None = None):
        """txt2img, and img2img with `inits` (one picture for every image, or one per image of a batch: then the
        batch is that many, as A1111 sets it), inpainting with `mask` (`prepare_inpainting`)."""
        only_variations()
        if prior_model and inits is not None:
            from_text_only("img2img", "use POST /sdapi/v1/txt2img or /v1/images/generations")
        if prior_model and getattr(req, "enable_hr", False):
            from_text_only("hires. fix (enable_hr)", "send the request without enable_hr, at the size wanted")
        if prior_model and float(getattr(req, "subseed_strength", 0) or 0) > 0:
            from_text_only("a variation seed (subseed_strength)", "send the request without subseed_strength")
        init = inits[0] if inits else None
        batch_size = len(inits) if inits and len(inits) > 1 else req.batch_size
        sent = req  # (echoed in `parameters` as sent; `info` carries the texts used, as A1111's)
        if req.styles:  # A1111's prompt styles: merged into the texts before anything reads them
            from imagine.styles import apply_styles, pick_styles

            try:
                chosen = pick_styles(styles or {}, list(req.styles))
            except ValueError as e:
                raise ApiError(422, str(e), "styles") from None
            prompt, negative = apply_styles(req.prompt, req.negative_prompt, chosen)
            update = {"prompt": prompt, "negative_prompt": negative}
            if getattr(req, "hr_prompt", ""):  # (the hires pass's own texts are styled when given, as A1111's)
                update["hr_prompt"] = apply_styles(req.hr_prompt, "", chosen)[0]
            if getattr(req, "hr_negative_prompt", ""):
                update["hr_negative_prompt"] = apply_styles("", req.hr_negative_prompt, chosen)[1]
            req = req.model_copy(update=update)
        check_prompt("prompt", req.prompt)
        check_prompt("negative_prompt", req.negative_prompt)
        steps = defaults["steps"] if req.steps is None else req.steps
        check_int("steps", steps, 1, cfg.max_steps, " (the server's limit)")
        guidance = defaults["guidance_scale"] if req.cfg_scale is None else req.cfg_scale
        check_guidance("cfg_scale", guidance)
        if init is not None and not req.width and not req.height:  # the picture's size, to the model's factor
            f = _size_multiple(pipe)
            width, height = (max(f, v // f * f) for v in init.size)
            if width > cfg.max_width or height > cfg.max_height:  # (A1111's API would run 512 x 512: say what to send)
                raise ApiError(422, f"width: img2img sent without width and height runs at the picture's own size, "
                                    f"{width}x{height}, past the server's limit of {cfg.max_width}x{cfg.max_height}; "
                                    "send width and height (the picture is brought to them by resize_mode)", "width")
        else:
            width = req.width or defaults["width"]
            height = req.height or defaults["height"]
        hires = None
        check_size(height, width)
        if getattr(req, "enable_hr", False) and inits is None:
            hr_strength = A1111_HIRES_DENOISING if req.denoising_strength is None else req.denoising_strength
            if not 0 < hr_strength <= 1:
                raise ApiError(422, f"denoising_strength must be in (0, 1]; got {hr_strength!r}", "denoising_strength")
            check_int("hr_second_pass_steps", req.hr_second_pass_steps, 0, cfg.max_steps, " (the server's limit)")
            # (A1111's second pass lays out int(steps / strength) levels and runs its last steps: within the model's
            # timesteps, said before the first pass runs)
            laid = int((req.hr_second_pass_steps or steps) / min(hr_strength, 0.999))
            T = int(getattr(getattr(pipe, "schedule", None), "num_train_timesteps", 1000))
            if laid > T:
                raise ApiError(422, f"denoising_strength {hr_strength:g} with {req.hr_second_pass_steps or steps} hires "
                                    f"steps lays out {laid} steps, over the model's {T} timesteps: raise "
                                    "denoising_strength or take fewer hires steps", "denoising_strength")
            resize = hires_target(req, height, width)
            upscaler = hires_upscaler(req.hr_upscaler)
            # (A1111's hr_prompt / hr_negative_prompt: the second pass's texts; "" the first pass's), checked as the
            # prompt is, before the job is queued
            check_prompt("hr_prompt", req.hr_prompt)
            check_prompt("hr_negative_prompt", req.hr_negative_prompt)
            if prompt_loras(req.hr_prompt, req.hr_negative_prompt):
                raise ApiError(422, "hr_prompt: <lora:...> tags are read in the prompt; the hires pass keeps the "
                                    "prompt's LoRAs", "hr_prompt")
            hires = Hires(float(req.hr_scale), float(hr_strength), req.hr_second_pass_steps or None, upscaler,
                          req.hr_prompt or None, req.hr_negative_prompt or None, resize)
            strength = float(hr_strength)
        refiner = check_refiner(req)
        check_int("batch_size", batch_size, 1, cfg.max_images, " (the server's limit on images per request)")
        check_int("n_iter", req.n_iter, 1, cfg.max_images, " (the server's limit on images per request)")
        n = batch_size * req.n_iter
        if n > cfg.max_images:
            raise ApiError(422, f"batch_size x n_iter = {n} images; the server's limit is {cfg.max_images} "
                                "images per request", "batch_size")
        sampler_field = "sampler_name" if req.sampler_name else "sampler_index"
        sampler, asked = resolve_sampler(sampler_field, req.sampler_name or req.sampler_index, req.scheduler)
        eta, options, unused = sampler_settings(sampler, req.eta, req.s_tmin, req.s_tmax, req.s_churn, req.s_noise)
        if hires is None:  # (hires. fix runs from text only; its fields sent otherwise are not used)
            unused += [k for k in HIRES_FIELDS if k in req.model_fields_set and (k != "enable_hr" or req.enable_hr)]
            if inits is None and "denoising_strength" in req.model_fields_set:
                unused.append("denoising_strength")
        elif hires.resize and "hr_scale" in req.model_fields_set:  # (a size asked stands for the scale, as in A1111)
            unused.append("hr_scale")
        if "image_cfg_scale" in req.model_fields_set and not getattr(pipe, "edits", False):
            unused.append("image_cfg_scale")  # (an instruct-pix2pix model's)
        asked_options = dict(options)  # (the request's, which the infotext writes as A1111's "Sigma churn"...)
        rng, seed_delta, zero_snr, downcast = a1111_noise(req)  # (its settings checked: eta_ddim, eta_ancestral too)
        eta, eta_shown = a1111_eta(req, sampler, eta)
        run, shown = a1111_run(sampler, asked, eta, options)
        eta, schedule, options = run["eta"], run["sigma_schedule"], run["sampler_options"]
        hires_sampling = hires_shown = None
        if hires is not None:  # A1111's hires sampler and schedule type ("Use same ...": the first pass's)
            same_sampler = req.hr_sampler_name in (None, "", "Use same sampler")
            same_schedule = req.hr_scheduler in (None, "", "Use same scheduler")
            hires_sampler, hires_asked = resolve_sampler(
                "hr_sampler_name", req.sampler_name or req.sampler_index if same_sampler else req.hr_sampler_name,
                req.scheduler if same_schedule else req.hr_scheduler, "hr_scheduler")
            if (hires_sampler, hires_asked) != (sampler, asked):
                if is_cfg_pp(hires_sampler) != is_cfg_pp(sampler):
                    raise ApiError(422, f"hr_sampler_name {req.hr_sampler_name!r}: a CFG++ sampler's guidance is "
                                        f"its lambda (cfg_scale / 12.5), {samplers.a1111_name(sampler)}'s is not: take "
                                        "CFG++ samplers for both passes or for neither", "hr_sampler_name")
                hires_eta, hires_options, hires_unused = sampler_settings(hires_sampler, req.eta, req.s_tmin,
                                                                          req.s_tmax, req.s_churn, req.s_noise)
                hires_eta = a1111_eta(req, hires_sampler, hires_eta)[0]  # (A1111 makes the hires sampler anew)
                # (a field either pass takes is used)
                unused = [k for k in unused if k in hires_unused or k not in SAMPLER_FIELDS]
                hires_run, hires_shown = a1111_run(hires_sampler, hires_asked, hires_eta, hires_options)
                hires_sampling = tuple(sorted(hires_run.items()))
        base = check_seed("seed", req.seed)
        variation = float(req.subseed_strength)
        if not math.isfinite(variation) or not 0 <= variation <= 1:
            raise ApiError(422, f"subseed_strength must be a number in [0, 1]; got {req.subseed_strength}",
                           "subseed_strength")
        # A1111's processing: all_seeds = [seed + (x if subseed_strength == 0 else 0)], all_subseeds = [subseed + x]:
        # with a variation strength every image keeps the seed and only the variation seeds count up; the subseed is
        # drawn (for -1) and reported at strength 0 too
        seeds = [(base + (0 if variation > 0 else i)) % (MAX_SEED + 1) for i in range(n)]
        first = check_seed("subseed", req.subseed)
        all_subseeds = [(first + i) % (MAX_SEED + 1) for i in range(n)]
        subseeds = all_subseeds if variation > 0 else None
        check_int("seed_resize_from_h", req.seed_resize_from_h, -1, cfg.max_height, " (pixels, the server's limit; "
                  "0 or -1: off)")
        check_int("seed_resize_from_w", req.seed_resize_from_w, -1, cfg.max_width, " (pixels, the server's limit; "
                  "0 or -1: off)")
        seed_resize = ((req.seed_resize_from_h, req.seed_resize_from_w)
                       if req.seed_resize_from_h > 0 and req.seed_resize_from_w > 0 else None)
        if downcast:
            try:
                check_downcast(TIMESTEP_RULE[sampler], schedule, samplers.a1111_name(sampler))
                if hires_sampling:
                    check_downcast(TIMESTEP_RULE[hires_sampler], hires_run["sigma_schedule"],
                                   samplers.a1111_name(hires_sampler))
            except ValueError as e:
                raise ApiError(422, f"use_downcasted_alpha_bar: {e}", "override_settings") from None
        units, unit_ignored = check_controlnet(req, inits is not None)
        unit_pictures = await run_in_threadpool(
            lambda: [_decode_image(u["image"], u["field"], rgb=False) if u["image"] else None for u in units])
        inpaint = None
        if mask is not None:
            inpaint = await run_in_threadpool(lambda: prepare_inpainting(inits, mask, width, height, **mask_options))
        elif inits is not None:  # sent without a mask, A1111's inpainting options are not used
            unused = [*unused, *(k for k in INPAINTING_FIELDS if k in req.model_fields_set)]
        # (img2img's pictures are fitted by the pipeline, inpainting's by prepare_inpainting; a ControlNet unit without
        # a picture takes the picture as sent, as the extension takes A1111's init image)
        img2img = isinstance(req, Img2ImgRequest)  # (txt2img's extras may name img2img's fields: not read)
        mode = req.resize_mode if img2img else 0
        resize_mode = RESIZE_MODES[mode]
        encoded_at = None  # (latent upscale: the size the pictures are encoded at, which jobs must share to batch)
        if inits is not None and hasattr(pipe, "check_resize_mode"):
            try:
                if pipe.check_resize_mode(resize_mode, inits, None if mask is None else [mask]):
                    encoded_at = pipe.factor_size(inits[0])
            except ValueError as e:
                raise ApiError(422, f"resize_mode {mode}: {e}", "resize_mode") from None
        if encoded_at is not None and (encoded_at[0] > cfg.max_width or encoded_at[1] > cfg.max_height):
            raise ApiError(422, f"resize_mode 3 (latent upscale) encodes the picture at its own size, "
                                f"{encoded_at[0]}x{encoded_at[1]}; the server's limit is {cfg.max_width}x"
                                f"{cfg.max_height}: send a smaller picture or another resize_mode", "init_images")
        starts = inpaint.inits if inpaint is not None else inits
        hires_size = None
        if hires is not None and units:  # (the extension fits each map to the second pass's size apart: hr_hint_cond)
            from imagine.pipelines.text_to_image import hires_target as target

            f = _size_multiple(pipe)
            (up_h, up_w), (cut_h, cut_w) = target(height, width, hires.scale, hires.resize, f)
            hires_size = (up_w - cut_w * f, up_h - cut_h * f)
            # (its hook runs canny and mlsd units with the soft weights in the hires pass, "to reduce artifacts":
            # "balanced" as "My prompt is more important" there)
            modes = tuple("prompt" if u["mode"] == "balanced" and ("canny" in u["module"] or "mlsd" in u["module"])
                          else u["mode"] for u in units)
            if modes != tuple(u["mode"] for u in units):
                hires = hires._replace(control_modes=modes)
        controls, hires_controls = await run_in_threadpool(
            lambda: control_pictures(units, unit_pictures, n, starts, inpaint, width, height, resize_mode, hires_size))
        # an empty negative prompt is none given: zeros on SDXL, as AUTOMATIC1111 runs it (encoded "" elsewhere)
        job = Job(prompts=[req.prompt] * n, negative_prompts=[req.negative_prompt or None] * n, seeds=seeds,
                  batch_size=batch_size, settings=Settings(height=height, width=width, steps=steps, sampler=sampler,
                                    guidance_scale=a1111_guidance_scale(sampler, guidance),
                                    schedule=schedule, eta=eta, options=options,
                                    sigma_range=run["sigma_range"], start=run["start"],
                                    discard_penultimate_sigma=run["discard_penultimate_sigma"],
                                    strength_rule=run["strength_rule"], hires_sampling=hires_sampling,
                                    emphasis=a1111_emphasis(req), long_prompts=True, prompt_editing=True,
                                    composable=True,
                                    strength=None if hires else strength,
                                    image_guidance_scale=image_guidance(req, inits),
                                    hires=hires, inpainting=inpaint is not None,
                                    loras=prompt_loras(req.prompt, req.negative_prompt),
                                    masked_content=A1111_MASKED_CONTENT.get(int(req.inpainting_fill), "original")
                                    if inpaint is not None else "original",
                                    controlnets=tuple((u["name"], u["weight"], u["start"], u["end"], u["mode"])
                                                      for u in units),
                                    refiner_switch=refiner[1] if refiner else None,
                                    refiner_switch_by_steps=bool(refiner and refiner[2]), subseed_strength=variation,
                                    resize_mode=resize_mode, encoded_at=encoded_at, seed_resize=seed_resize,
                                    rng=rng, noise_seed_delta=seed_delta, zero_terminal_snr=zero_snr,
                                    downcast_alphas_cumprod=downcast,
                                    old_prompt_editing=a1111_old_scheduling(req), pad_conds=a1111_pad_conds(req),
                                    clip_skip=a1111_clip_skip(req)),
                  subseeds=subseeds,
                  # (A1111 fills "latent noise" once for the job, from all_seeds[0:batch_size]: every n_iter round
                  # gets the first round's fill)
                  latent_noise_seeds=[seeds[i % batch_size] for i in range(n)]
                  if inpaint is not None and int(req.inpainting_fill) == 2 else None,
                  init_images=None if not starts else [starts[i % len(starts)] for i in range(n)],
                  masks=None if inpaint is None else [inpaint.masks[i % len(inits)] for i in range(n)],
                  control_images=controls or None, hires_control_images=hires_controls or None)
        if req.force_task_id:
            job.id = str(req.force_task_id)[:200]
        result = await run_job(request, job)
        images = result.images if result is not None else []
        used = result.seeds if result is not None else []
        a_name = samplers.a1111_name(sampler)
        cn_units = [(u["title"], u["weight"], u["start"], u["end"], u["module"], u["resize"],
                     *(u.get("settings", {}).get(k) for k in ("resolution", "low", "high")), u["pixel_perfect"],
                     u["mode"]) for u in units]
        # (the run's guidance scale: for DDIM CFG++ its lambda, which the infotext writes back as A1111's CFG scale)
        skipped_layers = clip_skip if job.settings.clip_skip is None else job.settings.clip_skip
        infotexts = [_infotext(req.prompt, req.negative_prompt, steps, sampler, job.settings.guidance_scale, s, width,
                               height, name, fingerprint, version, vae_name, shown, skipped_layers, strength, hires,
                               inpaint.parameters() if inpaint is not None else None, cn_units, refiner,
                               job.settings.image_guidance_scale if job.settings.image_guidance_scale != 1 else None,
                               (subseeds[i], variation) if subseeds else None, seed_resize, rng, seed_delta,
                               eta_shown, zero_snr, asked_options, downcast,
                               job.settings.old_prompt_editing, hires_sampling and dict(hires_sampling), hires_shown,
                               # (written where a step was padded, as A1111 writes it)
                               job.settings.pad_conds if result is not None and result.parameters.get("padded_conds")
                               else None, {**(pipe.run_record() if hasattr(pipe, "run_record") else {}),
                                           # (A1111's "Lora hashes" / "TI hashes" of the files the run used,
                                           # and its "Emphasis" where not "Original" and a text has brackets)
                                           **{k: result.parameters[k] for k in ("lora_hashes", "ti_hashes", "emphasis")
                                              if result is not None and k in result.parameters},
                                           **(extra_params or {})})
                     for i, s in enumerate(used)]
        encoded = []
        if req.send_images and images:
            if inpaint is not None:  # A1111's paste back: the kept part is the original picture's pixels
                images = await run_in_threadpool(lambda: [inpaint.finish(im, i % len(inits))
                                                          for i, im in enumerate(images)])
            encoded = await run_in_threadpool(lambda: [_b64_png(im, t) for im, t in zip(images, infotexts)])
        mask_info = {}
        if mask is not None:  # as sent, with what was done ("Only masked" is off when the mask was blank)
            o = mask_options
            mask_info = {"mask_blur": o["blur"] if o["blur"] == o["blur_y"] else None,  # (A1111's mask_blur)
                         "inpainting_fill": o["fill"], "inpainting_mask_invert": o["invert"],
                         "inpaint_full_res": inpaint is not None and inpaint.full_res,
                         "inpaint_full_res_padding": o["padding"]}
        info = {
            "prompt": req.prompt, "all_prompts": [req.prompt] * len(used),
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(used),
            "seed": seeds[0], "all_seeds": used, "subseed": all_subseeds[0], "all_subseeds": all_subseeds[:len(used)],
            "subseed_strength": variation, "width": width, "height": height, "sampler_name": a_name, "sampler": sampler,
            "scheduler": asked or "automatic", "cfg_scale": guidance, "steps": steps,
            "batch_size": batch_size, "n_iter": req.n_iter, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": name, "sd_model_hash": fingerprint[:10],
            "sd_vae_name": vae_name, "sd_vae_hash": None, "seed_resize_from_w": req.seed_resize_from_w,
            "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": strength,
            "extra_generation_params": {**(inpaint.extra_generation_params() if inpaint is not None else {}),
                                        **{f"ControlNet {i}": controlnet_unit_text(*unit)
                                           for i, unit in enumerate(cn_units)},
                                        **({"Refiner": refiner[0], "Refiner switch at": refiner[1]} if refiner
                                           else {}),
                                        **({"Refiner switch by sampling steps": True} if refiner and refiner[2]
                                           else {})},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": list(req.styles),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1 + skipped_layers,
            "is_using_inpainting_conditioning": bool(getattr(pipe, "image_conditioned", False)),
            "version": f"imagine {version}", **mask_info,
            "task_id": job.id, "interrupted": result is None or result.interrupted,
            "skipped": bool(result and result.skipped),
            # (a null is a field not sent, A1111's Optional: not listed)
            "ignored_fields": sorted([*(k for k, v in (req.model_extra or {}).items() if v is not None and not (
                                        k in ("alwayson_scripts", "override_settings") and isinstance(v, dict))),
                                      *(f"override_settings.{k}" for k in request_overrides(req)
                                        if k not in A1111_OVERRIDES_READ),
                                      *unused, *unit_ignored]),
            "seconds": round(result.seconds, 3) if result else 0.0,
            "batch_images": result.batch_images if result else 0,
        }
        dumped = sent.model_dump()
        if init is not None:
            dumped["init_images"] = [f"<{len(x)} base64 characters>" for x in req.init_images]  # not echoed back
        if isinstance(req, Img2ImgRequest) and req.mask:
            dumped["mask"] = f"<{len(req.mask)} base64 characters>"
        if units:  # the control pictures are not echoed back either
            dumped["alwayson_scripts"] = _without_pictures(dumped.get("alwayson_scripts"))
        parameters = {**dumped, "steps": steps, "cfg_scale": guidance, "width": width, "height": height,
                      "sampler_name": a_name}
        return {"images": encoded, "parameters": jsonable_encoder(parameters), "info": json.dumps(info)}

    # -- AUTOMATIC1111's ControlNet extension -------------------------------------------------------
    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True):
        return {"model_list": list(controlnet_titles().values())}

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": 2}  # the extension's API version

    @app.get("/controlnet/module_list")
    def controlnet_module_list(alias_names: bool = False):
        """The preprocessors imagine runs (imagine.preprocessors), as the extension lists its own."""
        names, detail = [], {}
        for name, (label, _, sliders) in preprocessors.PREPROCESSORS.items():
            key = label if alias_names else name
            names.append(key)
            detail[key] = {"model_free": False, "sliders": [
                {"name": sl[0], "value": sl[1], "min": sl[2], "max": sl[3], "step": sl[4]}
                for sl in sliders if sl is not None]}
        return {"module_list": names, "module_detail": detail}

    @app.post("/controlnet/detect")
    async def controlnet_detect(req: DetectRequest):
        """The extension's preview of a preprocessor: each picture's map at the preprocessor's resolution."""
        try:
            module = preprocessors.find_preprocessor(req.controlnet_module)
        except ValueError as e:
            raise ApiError(422, str(e), "controlnet_module") from None
        if not req.controlnet_input_images:
            raise ApiError(422, "controlnet_input_images: no image given (base64 pictures)", "controlnet_input_images")
        if len(req.controlnet_input_images) > cfg.max_images:
            raise ApiError(422, f"controlnet_input_images: at most {cfg.max_images} pictures (the server's limit)",
                           "controlnet_input_images")
        for v, field in ((req.controlnet_processor_res, "controlnet_processor_res"),
                         (req.controlnet_threshold_a, "controlnet_threshold_a"),
                         (req.controlnet_threshold_b, "controlnet_threshold_b")):
            if not math.isfinite(v):
                raise ApiError(422, f"{field} must be a finite number (-1: the preprocessor's default)", field)
        res = min(req.controlnet_processor_res, max(cfg.max_width, cfg.max_height))

        def run():
            maps = []
            for i, data in enumerate(req.controlnet_input_images):
                picture = _decode_image(data, f"controlnet_input_images[{i}]", rgb=False)
                try:
                    made = preprocessors.preprocess(module, picture, res, req.controlnet_threshold_a,
                                                    req.controlnet_threshold_b)
                except ValueError as e:
                    raise ApiError(422, f"controlnet_input_images[{i}]: {e}", "controlnet_input_images") from None
                maps.append(_b64_png(made))
            return maps

        return {"images": await run_in_threadpool(run), "info": "Success"}

    @app.get("/sdapi/v1/samplers")
    def get_samplers():
        # (options: A1111's "scheduler", the schedule type its "Automatic" picks for the sampler where that is not
        # k-diffusion's own levels, as A1111 lists it; and the sampler's name here)
        def options(s: str) -> dict:
            pick = a1111_named_pick(s)
            return {"imagine": s, **({"scheduler": A1111_SCHEDULE_NAMES.get(pick, pick)} if pick else {})}

        out = [{"name": n, "aliases": a, "options": options(s)} for n, a, s in samplers.a1111]
        out += [{"name": s, "aliases": [], "options": {"imagine": s}} for s in samplers.ours
                if s not in {x for _, _, x in samplers.a1111}]
        return out

    @app.get("/sdapi/v1/schedulers")
    def get_schedulers():
        rho = {"karras": 7.0, "polyexponential": 1.0}
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}] + [
                {"name": A1111_SCHEDULE_NAMES.get(k, k), "label": SCHEDULE_LABELS[k],
                 "aliases": ["SGMUniform"] if k == "sgm_uniform" else None, "default_rho": rho.get(k, -1),
                 "need_inner_model": k in MODEL_SIGMA_SCHEDULES} for k in schedule_types]

    @app.get("/sdapi/v1/sd-models")
    def get_sd_models():
        models = [{"title": title, "model_name": checkpoint_model_name, "hash": fingerprint[:10], "sha256": fingerprint,
                   "filename": source, "config": None}]
        refiner = getattr(pipe, "refiner", None)
        if refiner is not None:  # (A1111 lists its refiner among the checkpoints: clients pick refiner_checkpoint here)
            stem = Path(refiner.c.source).stem
            models.append({"title": stem, "model_name": stem, "hash": None, "sha256": None,
                           "filename": str(refiner.c.source), "config": None})
        return models

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None

    @app.get("/sdapi/v1/options")
    def get_options():
        return options

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest):
        """A picture's generation parameters as A1111's PNG Info reads them: `info`, its infotext (the PNG's
        "parameters" text); `items`, its other text chunks (imagine's JSON among them); `parameters`, the infotext
        read as A1111 reads it, with A1111's values for the fields it lacks (imagine.images.parse_a1111_parameters)."""
        from PIL import Image, UnidentifiedImageError

        from imagine.images import parse_a1111_parameters, picture_infotext

        data = req.image.strip()
        if not data:
            return {"info": "", "items": {}, "parameters": {}}
        raw = data.split(",", 1)[1] if data.startswith("data:") else data
        try:  # (opened, not decoded: the text chunks and EXIF are read with the header, the pixels never)
            with Image.open(io.BytesIO(base64.b64decode(raw, validate=False))) as picture:
                info = picture_infotext(picture) or ""
                items = {k: v for k, v in picture.info.items()
                         if isinstance(v, str) and k not in _PICTURE_INFO_KEYS and k != "parameters"}
        except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ApiError(422, f"image: not a base64 image Pillow can read ({type(e).__name__})", "image") from None
        try:
            parameters = parse_a1111_parameters(info, defaults=True)
        except ValueError as e:
            raise ApiError(422, f"image: {e}", "image") from None
        return {"info": info, "items": items, "parameters": parameters}

    @app.post("/imagine/v1/infotext")
    def infotext(req: InfotextRequest):
        """An infotext given as text, read as /sdapi/v1/png-info reads a picture's: for the page's "read parameters
        from the prompt" (A1111's paste button, which reads an infotext pasted into the prompt box). `parameters`
        holds A1111's values for the fields it lacks; `has_settings` says whether it had a settings line ("Steps: 20,
        Sampler: ...", three fields or more, as A1111 tells one) at all: plain prompt text has none."""
        from imagine.images import parse_a1111_parameters

        text = req.text.strip()
        try:
            read = parse_a1111_parameters(text) if text else {}
            parameters = parse_a1111_parameters(text, defaults=True) if text else {}
        except ValueError as e:
            raise ApiError(422, f"text: {e}", "text") from None
        return {"info": text, "parameters": parameters, "has_settings": any(k not in ("Prompt", "Negative prompt") for k in read)}

    def apply_options(body: dict) -> None:
        """A1111's settings set (POST /sdapi/v1/options; imagine serve --ckpt-dir carries them to the next model): an
        ApiError naming a bad one, and then none is set."""
        want = body.get("sd_model_checkpoint")
        # (its names as A1111 takes them: title, name, model name, hash)
        if want is not None and want not in (title, name, checkpoint_model_name, fingerprint[:10], fingerprint):
            raise ApiError(422, f"this server serves one model, {title!r}; cannot switch to {want!r} (imagine serve "
                                "--ckpt-dir DIR serves a folder of them)", "sd_model_checkpoint")
        body = {k: v for k, v in body.items() if k != "sd_model_checkpoint"}
        # (checked with the options kept: a pair that cannot run may come half from each; a whole-number delta made
        # an int there)
        checked = check_noise_settings({**options, **body}, "options")
        options.update({k: checked[k] for k in body})

    app.state.apply_options = apply_options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:  # (NaN and Infinity refused here too, whatever the body's content type: a stored one breaks GET options)
            body = json.loads(await request.body(), parse_constant=_not_json)
        except _NotJson as e:
            raise ApiError(422, f"the body holds {e}, which is not a JSON number (JSON has no NaN or "
                                "Infinity)") from None
        except ValueError as e:
            raise ApiError(422, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"options must be a JSON object of option names to values; got {type(body).__name__}")
        apply_options(body)
        return None

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return {"listen": bool(getattr(app.state, "listen", False)), "api": True, "nowebui": False}

    @app.get("/sdapi/v1/scripts")
    def get_scripts():  # the ControlNet extension is there when ControlNets are loaded (clients look for it)
        if worker.controlnets():
            return {k: [*v, "controlnet"] for k, v in _A1111_SCRIPTS.items()}
        return _A1111_SCRIPTS

    @app.get("/sdapi/v1/script-info")
    def get_script_info():
        return []

    @app.get("/sdapi/v1/embeddings")
    def get_embeddings():  # A1111's shape: name -> {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}
        encoder = getattr(pipe, "text_encoder", None)
        loaded = {}
        for word in getattr(pipe, "embeddings", []):
            n = len(encoder.expansions.get(word, word).split()) if encoder is not None else 1
            loaded[word] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                            "shape": getattr(encoder, "dim", None), "vectors": n}
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/memory")
    def get_memory():
        import os

        try:
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            avail = os.sysconf("SC_AVPHYS_PAGES")
            ram = {"total": pages * size, "free": avail * size, "used": (pages - avail) * size}
        except (ValueError, OSError, AttributeError):
            ram = {"error": "unknown"}
        return {"ram": ram, "cuda": {"error": "no CUDA: imagine runs on the CPU"}}

    @app.get("/sdapi/v1/loras")
    def loras():  # merged at start (imagine serve --lora: every request), then the files a prompt can ask for
        merged = [{"name": n, "alias": n, "path": "", "metadata": {},  # (strength: the text encoders'; unet_strength)
                   "strength": s if isinstance(s, (int, float)) else s[0],
                   "unet_strength": s if isinstance(s, (int, float)) else s[1]} for n, s in getattr(pipe, "loras", [])]
        folder = getattr(pipe, "lora_dir", None)
        available = getattr(pipe, "available_loras", lambda: [])()
        return merged + [{"name": n, "alias": n, "path": str(folder), "metadata": {}} for n in available
                         if n not in {m["name"] for m in merged}]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return [{"model_name": vae_name, "filename": vae_source}] if vae_name else []

    for _path in _EMPTY_LISTS:
        app.add_api_route(f"/sdapi/v1/{_path}", lambda: [], methods=["GET"])

    @app.get("/sdapi/v1/upscalers")
    def upscalers():  # A1111's list (its sd_upscalers): the picture upscalers, then the models of --upscaler-dir
        from imagine.pipelines.text_to_image import HIRES_UPSCALERS, LATENT_UPSCALE_MODES
        from imagine.upscalers import A1111_NAMES, find_upscalers

        folder = getattr(pipe, "upscaler_dir", None)
        files = find_upscalers(folder) if folder is not None else {}
        # (A1111's scale field: 4 for ESRGAN models whatever they are, Real-ESRGAN's and DAT's own for theirs)
        return ([{"name": label, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for key, label in HIRES_UPSCALERS.items() if key not in LATENT_UPSCALE_MODES]
                + [{"name": A1111_NAMES.get(stem, stem), "model_name": stem, "model_path": str(path),
                    "model_url": None, "scale": {"DAT_x3": 3}.get(stem, 2 if "x2" in stem else 4)}
                   for stem, path in files.items()])

    @app.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models():  # A1111's list of its Real-ESRGAN upscalers that are on disk
        from imagine.upscalers import A1111_REALESRGAN_NAMES, find_upscalers

        folder = getattr(pipe, "upscaler_dir", None)
        files = find_upscalers(folder) if folder is not None else {}
        return [{"name": A1111_REALESRGAN_NAMES[stem], "path": str(path), "scale": 2 if "x2" in stem else 4}
                for stem, path in files.items() if stem in A1111_REALESRGAN_NAMES]

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(req: ExtrasSingleRequest, request: Request):
        """A1111's Extras on one picture (its run_extras through the postprocessing upscale script): the picture
        enlarged by upscaler_1 (and upscaler_2 blended in at extras_upscaler_2_visibility), by upscaling_resize
        (resize_mode 0) or to upscaling_resize_w x upscaling_resize_h (resize_mode 1; upscaling_crop: cut to it,
        centred). Its PNG keeps the picture's text chunks and adds "postprocessing"."""
        images, info = await run_extras(req, [(req.image, "image")], request)
        return {"html_info": info, "image": images[0]}

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchRequest, request: Request):
        """A1111's Extras on a list of pictures (imageList: [{"data": base64, "name": ...}])."""
        items = [(item.get("data") if isinstance(item, dict) else None, f"imageList[{i}].data")
                 for i, item in enumerate(req.imageList)]
        images, info = await run_extras(req, items, request)
        return {"html_info": info, "images": images}

    async def run_extras(req, items: list, request: Request) -> tuple[list[str], str]:
        from imagine.upscalers import a1111_upscale

        if not items:
            raise ApiError(422, "imageList: give at least one picture", "imageList")
        if len(items) > cfg.max_images:
            raise ApiError(422, f"imageList: {len(items)} pictures; up to {cfg.max_images} a request (the server's "
                                "limit)", "imageList")
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(req, field):
                raise ApiError(422, f"{field}: this server has no face restorers (/sdapi/v1/face-restorers lists "
                                    "none); send 0", field)
        if req.resize_mode not in (0, 1):
            raise ApiError(422, f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x "
                                f"upscaling_resize_h); got {req.resize_mode}", "resize_mode")
        if req.resize_mode == 0 and not (math.isfinite(req.upscaling_resize) and 0 < req.upscaling_resize <= 8):
            raise ApiError(422, f"upscaling_resize must be in (0, 8] (A1111's slider); got {req.upscaling_resize}",
                           "upscaling_resize")
        if req.resize_mode == 1:
            for field in ("upscaling_resize_w", "upscaling_resize_h"):
                check_int(field, getattr(req, field), 1, 8192, "")
        if not 0 <= req.extras_upscaler_2_visibility <= 1:
            raise ApiError(422, f"extras_upscaler_2_visibility must be in [0, 1]; got "
                                f"{req.extras_upscaler_2_visibility}", "extras_upscaler_2_visibility")

        def upscaler(name, field):
            if name in (None, "", "None"):
                return None
            if name.lower() in ("lanczos", "nearest"):
                return name.capitalize()
            model = upscaler_model(name, field)
            if model is None:
                raise ApiError(422, f"{field}: no upscaler named {name!r}; valid: "
                                    f"{', '.join(['None', 'Lanczos', 'Nearest', *upscaler_models()])}", field)
            return model

        first, second = upscaler(req.upscaler_1, "upscaler_1"), upscaler(req.upscaler_2, "upscaler_2")
        pictures = []
        for data, field in items:
            picture = _decode_image(data, field)
            size = picture.size if req.resize_mode == 0 else (req.upscaling_resize_w, req.upscaling_resize_h)
            grows = req.upscaling_resize if req.resize_mode == 0 else max(size[0] / picture.width,
                                                                          size[1] / picture.height)
            if int(picture.width * grows) * int(picture.height * grows) > MAX_PICTURE_PIXELS:
                raise ApiError(422, f"{field}: enlarged {grows:g} times the picture would be past "
                                    f"{MAX_PICTURE_PIXELS:,} pixels", field)
            pictures.append((picture, grows, _png_texts(data)))
        if first is None:  # (A1111's upscale script does nothing without an upscaler_1)
            return [_b64_png_texts(p, texts) for p, _, texts in pictures], ""
        name = lambda u: u if isinstance(u, str) else u.a1111_name  # noqa: E731
        how = (f"Postprocess upscale by: {req.upscaling_resize:g}" if req.resize_mode == 0 else
               f"Postprocess upscale to: {req.upscaling_resize_w}x{req.upscaling_resize_h}")
        info = f"{how}, Postprocess upscaler: {name(first)}"
        if second is not None and req.extras_upscaler_2_visibility > 0:
            info += f", Postprocess upscaler 2: {name(second)}"

        def work(_pipe, run):
            from PIL import Image

            out = []
            for picture, grows, texts in pictures:
                run.check()
                done = a1111_upscale(picture, grows, first)
                if second is not None and req.extras_upscaler_2_visibility > 0:
                    other = a1111_upscale(picture, grows, second)
                    done = Image.blend(done, other.convert(done.mode), req.extras_upscaler_2_visibility)
                if req.resize_mode == 1 and req.upscaling_crop:  # (cut to the size, centred, as A1111's script)
                    w, h = req.upscaling_resize_w, req.upscaling_resize_h
                    cut = Image.new("RGB", (w, h))
                    cut.paste(done, box=(w // 2 - done.width // 2, h // 2 - done.height // 2))
                    done = cut
                out.append(_b64_png_texts(done, {**texts, "postprocessing": info}))
            return out

        job = Job(prompts=[""], negative_prompts=[""], seeds=[0], call=work,
                  settings=Settings(height=0, width=0, steps=1, sampler="euler", guidance_scale=1.0))
        images = await run_job(request, job)
        if images is None:
            raise ApiError(409, "interrupted before the pictures were enlarged")
        return images, f"<p>{html.escape(info)}</p>"

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():  # A1111's (shared.latent_upscale_modes), all run here
        from imagine.pipelines.text_to_image import HIRES_UPSCALERS, LATENT_UPSCALE_MODES

        return [{"name": HIRES_UPSCALERS[key]} for key in LATENT_UPSCALE_MODES]

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():  # A1111's list (`imagine serve --styles`)
        return [{"name": st.name, "prompt": st.prompt, "negative_prompt": st.negative_prompt}
                for st in (styles or {}).values()]

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return None

    @app.post("/sdapi/v1/skip")
    def skip():
        """A1111's skip (state.skip()): the running chunk, one forward pass of images (an n_iter round), stops at its
        next step and keeps its images as they are; the batch's later chunks run."""
        worker.skip()
        return None

    @app.post("/imagine/v1/cancel")
    async def cancel(id_task: str):
        """Stop one request's job by its task id (force_task_id), leaving other requests' jobs alone, where A1111's
        /sdapi/v1/interrupt stops whatever runs. Per job, its state: "cancelled" (it was waiting: dropped, its request
        answers 499), "interrupted" (it runs, alone or with jobs of the same id only: stopped at its next step, its
        request answers with the images so far, as after /sdapi/v1/interrupt), "cancelling" (it runs in one batch
        with other requests' jobs: they go on, its request answers 499 when the batch ends). 404: no such job waits or
        runs. (Run on the event loop, as run_job is: the registry changes under neither.)"""
        jobs = list(active.get(id_task, []))
        if not jobs:
            raise ApiError(404, f"no job with id_task {id_task!r} waits or runs (finished, cancelled, or never "
                                "submitted)", "id_task")
        states = []
        for job in jobs:
            if job in worker.running() and worker.interrupt(id_task):  # (a batch of this id's jobs only)
                states.append("interrupted")
                continue
            state = worker.cancel(job)
            if state in ("queued", "running"):
                cancel_asked.add(job)
            states.append({"queued": "cancelled", "running": "cancelling"}.get(state, state))
        return {"id_task": id_task, "states": states}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False, id_task: str | None = None):
        p = worker.progress
        running = worker.running()
        queued = worker.queued()
        state = {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False,
                 "job": ",".join(p.job_ids), "job_count": len(running) + queued,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.started or time.time())),
                 "job_no": p.chunk, "sampling_step": p.step, "sampling_steps": p.steps}
        out = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
               "current_task": p.job_ids[0] if p.job_ids else None, "queued": queued}
        position = worker.position(id_task) if id_task else 0 if running else None
        if id_task:
            out["completed"] = position is None and worker.ended(id_task)
            if out["completed"]:  # (all of it done: a poll between its last step and its end never reads a drop)
                out["progress"] = 1.0
            if position is None or position > 0:
                out["textinfo"] = (f"waiting: position {position} in the queue" if position
                                   else "finished" if out["completed"] else "unknown task")
                return out
        if not running or not p.steps:
            return out
        # (hires. fix: two passes a chunk, each half of it, as A1111 counts them)
        passes = max(1, p.passes)
        done = (p.chunk * passes + int(p.hires_pass) + p.step / p.steps) / max(1, p.chunks * passes)
        elapsed = time.time() - p.started
        out["progress"] = round(done, 4)
        out["eta_relative"] = round(elapsed / done - elapsed, 3) if done > 0 else 0.0
        out["textinfo"] = (f"step {p.step}/{p.steps}" + (", hires pass" if p.hires_pass else "")
                           + (f", batch {p.chunk + 1}/{p.chunks}" if p.chunks > 1 else ""))
        if not skip_current_image and options.get("live_previews_enable", True) and p.denoised is not None:
            step = f"{p.started}:{p.version}"
            with preview_lock:  # at most one decode per row and sampler step, however many pollers
                if preview_cache["step"] != step:
                    preview_cache.update(step=step, rows={})
                row = worker.preview_row(id_task)
                if row not in preview_cache["rows"]:
                    img = worker.preview(id_task)
                    preview_cache["rows"][row] = _b64_png(img) if img is not None else None
                out["current_image"] = preview_cache["rows"][row]
        return out

    # -- OpenAI ------------------------------------------------------------------------------
    def openai_settings(prompt: str, negative: str, n, size, steps, guidance_scale, sampler, seed,
                        own_size: tuple[int, int], response_format=None, output_format=None):
        """The checked settings of an OpenAI images request (generations, edits, variations): (height, width,
        steps, guidance, sampler, schedule, seeds). size "auto" (or none) is `own_size`."""
        if response_format not in (None, "b64_json"):
            raise ApiError(400, f"response_format {response_format!r} is not supported: this server keeps no "
                                "files to link to; use response_format='b64_json'", "response_format")
        if output_format not in (None, "png"):
            raise ApiError(400, f"output_format {output_format!r} is not supported; use 'png'", "output_format")
        check_prompt("prompt", prompt)
        check_prompt("negative_prompt", negative)
        check_int("n", n, 1, cfg.max_images, " (the server's limit on images per request)")
        height, width = own_size
        if size not in (None, "auto"):
            m = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", size)  # (int() of 5000 digits raises)
            if not m:
                raise ApiError(422, f"size must be 'WIDTHxHEIGHT' (e.g. '{width}x{height}') or 'auto'; "
                                    f"got {size!r}", "size")
            width, height = int(m.group(1)), int(m.group(2))
        try:
            check_size(height, width)
        except ApiError as e:
            e.field, e.message = "size", f"size {width}x{height}: {e.message}"
            raise
        steps = defaults["steps"] if steps is None else steps
        check_int("steps", steps, 1, cfg.max_steps, " (the server's limit)")
        sampler, schedule = resolve_sampler("sampler", sampler)
        # (a CFG++ sampler's default is its lambda: the default CFG scale mapped as A1111 maps it)
        guidance = (default_guidance_scale(defaults["guidance_scale"], sampler) if guidance_scale is None
                    else guidance_scale)
        check_guidance("guidance_scale", guidance)
        base = check_seed("seed", -1 if seed is None else seed)
        return height, width, steps, guidance, sampler, schedule, [(base + i) % (MAX_SEED + 1) for i in range(n)]

    async def openai_answer(request: Request, job: Job, prompt: str, negative: str, originals=None) -> dict:
        """Run an OpenAI images job; answer {created, data: [{b64_json, seed}], output_format, size}. `originals`:
        (picture, mask) for an edit, whose kept part is the picture's own pixels in the answer."""
        s = job.settings
        result = await run_job(request, job)
        if result is None or result.interrupted:
            raise ApiError(409, "the generation was interrupted (POST /sdapi/v1/interrupt) before it finished",
                           kind="interrupted")

        def encode():
            out = []
            for im, seed in zip(result.images, result.seeds):
                if originals is not None and originals[1] is not None:  # the kept part: the picture's own pixels
                    picture, mask = (x.resize(im.size, Image.LANCZOS) for x in originals)
                    im = Image.composite(im, picture.convert("RGB"), mask.point(lambda v: 255 if v > 127 else 0))
                text = _infotext(prompt, negative, s.steps, s.sampler, s.guidance_scale, seed, s.width, s.height,
                                 name, fingerprint, version, vae_name, s.schedule, clip_skip, s.strength)
                out.append({"b64_json": _b64_png(im, text), "seed": seed})
            return out

        from PIL import Image

        data = await run_in_threadpool(encode)
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{s.width}x{s.height}"}

    def only_variations() -> None:
        """422 for a request other than OpenAI's variations when the model is an unCLIP decoder, which makes
        variations of a picture and nothing else (or another model a picture conditions throughout, which no
        endpoint serves)."""
        what = getattr(pipe, "picture_model", None)
        if what:
            hint = ("it makes variations of a picture; use POST /v1/images/variations" if unclip_model else
                    "no endpoint of this server runs it; serve a text-to-image model")
            raise ApiError(422, f"this server's model is {what}: {hint}")

    def from_text_only(what: str, hint: str = "use POST /sdapi/v1/txt2img or /v1/images/generations") -> None:
        """422 for what an unCLIP text-to-image model (a diffusion prior and decoder) does not do: it makes images
        from text alone."""
        raise ApiError(422, f"this server's model is an unCLIP text-to-image model (a diffusion prior and decoder): it "
                            f"makes images from text, so {what} is not for it; {hint}")

    @app.post("/v1/images/generations")
    async def images_generations(req: ImageGenerationRequest, request: Request):
        only_variations()
        if not req.prompt.strip():
            raise ApiError(422, "prompt must not be empty", "prompt")
        negative = req.negative_prompt or ""
        height, width, steps, guidance, sampler, schedule, seeds = openai_settings(
            req.prompt, negative, req.n, req.size, req.steps, req.guidance_scale, req.sampler, req.seed,
            (defaults["height"], defaults["width"]), req.response_format, req.output_format)
        job = Job(prompts=[req.prompt] * req.n, negative_prompts=[negative or None] * req.n, seeds=seeds,
                  settings=Settings(height=height, width=width, steps=steps, sampler=sampler,
                                    guidance_scale=float(guidance), schedule=schedule, long_prompts=True,
                                    loras=prompt_loras(req.prompt, negative)))
        return await openai_answer(request, job, req.prompt, negative)

    async def openai_picture_form(request: Request, what: str) -> tuple[dict, object, object]:
        """An OpenAI images.edit / create_variation multipart body -> (its text fields, the picture, the mask file's
        picture or None), pictures with their transparency kept; 400 naming what is wrong."""
        try:
            form = await request.form()
        except Exception:  # (not multipart/form-data, or a broken body)
            raise ApiError(400, f"{what} takes multipart/form-data: image (a PNG file), prompt, ...") from None
        files = [f for key in ("image", "image[]") for f in form.getlist(key)]
        if not files or any(isinstance(f, str) for f in files):
            raise ApiError(400, "image: a picture file (PNG) is required", "image")
        if len(files) > 1:
            raise ApiError(400, f"image: {len(files)} pictures given; this server edits one picture", "image")

        async def picture(upload, field):
            data = await upload.read()
            if len(data) > cfg.max_body_bytes:
                raise ApiError(413, f"{field}: {len(data)} bytes; the server's limit is {cfg.max_body_bytes}", field)
            with _opened_picture(data, field, "not a picture Pillow can read", 400) as im:
                return im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")

        mask = form.get("mask")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return fields, await picture(files[0], "image"), (await picture(mask, "mask") if mask is not None and
                                                          not isinstance(mask, str) else None)

    def form_number(fields: dict, key: str, kind=float):
        v = fields.get(key)
        if v in (None, ""):
            return None
        try:
            return kind(v)
        except ValueError:
            raise ApiError(422, f"{key} must be {'an integer' if kind is int else 'a number'}; got {v!r}", key) from None

    async def openai_picture_job(request: Request, fields: dict, picture, mask, prompt: str, strength_default: float):
        """The job of an edit or a variation: inpainting where `mask` (white: paint anew) is given, else image to
        image at `strength`."""
        from PIL import Image

        negative = fields.get("negative_prompt") or ""
        n = form_number(fields, "n", int)
        f = _size_multiple(pipe)
        # (an unCLIP decoder's variations, the only job it takes, are at the model's own size; image to image keeps
        # the picture's)
        own = (defaults["height"], defaults["width"]) if unclip_model else \
            tuple(max(f, v // f * f) for v in (picture.height, picture.width))
        height, width, steps, guidance, sampler, schedule, seeds = openai_settings(
            prompt, negative, 1 if n is None else n, fields.get("size"), form_number(fields, "steps", int),
            form_number(fields, "guidance_scale"), fields.get("sampler"), form_number(fields, "seed", int), own,
            fields.get("response_format"), fields.get("output_format"))
        strength = form_number(fields, "strength")
        strength = (1.0 if mask is not None else strength_default) if strength is None else strength
        if not 0 < strength <= 1:
            raise ApiError(422, f"strength must be in (0, 1]; got {strength}", "strength")
        noise_level = None
        if unclip_model:  # unCLIP's variations (DALL-E 2's own kind): the picture's CLIP embedding, noised to noise_level
            noise_level = form_number(fields, "noise_level", int)
            noise_level = 0 if noise_level is None else noise_level
            noising = pipe.c.image_noise_schedule  # (None: a decoder that reads the embedding unnoised, Karlo's)
            try:
                check_level(noise_level, noising.num_train_timesteps - 1 if noising is not None else 0)
            except ValueError as e:
                raise ApiError(422, str(e) + ("" if noising is not None else " (this model's decoder reads the "
                                              "picture's CLIP embedding unnoised)"), "noise_level") from None
        k = len(seeds)
        rgb = picture.convert("RGB")
        if picture.mode == "RGBA" and mask is None:  # (what lies under transparent pixels is not the picture: white)
            rgb = Image.alpha_composite(Image.new("RGBA", picture.size, (255, 255, 255, 255)), picture).convert("RGB")
        job = Job(prompts=[prompt] * k, negative_prompts=[negative or None] * k, seeds=seeds,
                  settings=Settings(height=height, width=width, steps=steps, sampler=sampler,
                                    guidance_scale=float(guidance), schedule=schedule, long_prompts=True,
                                    strength=None if unclip_model else float(strength), inpainting=mask is not None,
                                    loras=prompt_loras(prompt, negative), noise_level=noise_level),
                  init_images=[rgb] * k, masks=None if mask is None else [mask] * k)
        return await openai_answer(request, job, prompt, negative, (rgb, mask))

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        """OpenAI's images.edit: `image` edited as `prompt` says. With a `mask` (a PNG of the picture's size), its
        fully transparent pixels (alpha 0) are painted anew and the rest kept, the picture's own pixels; without
        one, the picture's own fully transparent pixels, as DALL-E 2 reads them; a picture with none is redrawn
        whole by image to image (strength 0.75, A1111's default; `strength` in the form). Ours, as form fields:
        negative_prompt, seed, steps, guidance_scale, sampler, strength."""
        only_variations()
        if prior_model:
            from_text_only("an edit of a picture")
        fields, picture, mask_picture = await openai_picture_form(request, "images.edit")
        prompt = fields.get("prompt") or ""
        if not prompt.strip():
            raise ApiError(400, "prompt: the edit's instruction is required", "prompt")
        source = mask_picture if mask_picture is not None else picture
        if mask_picture is not None and mask_picture.size != picture.size:
            raise ApiError(400, f"mask: {mask_picture.size[0]}x{mask_picture.size[1]}, but the image is "
                                f"{picture.size[0]}x{picture.size[1]}; they must be the same size", "mask")
        if mask_picture is not None and source.mode != "RGBA":
            raise ApiError(400, "mask: its fully transparent pixels say where to edit; give a PNG with transparency",
                           "mask")
        mask = None
        if source.mode == "RGBA":
            alpha = source.getchannel("A")
            if alpha.getextrema()[0] == 0:  # some pixel fully transparent
                mask = alpha.point(lambda v: 255 if v == 0 else 0)
            elif mask_picture is not None:
                raise ApiError(400, "mask: no pixel is fully transparent (alpha 0), so there is nothing to edit",
                               "mask")
        return await openai_picture_job(request, fields, picture, mask, prompt, 0.75)

    @app.post("/v1/images/variations")
    async def images_variations(request: Request):
        """OpenAI's images.create_variation: image to image from `image` with no prompt (strength 0.6; `prompt` and
        `strength` in the form if wanted), n pictures of its kind; with an unCLIP decoder (SD 2.1 unCLIP), unCLIP's
        own variations, from the picture's CLIP embedding (`noise_level` in the form, default 0)."""
        if prior_model:
            from_text_only("a variation of a picture")
        fields, picture, _ = await openai_picture_form(request, "images.create_variation")
        return await openai_picture_job(request, fields, picture, None, fields.get("prompt") or "", 0.6)

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "imagine"}]}

    # -- ours: the page's settings, counters -------------------------------------------------
    @app.get("/imagine/v1/config")
    def get_config():
        return {"model": title, "version": version, "defaults": {**defaults,
                                                                 "sampler": samplers.a1111_name(defaults["sampler"])},
                "limits": {"max_width": cfg.max_width, "max_height": cfg.max_height, "max_steps": cfg.max_steps,
                           "max_images": cfg.max_images, "max_prompt_length": cfg.max_prompt_length},
                "size_multiple": _size_multiple(pipe), "samplers": samplers.names(),
                # (an unCLIP decoder makes variations of a picture alone: the page sends them to OpenAI's endpoint)
                "variations_only": unclip_model,
                # (the fields A1111's PNG Info reader fills in where an infotext has none: the page reads a picture's
                # field at its default as asking for nothing)
                "infotext_defaults": A1111_INFOTEXT_DEFAULTS}

    @app.get("/imagine/v1/stats")
    def get_stats():
        return {**{k: worker.stats.get(k, 0) for k in ("accepted", "rejected", "completed", "failed", "cancelled",
                                                        "interrupted", "batches")},
                "queued": worker.queued(), "running": len(worker.running()), "queue_size": cfg.queue_size,
                "max_batch": cfg.max_batch}

    # -- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _without_pictures(value):
    """A request's alwayson_scripts with the ControlNet units' base64 pictures shown by their length."""
    if isinstance(value, dict):
        return {k: (f"<{len(v)} base64 characters>" if k in ("image", "input_image", "mask", "mask_image")
                    and isinstance(v, str) and len(v) > 64 else _without_pictures(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [f"<{len(v)} base64 characters>" if isinstance(v, str) and len(v) > 64 else _without_pictures(v)
                for v in value]
    return value


def _size_multiple(pipe) -> int:
    """What image sides must be multiples of: the VAE's factor (the U-Net runs any latent size)."""
    return int(getattr(pipe, "scale", 1))


def _model_defaults(pipe, samplers: SamplerTable) -> dict:
    d = dict(getattr(pipe, "defaults", {}) or {})
    height, width = d.get("height"), d.get("width")
    if not (height and width):  # (a pixel cascade names both: it has no one U-Net)
        sample = getattr(pipe.unet.config, "sample_size", None) or 32
        sh, sw = (int(sample[0]), int(sample[1])) if isinstance(sample, (tuple, list)) else (int(sample),) * 2
        height, width = height or sh * pipe.scale, width or sw * pipe.scale
    height, width = int(height), int(width)
    sampler = d.get("sampler") or "dpmpp_2m"
    try:
        sampler = samplers.resolve(sampler)[0]
    except LookupError:
        sampler = samplers.ours[0] if samplers.ours else sampler
    return {"steps": int(d.get("steps") or 20), "guidance_scale": float(d.get("guidance_scale", 7.5)),
            "sampler": sampler, "height": height, "width": width}


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 and a free port (tests, benchmarks,
    notebooks): `with BackgroundServer(app) as srv: srv.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))  # bound here, so the port is known before uvicorn starts
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="imagine-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self._thread.is_alive() or time.time() - t0 > timeout:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
