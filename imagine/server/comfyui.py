"""ComfyUI's API over the served model: its clients queue a graph of nodes (its "API format" workflow) with
`POST /prompt`, follow it on the `/ws` socket, find its pictures in `/history/{prompt_id}` and fetch them from `/view`.

A graph runs in the model worker as one job (Job.call, alone, as ComfyUI runs one prompt at a time), node by node,
each node's outputs computed once for the prompt. The nodes are ComfyUI's core ones that a text-to-image workflow and
its image-to-image and hires. fix forms are made of: CheckpointLoaderSimple (the served model), CLIPTextEncode,
CLIPSetLastLayer, EmptyLatentImage, KSampler, VAEDecode, VAEEncode, LatentUpscale, LatentUpscaleBy, LoadImage,
SaveImage and PreviewImage. KSampler runs the pipeline's sampler as ComfyUI's does (imagine.sampling: its noise, one
seed for the batch; its start; the nearest training timestep; its schedulers; image to image from a latent with
`denoise`), so that a seed gives ComfyUI's picture. ComfyUI's facts carried over are named where they are used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import random
import re
import string
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from fastapi import Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageOps, PngImagePlugin

from imagine.pipelines.text_to_image import LORA_TAG
from imagine.samplers import CFG_PP_SAMPLERS

log = logging.getLogger(__name__)
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # its KSampler's seed range
MAX_HISTORY = 10000  # its PromptQueue's history size
# ComfyUI's sampler names (its KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2, in its order) -> ours, where ours is the same
# algorithm (its "ddim" is Euler: its samplers.sampler_object), whether ComfyUI lays out one more level and drops the
# one before the end for it (its KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS), and the options it runs it with
_UNIPC = {"order": 3, "floor": 0.001}  # (its uni_pc.sample_unipc: order min(3, steps - 1), the end t = 0.001)
SAMPLERS = {"euler": ("euler", False, {}), "euler_cfg_pp": ("euler_cfgpp", False, {}),
            "euler_ancestral": ("euler_a", False, {}), "euler_ancestral_cfg_pp": ("euler_a_cfgpp", False, {}),
            "heun": ("heun", False, {}), "heunpp2": ("heunpp2", False, {}), "dpm_2": ("dpm2", True, {}),
            "dpm_2_ancestral": ("dpm2_a", True, {}), "lms": ("lms", False, {}),
            # (its dpm_fast / dpm_adaptive run from the first level to the last above 0, dpm_fast in `steps` calls)
            "dpm_fast": ("dpm_fast", False, {"ends": "plan"}),
            "dpm_adaptive": ("dpm_adaptive", False, {"ends": "plan"}), "dpmpp_2s_ancestral": ("dpmpp_2s_a", False, {}),
            "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_a_cfgpp", False, {}),
            "dpmpp_sde": ("dpmpp_sde", False, {}), "dpmpp_sde_gpu": ("dpmpp_sde", False, {}),
            "dpmpp_2m": ("dpmpp_2m", False, {}), "dpmpp_2m_cfg_pp": ("dpmpp_2m_cfgpp", False, {}),
            # (its _gpu forms grow the Brownian tree on the sample's device: on a CPU, as here, the same tree)
            "dpmpp_2m_sde": ("dpmpp_2m_sde", False, {}), "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", False, {}),
            "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", False, {}),
            "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde_heun", False, {}),
            "dpmpp_3m_sde": ("dpmpp_3m_sde", False, {}), "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", False, {}),
            "ddpm": ("ddpm", False, {}), "lcm": ("lcm", False, {}), "ipndm": ("ipndm", False, {}),
            "ipndm_v": ("ipndm_v", False, {}), "deis": ("deis", False, {}),
            "res_multistep": ("res_multistep", False, {}), "res_multistep_cfg_pp": ("res_multistep_cfgpp", False, {}),
            "res_multistep_ancestral": ("res_multistep_a", False, {}),
            "res_multistep_ancestral_cfg_pp": ("res_multistep_a_cfgpp", False, {}),
            "gradient_estimation": ("gradient_estimation", False, {}),
            "gradient_estimation_cfg_pp": ("gradient_estimation_cfgpp", False, {}), "er_sde": ("er_sde", False, {}),
            "seeds_2": ("seeds_2", False, {}), "seeds_3": ("seeds_3", False, {}),
            "sa_solver": ("sa_solver", False, {}), "sa_solver_pece": ("sa_solver_pece", False, {}),
            "ddim": ("euler", False, {}), "uni_pc": ("unipc", False, {**_UNIPC, "variant": "bh1"}),
            "uni_pc_bh2": ("unipc", False, {**_UNIPC, "variant": "bh2"})}
# its schedulers (its SCHEDULER_NAMES, in its order) -> our schedule types over the model's whole range as ComfyUI lays
# them out (imagine.schedules, sigma_range "comfyui": the same rules)
SCHEDULERS = {"simple": "simple", "sgm_uniform": "sgm_uniform", "karras": "karras", "exponential": "exponential",
              "ddim_uniform": "ddim_uniform", "beta": "beta", "normal": "normal",
              "linear_quadratic": "linear_quadratic", "kl_optimal": "kl_optimal"}
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")  # its LatentUpscale's (bislerp not here)


class NodeError(Exception):
    """A node's input failed validation: ComfyUI's node error {"type", "message", "details", "extra_info"}."""

    def __init__(self, kind: str, message: str, details: str, input_name: str | None = None, **extra):
        super().__init__(f"{message}: {details}")
        self.error = {"type": kind, "message": message, "details": details,
                      "extra_info": {**({"input_name": input_name} if input_name else {}), **extra}}


@dataclass(frozen=True)
class Model:
    """A MODEL output: the checkpoint it is (CheckpointLoaderSimple's ckpt_name; None: the one served), the LoRAs its
    LoraLoaders put on the U-Net, ((file name, strength), ...), and what its ModelSamplingDiscrete says: the
    prediction its output is read as (None: the model's own) and zsnr."""

    ckpt: str | None = None
    loras: tuple = ()
    prediction: str | None = None
    zsnr: bool = False
    lcm: bool = False  # (its "lcm" model sampling: the LCM distillation timesteps' table)


@dataclass(frozen=True)
class Clip:
    """A CLIP output: the layers skipped from the last (None: the model's own, ComfyUI's -1 for SD 1.x), the LoRAs
    put on the text encoder, and the checkpoint whose text encoder it is (None: the one served)."""

    skip: int | None = None
    loras: tuple = ()
    ckpt: str | None = None


@dataclass(frozen=True)
class Vae:
    """A VAE output of CheckpointLoaderSimple: the checkpoint's own VAE (VAELoader's is ("file", name))."""

    ckpt: str | None = None


@dataclass(frozen=True)
class ClipVision:
    """A CLIP_VISION output: unCLIPCheckpointLoader's, the checkpoint's CLIP image tower (an unCLIP model's), or
    CLIPVisionLoader's, the tower file `file` of serve --clip-vision-dir."""

    ckpt: str | None = None
    file: str | None = None


@dataclass(eq=False)
class ClipVisionOutput:
    """A CLIP_VISION_OUTPUT (CLIPVisionEncode's): the pictures' projected CLIP image embeddings [B, D]."""

    image_embeds: torch.Tensor


# the nodes that load a checkpoint by its ckpt_name (a checkpoint server loads the ones a prompt names)
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "unCLIPCheckpointLoader")


@dataclass(frozen=True)
class Conditioning:
    """An entry of a CONDITIONING output (which is a tuple of them, as ComfyUI's is a list): how its tensors are made
    (`encoding`: ("text", text), ("zero", enc), ("average", to, from, w) or ("concat", to, from)), the CLIP that
    encodes the texts, the values the Conditioning* nodes set (`options`, (key, value) pairs, a later one winning:
    area, strength, mask, mask_strength, bounds, start_percent, end_percent), and InpaintModelConditioning's
    concat_latent_image and concat_mask ((latents, mask) or None), which an inpainting model reads beside the
    sample."""

    encoding: tuple
    clip: Clip
    concat: Any = field(default=None, compare=False)
    # the ControlNets applied, in order: (its index among the pipeline's, hint [B, H, W, 3], strength, start percent,
    # end percent, whether ControlNetApply (the old node) put it, which ComfyUI also applies to a negative without any)
    controls: tuple = field(default=(), compare=False)
    options: tuple = field(default=(), compare=False)

    @property
    def text(self) -> str | None:
        """The text, where the entry is one text's encoding and nothing more."""
        return self.encoding[1] if self.encoding[0] == "text" and not self.options else None


def _each(conditioning: tuple, **values) -> tuple:
    return tuple(dataclasses.replace(c, **values) for c in conditioning)


def _set(conditioning: tuple, **options) -> tuple:
    """ComfyUI's node_helpers.conditioning_set_values: each entry with these values set."""
    return tuple(dataclasses.replace(c, options=c.options + tuple(options.items())) for c in conditioning)


@dataclass
class Node:
    """One of ComfyUI's node classes: its inputs as its INPUT_TYPES gives them, outputs, and what it does."""

    inputs: Callable[["ComfyState"], dict]  # state -> {"required": {...}, "optional": {...}, "hidden": {...}}
    outputs: tuple[str, ...]
    run: Callable[..., Any]  # (ctx, **inputs) -> a tuple of outputs, or {"ui": ..., "result": (...)}
    category: str
    description: str = ""
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    display_name: str | None = None
    # (state, inputs) -> what, beside the inputs, says whether the node's output changed (ComfyUI's IS_CHANGED: a
    # loaded file's hash); None: the inputs alone
    changed: Callable[..., Any] | None = None


@dataclass
class Prompt:
    """A queued graph: ComfyUI's queue item [number, prompt_id, prompt, extra_data, outputs_to_execute]."""

    number: float
    id: str
    graph: dict
    extra_data: dict
    outputs: list[str]
    client_id: str | None
    job: Any = None
    state: str = "queued"  # queued -> running -> done

    def item(self) -> list:
        return [self.number, self.id, self.graph, self.extra_data, self.outputs]


@dataclass
class Served:
    """The model a prompt runs on: its pipeline and worker, its name (ComfyUI's ckpt_name) and the server's limits."""

    pipe: Any
    worker: Any
    name: str
    max_steps: int
    max_width: int
    max_height: int


@dataclass
class ComfyState:
    """What the ComfyUI API keeps across its prompts: the queue and history, the sockets, the folders; one for the
    server, shared by the models of `imagine serve --ckpt-dir` (each model's app runs its prompts on its worker).
    `checkpoint_names()`: what CheckpointLoaderSimple offers; `on_queued(future)`: told of each prompt's job as it is
    queued (the checkpoint server keeps the model until the job ends)."""

    base_dir: Path
    checkpoint_names: Callable[[], list[str]] | None = None
    lora_names: Callable[[], list[str]] | None = None  # what LoraLoader offers: the files of serve --lora-dir
    controlnet_names: Callable[[], list[str]] | None = None  # what ControlNetLoader offers: serve --controlnet's
    vae_names: Callable[[], list[str]] | None = None  # what VAELoader offers: the files of serve --vae-dir
    upscaler_names: Callable[[], list[str]] | None = None  # what UpscaleModelLoader offers: serve --upscaler-dir's
    clip_vision_names: Callable[[], list[str]] | None = None  # what CLIPVisionLoader offers: serve --clip-vision-dir's
    vae: tuple | None = None  # (the last VAE VAELoader loaded: (its path, a weakref to the VAE it was fitted to, it))
    clip_vision: tuple | None = None  # (the last tower CLIPVisionLoader loaded: (its path, its file's mtime, it))
    # a checkpoint's pipeline by its name, where it is in memory beside the one served (a checkpoint server loads the
    # checkpoints a prompt names before it runs); None: none
    other_pipe: Callable[[str], Any] | None = None
    on_queued: Callable[[Any], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    prompts: "OrderedDict[str, Prompt]" = field(default_factory=OrderedDict)  # queued and running, in order
    history: "OrderedDict[str, dict]" = field(default_factory=OrderedDict)
    sockets: dict = field(default_factory=dict)  # client id -> websocket
    # the last prompt's node outputs by their inputs' signature (ComfyUI's classic cache): a node of the next prompt
    # with the same signature is not run again
    cache: dict = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    counter: int = 0

    def folder(self, kind: str) -> Path:
        if kind not in ("output", "input", "temp"):
            raise ValueError(f"type must be output, input or temp; got {kind!r}")
        path = self.base_dir / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input_files(self) -> list[str]:
        folder = self.folder("input")
        return sorted(str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*")
                      if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"))

    def emit(self, event: str, data: dict, client_id: str | None = None) -> None:
        """A message to a client's socket (None: every client), from any thread."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        message = json.dumps({"type": event, "data": data})
        targets = [client_id] if client_id is not None else None

        def send():
            for sid, ws in list(self.sockets.items()):
                if targets is None or sid in targets:
                    asyncio.ensure_future(_send(ws, message))

        loop.call_soon_threadsafe(send)

    def queue_remaining(self) -> int:
        with self.lock:
            return sum(1 for p in self.prompts.values() if p.state != "done")

    def emit_status(self) -> None:
        self.emit("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}})


async def _send(ws, message: str) -> None:
    try:
        await ws.send_text(message)
    except Exception:  # (a socket that went away: its handler drops it)
        pass


# -- the nodes -----------------------------------------------------------------------------------------------------
def _int(default, lo, hi, step=1, **more):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, **more})


def _strength():
    return ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})


def _checkpoint(ctx, ckpt_name):
    ctx.pipe_of(ckpt_name)  # (a checkpoint server loads those a prompt names before it is queued)
    return (Model(ckpt_name), Clip(ckpt=ckpt_name), Vae(ckpt_name))


def _unclip_checkpoint(ctx, ckpt_name):
    # (ComfyUI's unCLIPCheckpointLoader: an unCLIP checkpoint's parts and its CLIP image tower)
    embedder = getattr(getattr(ctx.pipe_of(ckpt_name), "c", None), "image_embedder", None)
    if embedder is None or embedder.encoder is None:
        raise ValueError(f"ckpt_name {ckpt_name!r} is not an unCLIP model (SD 2.1 unCLIP: a U-Net that reads a CLIP "
                         "image embedding, with its image tower): load it with CheckpointLoaderSimple")
    return (*_checkpoint(ctx, ckpt_name), ClipVision(ckpt_name))


def comfyui_clip_preprocess(image: torch.Tensor, size: int, mean, std, crop: bool = True) -> torch.Tensor:
    """ComfyUI's clip_preprocess: pictures [B, H, W, C] in [0, 1] to a CLIP tower's pixel values: the shorter side to
    `size` (crop; else both sides) by torch's antialiased bicubic, the middle cut out, 8-bit rounded, normalized."""
    mean = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    x = image[..., :3].movedim(-1, 1)
    if not (x.shape[2] == size and x.shape[3] == size):
        if crop:
            scale = size / min(x.shape[2], x.shape[3])
            to = (round(scale * x.shape[2]), round(scale * x.shape[3]))
        else:
            to = (size, size)
        x = torch.nn.functional.interpolate(x, size=to, mode="bicubic", antialias=True)
        h, w = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, h:h + size, w:w + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    return (x - mean) / std


def _clip_vision_loader(ctx, clip_name):
    ctx.clip_vision_embedder(ClipVision(file=clip_name))  # (loaded now: a file that is no tower fails this node)
    return (ClipVision(file=clip_name),)


def _clip_vision_encode(ctx, clip_vision, image, crop="center"):
    # (ComfyUI's CLIPVisionEncode: the tower's projected embedding of its preprocessed pictures)
    embedder = ctx.clip_vision_embedder(clip_vision)
    p = embedder.processor
    crop_size = p.crop_size  # (a dict, or transformers' SizeDict, or a number)
    size = int(crop_size if isinstance(crop_size, (int, float)) else
               (crop_size["height"] if isinstance(crop_size, dict) else crop_size.height))
    pixels = comfyui_clip_preprocess(image.float(), size, p.image_mean, p.image_std, crop == "center")
    w = next(embedder.encoder.parameters())
    with torch.no_grad():
        embeds = embedder.encoder(pixels.to(device=w.device, dtype=w.dtype)).image_embeds.float()
    return (ClipVisionOutput(embeds),)


def _unclip_conditioning(ctx, conditioning, clip_vision_output, strength, noise_augmentation):
    # (ComfyUI's unCLIPConditioning: each entry keeps a list of (embedding, strength, noise augmentation) that an
    # unCLIP model reads; strength 0 changes nothing)
    if float(strength) == 0:
        return (conditioning,)
    one = (clip_vision_output.image_embeds, float(strength), float(noise_augmentation))
    return (tuple(dataclasses.replace(c, options=c.options + (("unclip", dict(c.options).get("unclip", ()) + (one,)),))
                  for c in conditioning),)


UNCLIP_MERGE_AUGMENTATION = 0.05  # (ComfyUI's unclip_noise_augment_merge default)


def unclip_label(pipe, unclip: tuple, seed: int, n: int) -> torch.Tensor:
    """An unCLIP U-Net's class input [n, 2D] for a conditioning's unCLIPConditioning list, as ComfyUI's unclip_adm
    makes it: each embedding row normalized, noised to level round(999 aug) with noise from torch.manual_seed(seed -
    10) (ComfyUI's KSampler seed - 10), un-normalized, its level's code appended, times its strength; several summed,
    then noised again at round(999 * 0.05) (ComfyUI draws that noise from its global generator; here the same seeded
    draw); none: zeros (ComfyUI's encode_adm without one)."""
    embedder = pipe.c.image_embedder
    if not unclip:
        return torch.zeros(n, 2 * embedder.dim)
    return _unclip_adm(embedder, pipe.c.image_noise_schedule, unclip, seed).repeat(n, 1)


def _unclip_adm(embedder, schedule, unclip: tuple, seed: int) -> torch.Tensor:
    # (ComfyUI's unclip_adm, [1, 2D]: see unclip_label)
    from imagine.pipelines.unclip import image_condition

    top, d = int(schedule.num_train_timesteps), embedder.dim

    def noised(z: torch.Tensor, augmentation: float) -> torch.Tensor:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(int(seed) - 10))
        return image_condition(embedder, z, noise, round((top - 1) * augmentation), schedule)

    out = [noised(row[None].float(), aug) * strength for embeds, strength, aug in unclip for row in embeds]
    return out[0] if len(out) == 1 else noised(torch.stack(out).sum(0)[:, :d], UNCLIP_MERGE_AUGMENTATION)


def revision_pooled(unclip: tuple, seed: int, n: int, width: int) -> torch.Tensor:
    """SDXL's Revision, [n, width]: an SDXL model given unCLIPConditioning reads, in place of its text's pooled vector,
    the image embedding noised as an unCLIP model's class input is (`unclip_label`) by SDXL's own noise augmentor
    (ComfyUI's sdxl_pooled: CLIPEmbeddingNoiseAugmentation, 1000 squaredcos_cap_v2 steps, identity statistics), the
    level's code cut off: unclip_adm(...)[:, :1280], 1280 the pooled vector's width and ViT-bigG's embedding's."""
    from imagine.loading.single_file import UNCLIP_NOISE_SCHEDULE
    from imagine.models.image_encoder import ImageEmbedder
    from imagine.schedules import NoiseSchedule

    d = unclip[0][0].shape[-1]
    if d != width:
        raise ValueError(f"unCLIPConditioning on SDXL (Revision): the CLIP vision embeddings are {d} wide and this "
                         f"model's pooled text vector is {width}: Revision reads ViT-bigG's (clip_vision_g)")
    identity = ImageEmbedder(None, None, torch.zeros(width), torch.ones(width))
    schedule = NoiseSchedule.from_diffusers_config(dict(UNCLIP_NOISE_SCHEDULE))
    return _unclip_adm(identity, schedule, unclip, seed)[:, :width].repeat(n, 1)


# ComfyUI's `embedding:NAME` word (its sd1_clip tokenize_with_weights): at the start of a word (the text's, after a
# space or a group's bracket), NAME up to the word's end, a weight's colon or trailing commas
EMBEDDING_WORD = re.compile(r"(?<![^ ()])embedding:([^ (),:]+)")


def comfyui_embeddings(text: str, files: dict[str, str]) -> str:
    """`text` with ComfyUI's `embedding:NAME` words read as it reads them: the word of the textual inversion loaded
    from the file NAME names (with or without its extension, as ComfyUI names its models/embeddings files; `files`
    maps our words to their files, the pipeline's embedding_files), its weight the word's; a NAME no loaded file has
    is left out, as ComfyUI leaves it out, with a warning in the log."""
    by_name = {n: word for word, f in files.items() for n in (f, Path(f).stem)}

    def word(m: re.Match) -> str:
        found = by_name.get(m.group(1))
        if found is None:
            log.warning("embedding:%s names no embedding this server loaded (serve --embedding); left out, as "
                        "ComfyUI leaves out one it does not have", m.group(1))
            return ""
        # (commas after it are a word of their own in ComfyUI's reading: kept apart)
        return found + (" " if m.string.startswith(",", m.end()) else "")

    return EMBEDDING_WORD.sub(word, text) if "embedding:" in text else text


def _clip_text_encode(ctx, text, clip):
    text = comfyui_embeddings(str(text), getattr(ctx.pipe_of(clip.ckpt), "embedding_files", {}))
    return ((Conditioning(("text", text), clip),),)


def _clip_text_encode_sdxl(ctx, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
    # (ComfyUI's: text_g for the bigG tower and the pooled vector, text_l for the CLIP-L tower, its own size codes)
    files = getattr(ctx.pipe_of(clip.ckpt), "embedding_files", {})
    sizes = (int(height), int(width), int(crop_h), int(crop_w), int(target_height), int(target_width))
    return ((Conditioning(("sdxl", comfyui_embeddings(str(text_g), files), comfyui_embeddings(str(text_l), files),
                           sizes), clip),),)


def _clip_text_encode_sdxl_refiner(ctx, ascore, width, height, text, clip):
    # (ComfyUI's: the text with an aesthetic score and a size, which a refiner reads as (height, width, 0, 0, ascore)
    # on either side, its SDXLRefiner.encode_adm; an SDXL base reads the size alone)
    text = comfyui_embeddings(str(text), getattr(ctx.pipe_of(clip.ckpt), "embedding_files", {}))
    return ((Conditioning(("refiner", text, (int(height), int(width), float(ascore))), clip),),)


# -- the Conditioning* nodes (ComfyUI's nodes.py; imagine.area_conditioning runs what they set) --
def _conditioning_combine(ctx, conditioning_1, conditioning_2):
    return (conditioning_1 + conditioning_2,)


def _conditioning_set_area(ctx, conditioning, width, height, x, y, strength):
    # (its area in latent cells: pixels // 8, whatever the VAE's factor, as ComfyUI writes it)
    return (_set(conditioning, area=(int(height) // 8, int(width) // 8, int(y) // 8, int(x) // 8),
                 strength=float(strength), bounds=False),)


def _conditioning_set_area_percentage(ctx, conditioning, width, height, x, y, strength):
    return (_set(conditioning, area=("percentage", float(height), float(width), float(y), float(x)),
                 strength=float(strength), bounds=False),)


def _conditioning_set_area_strength(ctx, conditioning, strength):
    return (_set(conditioning, strength=float(strength)),)


def _conditioning_set_mask(ctx, conditioning, mask, strength, set_cond_area):
    return (_set(conditioning, mask=mask if mask.ndim == 3 else mask[None], bounds=set_cond_area != "default",
                 mask_strength=float(strength)),)


def _conditioning_set_timestep_range(ctx, conditioning, start, end):
    return (_set(conditioning, start_percent=float(start), end_percent=float(end)),)


def _conditioning_zero_out(ctx, conditioning):
    return (tuple(dataclasses.replace(c, encoding=("zero", c.encoding)) for c in conditioning),)


def _conditioning_average(ctx, conditioning_to, conditioning_from, conditioning_to_strength):
    # (ComfyUI's: each entry of `to` averaged with the first of `from`, its other values kept)
    if len(conditioning_from) > 1:
        log.warning("ConditioningAverage: conditioning_from has %d entries; only the first is used, as ComfyUI "
                    "uses it", len(conditioning_from))
    first = conditioning_from[0].encoding
    w = float(conditioning_to_strength)
    return (tuple(dataclasses.replace(c, encoding=("average", c.encoding, first, w)) for c in conditioning_to),)


def _conditioning_concat(ctx, conditioning_to, conditioning_from):
    if len(conditioning_from) > 1:
        log.warning("ConditioningConcat: conditioning_from has %d entries; only the first is used, as ComfyUI "
                    "uses it", len(conditioning_from))
    first = conditioning_from[0].encoding
    return (tuple(dataclasses.replace(c, encoding=("concat", c.encoding, first)) for c in conditioning_to),)


def _chain(controls: tuple) -> tuple:
    # (a ControlNet chain compared with its hints by identity)
    return tuple((c[0], id(c[1]), *c[2:]) for c in controls)


def _area_conditioning(positive: tuple, negative: tuple, pipe, n: int, height: int, width: int, guided: bool,
                       seed: int = 0):
    """generate's `conditioning` for ComfyUI's lists: each entry's tensors (`_encoded`, with the size codes of an
    SDXL model, an unCLIP model's class input from its unCLIPConditioning list and the seed: `unclip_label`) and the
    values its Conditioning* nodes set, the timestep range's percents read as ComfyUI reads them
    (schedules.comfyui_percent_sigma)."""
    from imagine.area_conditioning import AreaConditioning, AreaEntry
    from imagine.schedules import comfyui_percent_sigma

    table, cache = pipe.schedule.kdiffusion_log_sigmas(), {}
    unclip = is_unclip(pipe)

    def side(entries: tuple, negative: bool) -> AreaConditioning:
        # (the picture's size codes; a refiner's aesthetic score is the negative one on the negative side, as ComfyUI's
        # SDXLRefiner.encode_adm reads its prompt_type)
        sizes = pipe.size_conditioning(n, height, width, negative=negative)
        out = []
        for c in entries:
            o = dict(c.options)
            levels = None if "start_percent" not in o else (comfyui_percent_sigma(table, o["start_percent"]),
                                                            comfyui_percent_sigma(table, o["end_percent"]))
            # (an entry's own size codes, CLIPTextEncodeSDXL's, before the picture's)
            labels = {"class_labels": unclip_label(pipe, o.get("unclip", ()), seed, n)} if unclip else {}
            encoded = _encoded(pipe, c.encoding, n, cache)
            if not unclip and o.get("unclip"):  # (SDXL's Revision: the picture's pooled vector for the text's)
                encoded["text_embeds"] = revision_pooled(o["unclip"], seed, n, encoded["text_embeds"].shape[-1])
            out.append(AreaEntry({**sizes, **encoded, **labels}, area=o.get("area"),
                                 strength=o.get("strength", 1.0), mask=o.get("mask"),
                                 mask_strength=o.get("mask_strength", 1.0), bounds=o.get("bounds", False),
                                 levels=levels))
        return AreaConditioning(out)

    return side(positive, False), side(negative, True) if guided else None


def _is_sdxl(pipe) -> bool:
    # (a model whose U-Net reads a pooled text vector beside the size codes: SDXL's base or refiner)
    config = getattr(getattr(pipe, "unet", None), "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def is_unclip(pipe) -> bool:
    """Whether the model reads a CLIP image embedding throughout (an SD 2.1 unCLIP decoder)."""
    c = getattr(pipe, "c", None)
    return getattr(c, "image_embedder", None) is not None and getattr(c, "prior", None) is None


def _encoded(pipe, encoding: tuple, n: int, cache: dict) -> dict:
    """An entry's tensors for a batch of n: its text encoded as ComfyUI reads it (its weights and windows), or
    ConditioningZeroOut's zeros (the states and the pooled vector), ConditioningAverage's w to + (1 - w) from (from
    cut, or filled with zeros, to to's length; the pooled vectors alike where both have one), ConditioningConcat's
    states side by side."""
    kind = encoding[0]
    if kind == "text":
        if encoding[1] not in cache:
            cache[encoding[1]] = pipe.encode_prompts([encoding[1]] * n, "ComfyUI", True)
        return dict(cache[encoding[1]])
    if kind == "sdxl":  # (CLIPTextEncodeSDXL: the towers' states of their own texts, the shorter filled with "")
        towers = getattr(pipe.text_encoder, "towers", None)
        if towers is None or len(towers) != 2:
            raise ValueError("CLIPTextEncodeSDXL is for SDXL's two text towers; this model has "
                             f"{'one' if towers is not None else 'another text encoder'}: use CLIPTextEncode")
        g, low = (_encoded(pipe, ("text", t), n, cache) for t in encoding[1:3])
        d = towers[0].dim
        a, b = low["context"][..., :d], g["context"][..., d:]
        empty = _encoded(pipe, ("text", ""), n, cache)["context"] if a.shape[1] != b.shape[1] else None
        while a.shape[1] < b.shape[1]:
            a = torch.cat([a, empty[..., :d]], dim=1)
        while b.shape[1] < a.shape[1]:
            b = torch.cat([b, empty[..., d:]], dim=1)
        return {**g, "context": torch.cat([a, b], dim=-1),
                "time_ids": torch.tensor([encoding[3]], dtype=torch.float32).repeat(n, 1)}
    if kind == "refiner":  # (CLIPTextEncodeSDXLRefiner's)
        out = _encoded(pipe, ("text", encoding[1]), n, cache)
        h, w, score = encoding[2]
        codes = pipe.size_conditioning(n, h, w)
        if "time_ids" in codes:
            if codes["time_ids"].shape[1] == 5:  # (a refiner's five: the aesthetic score last)
                codes["time_ids"][:, 4] = score
            out["time_ids"] = codes["time_ids"]
        return out
    if kind == "zero":
        c = _encoded(pipe, encoding[1], n, cache)
        return {k: (torch.zeros_like(v) if k in ("context", "text_embeds") else v) for k, v in c.items()}
    to, other = _encoded(pipe, encoding[1], n, cache), _encoded(pipe, encoding[2], n, cache)
    if to.get("context_mask") is not None or other.get("context_mask") is not None:
        raise ValueError(f"Conditioning{kind.title()} works on CLIP's states; this model's text encoder masks its "
                         "tokens")
    a, b = to["context"], other["context"]
    if kind == "average":
        w = encoding[3]
        if b.shape[1] < a.shape[1]:
            b = torch.cat([b, torch.zeros(b.shape[0], a.shape[1] - b.shape[1], b.shape[2], dtype=b.dtype)], dim=1)
        out = {**to, "context": a * w + b[:, :a.shape[1]] * (1 - w)}
        if to.get("text_embeds") is not None and other.get("text_embeds") is not None:
            out["text_embeds"] = to["text_embeds"] * w + other["text_embeds"] * (1 - w)
        return out
    return {**to, "context": torch.cat([a, b], dim=1)}


def _clip_set_last_layer(ctx, clip, stop_at_clip_layer):
    # (ComfyUI's -1 is the last layer's states, -2 the one before, layer-normed as its SD 1.x CLIP does)
    return (dataclasses.replace(clip, skip=-int(stop_at_clip_layer) - 1),)


def _model_sampling_discrete(ctx, model, sampling, zsnr):
    # (ComfyUI's: the U-Net's output read as eps or v, over the schedule rescaled to zero terminal SNR with zsnr, its
    # rescale_zero_terminal_snr_sigmas: A1111's, the last abar 4.8973e-8)
    # "lcm": ComfyUI's ModelSamplingDiscreteDistilled, the table of the 50 distillation timesteps (19, 39, ..., 999),
    # a level's timestep the nearest of them (schedules.NoiseSchedule._lcm_levels, A1111's LCM denoiser's rule); its
    # LCM boundary scalings at those timesteps move x_0 by under 7e-6 (samplers.sample_lcm) and are left out
    kinds = {"eps": "epsilon", "v_prediction": "v_prediction", "lcm": "epsilon"}
    if sampling not in kinds:
        raise ValueError(f"ModelSamplingDiscrete sampling {sampling!r} is not run by this server (eps, v_prediction "
                         "and lcm are)")
    if sampling == "lcm" and zsnr:
        raise ValueError("ModelSamplingDiscrete: lcm with zsnr is not run by this server")
    return (dataclasses.replace(model, prediction=kinds[sampling], zsnr=bool(zsnr), lcm=sampling == "lcm"),)


def _lora_loader(ctx, model, clip, lora_name, strength_model, strength_clip):
    # (ComfyUI's LoraLoader patches W + s dW into the U-Net and the text encoder, each at its own strength; a strength
    # of 0 on both loads nothing)
    if float(strength_model) == 0 and float(strength_clip) == 0:
        return (model, clip)
    return (dataclasses.replace(model, loras=model.loras + ((lora_name, float(strength_model)),)),
            dataclasses.replace(clip, loras=clip.loras + ((lora_name, float(strength_clip)),)))


def _lora_loader_model_only(ctx, model, lora_name, strength_model):
    return (dataclasses.replace(model, loras=model.loras + ((lora_name, float(strength_model)),))
            if float(strength_model) else model,)


def _empty_latent(ctx, width, height, batch_size):
    pipe = ctx.served.pipe
    f = int(getattr(pipe, "scale", 8))
    return ({"samples": torch.zeros([int(batch_size), int(pipe.latent_channels), int(height) // f, int(width) // f])},)


def _ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
    return (ctx.sample(model, latent_image, int(seed), int(steps), float(cfg), sampler_name, scheduler, positive,
                       negative, float(denoise)),)


def _ksampler_advanced(ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    window = (int(start_at_step), int(end_at_step), return_with_leftover_noise != "enable", add_noise == "enable")
    return (ctx.sample(model, latent_image, int(noise_seed), int(steps), float(cfg), sampler_name, scheduler, positive,
                       negative, 1.0, window),)


def _set_latent_noise_mask(ctx, samples, mask):
    return ({**samples, "noise_mask": mask.reshape(-1, 1, *mask.shape[-2:])},)


def controlnet_names(pipe) -> list[str]:
    """What ControlNetLoader offers: the loaded ControlNets' file names (as ComfyUI names its controlnet folder's
    files) and their names here."""
    files = getattr(pipe, "controlnet_files", {})
    return list(dict.fromkeys(n for name, _ in getattr(pipe, "controlnets", []) for n in (files.get(name), name) if n))


def _controlnet_index(pipe, name: str) -> int:
    files = getattr(pipe, "controlnet_files", {})
    for k, (loaded, _) in enumerate(getattr(pipe, "controlnets", [])):
        if name in (loaded, files.get(loaded)):
            return k
    raise ValueError(f"control_net_name {name!r}: no such ControlNet is loaded (serve --controlnet)")


def _strength_0_10():
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})


def _level(default: float):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False})


def _fraction(default: float, step: float = 0.01):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": step})


def _controlnet_loader(ctx, control_net_name):
    return (_controlnet_index(ctx.served.pipe, control_net_name),)


def _with_control(conditioning: tuple, control: tuple) -> tuple:
    return tuple(dataclasses.replace(c, controls=c.controls + (control,)) for c in conditioning)


def _controlnet_apply_advanced(ctx, positive, negative, control_net, image, strength, start_percent, end_percent,
                               vae=None):
    # (ComfyUI's: both conditionings get the ControlNet, chained after any they have; strength 0 changes nothing)
    if float(strength) == 0:
        return (positive, negative)
    control = (control_net, image, float(strength), float(start_percent), float(end_percent), False)
    return (_with_control(positive, control), _with_control(negative, control))


def _controlnet_apply(ctx, conditioning, control_net, image, strength):
    # (ComfyUI's old "Apply ControlNet": the whole run; a negative with no ControlNet of its own gets it too)
    if float(strength) == 0:
        return (conditioning,)
    return (_with_control(conditioning, (control_net, image, float(strength), 0.0, 1.0, True)),)


# -- latent and picture utilities (ComfyUI's nodes.py) --
def _repeat_latent_batch(ctx, samples, amount):
    s, z, amount = dict(samples), samples["samples"], int(amount)
    s["samples"] = z.repeat(amount, 1, 1, 1)
    if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:  # (a mask of one is every image's already)
        s["noise_mask"] = samples["noise_mask"].repeat(amount, 1, 1, 1)
    if "batch_index" in s:  # (the repeats' noise follows the batch's: each repeat offset by its span)
        index = s["batch_index"]
        offset = max(index) - min(index) + 1
        s["batch_index"] = index + [k + i * offset for i in range(1, amount) for k in index]
    return (s,)


def _latent_from_batch(ctx, samples, batch_index, length):
    # (ComfyUI's: the images keep their places in the batch, batch_index, so that their noise is theirs in it)
    s, z = dict(samples), samples["samples"]
    first = min(z.shape[0] - 1, int(batch_index))
    length = min(z.shape[0] - first, int(length))
    s["samples"] = z[first:first + length].clone()
    if "noise_mask" in samples:
        masks = samples["noise_mask"]
        if masks.shape[0] == 1:
            s["noise_mask"] = masks.clone()
        else:
            if masks.shape[0] < z.shape[0]:
                masks = masks.repeat(math.ceil(z.shape[0] / masks.shape[0]), 1, 1, 1)[:z.shape[0]]
            s["noise_mask"] = masks[first:first + length].clone()
    s["batch_index"] = samples["batch_index"][first:first + length] if "batch_index" in samples else \
        list(range(first, first + length))
    return (s,)


def _latent_composite(ctx, samples_to, samples_from, x, y, feather):
    # (ComfyUI's: pixels // 8 as latent cells; with a feather, samples_from faded in over it where it lies inside)
    x, y, feather = int(x) // 8, int(y) // 8, int(feather) // 8
    out, to, src = dict(samples_to), samples_to["samples"], samples_from["samples"]
    s = to.clone()
    src = src[:, :, :to.shape[2] - y, :to.shape[3] - x]
    region = (slice(None), slice(None), slice(y, y + src.shape[2]), slice(x, x + src.shape[3]))
    if feather == 0:
        s[region] = src
    else:
        mask = torch.ones_like(src)
        for t in range(feather):
            w = (t + 1) / feather
            if y != 0:
                mask[:, :, t:t + 1, :] *= w
            if y + src.shape[2] < to.shape[2]:
                mask[:, :, mask.shape[2] - 1 - t:mask.shape[2] - t, :] *= w
            if x != 0:
                mask[:, :, :, t:t + 1] *= w
            if x + src.shape[3] < to.shape[3]:
                mask[:, :, :, mask.shape[3] - 1 - t:mask.shape[3] - t] *= w
        s[region] = src * mask + s[region] * (1 - mask)
    out["samples"] = s
    return (out,)


def _latent_blend(ctx, samples1, samples2, blend_factor):
    a, b = samples1["samples"], samples2["samples"]
    if a.shape != b.shape:  # (its bicubic resize of the second to the first's size)
        b = _upscale(b, "bicubic", a.shape[3], a.shape[2], "center")
    return ({**samples1, "samples": a * float(blend_factor) + b * (1 - float(blend_factor))},)


def _reshaped_to(shape, z: torch.Tensor, repeat_batch: bool = True) -> torch.Tensor:
    # (comfy_extras/nodes_latent.py's reshape_latent_to: bilinear to the target's size after a centre crop, then the
    # batch repeated or cut to the target's, its repeat_to_batch_size)
    if z.shape[1:] != shape[1:]:
        z = _upscale(z, "bilinear", shape[-1], shape[-2], "center")
    return _batched(z, shape[0]) if repeat_batch else z


def _latent_add(ctx, samples1, samples2):
    a = samples1["samples"]
    return ({**samples1, "samples": a + _reshaped_to(a.shape, samples2["samples"])},)


def _latent_subtract(ctx, samples1, samples2):
    a = samples1["samples"]
    return ({**samples1, "samples": a - _reshaped_to(a.shape, samples2["samples"])},)


def _latent_multiply(ctx, samples, multiplier):
    return ({**samples, "samples": samples["samples"] * float(multiplier)},)


def _latent_interpolate(ctx, samples1, samples2, ratio):
    """Its LatentInterpolate: at each position the two latents' channel vectors, each taken to unit length, mixed
    ratio : 1 - ratio, taken to unit length again and given the lengths mixed the same way (a zero vector counts as
    zero: its nan_to_num). ComfyUI divides [B, C, H, W] by norms [B, H, W], which lines up only at batch 1; here the
    norms keep their channel axis, the same numbers at batch 1 and each picture's own at any batch."""
    a = samples1["samples"]
    b = _reshaped_to(a.shape, samples2["samples"])
    r = float(ratio)
    m1, m2 = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    t = torch.nan_to_num(a / m1) * r + torch.nan_to_num(b / m2) * (1.0 - r)
    return ({**samples1, "samples": torch.nan_to_num(t / t.norm(dim=1, keepdim=True)) * (m1 * r + m2 * (1.0 - r))},)


def _latent_batch(ctx, samples1, samples2):
    # (the two batches one after the other, each image keeping its place for the start noise, its batch_index)
    a = samples1["samples"]
    b = _reshaped_to(a.shape, samples2["samples"], repeat_batch=False)
    index = list(samples1.get("batch_index", range(a.shape[0]))) + list(samples2.get("batch_index", range(b.shape[0])))
    return ({**samples1, "samples": torch.cat((a, b), dim=0), "batch_index": index},)


def _latent_batch_seed_behavior(ctx, samples, seed_behavior):
    # ("random": each image its own place's noise; "fixed": every image the first one's)
    out = dict(samples)
    if seed_behavior == "random":
        out.pop("batch_index", None)
    else:
        out["batch_index"] = [list(samples.get("batch_index", [0]))[0]] * samples["samples"].shape[0]
    return (out,)


def _latent_crop(ctx, samples, width, height, x, y):
    z = samples["samples"]
    x, y = min(int(x) // 8, z.shape[3] - 8), min(int(y) // 8, z.shape[2] - 8)  # (at least 8 cells left, as its)
    return ({**samples, "samples": z[:, :, y:y + int(height) // 8, x:x + int(width) // 8]},)


def _latent_rotate(ctx, samples, rotation):
    k = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
    return ({**samples, "samples": torch.rot90(samples["samples"], k=k, dims=[3, 2])},)


def _latent_flip(ctx, samples, flip_method):
    return ({**samples, "samples": torch.flip(samples["samples"], dims=[2 if flip_method.startswith("x") else 3])},)


def _image_batch(ctx, image1, image2):
    if image1.shape[1:] != image2.shape[1:]:  # (the second brought to the first's size, bilinear after a centre crop)
        image2 = _upscale(image2.permute(0, 3, 1, 2), "bilinear", image1.shape[2], image1.shape[1],
                          "center").permute(0, 2, 3, 1)
    return (torch.cat([image1, image2], dim=0),)


def _empty_image(ctx, width, height, batch_size, color):
    c = int(color)
    rgb = torch.tensor([((c >> 16) & 0xFF) / 0xFF, ((c >> 8) & 0xFF) / 0xFF, (c & 0xFF) / 0xFF])
    return (rgb.view(1, 1, 1, 3).repeat(int(batch_size), int(height), int(width), 1),)


def _image_pad_for_outpaint(ctx, image, left, top, right, bottom, feathering):
    """ComfyUI's ImagePadForOutpaint: the picture on a grey (0.5) canvas grown by the margins, and a mask of 1 on the
    margins, 0 on the picture except, within `feathering` of a grown side, ((feathering - d) / feathering)^2."""
    b, h, w, c = image.shape
    left, top, right, bottom, feathering = int(left), int(top), int(right), int(bottom), int(feathering)
    out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
    out[:, top:top + h, left:left + w] = image
    mask = torch.ones(h + top + bottom, w + left + right)
    inner = torch.zeros(h, w)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i, j = torch.arange(h).view(-1, 1).float(), torch.arange(w).view(1, -1).float()
        big = torch.full_like(i, float(h)), torch.full_like(j, float(w))
        d = torch.minimum(torch.minimum(i if top else big[0], (h - i) if bottom else big[0]),
                          torch.minimum(j if left else big[1], (w - j) if right else big[1]))
        inner = torch.where(d < feathering, ((feathering - d) / feathering) ** 2, torch.zeros(()))
    mask[top:top + h, left:left + w] = inner
    return (out, mask)


def _load_image_mask(ctx, image, channel):
    with Image.open(ctx.state.folder("input") / image) as im:
        im = ImageOps.exif_transpose(im)
        if im.getbands() != ("R", "G", "B", "A"):
            im = im.convert("RGBA")
        c = channel[0].upper()
        mask = torch.from_numpy(np.asarray(im.getchannel(c), dtype=np.float32) / 255.0)
    return ((1.0 - mask if c == "A" else mask)[None],)


def _keeping_x0(step, kept: dict, info: dict) -> None:
    kept["x0"] = info["denoised"]
    step(info)


# -- custom sampling (ComfyUI's comfy_extras/nodes_custom_sampler.py) --
def _ksampler_select(ctx, sampler_name):
    return (sampler_name,)


def _sigmas_of(ctx, model: Model, scheduler: str, steps: int) -> torch.Tensor:
    # (its calculate_sigmas: the scheduler's levels over the model's range, as KSampler lays them out, no discard)
    plan = ctx.pipe_of(model.ckpt).schedule.plan(int(steps), sigma_schedule=SCHEDULERS[scheduler],
                                                 sigma_range="comfyui")
    return plan.sigmas.float()


def _basic_scheduler(ctx, model, scheduler, steps, denoise):
    steps, denoise = int(steps), float(denoise)
    if denoise <= 0:
        return (torch.zeros(0),)
    return (_sigmas_of(ctx, model, scheduler, int(steps / denoise) if denoise < 1 else steps)[-(steps + 1):],)


def _karras_scheduler(ctx, steps, sigma_max, sigma_min, rho):
    from imagine.schedules import karras_sigmas

    levels = karras_sigmas(float(sigma_min), float(sigma_max), int(steps), float(rho), torch.float32)
    return (torch.cat([torch.from_numpy(levels).float(), torch.zeros(1)]),)


def _exponential_scheduler(ctx, steps, sigma_max, sigma_min):
    levels = torch.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), int(steps)).exp()
    return (torch.cat([levels, torch.zeros(1)]),)


def _sd_turbo_scheduler(ctx, model, steps, denoise):
    # (its: of the timesteps 999, 899, ..., 99, `steps` from the one int(10 denoise) from the end, then 0)
    from imagine.schedules import kdiffusion_t_to_sigma

    start = 10 - int(10 * float(denoise))
    t = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + int(steps)]
    sigmas = kdiffusion_t_to_sigma(t, ctx.pipe_of(model.ckpt).schedule.kdiffusion_log_sigmas())
    return (torch.cat([sigmas, torch.zeros(1)]),)


def _split_sigmas(ctx, sigmas, step):
    return (sigmas[:int(step) + 1], sigmas[int(step):])


def _sampler_custom(ctx, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
    kept: dict = {}
    out = ctx.sample(model, latent_image, int(noise_seed), max(len(sigmas) - 1, 1), float(cfg), sampler, None,
                     positive, negative, 1.0, levels=sigmas, add_noise=bool(add_noise), denoised=kept)
    return (out, {**out, "samples": kept["x0"].float()} if "x0" in kept else out)


# -- masks (ComfyUI's comfy_extras/nodes_mask.py) --
def _batched(x: torch.Tensor, n: int) -> torch.Tensor:
    # (its repeat_to_batch_size: repeated in turn, or cut, to n)
    return x[:n] if x.shape[0] >= n else x.repeat(math.ceil(n / x.shape[0]), *[1] * (x.ndim - 1))[:n]


def _composite(destination, source, x, y, mask=None, multiplier=8, resize_source=False):
    """Its composite: `source` over `destination` [B, C, H, W] at (x, y) / multiplier, under `mask` (bilinear to the
    source's size), the part outside the destination dropped."""
    if resize_source:
        source = torch.nn.functional.interpolate(source, size=tuple(destination.shape[2:]), mode="bilinear")
    source = _batched(source, destination.shape[0])
    x = max(-source.shape[3] * multiplier, min(int(x), destination.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(int(y), destination.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                               size=tuple(source.shape[2:]), mode="bilinear")
        mask = _batched(mask, source.shape[0])
    w, h = destination.shape[3] - left + min(0, x), destination.shape[2] - top + min(0, y)
    mask = mask[:, :, :h, :w]
    destination[:, :, top:bottom, left:right] = mask * source[:, :, :h, :w] + \
        (1 - mask) * destination[:, :, top:bottom, left:right]
    return destination


def _latent_composite_masked(ctx, destination, source, x, y, resize_source, mask=None):
    return ({**destination, "samples": _composite(destination["samples"].clone(), source["samples"], x, y, mask, 8,
                                                  bool(resize_source))},)


def _image_composite_masked(ctx, destination, source, x, y, resize_source, mask=None):
    if destination.shape[-1] != source.shape[-1]:
        raise ValueError("ImageCompositeMasked: the pictures have other channel counts (RGB and RGBA)")
    out = _composite(destination.clone().permute(0, 3, 1, 2), source.permute(0, 3, 1, 2), x, y, mask, 1,
                     bool(resize_source))
    return (out.permute(0, 2, 3, 1),)


def _mask_to_image(ctx, mask):
    return (mask.reshape(-1, 1, *mask.shape[-2:]).permute(0, 2, 3, 1).expand(-1, -1, -1, 3),)


def _image_to_mask(ctx, image, channel):
    index = ["red", "green", "blue", "alpha"].index(channel)
    if index >= image.shape[-1]:
        raise ValueError(f"ImageToMask: the picture has no {channel} channel")
    return (image[:, :, :, index],)


def _solid_mask(ctx, value, width, height):
    return (torch.full((1, int(height), int(width)), float(value)),)


def _invert_mask(ctx, mask):
    return (1.0 - mask,)


def _crop_mask(ctx, mask, x, y, width, height):
    mask = mask.reshape(-1, *mask.shape[-2:])
    return (mask[:, int(y):int(y) + int(height), int(x):int(x) + int(width)],)


def _mask_composite(ctx, destination, source, x, y, operation):
    out = destination.reshape(-1, *destination.shape[-2:]).clone()
    source = source.reshape(-1, *source.shape[-2:])
    left, top = int(x), int(y)
    right, bottom = min(left + source.shape[-1], out.shape[-1]), min(top + source.shape[-2], out.shape[-2])
    a, b = out[:, top:bottom, left:right], source[:, :bottom - top, :right - left]
    ops = {"multiply": lambda: a * b, "add": lambda: a + b, "subtract": lambda: a - b,
           "and": lambda: (a.round().bool() & b.round().bool()).float(),
           "or": lambda: (a.round().bool() | b.round().bool()).float(),
           "xor": lambda: (a.round().bool() ^ b.round().bool()).float()}
    out[:, top:bottom, left:right] = ops[operation]()
    return (out.clamp(0.0, 1.0),)


def _feather_mask(ctx, mask, left, top, right, bottom):
    # (its loops, index -0 included: the far sides' ramps start on the first row and column, as ComfyUI's do)
    out = mask.reshape(-1, *mask.shape[-2:]).clone()
    left, right = min(int(left), out.shape[-1]), min(int(right), out.shape[-1])
    top, bottom = min(int(top), out.shape[-2]), min(int(bottom), out.shape[-2])
    for k in range(left):
        out[:, :, k] *= (k + 1.0) / left
    for k in range(right):
        out[:, :, -k] *= (k + 1) / right
    for k in range(top):
        out[:, k, :] *= (k + 1) / top
    for k in range(bottom):
        out[:, -k, :] *= (k + 1) / bottom
    return (out,)


def _grow_mask(ctx, mask, expand, tapered_corners):
    # (its scipy grey dilation, or erosion for expand < 0, by a 3x3 cross or square, |expand| times)
    import scipy.ndimage

    c = 0 if tapered_corners else 1
    kernel = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    out = []
    for m in mask.reshape(-1, *mask.shape[-2:]):
        a = m.numpy()
        for _ in range(abs(int(expand))):
            a = (scipy.ndimage.grey_erosion if int(expand) < 0 else scipy.ndimage.grey_dilation)(a, footprint=kernel)
        out.append(torch.from_numpy(a))
    return (torch.stack(out),)


def _threshold_mask(ctx, mask, value):
    return ((mask > float(value)).float(),)


def _random_noise(ctx, noise_seed):
    return (int(noise_seed),)


def _disable_noise(ctx):
    return (None,)


def _cfg_guider(ctx, model, positive, negative, cfg):
    return ((model, positive, negative, float(cfg)),)


def _basic_guider(ctx, model, conditioning):
    # (no unconditional pass: cfg 1, the conditioning standing in for the negative it does not run)
    return ((model, conditioning, conditioning, 1.0),)


def _sampler_custom_advanced(ctx, noise, guider, sampler, sigmas, latent_image):
    model, positive, negative, cfg = guider
    if positive is negative and SAMPLERS[sampler][0] in CFG_PP_SAMPLERS:
        raise ValueError(f"{sampler} renoises with the unconditional prediction, which BasicGuider does not make: use "
                         "CFGGuider")
    kept: dict = {}
    out = ctx.sample(model, latent_image, 0 if noise is None else noise, max(len(sigmas) - 1, 1), cfg, sampler, None,
                     positive, negative, 1.0, levels=sigmas, add_noise=noise is not None, denoised=kept)
    return (out, {**out, "samples": kept["x0"].float()} if "x0" in kept else out)


def _vae_loader(ctx, vae_name):
    return (("file", str(vae_name)),)


def _upscale_model_loader(ctx, model_name):
    return (ctx.upscale_model(model_name),)


def _image_upscale_with_model(ctx, upscale_model, image):
    """ComfyUI's ImageUpscaleWithModel: the pictures ([B, H, W, C]) through the model over 512-pixel tiles
    overlapping by 32 (imagine.upscalers.upscale_pictures, its tiled_scale), clamped to [0, 1]; a "progress" message
    per tile, its max the tiles of the batch (comfy.utils.get_tiled_scale_steps: one for a picture within a tile)."""
    from imagine.upscalers import COMFYUI_OVERLAP, COMFYUI_TILE, upscale_pictures

    from imagine.server.app import MAX_PICTURE_PIXELS

    x = image[..., :3].movedim(-1, 1).float()
    w, h = x.shape[3] * upscale_model.scale, x.shape[2] * upscale_model.scale
    if w * h > MAX_PICTURE_PIXELS:  # (the picture cap, not the generation size limit: upscalers make large pictures)
        raise ValueError(f"upscaled, the picture would be {w}x{h}: past the server's cap of {MAX_PICTURE_PIXELS:,} "
                         "pixels")
    node = ctx.current  # (ComfyUI's ProgressBar over the tiles: a "progress" message after each, as KSampler's steps)
    progress = lambda done, total: ctx.emit("progress", {"value": done, "max": total, "node": node})  # noqa: E731
    return (upscale_pictures(upscale_model, x, COMFYUI_TILE, COMFYUI_OVERLAP, progress).movedim(1, -1).contiguous(),)


def _vae_decode(ctx, samples, vae):
    return (ctx.decode(samples["samples"], vae),)


def _vae_encode(ctx, pixels, vae):
    return ({"samples": ctx.encode(pixels, vae)},)


def _masked_grey(pixels: torch.Tensor, mask: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's inpainting picture (VAEEncodeForInpaint, InpaintModelConditioning): the mask bilinear to the
    picture's size, both cropped about their centre to the VAE's factor, the masked part (the mask rounded) grey 0.5.
    Returns (picture [B, H, W, 3], mask [B, 1, H, W])."""
    h, w = pixels.shape[1] // f * f, pixels.shape[2] // f * f
    if h == 0 or w == 0:
        raise ValueError(f"the picture is {pixels.shape[2]}x{pixels.shape[1]}: the VAE needs at least {f} pixels a "
                         "side")
    mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=tuple(pixels.shape[1:3]),
                                           mode="bilinear")
    dy, dx = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
    pixels, mask = pixels[:, dy:dy + h, dx:dx + w, :3], mask[:, :, dy:dy + h, dx:dx + w]
    keep = (1.0 - mask.round()).squeeze(1)[..., None]
    return (pixels - 0.5) * keep + 0.5, mask


def _vae_encode_for_inpaint(ctx, pixels, vae, mask, grow_mask_by):
    # (ComfyUI's: the picture with its masked part grey, and the noise mask grown by a box of grow_mask_by pixels)
    grey, mask = _masked_grey(pixels, mask, ctx.factor(vae))
    g = int(grow_mask_by)
    if g > 0:
        grown = torch.nn.functional.conv2d(mask.round(), torch.ones(1, 1, g, g), padding=math.ceil((g - 1) / 2))
        mask = grown.clamp(0, 1)[:, :, :grey.shape[1], :grey.shape[2]]
    return ({"samples": ctx.encode(grey, vae), "noise_mask": mask.round()},)


def _inpaint_model_conditioning(ctx, positive, negative, vae, pixels, mask, noise_mask=True):
    # (ComfyUI's: the grey-masked picture's latents and the mask ride on both conditionings; the latent is the whole
    # picture's, with the mask as its noise mask unless noise_mask is off)
    grey, mask = _masked_grey(pixels, mask, ctx.factor(vae))
    concat = (ctx.encode(grey, vae), mask)
    latent = {"samples": ctx.encode(pixels, vae), **({"noise_mask": mask} if noise_mask else {})}
    return (_each(positive, concat=concat), _each(negative, concat=concat), latent)


# an inpainting model's "masked picture" where no mask is given: ComfyUI's latents of grey for SD's VAE (its
# blank_inpaint_image_like)
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def _batch_resized(x: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's utils.resize_to_batch_size: n items picked evenly from x's batch (not repeated in turn)."""
    b = x.shape[0]
    if b == n:
        return x
    if n <= 1:
        return x[:n]
    if n < b:
        scale = (b - 1) / (n - 1)
        return x[[min(round(i * scale), b - 1) for i in range(n)]]
    return x[[min(math.floor((i + 0.0001) * b / n), b - 1) for i in range(n)]]


def inpaint_concat(z: torch.Tensor, concat, noise_mask: torch.Tensor | None) -> torch.Tensor:
    """An inpainting model's extra channels as ComfyUI's concat_cond makes them for a run from latents z: the mask
    (InpaintModelConditioning's, else the latent's noise mask; bilinear to the latents' size, rounded) and the masked
    picture's latents (InpaintModelConditioning's, else z itself), each brought to z's batch; with neither, a mask of
    ones and BLANK_INPAINT_LATENT."""
    n, size = z.shape[0], tuple(z.shape[2:])
    mask = concat[1] if concat is not None else noise_mask
    if mask is None:
        blank = torch.tensor(BLANK_INPAINT_LATENT, dtype=z.dtype).view(1, -1, 1, 1)
        if z.shape[1] != blank.shape[1]:
            raise ValueError(f"ComfyUI's blank inpainting latents are for 4-channel latents; this model's have "
                             f"{z.shape[1]}: give the inpainting model a mask (VAEEncodeForInpaint, "
                             "InpaintModelConditioning or SetLatentNoiseMask)")
        return torch.cat([torch.ones(n, 1, *size, dtype=z.dtype), blank.expand(n, -1, *size)], dim=1)
    picture = z if concat is None else concat[0]
    if tuple(picture.shape[1:]) != tuple(z.shape[1:]):
        picture = torch.nn.functional.interpolate(picture.float(), size=size, mode="bilinear")
    mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if tuple(mask.shape[-2:]) != size:
        mask = torch.nn.functional.interpolate(mask, size=size, mode="bilinear")
    return torch.cat([_batch_resized(mask.round(), n), _batch_resized(picture.float(), n)], dim=1)


def _sides(x: torch.Tensor, w: int, h: int) -> tuple[int, int] | None:
    """ComfyUI's target size: a side of 0 keeps the aspect ratio; both 0, no change (None)."""
    if w == 0 and h == 0:
        return None
    if w == 0:
        w = max(1, round(x.shape[3] * h / x.shape[2]))
    elif h == 0:
        h = max(1, round(x.shape[2] * w / x.shape[3]))
    return w, h


def _latent_upscale(ctx, samples, upscale_method, width, height, crop):
    f = int(getattr(ctx.served.pipe, "scale", 8))
    size = _sides(samples["samples"], int(width) // f, int(height) // f)
    return (samples if size is None else {**samples, "samples": ctx.scaled(samples["samples"], upscale_method, *size,
                                                                            crop, f)},)


def _latent_upscale_by(ctx, samples, upscale_method, scale_by):
    z, f = samples["samples"], int(getattr(ctx.served.pipe, "scale", 8))
    w, h = round(z.shape[3] * float(scale_by)), round(z.shape[2] * float(scale_by))
    return ({**samples, "samples": ctx.scaled(z, upscale_method, w, h, "disabled", f)},)


def _image_scale(ctx, image, upscale_method, width, height, crop):
    x = image.movedim(-1, 1)
    size = _sides(x, int(width), int(height))
    return (image if size is None else ctx.scaled(x, upscale_method, *size, crop).movedim(1, -1),)


def _image_scale_by(ctx, image, upscale_method, scale_by):
    x = image.movedim(-1, 1)
    w, h = round(x.shape[3] * float(scale_by)), round(x.shape[2] * float(scale_by))
    return (ctx.scaled(x, upscale_method, w, h, "disabled").movedim(1, -1),)


def _image_scale_to_total_pixels(ctx, image, upscale_method, megapixels):
    # (comfy_extras/nodes_post_processing.py: the side lengths that hold `megapixels` x 1024^2 pixels, the aspect kept)
    x = image.movedim(-1, 1)
    scale = math.sqrt(int(float(megapixels) * 1024 * 1024) / (x.shape[3] * x.shape[2]))
    return (ctx.scaled(x, upscale_method, round(x.shape[3] * scale), round(x.shape[2] * scale), "disabled")
            .movedim(1, -1),)


def _image_crop(ctx, image, width, height, x, y):
    # (nodes_images.py's ImageCrop: the corner held inside the picture, the crop cut at its edges)
    x, y = min(int(x), image.shape[2] - 1), min(int(y), image.shape[1] - 1)
    return (image[:, y:y + int(height), x:x + int(width), :],)


def _repeat_image_batch(ctx, image, amount):
    return (image.repeat((int(amount), 1, 1, 1)),)


def _image_from_batch(ctx, image, batch_index, length):
    first = min(image.shape[0] - 1, int(batch_index))
    return (image[first:first + min(image.shape[0] - first, int(length))].clone(),)


BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")


def _image_blend(ctx, image1, image2, blend_factor, blend_mode):
    # (nodes_post_processing.py's ImageBlend: image2 brought to image1's size (bicubic, centre crop), blended by the
    # mode, then mixed with image1 by the factor, clamped to [0, 1])
    a = image1
    b = image2 if image2.shape == a.shape else \
        _upscale(image2.movedim(-1, 1), "bicubic", a.shape[2], a.shape[1], "center").movedim(1, -1)
    soft = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
    blended = {"normal": lambda: b, "multiply": lambda: a * b, "screen": lambda: 1 - (1 - a) * (1 - b),
               "overlay": lambda: torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
               "soft_light": lambda: torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (soft - a)),
               "difference": lambda: a - b}[blend_mode]()
    f = float(blend_factor)
    return (torch.clamp(a * (1 - f) + blended * f, 0, 1),)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    # (its gaussian_kernel: exp(-d^2 / 2 sigma^2) over a size x size grid spanning [-1, 1], summing to 1; d squared
    # after its square root, as it rounds)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filtered(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    # (a kernel per channel over the picture reflect-padded by the radius, as its blur and sharpen run it)
    c = image.shape[3]
    x = torch.nn.functional.pad(image.permute(0, 3, 1, 2), (radius,) * 4, "reflect")
    out = torch.nn.functional.conv2d(x, kernel.repeat(c, 1, 1).unsqueeze(1), padding=kernel.shape[0] // 2, groups=c)
    return out[:, :, radius:-radius, radius:-radius].permute(0, 2, 3, 1)


def _image_blur(ctx, image, blur_radius, sigma):
    r = int(blur_radius)
    return (image if r == 0 else _filtered(image, _gaussian_kernel(2 * r + 1, float(sigma)), r),)


def _image_sharpen(ctx, image, sharpen_radius, sigma, alpha):
    # (its kernel: the Gaussian times -10 alpha, its centre raised so that it sums to 1; clamped after)
    r = int(sharpen_radius)
    if r == 0:
        return (image,)
    kernel = _gaussian_kernel(2 * r + 1, float(sigma)) * -(float(alpha) * 10)
    kernel[r, r] = kernel[r, r] - kernel.sum() + 1.0
    return (torch.clamp(_filtered(image, kernel, r), 0, 1),)


def _image_invert(ctx, image):
    return (1.0 - image,)


def _upscale(z: torch.Tensor, method: str, w: int, h: int, crop: str) -> torch.Tensor:
    """ComfyUI's common_upscale [B, C, H, W]: an optional centre crop to the target's aspect ratio, then torch's
    interpolation, or for pictures "lanczos", Pillow's on each picture in 8 bits (its lanczos: truncated, then /255)."""
    if crop == "center":
        old_w, old_h = z.shape[3], z.shape[2]
        old_aspect, new_aspect = old_w / old_h, w / h
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        z = z[:, :, y:old_h - y, x:old_w - x]
    if method == "lanczos":
        pictures = [Image.fromarray(np.clip(255.0 * x.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8))
                    for x in z]
        return torch.stack([torch.from_numpy(np.asarray(p.resize((w, h), resample=Image.LANCZOS), dtype=np.float32)
                                             / 255.0).movedim(-1, 0) for p in pictures])
    if method == "bicubic" or method == "bilinear":
        return torch.nn.functional.interpolate(z, size=(h, w), mode=method, align_corners=False)
    return torch.nn.functional.interpolate(z, size=(h, w), mode=method)


def _input_file_hash(state, inputs) -> str:
    # (LoadImage's IS_CHANGED: the file's SHA-256, so an upload under the same name is loaded again)
    import hashlib

    path = state.folder("input") / str(inputs.get("image", ""))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _load_image(ctx, image):
    path = ctx.state.folder("input") / image
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        if "A" in im.getbands():  # (ComfyUI's mask: 1 - alpha)
            mask = 1.0 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
    return (torch.from_numpy(rgb)[None], mask[None])


def _save_image(ctx, images, filename_prefix="ComfyUI"):
    return {"ui": {"images": ctx.save(images, str(filename_prefix), "output")}, "result": ()}


def _preview_image(ctx, images):
    prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return {"ui": {"images": ctx.save(images, prefix, "temp")}, "result": ()}


def _samplers_list(state):
    return list(SAMPLERS)


NODES: dict[str, Node] = {
    "CheckpointLoaderSimple": Node(
        lambda s: {"required": {"ckpt_name": (s.checkpoint_names(), {"tooltip": "The served model (imagine serve "
                                                                               "--ckpt-dir serves several)."})}},
        ("MODEL", "CLIP", "VAE"), _checkpoint, "loaders", "Loads a diffusion model checkpoint.",
        display_name="Load Checkpoint"),
    "unCLIPCheckpointLoader": Node(
        lambda s: {"required": {"ckpt_name": (s.checkpoint_names(),)}}, ("MODEL", "CLIP", "VAE", "CLIP_VISION"),
        _unclip_checkpoint, "loaders", "Loads an unCLIP checkpoint and its CLIP image tower.",
        display_name="unCLIPCheckpointLoader"),
    "CLIPVisionLoader": Node(
        lambda s: {"required": {"clip_name": (s.clip_vision_names(),)}}, ("CLIP_VISION",), _clip_vision_loader,
        "loaders", "Loads a CLIP image tower file of serve --clip-vision-dir (clip_vision_g.safetensors for SDXL's "
        "Revision).", display_name="Load CLIP Vision"),
    "CLIPVisionEncode": Node(
        lambda s: {"required": {"clip_vision": ("CLIP_VISION",), "image": ("IMAGE",),
                                "crop": (["center", "none"],)}},
        ("CLIP_VISION_OUTPUT",), _clip_vision_encode, "conditioning", display_name="CLIP Vision Encode"),
    "unCLIPConditioning": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
                                "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0,
                                                                 "step": 0.01})}},
        ("CONDITIONING",), _unclip_conditioning, "conditioning", display_name="unCLIPConditioning"),
    "CLIPTextEncode": Node(
        lambda s: {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}},
        ("CONDITIONING",), _clip_text_encode, "conditioning", "Encodes a text prompt with the CLIP model.",
        display_name="CLIP Text Encode (Prompt)"),
    "ModelSamplingDiscrete": Node(
        lambda s: {"required": {"model": ("MODEL",),
                                "sampling": (["eps", "v_prediction", "lcm", "x0", "img_to_img"],),
                                "zsnr": ("BOOLEAN", {"default": False})}},
        ("MODEL",), _model_sampling_discrete, "advanced/model", display_name="ModelSamplingDiscrete"),
    "LoraLoader": Node(
        lambda s: {"required": {"model": ("MODEL",), "clip": ("CLIP",), "lora_name": (s.lora_names(),),
                                "strength_model": _strength(), "strength_clip": _strength()}},
        ("MODEL", "CLIP"), _lora_loader, "loaders", "LoRAs of serve --lora-dir, merged for the prompt's sampling.",
        display_name="Load LoRA"),
    "LoraLoaderModelOnly": Node(
        lambda s: {"required": {"model": ("MODEL",), "lora_name": (s.lora_names(),),
                                "strength_model": _strength()}},
        ("MODEL",), _lora_loader_model_only, "loaders", display_name="LoraLoaderModelOnly"),
    "CLIPSetLastLayer": Node(
        lambda s: {"required": {"clip": ("CLIP",), "stop_at_clip_layer": _int(-1, -24, -1)}},
        ("CLIP",), _clip_set_last_layer, "conditioning", display_name="CLIP Set Last Layer"),
    "EmptyLatentImage": Node(
        lambda s: {"required": {"width": _int(512, 16, MAX_RESOLUTION, 8), "height": _int(512, 16, MAX_RESOLUTION, 8),
                                "batch_size": _int(1, 1, 4096)}},
        ("LATENT",), _empty_latent, "latent", "Creates a batch of empty latent images to be denoised.",
        display_name="Empty Latent Image"),
    "KSampler": Node(
        lambda s: {"required": {
            "model": ("MODEL",), "seed": _int(0, 0, MAX_SEED, control_after_generate=True),
            "steps": _int(20, 1, 10000), "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                                           "round": 0.01}),
            "sampler_name": (list(SAMPLERS),), "scheduler": (list(SCHEDULERS),), "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}},
        ("LATENT",), _ksampler, "sampling", "Denoises the latent image with the model, the prompts and the sampler.",
        display_name="KSampler"),
    "KSamplerAdvanced": Node(
        lambda s: {"required": {
            "model": ("MODEL",), "add_noise": (["enable", "disable"],),
            "noise_seed": _int(0, 0, MAX_SEED, control_after_generate=True), "steps": _int(20, 1, 10000),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(SAMPLERS),), "scheduler": (list(SCHEDULERS),), "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",), "latent_image": ("LATENT",), "start_at_step": _int(0, 0, 10000),
            "end_at_step": _int(10000, 0, 10000), "return_with_leftover_noise": (["disable", "enable"],)}},
        ("LATENT",), _ksampler_advanced, "sampling", display_name="KSampler (Advanced)"),
    "SetLatentNoiseMask": Node(lambda s: {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}, ("LATENT",),
                               _set_latent_noise_mask, "latent/inpaint", display_name="Set Latent Noise Mask"),
    "VAEDecode": Node(lambda s: {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",), _vae_decode,
                      "latent", "Decodes latent images back into pixel space images.", display_name="VAE Decode"),
    "VAEEncode": Node(lambda s: {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}, ("LATENT",), _vae_encode,
                      "latent", display_name="VAE Encode"),
    "LatentCompositeMasked": Node(
        lambda s: {"required": {"destination": ("LATENT",), "source": ("LATENT",),
                                "x": _int(0, 0, MAX_RESOLUTION, 8), "y": _int(0, 0, MAX_RESOLUTION, 8),
                                "resize_source": ("BOOLEAN", {"default": False})}, "optional": {"mask": ("MASK",)}},
        ("LATENT",), _latent_composite_masked, "latent", display_name="LatentCompositeMasked"),
    "ImageCompositeMasked": Node(
        lambda s: {"required": {"destination": ("IMAGE",), "source": ("IMAGE",), "x": _int(0, 0, MAX_RESOLUTION),
                                "y": _int(0, 0, MAX_RESOLUTION), "resize_source": ("BOOLEAN", {"default": False})},
                   "optional": {"mask": ("MASK",)}},
        ("IMAGE",), _image_composite_masked, "image", display_name="ImageCompositeMasked"),
    "MaskToImage": Node(lambda s: {"required": {"mask": ("MASK",)}}, ("IMAGE",), _mask_to_image, "mask",
                        display_name="Convert Mask to Image"),
    "ImageToMask": Node(lambda s: {"required": {"image": ("IMAGE",), "channel": (["red", "green", "blue", "alpha"],)}},
                        ("MASK",), _image_to_mask, "mask", display_name="Convert Image to Mask"),
    "SolidMask": Node(
        lambda s: {"required": {"value": _fraction(1.0), "width": _int(512, 1, MAX_RESOLUTION),
                                "height": _int(512, 1, MAX_RESOLUTION)}},
        ("MASK",), _solid_mask, "mask", display_name="SolidMask"),
    "InvertMask": Node(lambda s: {"required": {"mask": ("MASK",)}}, ("MASK",), _invert_mask, "mask",
                       display_name="InvertMask"),
    "CropMask": Node(
        lambda s: {"required": {"mask": ("MASK",), "x": _int(0, 0, MAX_RESOLUTION), "y": _int(0, 0, MAX_RESOLUTION),
                                "width": _int(512, 1, MAX_RESOLUTION), "height": _int(512, 1, MAX_RESOLUTION)}},
        ("MASK",), _crop_mask, "mask", display_name="CropMask"),
    "MaskComposite": Node(
        lambda s: {"required": {"destination": ("MASK",), "source": ("MASK",), "x": _int(0, 0, MAX_RESOLUTION),
                                "y": _int(0, 0, MAX_RESOLUTION),
                                "operation": (["multiply", "add", "subtract", "and", "or", "xor"],)}},
        ("MASK",), _mask_composite, "mask", display_name="MaskComposite"),
    "FeatherMask": Node(
        lambda s: {"required": {"mask": ("MASK",), "left": _int(0, 0, MAX_RESOLUTION),
                                "top": _int(0, 0, MAX_RESOLUTION), "right": _int(0, 0, MAX_RESOLUTION),
                                "bottom": _int(0, 0, MAX_RESOLUTION)}},
        ("MASK",), _feather_mask, "mask", display_name="FeatherMask"),
    "GrowMask": Node(
        lambda s: {"required": {"mask": ("MASK",), "expand": _int(0, -MAX_RESOLUTION, MAX_RESOLUTION),
                                "tapered_corners": ("BOOLEAN", {"default": True})}},
        ("MASK",), _grow_mask, "mask", display_name="GrowMask"),
    "ThresholdMask": Node(lambda s: {"required": {"mask": ("MASK",), "value": _fraction(0.5)}}, ("MASK",),
                          _threshold_mask, "mask", display_name="ThresholdMask"),
    "VAELoader": Node(lambda s: {"required": {"vae_name": (s.vae_names(),)}}, ("VAE",), _vae_loader, "loaders",
                      "The VAE files of serve --vae-dir.", display_name="Load VAE"),
    "UpscaleModelLoader": Node(lambda s: {"required": {"model_name": (s.upscaler_names(),)}}, ("UPSCALE_MODEL",),
                               _upscale_model_loader, "loaders", "The upscaler models of serve --upscaler-dir.",
                               display_name="Load Upscale Model"),
    "ImageUpscaleWithModel": Node(lambda s: {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}},
                                  ("IMAGE",), _image_upscale_with_model, "image/upscaling",
                                  display_name="Upscale Image (using Model)"),
    "VAEEncodeForInpaint": Node(
        lambda s: {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
                                "grow_mask_by": _int(6, 0, 64)}},
        ("LATENT",), _vae_encode_for_inpaint, "latent/inpaint", display_name="VAE Encode (for Inpainting)"),
    "CLIPTextEncodeSDXL": Node(
        lambda s: {"required": {"clip": ("CLIP",), "width": _int(1024, 0, MAX_RESOLUTION),
                                "height": _int(1024, 0, MAX_RESOLUTION), "crop_w": _int(0, 0, MAX_RESOLUTION),
                                "crop_h": _int(0, 0, MAX_RESOLUTION), "target_width": _int(1024, 0, MAX_RESOLUTION),
                                "target_height": _int(1024, 0, MAX_RESOLUTION),
                                "text_g": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                                "text_l": ("STRING", {"multiline": True, "dynamicPrompts": True})}},
        ("CONDITIONING",), _clip_text_encode_sdxl, "advanced/conditioning", display_name="CLIPTextEncodeSDXL"),
    "CLIPTextEncodeSDXLRefiner": Node(
        lambda s: {"required": {"ascore": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}),
                                "width": _int(1024, 0, MAX_RESOLUTION), "height": _int(1024, 0, MAX_RESOLUTION),
                                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}},
        ("CONDITIONING",), _clip_text_encode_sdxl_refiner, "advanced/conditioning",
        display_name="CLIPTextEncodeSDXLRefiner"),
    "ConditioningCombine": Node(
        lambda s: {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}},
        ("CONDITIONING",), _conditioning_combine, "conditioning", display_name="Conditioning (Combine)"),
    "ConditioningSetArea": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "width": _int(64, 64, MAX_RESOLUTION, 8),
                                "height": _int(64, 64, MAX_RESOLUTION, 8), "x": _int(0, 0, MAX_RESOLUTION, 8),
                                "y": _int(0, 0, MAX_RESOLUTION, 8), "strength": _strength_0_10()}},
        ("CONDITIONING",), _conditioning_set_area, "conditioning", display_name="Conditioning (Set Area)"),
    "ConditioningSetAreaPercentage": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "width": _fraction(1.0), "height": _fraction(1.0),
                                "x": _fraction(0.0), "y": _fraction(0.0), "strength": _strength_0_10()}},
        ("CONDITIONING",), _conditioning_set_area_percentage, "conditioning",
        display_name="Conditioning (Set Area with Percentage)"),
    "ConditioningSetAreaStrength": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "strength": _strength_0_10()}},
        ("CONDITIONING",), _conditioning_set_area_strength, "conditioning", display_name="ConditioningSetAreaStrength"),
    "ConditioningSetMask": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "mask": ("MASK",), "strength": _strength_0_10(),
                                "set_cond_area": (["default", "mask bounds"],)}},
        ("CONDITIONING",), _conditioning_set_mask, "conditioning", display_name="Conditioning (Set Mask)"),
    "ConditioningSetTimestepRange": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "start": _fraction(0.0, 0.001),
                                "end": _fraction(1.0, 0.001)}},
        ("CONDITIONING",), _conditioning_set_timestep_range, "advanced/conditioning",
        display_name="ConditioningSetTimestepRange"),
    "ConditioningZeroOut": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",)}}, ("CONDITIONING",), _conditioning_zero_out,
        "advanced/conditioning", display_name="ConditioningZeroOut"),
    "ConditioningAverage": Node(
        lambda s: {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",),
                                "conditioning_to_strength": _fraction(1.0)}},
        ("CONDITIONING",), _conditioning_average, "conditioning", display_name="Conditioning (Average)"),
    "ConditioningConcat": Node(
        lambda s: {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}},
        ("CONDITIONING",), _conditioning_concat, "conditioning", display_name="Conditioning (Concat)"),
    "KSamplerSelect": Node(lambda s: {"required": {"sampler_name": (list(SAMPLERS),)}}, ("SAMPLER",),
                           _ksampler_select, "sampling/custom_sampling/samplers", display_name="KSamplerSelect"),
    "BasicScheduler": Node(
        lambda s: {"required": {"model": ("MODEL",), "scheduler": (list(SCHEDULERS),), "steps": _int(20, 1, 10000),
                                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}},
        ("SIGMAS",), _basic_scheduler, "sampling/custom_sampling/schedulers", display_name="BasicScheduler"),
    "KarrasScheduler": Node(
        lambda s: {"required": {"steps": _int(20, 1, 10000), "sigma_max": _level(14.614642),
                                "sigma_min": _level(0.0291675), "rho": ("FLOAT", {"default": 7.0, "min": 0.0,
                                                                                  "max": 100.0, "step": 0.01})}},
        ("SIGMAS",), _karras_scheduler, "sampling/custom_sampling/schedulers", display_name="KarrasScheduler"),
    "ExponentialScheduler": Node(
        lambda s: {"required": {"steps": _int(20, 1, 10000), "sigma_max": _level(14.614642),
                                "sigma_min": _level(0.0291675)}},
        ("SIGMAS",), _exponential_scheduler, "sampling/custom_sampling/schedulers",
        display_name="ExponentialScheduler"),
    "SDTurboScheduler": Node(
        lambda s: {"required": {"model": ("MODEL",), "steps": _int(1, 1, 10),
                                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}},
        ("SIGMAS",), _sd_turbo_scheduler, "sampling/custom_sampling/schedulers", display_name="SDTurboScheduler"),
    "SplitSigmas": Node(
        lambda s: {"required": {"sigmas": ("SIGMAS",), "step": _int(0, 0, 10000)}}, ("SIGMAS", "SIGMAS"),
        _split_sigmas, "sampling/custom_sampling/sigmas", output_names=("high_sigmas", "low_sigmas"),
        display_name="SplitSigmas"),
    "SamplerCustom": Node(
        lambda s: {"required": {"model": ("MODEL",), "add_noise": ("BOOLEAN", {"default": True}),
                                "noise_seed": _int(0, 0, MAX_SEED, control_after_generate=True),
                                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                                  "round": 0.01}),
                                "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "sampler": ("SAMPLER",),
                                "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)}},
        ("LATENT", "LATENT"), _sampler_custom, "sampling/custom_sampling", output_names=("output", "denoised_output"),
        display_name="SamplerCustom"),
    "RandomNoise": Node(lambda s: {"required": {"noise_seed": _int(0, 0, MAX_SEED, control_after_generate=True)}},
                        ("NOISE",), _random_noise, "sampling/custom_sampling/noise", display_name="RandomNoise"),
    "DisableNoise": Node(lambda s: {"required": {}}, ("NOISE",), _disable_noise, "sampling/custom_sampling/noise",
                         display_name="DisableNoise"),
    "CFGGuider": Node(
        lambda s: {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                                  "round": 0.01})}},
        ("GUIDER",), _cfg_guider, "sampling/custom_sampling/guiders", display_name="CFGGuider"),
    "BasicGuider": Node(
        lambda s: {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}, ("GUIDER",), _basic_guider,
        "sampling/custom_sampling/guiders", display_name="BasicGuider"),
    "SamplerCustomAdvanced": Node(
        lambda s: {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",),
                                "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)}},
        ("LATENT", "LATENT"), _sampler_custom_advanced, "sampling/custom_sampling",
        output_names=("output", "denoised_output"), display_name="SamplerCustomAdvanced"),
    "ControlNetLoader": Node(
        lambda s: {"required": {"control_net_name": (s.controlnet_names(),)}}, ("CONTROL_NET",), _controlnet_loader,
        "loaders", "The ControlNets of serve --controlnet, by their file names or names.",
        display_name="Load ControlNet Model"),
    "ControlNetApplyAdvanced": Node(
        lambda s: {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                                "control_net": ("CONTROL_NET",), "image": ("IMAGE",),
                                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
                   "optional": {"vae": ("VAE",)}},
        ("CONDITIONING", "CONDITIONING"), _controlnet_apply_advanced, "conditioning/controlnet",
        output_names=("positive", "negative"), display_name="Apply ControlNet"),
    "ControlNetApply": Node(
        lambda s: {"required": {"conditioning": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
                                "image": ("IMAGE",),
                                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})}},
        ("CONDITIONING",), _controlnet_apply, "conditioning/controlnet", display_name="Apply ControlNet (OLD)"),
    "InpaintModelConditioning": Node(
        lambda s: {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                                "pixels": ("IMAGE",), "mask": ("MASK",),
                                "noise_mask": ("BOOLEAN", {"default": True, "tooltip": "Add a noise mask to the "
                                               "latent so sampling will only happen within the mask."})}},
        ("CONDITIONING", "CONDITIONING", "LATENT"), _inpaint_model_conditioning, "conditioning/inpaint",
        output_names=("positive", "negative", "latent"), display_name="InpaintModelConditioning"),
    "LatentUpscale": Node(
        lambda s: {"required": {"samples": ("LATENT",), "upscale_method": (list(UPSCALE_METHODS),),
                                "width": _int(512, 0, MAX_RESOLUTION, 8), "height": _int(512, 0, MAX_RESOLUTION, 8),
                                "crop": (["disabled", "center"],)}},
        ("LATENT",), _latent_upscale, "latent", display_name="Upscale Latent"),
    "LatentUpscaleBy": Node(
        lambda s: {"required": {"samples": ("LATENT",), "upscale_method": (list(UPSCALE_METHODS),),
                                "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}},
        ("LATENT",), _latent_upscale_by, "latent", display_name="Upscale Latent By"),
    "ImageScale": Node(
        lambda s: {"required": {"image": ("IMAGE",), "upscale_method": ([*UPSCALE_METHODS, "lanczos"],),
                                "width": _int(512, 0, MAX_RESOLUTION), "height": _int(512, 0, MAX_RESOLUTION),
                                "crop": (["disabled", "center"],)}},
        ("IMAGE",), _image_scale, "image/upscaling", display_name="Upscale Image"),
    "ImageScaleBy": Node(
        lambda s: {"required": {"image": ("IMAGE",), "upscale_method": ([*UPSCALE_METHODS, "lanczos"],),
                                "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}},
        ("IMAGE",), _image_scale_by, "image/upscaling", display_name="Upscale Image By"),
    "ImageScaleToTotalPixels": Node(
        lambda s: {"required": {"image": ("IMAGE",), "upscale_method": ([*UPSCALE_METHODS, "lanczos"],),
                                "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01})}},
        ("IMAGE",), _image_scale_to_total_pixels, "image/upscaling", display_name="ImageScaleToTotalPixels"),
    "ImageCrop": Node(
        lambda s: {"required": {"image": ("IMAGE",), "width": _int(512, 1, MAX_RESOLUTION),
                                "height": _int(512, 1, MAX_RESOLUTION), "x": _int(0, 0, MAX_RESOLUTION),
                                "y": _int(0, 0, MAX_RESOLUTION)}},
        ("IMAGE",), _image_crop, "image/transform", display_name="ImageCrop"),
    "RepeatImageBatch": Node(lambda s: {"required": {"image": ("IMAGE",), "amount": _int(1, 1, 4096)}}, ("IMAGE",),
                             _repeat_image_batch, "image/batch", display_name="RepeatImageBatch"),
    "ImageFromBatch": Node(
        lambda s: {"required": {"image": ("IMAGE",), "batch_index": _int(0, 0, 4095), "length": _int(1, 1, 4096)}},
        ("IMAGE",), _image_from_batch, "image/batch", display_name="ImageFromBatch"),
    "ImageBlend": Node(
        lambda s: {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",),
                                "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                                "blend_mode": (list(BLEND_MODES),)}},
        ("IMAGE",), _image_blend, "image/postprocessing", display_name="Image Blend"),
    "ImageBlur": Node(
        lambda s: {"required": {"image": ("IMAGE",), "blur_radius": _int(1, 1, 31),
                                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1})}},
        ("IMAGE",), _image_blur, "image/postprocessing", display_name="Image Blur"),
    "ImageSharpen": Node(
        lambda s: {"required": {"image": ("IMAGE",), "sharpen_radius": _int(1, 1, 31),
                                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
                                "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01})}},
        ("IMAGE",), _image_sharpen, "image/postprocessing", display_name="Image Sharpen"),
    "ImageInvert": Node(lambda s: {"required": {"image": ("IMAGE",)}}, ("IMAGE",), _image_invert, "image",
                        display_name="Invert Image"),
    "ImageBatch": Node(lambda s: {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}, ("IMAGE",),
                       _image_batch, "image", display_name="Batch Images"),
    "EmptyImage": Node(
        lambda s: {"required": {"width": _int(512, 1, MAX_RESOLUTION), "height": _int(512, 1, MAX_RESOLUTION),
                                "batch_size": _int(1, 1, 4096), "color": _int(0, 0, 0xFFFFFF, display="color")}},
        ("IMAGE",), _empty_image, "image", display_name="EmptyImage"),
    "ImagePadForOutpaint": Node(
        lambda s: {"required": {"image": ("IMAGE",), "left": _int(0, 0, MAX_RESOLUTION, 8),
                                "top": _int(0, 0, MAX_RESOLUTION, 8), "right": _int(0, 0, MAX_RESOLUTION, 8),
                                "bottom": _int(0, 0, MAX_RESOLUTION, 8), "feathering": _int(40, 0, MAX_RESOLUTION)}},
        ("IMAGE", "MASK"), _image_pad_for_outpaint, "image", display_name="Pad Image for Outpainting"),
    "RepeatLatentBatch": Node(
        lambda s: {"required": {"samples": ("LATENT",), "amount": _int(1, 1, 64)}}, ("LATENT",), _repeat_latent_batch,
        "latent/batch", display_name="Repeat Latent Batch"),
    "LatentFromBatch": Node(
        lambda s: {"required": {"samples": ("LATENT",), "batch_index": _int(0, 0, 63), "length": _int(1, 1, 64)}},
        ("LATENT",), _latent_from_batch, "latent/batch", display_name="Latent From Batch"),
    "LatentComposite": Node(
        lambda s: {"required": {"samples_to": ("LATENT",), "samples_from": ("LATENT",),
                                "x": _int(0, 0, MAX_RESOLUTION, 8), "y": _int(0, 0, MAX_RESOLUTION, 8),
                                "feather": _int(0, 0, MAX_RESOLUTION, 8)}},
        ("LATENT",), _latent_composite, "latent", display_name="Latent Composite"),
    "LatentAdd": Node(lambda s: {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}, ("LATENT",),
                      _latent_add, "latent/advanced", display_name="LatentAdd"),
    "LatentSubtract": Node(lambda s: {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}, ("LATENT",),
                           _latent_subtract, "latent/advanced", display_name="LatentSubtract"),
    "LatentMultiply": Node(
        lambda s: {"required": {"samples": ("LATENT",),
                                "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}},
        ("LATENT",), _latent_multiply, "latent/advanced", display_name="LatentMultiply"),
    "LatentInterpolate": Node(
        lambda s: {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",), "ratio": _fraction(1.0)}},
        ("LATENT",), _latent_interpolate, "latent/advanced", display_name="LatentInterpolate"),
    "LatentBatch": Node(lambda s: {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}, ("LATENT",),
                        _latent_batch, "latent/batch", display_name="LatentBatch"),
    "LatentBatchSeedBehavior": Node(
        lambda s: {"required": {"samples": ("LATENT",), "seed_behavior": (["random", "fixed"], {"default": "fixed"})}},
        ("LATENT",), _latent_batch_seed_behavior, "latent/advanced", display_name="LatentBatchSeedBehavior"),
    "LatentBlend": Node(
        lambda s: {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",), "blend_factor": _fraction(0.5)}},
        ("LATENT",), _latent_blend, "_for_testing", display_name="Latent Blend"),
    "LatentCrop": Node(
        lambda s: {"required": {"samples": ("LATENT",), "width": _int(512, 64, MAX_RESOLUTION, 8),
                                "height": _int(512, 64, MAX_RESOLUTION, 8), "x": _int(0, 0, MAX_RESOLUTION, 8),
                                "y": _int(0, 0, MAX_RESOLUTION, 8)}},
        ("LATENT",), _latent_crop, "latent/transform", display_name="Crop Latent"),
    "LatentRotate": Node(
        lambda s: {"required": {"samples": ("LATENT",),
                                "rotation": (["none", "90 degrees", "180 degrees", "270 degrees"],)}},
        ("LATENT",), _latent_rotate, "latent/transform", display_name="Rotate Latent"),
    "LatentFlip": Node(
        lambda s: {"required": {"samples": ("LATENT",),
                                "flip_method": (["x-axis: vertically", "y-axis: horizontally"],)}},
        ("LATENT",), _latent_flip, "latent/transform", display_name="Flip Latent"),
    "LoadImageMask": Node(
        lambda s: {"required": {"image": (s.input_files(), {"image_upload": True}),
                                "channel": (["alpha", "red", "green", "blue"],)}},
        ("MASK",), _load_image_mask, "mask", display_name="Load Image (as Mask)", changed=_input_file_hash),
    "LoadImage": Node(
        lambda s: {"required": {"image": (s.input_files(), {"image_upload": True})}},
        ("IMAGE", "MASK"), _load_image, "image", display_name="Load Image", changed=_input_file_hash),
    "SaveImage": Node(
        lambda s: {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                   "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        (), _save_image, "image", "Saves the input images to the output directory.", output_node=True,
        display_name="Save Image"),
    "PreviewImage": Node(
        lambda s: {"required": {"images": ("IMAGE",)},
                   "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        (), _preview_image, "image", "Saves the input images to the temporary directory.", output_node=True,
        display_name="Preview Image"),
}


def object_info(state: ComfyState, name: str) -> dict:
    """ComfyUI's /object_info entry of a node class."""
    node = NODES[name]
    inputs = node.inputs(state)
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items() if k != "hidden"},
            "output": list(node.outputs), "output_is_list": [False] * len(node.outputs),
            "output_name": list(node.output_names or node.outputs), "name": name,
            "display_name": node.display_name or name, "description": node.description,
            "python_module": "nodes", "category": node.category, "output_node": node.output_node}


# -- validation: ComfyUI's validate_prompt --------------------------------------------------------------------------
def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def validate(state: ComfyState, graph) -> tuple[dict | None, list[str], dict]:
    """-> (prompt error or None, the output nodes to execute, node errors by id), as ComfyUI's validate_prompt."""
    if not isinstance(graph, dict) or not graph:
        return ({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                 "extra_info": {}}, [], {})
    for nid, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return ({"type": "invalid_prompt", "message": f"Cannot execute because a node is missing the class_type "
                                                          f"property.: Node ID '#{nid}'",
                     "details": "", "extra_info": {}}, [], {})
        if node["class_type"] not in NODES:
            return ({"type": "missing_node_type", "message": f"Node '{node['class_type']}' not found. This server "
                                                             f"runs ComfyUI's core nodes: {', '.join(NODES)}",
                     "details": f"Node ID '#{nid}'", "extra_info": {"node_id": nid, "class_type": node["class_type"]}},
                    [], {})
    outputs = sorted((nid for nid, n in graph.items() if NODES[n["class_type"]].output_node),
                     key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    if not outputs:
        return ({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}},
                [], {})
    checked: dict[str, list] = {}

    def check(nid: str, seen: tuple) -> bool:
        if nid in checked:
            return not checked[nid]
        node = graph[nid]
        spec = NODES[node["class_type"]].inputs(state)
        inputs = node.get("inputs", {}) if isinstance(node.get("inputs"), dict) else {}
        errors, ok = [], True
        for name, info in spec.get("required", {}).items():
            kind, opts = info[0], info[1] if len(info) > 1 else {}
            if name not in inputs:
                errors.append({"type": "required_input_missing", "message": "Required input is missing",
                               "details": name, "extra_info": {"input_name": name}})
                continue
            v = inputs[name]
            if _is_link(v):
                src = str(v[0])
                if src not in graph:
                    errors.append({"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list "
                                   "of [string, int]", "details": f"{name}: node {src} does not exist",
                                   "extra_info": {"input_name": name, "linked_node": v}})
                    continue
                if src in seen:
                    errors.append({"type": "dependency_cycle", "message": "Dependency cycle detected",
                                   "details": f"{name}: {src}", "extra_info": {"input_name": name}})
                    continue
                out = NODES[graph[src]["class_type"]].outputs
                got = out[v[1]] if 0 <= v[1] < len(out) else None
                if got != kind:
                    errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked "
                                   "nodes", "details": f"{name}, received_type({got}) mismatch input_type({kind})",
                                   "extra_info": {"input_name": name, "received_type": got, "linked_node": v}})
                    continue
                if not check(src, seen + (nid,)):
                    ok = False
                continue
            try:
                inputs[name] = _value(name, kind, opts, v)
            except NodeError as e:
                errors.append(e.error)
        if errors:
            checked[nid] = errors
            return False
        checked[nid] = []
        return ok

    node_errors: dict = {}
    good = []
    for nid in outputs:
        if check(nid, ()):
            good.append(nid)
    for nid, errors in checked.items():
        if errors:
            node_errors[nid] = {"errors": errors, "dependent_outputs": [o for o in outputs if o not in good],
                                "class_type": graph[nid]["class_type"]}
    if len(good) < len(outputs) or node_errors:
        details = "".join(f"\n{e['message']}: {e['details']}" for v in node_errors.values() for e in v["errors"])
        return ({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                 "details": details.strip(), "extra_info": {}}, good, node_errors)
    return None, outputs, {}


def _value(name: str, kind, opts: dict, v):
    """A widget value as ComfyUI's validation converts and bounds it."""
    if isinstance(kind, list):
        if v not in kind:
            shown = kind if len(kind) <= 20 else kind[:20] + ["..."]
            raise NodeError("value_not_in_list", "Value not in list", f"{name}: '{v}' not in {shown}", name,
                            received_value=v)
        return v
    try:
        if kind == "INT":
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            v = int(v)
        elif kind == "FLOAT":
            v = float(v)
            if not math.isfinite(v):
                raise ValueError
        elif kind == "STRING":
            v = str(v)
        elif kind == "BOOLEAN":
            v = bool(v)
    except (TypeError, ValueError):
        raise NodeError("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                        f"{name}, {v!r}", name, received_value=v) from None
    if "min" in opts and v < opts["min"]:
        raise NodeError("value_smaller_than_min", f"Value {v} smaller than min of {opts['min']}", name, name,
                        received_value=v)
    if "max" in opts and v > opts["max"]:
        raise NodeError("value_bigger_than_max", f"Value {v} bigger than max of {opts['max']}", name, name,
                        received_value=v)
    return v


# -- execution -------------------------------------------------------------------------------------------------------
class Execution:
    """One prompt's run in the model worker: its nodes' outputs, computed once each, and what KSampler, the VAE nodes
    and the image savers do with the pipeline."""

    def __init__(self, state: ComfyState, served: Served, prompt: Prompt):
        self.state, self.served, self.prompt, self.run = state, served, prompt, None
        self.values: dict[str, Any] = {}
        self.outputs: dict[str, dict] = {}
        self.executed: list[str] = []
        self.current: str | None = None
        self.keys: dict[str, str] = {}  # node -> its signature
        self.cached: list[str] = []  # the nodes whose outputs the last prompt's cache holds

    def emit(self, event: str, data: dict) -> None:
        self.state.emit(event, {**data, "prompt_id": self.prompt.id}, self.prompt.client_id)

    def pipe_of(self, ckpt: str | None):
        """The pipeline of the checkpoint `ckpt` (None: the one served): the prompt's other checkpoints are in memory
        beside it while it runs (a checkpoint server's, ComfyState.other_pipe)."""
        if ckpt is None or ckpt == self.served.name:
            return self.served.pipe
        other = self.state.other_pipe(ckpt) if self.state.other_pipe is not None else None
        if other is None:
            raise ValueError(f"ckpt_name {ckpt!r}: this prompt runs on {self.served.name!r}, and no other checkpoint "
                             "is loaded beside it (imagine serve --ckpt-dir serves several)")
        return other

    def clip_vision_embedder(self, clip_vision: ClipVision):
        """A CLIP_VISION's tower (an ImageEmbedder): a checkpoint's own, or the file of serve --clip-vision-dir that
        CLIPVisionLoader names, loaded once and kept while the prompts name it."""
        if clip_vision.file is None:
            return self.pipe_of(clip_vision.ckpt).c.image_embedder
        folder = getattr(self.served.pipe, "clip_vision_dir", None)
        path = Path(folder) / clip_vision.file if folder is not None else None
        if path is None or not path.is_file() or Path(folder).resolve() not in path.resolve().parents:
            raise ValueError(f"clip_name {clip_vision.file!r}: no such CLIP vision file in serve --clip-vision-dir")
        kept = self.state.clip_vision
        if kept is None or kept[0] != path or kept[1] != path.stat().st_mtime_ns:
            from imagine.loading.clip_vision import load_clip_vision

            self.state.clip_vision = kept = (path, path.stat().st_mtime_ns, load_clip_vision(path))
        return kept[2]

    def __call__(self, pipe, run) -> dict:
        self.run = run
        for nid in self.prompt.outputs:
            self.key(nid)
        previous = self.state.cache
        self.cached = sorted((nid for nid, k in self.keys.items() if k in previous), key=lambda n: (len(n), n))
        self.emit("execution_start", {"timestamp": _ms()})
        self.emit("execution_cached", {"nodes": self.cached, "timestamp": _ms()})
        try:
            for nid in self.prompt.outputs:
                self.value(nid)
        finally:  # (the cache holds this prompt's nodes now, those that finished or were cached: its classic cache)
            self.state.cache = {k: (self.values[nid], self.outputs.get(nid)) if nid in self.values else previous[k]
                                for nid, k in self.keys.items() if nid in self.values or k in previous}
        return self.outputs

    def key(self, nid: str) -> str:
        """The node's signature, ComfyUI's cache key: its class, what its IS_CHANGED says, its widget values and the
        signatures of the nodes its links come from (with the output taken)."""
        if nid not in self.keys:
            node = self.prompt.graph[nid]
            spec = NODES[node["class_type"]]
            given = node.get("inputs", {})
            inputs = [[name, *((self.key(str(v[0])), v[1]) if _is_link(v) else (v,))]
                      for name, v in sorted(given.items())]
            changed = spec.changed(self.state, given) if spec.changed is not None else None
            self.keys[nid] = json.dumps([node["class_type"], changed, inputs], default=str)
        return self.keys[nid]

    def value(self, nid: str):
        if nid in self.values:
            return self.values[nid]
        hit = self.state.cache.get(self.keys.get(nid))
        if hit is not None:  # (not run again: its outputs, and an output node's pictures, as the last prompt left them)
            out, ui = hit
            if ui is not None:
                self.outputs[nid] = ui
                self.emit("executed", {"node": nid, "display_node": nid, "output": ui})
            self.values[nid] = out
            return out
        node = self.prompt.graph[nid]
        spec = NODES[node["class_type"]]
        given = node.get("inputs", {})
        kwargs = {}
        for name, v in given.items():
            if _is_link(v):
                kwargs[name] = self.value(str(v[0]))[v[1]]
            elif name in spec.inputs(self.state).get("required", {}):
                kwargs[name] = v
        self.run.check()
        self.current = nid
        self.emit("executing", {"node": nid, "display_node": nid})
        out = spec.run(self, **kwargs)
        if isinstance(out, dict):
            ui = out.get("ui")
            if ui is not None:
                self.outputs[nid] = ui
                self.emit("executed", {"node": nid, "display_node": nid, "output": ui})
            out = out.get("result", ())
        self.values[nid] = out
        self.executed.append(nid)
        return out

    # -- what the nodes do with the pipeline ----------------------------------------------------------------------
    def sample(self, model: Model, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str | None, positive: tuple, negative: tuple, denoise: float,
               window: tuple | None = None, levels: torch.Tensor | None = None, add_noise: bool = True,
               denoised: dict | None = None) -> dict:
        """ComfyUI's KSampler (its common_ksampler): the texts read with its weights and windows (imagine.emphasis'
        "ComfyUI" mode), one seed for the batch's noise (BatchNoiseStream), the levels
        of its scheduler over the model's range, its start, the nearest training timesteps, classifier-free guidance
        at any cfg but 1; image to image from a non-empty latent at `denoise` (its last steps + 1 levels of
        int(steps / denoise)). denoise 0 gives the latent back (its set_steps: no levels). `window`: KSamplerAdvanced's
        (start_at_step, end_at_step, full denoise, add noise), imagine.sampling.comfyui_window. The LoRAs of `model`
        and of the texts' CLIP are merged for the run as AUTOMATIC1111's tags ask the pipeline to
        (`<lora:name:te=..:unet=..>`, the files of serve --lora-dir; put back after). `positive` and `negative` are
        lists of conditioning entries: one text each goes to the pipeline as text; anything more (several entries,
        areas, masks, strengths, timestep ranges, zeroed, averaged or concatenated encodings) as ComfyUI's lists
        (`_area_conditioning`, imagine.area_conditioning). `levels`: SamplerCustom's sigmas in place of the
        scheduler's (no noise with add_noise off); `denoised` receives the last step's x_0 prediction ("x0")."""
        limits = self.served
        if steps > limits.max_steps:
            raise ValueError(f"steps {steps} is past the server's limit of {limits.max_steps}")
        z = latent["samples"]
        if denoise <= 0:
            return latent
        pipe = self.pipe_of(model.ckpt)
        f = int(getattr(pipe, "scale", 8))
        if z.shape[3] * f > limits.max_width or z.shape[2] * f > limits.max_height:
            raise ValueError(f"the latent is for {z.shape[3] * f}x{z.shape[2] * f} pixels, past the server's limit "
                             f"of {limits.max_width}x{limits.max_height}")
        if not positive or not negative:
            raise ValueError("positive and negative must each hold a conditioning")
        entries, first = (*positive, *negative), positive[0]
        if any(c.clip != first.clip for c in entries):
            raise ValueError("positive and negative come from different CLIPs (CLIPSetLastLayer, LoraLoader): this "
                             "server encodes both with one text encoder")
        if self.pipe_of(first.clip.ckpt) is not pipe:
            raise ValueError(f"the conditioning was encoded with the CLIP of {first.clip.ckpt!r} and the model is "
                             f"{model.ckpt!r}: this server encodes a model's texts with its own text encoder (encode "
                             "them with the CLIP of the checkpoint the model comes from, as a refiner graph does)")
        if any(c.concat is not first.concat for c in entries):
            raise ValueError("positive and negative carry different inpainting pictures (InpaintModelConditioning): "
                             "this server gives the inpainting model one for both passes")
        for side in (positive, negative):
            if any(_chain(c.controls) != _chain(side[0].controls) for c in side):
                raise ValueError("the entries of a conditioning carry different ControlNets: this server applies one "
                                 "chain to a side")
        # (one text a side goes to the pipeline as text, unless it holds what reads as an A1111 LoRA tag there: ComfyUI
        # reads `<lora:...>` as text, as the lists' own encoding does)
        unclip = is_unclip(pipe)
        revision = not unclip and any(dict(c.options).get("unclip") for c in entries)
        if revision and not _is_sdxl(pipe):
            raise ValueError("unCLIPConditioning is for an unCLIP model (SD 2.1 unCLIP, whose U-Net reads the image "
                             "embedding) or SDXL (Revision: the embedding in place of the pooled text vector); "
                             f"{model.ckpt or 'this model'!r} reads neither")
        # (an unCLIP model reads its class input on every entry: zeros where unCLIPConditioning gave none, as ComfyUI;
        # SDXL given one reads it in its pooled vector's place on those entries)
        simple = len(positive) == len(negative) == 1 and first.text is not None and negative[0].text is not None \
            and not any(LORA_TAG.search(t) for t in (first.text, negative[0].text)) and not unclip and not revision
        areas = not simple and any(dict(c.options).get("area") is not None or dict(c.options).get("bounds")
                                   for c in entries)
        if areas and (first.concat is not None or first.controls or negative[0].controls):
            raise ValueError("an area (ConditioningSetArea, a mask's bounds) crops the sample; this server does not "
                             "crop an inpainting model's picture or a ControlNet's hint with it")
        te, unet = _summed(first.clip.loras), _summed(model.loras)
        tags = "".join(f"<lora:{_lora_stem(name)}:te={te.get(name, 0.0)!r}:unet={unet.get(name, 0.0)!r}>"
                       for name in dict.fromkeys([*te, *unet]))
        sampler, discard, options = SAMPLERS[sampler_name]
        n = z.shape[0]
        mask = latent.get("noise_mask")
        # (an inpainting model reads its mask and masked picture beside the sample, as ComfyUI's concat_cond makes them)
        concat = inpaint_concat(z, first.concat, mask) if getattr(pipe, "image_conditioned", False) else None
        controls = self.controls(pipe, first, negative[0], z)
        if mask is not None:  # (its prepare_mask: bilinear to the latents' size, repeated to the batch)
            if sampler_name == "ddim":
                raise ValueError("ComfyUI's ddim inpaints with noise of its own (seed + 1); with a noise mask use "
                                 "euler, which is the same sampler")
            mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                                   size=tuple(z.shape[2:]), mode="bilinear")
            mask = mask.repeat(math.ceil(n / mask.shape[0]), 1, 1, 1)[:n]
        if levels is not None:
            if model.lcm:
                raise ValueError("SamplerCustom on ModelSamplingDiscrete's lcm is not run by this server: use KSampler")
            if len(levels) < 2:  # (no step: ComfyUI gives the latent back)
                return latent
            steps = len(levels) - 1
        self.run.new_pass(steps)
        node = self.current
        self.run.on_step = lambda value, most: self.emit("progress", {"value": value, "max": most, "node": node})
        skip = None if first.clip.skip is None else \
            int(getattr(pipe.text_encoder, "clip_skip", 0) or 0) + first.clip.skip
        texts = ([first.text + tags] * n, [negative[0].text] * n) if simple else ([tags] * n, [""] * n)
        lists = None if simple else functools.partial(_area_conditioning, positive, negative, seed=seed)
        try:
            with self.run.using_clip_skip(skip):
                result = pipe.generate(*texts, conditioning=lists, seeds=[seed] * n, steps=steps,
                                       noise_indices=latent.get("batch_index"), prediction_type=model.prediction,
                                       zero_terminal_snr=model.zsnr, timestep_rule="lcm" if model.lcm else None,
                                       guidance_scale=cfg, sampler=sampler,
                                       sigma_schedule=SCHEDULERS[scheduler] if scheduler else "normal",
                                       sampler_options=options or None, sigma_range="comfyui",
                                       discard_penultimate_sigma=discard, start="comfyui",
                                       rng="comfyui", quantize=not model.lcm, init_latents=z.clone(),
                                       strength=min(float(denoise), 1.0), strength_rule="a1111_fixed_steps",
                                       window=window, latent_mask=mask, latent_concat=concat, **controls,
                                       levels=None if levels is None else [float(v) for v in levels],
                                       add_noise=add_noise, emphasis="ComfyUI", long_prompts=True,
                                       callback=self.run.step if denoised is None else
                                       functools.partial(_keeping_x0, self.run.step, denoised),
                                       progress=False,
                                       output_type="latent")
        finally:
            self.run.on_step = None
        return {**latent, "samples": result.latents.float()}

    def controls(self, pipe, positive: Conditioning, negative: Conditioning, z: torch.Tensor) -> dict:
        """generate's ControlNet arguments for the prompt's ControlNets, which ComfyUI runs on both passes (the old
        ControlNetApply's also on a negative with none of its own): per loaded ControlNet its hint, brought to the
        picture's size as ComfyUI brings it (nearest-exact after a centre crop to the aspect), strength and percents
        (read by ComfyUI's rule: imagine.models.controlnet.Controlled's "comfyui"); one not applied, or applied with
        start >= end (never active), at scale 0."""
        pos = positive.controls
        neg = negative.controls or tuple(c for c in pos if c[5])
        if not pos and not neg:
            return {}
        same = len(pos) == len(neg) and all(a[0] == b[0] and a[1] is b[1] and a[2:5] == b[2:5]
                                            for a, b in zip(pos, neg))
        if not same:
            raise ValueError("positive and negative carry different ControlNets: this server applies one chain to both "
                             "passes (ControlNetApplyAdvanced on both, or the old ControlNetApply on the positive)")
        used = {}
        for index, *rest in pos:
            if index in used:
                raise ValueError(f"ControlNet {pipe.controlnets[index][0]!r} is applied twice in one prompt; this "
                                 "server runs each loaded one once a prompt (load it again under another name: serve "
                                 "--controlnet PATH:NAME)")
            used[index] = rest
        f, n = int(getattr(pipe, "scale", 8)), z.shape[0]
        w, h = z.shape[3] * f, z.shape[2] * f
        pictures, scales, starts, ends = [], [], [], []
        for k in range(len(pipe.controlnets)):
            image, strength, start, end, _ = used.get(k, (None, 0.0, 0.0, 1.0, False))
            if image is None or start >= end:
                pictures.append([Image.new("RGB", (w, h))] * n)
                scales.append(0.0)
                starts.append(0.0)
                ends.append(1.0)
                continue
            hint = _upscale(image.permute(0, 3, 1, 2).float(), "nearest-exact", w, h, "center")
            hint = (hint.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            pictures.append([Image.fromarray(hint[i % len(hint)]) for i in range(n)])  # (its broadcast_image_to)
            scales.append(strength)
            starts.append(start)
            ends.append(end)
        return {"control_image": pictures if len(pictures) > 1 else pictures[0], "controlnet_scale": scales,
                "control_guidance_start": starts, "control_guidance_end": ends}

    def scaled(self, x: torch.Tensor, method: str, w: int, h: int, crop: str, factor: int = 1) -> torch.Tensor:
        """`_upscale` within the server's size limit (`factor`: pixels per cell, for latents)."""
        if w * factor > self.served.max_width or h * factor > self.served.max_height:
            raise ValueError(f"{w * factor}x{h * factor} pixels is past the server's limit of "
                             f"{self.served.max_width}x{self.served.max_height}")
        return _upscale(x, method, w, h, crop)

    def upscale_model(self, name: str):
        """UpscaleModelLoader's model: the file `name` of serve --upscaler-dir (its path there), loaded once per file
        version (imagine.upscalers)."""
        from imagine.upscalers import cached_upscale_model

        folder = getattr(self.served.pipe, "upscaler_dir", None)
        path = Path(folder) / name if folder is not None else None
        if path is None or not path.is_file() or Path(folder).resolve() not in path.resolve().parents:
            raise ValueError(f"model_name {name!r}: no such upscaler model in serve --upscaler-dir")
        return cached_upscale_model(path).with_precision(getattr(self.served.pipe, "precision", None) or "exact")

    def vae(self, vae):
        """The VAE a VAE value names: a checkpoint's own (None), or VAELoader's file of serve --vae-dir, loaded once
        and kept while the prompts name it (in the served model's latent space, as serve --vae fits one)."""
        if not isinstance(vae, tuple):
            return None
        from imagine.pipelines.text_to_image import fitted_vae

        pipe = self.served.pipe
        folder = getattr(pipe, "vae_dir", None)
        path = Path(folder) / vae[1] if folder is not None else None
        if path is None or not path.exists():
            raise ValueError(f"vae_name {vae[1]!r}: no such VAE in serve --vae-dir")
        kept = self.state.vae
        if kept is None or kept[0] != path or kept[1]() is not pipe.vae:
            import weakref

            self.state.vae = None  # (the one kept before goes first)
            self.state.vae = kept = (path, weakref.ref(pipe.vae), fitted_vae(pipe.vae, path, what="VAELoader").eval())
        return kept[2]

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        from imagine.pipelines.text_to_image import decode_latents

        pipe, own = self.pipe_of(getattr(vae, "ckpt", None)), self.vae(vae)
        x = pipe.decode(latents) if own is None else decode_latents(own, latents, "exact")
        # ([-1, 1]; ComfyUI's VAEDecode: clamp((x + 1) / 2, 0, 1), [B, H, W, C])
        return ((x.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).contiguous()

    def factor(self, vae=None) -> int:
        """The VAE's pixels per latent cell."""
        return int(getattr(self.pipe_of(getattr(vae, "ckpt", None)), "scale", 8))

    def encode(self, pixels: torch.Tensor, vae=None) -> torch.Tensor:
        """ComfyUI's VAEEncode: the picture cropped to the VAE's factor about its centre, encoded to the posterior's
        mean (deterministic: a seed never enters it)."""
        pipe, limits = self.pipe_of(getattr(vae, "ckpt", None)), self.served
        f = int(getattr(pipe, "scale", 8))
        h, w = pixels.shape[1] // f * f, pixels.shape[2] // f * f
        if h == 0 or w == 0:
            raise ValueError(f"the picture is {pixels.shape[2]}x{pixels.shape[1]}: VAEEncode needs at least {f} "
                             "pixels a side")
        dy, dx = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
        x = pixels[:, dy:dy + h, dx:dx + w, :3].permute(0, 3, 1, 2) * 2.0 - 1.0
        if h > limits.max_height or w > limits.max_width:
            raise ValueError(f"the picture is {w}x{h}, past the server's limit of {limits.max_width}x"
                             f"{limits.max_height}")
        own = self.vae(vae)
        if own is not None:
            with torch.no_grad():
                return own.to_latent(own.encode(x.float()).mode().float())
        return pipe.vae.to_latent(pipe.vae_mode(x.float()))

    def save(self, images: torch.Tensor, prefix: str, kind: str) -> list[dict]:
        """ComfyUI's SaveImage / PreviewImage: PNGs named <prefix>_<counter:05>_.png, the counter one past the
        folder's largest for the prefix; the graph ("prompt") and the client's extra_pnginfo ("workflow") as PNG text
        chunks; 8 bits by truncation (its np.clip(255 x).astype(uint8))."""
        base = self.state.folder(kind).resolve()
        sub, _, name = prefix.replace("\\", "/").rpartition("/")
        folder = (base / sub).resolve()
        if os.path.commonpath([str(base), str(folder)]) != str(base) or not name:
            raise ValueError(f"filename_prefix {prefix!r}: saving outside the {kind} folder is not allowed")
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(name) + r"_(\d+)_")
        counter = max([int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))], default=0) + 1
        meta = PngImagePlugin.PngInfo()
        meta.add_text("prompt", json.dumps(self.prompt.graph))
        for key, v in (self.prompt.extra_data.get("extra_pnginfo") or {}).items():
            meta.add_text(str(key), json.dumps(v))
        out = []
        for image in images:
            array = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{name}_{counter:05}_.png"
            part = folder / f".{file}.part"  # (written whole, then named: /view never serves half a file)
            Image.fromarray(array).save(part, format="PNG", pnginfo=meta, compress_level=4 if kind == "output" else 1)
            os.replace(part, folder / file)
            out.append({"filename": file, "subfolder": sub, "type": kind})
            counter += 1
        return out


def _summed(loras: tuple) -> dict[str, float]:
    """LoRAs loaded twice add up (W + s1 dW + s2 dW, as ComfyUI's patches add)."""
    out: dict[str, float] = {}
    for name, s in loras:
        out[name] = out.get(name, 0.0) + s
    return out


def _lora_stem(name: str) -> str:
    """ComfyUI's lora_name (a file of the LoRA folder) as the pipeline's LoRA tags name it (without its suffix)."""
    from imagine.pipelines.text_to_image import LORA_SUFFIXES

    path = Path(name)
    return path.with_suffix("").as_posix() if path.suffix.lower() in LORA_SUFFIXES else path.as_posix()


def _ms() -> int:
    return int(time.time() * 1000)


# -- the routes --------------------------------------------------------------------------------------------------------
def _vae_files(folder) -> list[str]:
    # (its vae folder's files, and VAE folders with a config.json)
    if folder is None or not Path(folder).is_dir():
        return []
    folders = [p for p in Path(folder).rglob("*") if p.is_dir() and (p / "config.json").is_file()]
    files = [p for p in Path(folder).rglob("*") if p.is_file()
             and p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
             and not any(f in p.parents for f in folders)]  # (a VAE folder's own weights are it)
    return sorted(p.relative_to(folder).as_posix() for p in folders + files)


def _upscaler_files(folder) -> list[str]:
    from imagine.upscalers import UPSCALER_SUFFIXES

    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES)


def _lora_files(folder) -> list[str]:
    from imagine.pipelines.text_to_image import LORA_SUFFIXES

    return _weight_files(folder, LORA_SUFFIXES)


def _weight_files(folder, suffixes=(".safetensors", ".ckpt", ".pt", ".pth", ".bin")) -> list[str]:
    # (a folder's weight files, its subfolders' too, by their paths in it)
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.suffix.lower() in suffixes)


def new_state(base_dir: str | Path | None = None) -> ComfyState:
    """The API's state, its output, input and temp folders in `base_dir` (None: a new temporary folder)."""
    import tempfile

    return ComfyState(Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="imagine-comfyui-")))


def add_routes(app, served: Served, state: ComfyState, version: str = "") -> ComfyState:
    """ComfyUI's routes on `app` (also under /api, as ComfyUI serves them), running prompts on `served`."""
    from imagine.server.worker import Job, QueueFull, Settings, ShuttingDown

    pipe, worker = served.pipe, served.worker
    # (what the state keeps holds names, not the model: a checkpoint server's state outlives the models it served)
    name, lora_dir = served.name, getattr(pipe, "lora_dir", None)
    if state.checkpoint_names is None:
        state.checkpoint_names = lambda: [name]
    if state.lora_names is None:  # (a checkpoint server's models share --lora-dir)
        state.lora_names = lambda: _lora_files(lora_dir)
    if state.vae_names is None:  # (and --vae-dir)
        vae_dir = getattr(pipe, "vae_dir", None)
        state.vae_names = lambda: _vae_files(vae_dir)
    if state.upscaler_names is None:  # (and --upscaler-dir)
        upscaler_dir = getattr(pipe, "upscaler_dir", None)
        state.upscaler_names = lambda: _upscaler_files(upscaler_dir)
    if state.clip_vision_names is None:  # (and --clip-vision-dir)
        clip_vision_dir = getattr(pipe, "clip_vision_dir", None)
        state.clip_vision_names = lambda: _weight_files(clip_vision_dir)
    if state.controlnet_names is None:  # (and --controlnet)
        nets = controlnet_names(pipe)
        state.controlnet_names = lambda: nets

    def route(path: str, methods: list[str]):
        def add(fn):
            for prefix in ("", "/api"):
                app.add_api_route(prefix + path, fn, methods=methods, include_in_schema=not prefix)
            return fn
        return add

    def finish(prompt: Prompt, execution: Execution, future) -> None:
        """The prompt's history entry and last messages, when its job ends (in the worker's thread)."""
        from imagine.server.worker import Interrupted, JobCancelled

        messages = [["execution_start", {"prompt_id": prompt.id, "timestamp": _ms()}],
                    ["execution_cached", {"nodes": execution.cached, "prompt_id": prompt.id, "timestamp": _ms()}]]
        e = future.exception()
        if isinstance(e, JobCancelled) and not execution.executed and execution.current is None:
            with state.lock:  # (deleted from the queue before it ran: ComfyUI keeps no history of it)
                prompt.state = "done"
                state.prompts.pop(prompt.id, None)
            state.emit_status()
            return
        status = "success"
        if e is None:
            messages.append(["execution_success", {"prompt_id": prompt.id, "timestamp": _ms()}])
            execution.emit("execution_success", {"timestamp": _ms()})
        else:
            status = "error"
            node = execution.current
            info = {"prompt_id": prompt.id, "node_id": node,
                    "node_type": prompt.graph[node]["class_type"] if node else None,
                    "executed": list(execution.executed), "timestamp": _ms()}
            if isinstance(e, (Interrupted, JobCancelled)):
                messages.append(["execution_interrupted", info])
                execution.emit("execution_interrupted", info)
            else:
                info.update(exception_message=str(e), exception_type=type(e).__name__, traceback=[],
                            current_inputs={}, current_outputs={})
                messages.append(["execution_error", info])
                execution.emit("execution_error", info)
        with state.lock:  # (in history and out of the queue before the last message, as ComfyUI's task_done)
            prompt.state = "done"
            state.prompts.pop(prompt.id, None)
            state.history[prompt.id] = {
                "prompt": prompt.item(), "outputs": execution.outputs,
                "status": {"status_str": status, "completed": status == "success", "messages": messages},
                "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                         for nid in execution.outputs}}
            while len(state.history) > MAX_HISTORY:
                state.history.popitem(last=False)
        execution.emit("executing", {"node": None})
        state.emit_status()

    @route("/prompt", ["POST"])
    async def post_prompt(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"type": "invalid_prompt", "message": "the body is not JSON",
                                           "details": "", "extra_info": {}}, "node_errors": {}}, status_code=400)
        if not isinstance(body, dict) or "prompt" not in body:
            return JSONResponse({"error": {"type": "no_prompt", "message": "No prompt provided",
                                           "details": "No prompt provided", "extra_info": {}}, "node_errors": {}},
                                status_code=400)
        state.loop = asyncio.get_running_loop()
        graph = body["prompt"]
        try:
            error, outputs, node_errors = validate(state, graph)
        except RecursionError:  # (a chain of links deeper than Python's stack: said, not a 500)
            error, outputs, node_errors = {"type": "invalid_prompt", "message": "the graph's links are too deep to "
                                           "follow", "details": f"{len(graph)} nodes", "extra_info": {}}, [], {}
        if error is not None:
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        try:
            prompt_id = str(uuid.UUID(str(prompt_id)))
        except ValueError:
            return JSONResponse({"error": {"type": "invalid_prompt_id", "message": "Invalid prompt_id format",
                                           "details": f"prompt_id must be a valid UUID: {prompt_id!r}",
                                           "extra_info": {}}, "node_errors": {}}, status_code=400)
        extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        client_id = body.get("client_id")
        if client_id is not None:
            extra = {**extra, "client_id": client_id}
        with state.lock:
            if prompt_id in state.prompts or prompt_id in state.history:
                return JSONResponse({"error": {"type": "invalid_prompt_id", "message": "prompt_id already used",
                                               "details": prompt_id, "extra_info": {}}, "node_errors": {}},
                                    status_code=400)
            number = body.get("number")
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                number = state.counter
            if body.get("front"):
                number = -number
            state.counter += 1
        prompt = Prompt(float(number) if isinstance(number, float) else number, prompt_id, graph, extra, outputs,
                        client_id)
        execution = Execution(state, served, prompt)
        job = Job(prompts=[""], negative_prompts=[""], seeds=[0], call=execution, priority=float(number),
                  settings=Settings(height=0, width=0, steps=1, sampler="euler", guidance_scale=1.0))
        job.id = prompt_id
        prompt.job = job
        try:
            future = worker.submit(job)
        except QueueFull as e:
            return JSONResponse({"error": {"type": "queue_full", "message": str(e), "details": "", "extra_info": {}},
                                 "node_errors": {}}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        except ShuttingDown as e:
            return JSONResponse({"error": {"type": "shutting_down", "message": str(e), "details": "",
                                           "extra_info": {}}, "node_errors": {}}, status_code=503)
        with state.lock:
            state.prompts[prompt_id] = prompt
        if state.on_queued is not None:
            state.on_queued(future)
        future.add_done_callback(lambda f: finish(prompt, execution, f))
        state.emit_status()
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    @route("/prompt", ["GET"])
    def get_prompt():
        return {"exec_info": {"queue_remaining": state.queue_remaining()}}

    def queued() -> list[Prompt]:
        # (copied under the lock, asked of the worker after it: the worker answers a job holding its own lock, and
        # a job's end takes this one, so this one is never held while asking it)
        with state.lock:
            return list(state.prompts.values())

    def queue_items() -> tuple[list, list]:
        running, pending = [], []
        for p in sorted(queued(), key=lambda p: p.number):  # (in the order they run: by number)
            (running if worker.position(p.id) == 0 else pending).append(p.item())
        return running, pending

    @route("/queue", ["GET"])
    def get_queue():
        running, pending = queue_items()
        return {"queue_running": running, "queue_pending": pending}

    @route("/queue", ["POST"])
    async def post_queue(request: Request):
        body = await _json(request)
        waiting = [p for p in queued() if worker.position(p.id) not in (0, None)]
        if body.get("clear"):
            for p in waiting:
                worker.cancel(p.job)
        for pid in body.get("delete") or []:
            for p in waiting:
                if p.id == pid:
                    worker.cancel(p.job)
        return Response(status_code=200)

    @route("/interrupt", ["POST"])
    async def post_interrupt(request: Request):
        body = await _json(request)
        pid = body.get("prompt_id")
        if pid is None:  # (ComfyUI's global interrupt: whatever runs, a prompt of ours or not)
            worker.interrupt()
        else:
            worker.interrupt(job_id=str(pid))
        return Response(status_code=200)

    @route("/history", ["GET"])
    def get_history(max_items: int | None = None, offset: int = -1):
        with state.lock:
            items = list(state.history.items())
        if offset is not None and offset >= 0:
            items = items[offset:]
        if max_items is not None:
            items = items[-max_items:] if offset is None or offset < 0 else items[:max_items]
        return dict(items)

    @route("/history/{prompt_id}", ["GET"])
    def get_history_item(prompt_id: str):
        with state.lock:
            entry = state.history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @route("/history", ["POST"])
    async def post_history(request: Request):
        body = await _json(request)
        with state.lock:
            if body.get("clear"):
                state.history.clear()
            for pid in body.get("delete") or []:
                state.history.pop(pid, None)
        return Response(status_code=200)

    @route("/view", ["GET"])
    def view(filename: str, type: str = "output", subfolder: str = "", preview: str | None = None,
             channel: str | None = None):
        try:
            base = state.folder(type).resolve()
        except ValueError as e:
            return Response(str(e), status_code=400)
        path = (base / subfolder / filename).resolve()
        if os.path.commonpath([str(base), str(path)]) != str(base) or filename in ("", ".", ".."):
            return Response("the file is outside its folder", status_code=403)
        if not path.is_file():
            return Response(status_code=404)
        if preview is None and channel in (None, "rgba"):
            return FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})
        import io

        with Image.open(path) as im:
            im.load()
        if channel == "rgb":
            im = im.convert("RGB")
        elif channel == "a":
            alpha = im.getchannel("A") if "A" in im.getbands() else Image.new("L", im.size, 255)
            im = Image.new("RGBA", im.size, (0, 0, 0, 0))
            im.putalpha(alpha)
        buffer = io.BytesIO()
        kind, quality = "png", 90
        if preview:
            kind, _, q = preview.partition(";")
            kind = kind if kind in ("webp", "jpeg") else "webp"
            quality = int(q) if q.isdigit() else 90
            if kind == "jpeg":
                im = im.convert("RGB")
        im.save(buffer, format=kind.upper(), **({"quality": quality} if kind != "png" else {}))
        return Response(buffer.getvalue(), media_type=f"image/{kind}")

    @route("/upload/image", ["POST"])
    async def upload_image(request: Request):
        form = await request.form()
        upload = form.get("image")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            return Response("the form needs a file field 'image'", status_code=400)
        kind = str(form.get("type") or "input")
        sub = str(form.get("subfolder") or "")
        try:
            base = state.folder(kind).resolve()
        except ValueError as e:
            return Response(str(e), status_code=400)
        folder = (base / sub).resolve()
        name = Path(upload.filename or "image.png").name
        if os.path.commonpath([str(base), str(folder)]) != str(base) or name in ("", ".", ".."):
            return Response("the file would be outside its folder", status_code=400)
        data = await upload.read()
        try:
            import io

            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception:
            return Response(f"{name} is not a picture Pillow reads", status_code=400)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if str(form.get("overwrite") or "").lower() not in ("true", "1"):
            stem, suffix, k = target.stem, target.suffix, 1
            while target.exists():  # (ComfyUI's rule: "name (1).png", ...)
                target = folder / f"{stem} ({k}){suffix}"
                k += 1
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return {"name": target.name, "subfolder": sub, "type": kind}

    @route("/object_info", ["GET"])
    def get_object_info():
        return {name: object_info(state, name) for name in NODES}

    @route("/object_info/{node_class}", ["GET"])
    def get_object_info_node(node_class: str):
        return {node_class: object_info(state, node_class)} if node_class in NODES else {}

    @route("/system_stats", ["GET"])
    def system_stats():
        from imagine.models.winograd import _available_bytes

        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return {"system": {"os": os.name, "ram_total": total, "ram_free": _available_bytes() or 0,
                           "comfyui_version": f"imagine {version}", "python_version": sys.version,
                           "pytorch_version": torch.__version__, "embedded_python": False, "argv": sys.argv},
                "devices": [{"name": platform.processor() or "cpu", "type": "cpu", "index": None, "vram_total": 0,
                             "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}]}

    @route("/embeddings", ["GET"])
    def embeddings():
        # (ComfyUI's: its embeddings folder's file names without the extension)
        return sorted(Path(f).stem for f in getattr(pipe, "embedding_files", {}).values())

    @route("/extensions", ["GET"])
    def extensions():
        return []

    folders = {"checkpoints": lambda: state.checkpoint_names(), "loras": lambda: state.lora_names(),
               "vae": lambda: state.vae_names(), "controlnet": lambda: state.controlnet_names(),
               "upscale_models": lambda: state.upscaler_names(),
               "embeddings": embeddings}

    @route("/models", ["GET"])
    def model_folders():  # (ComfyUI's model folder types, those served here)
        return list(folders)

    @route("/models/{folder}", ["GET"])
    def model_files(folder: str):
        if folder not in folders:
            return JSONResponse({"error": f"no model folder {folder!r}; these are served: {', '.join(folders)}"},
                                status_code=404)
        return folders[folder]()

    @route("/free", ["POST"])
    async def free(request: Request):
        # (ComfyUI's: unload_models / free_memory; here the node cache and a VAELoader VAE are let go, the served
        # model stays)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
            state.cache, state.vae = {}, None
        return Response(status_code=200)

    for prefix in ("", "/api"):
        app.add_api_websocket_route(prefix + "/ws", socket_endpoint(state))
    app.state.comfyui = state
    return state


def socket_endpoint(state: ComfyState):
    """ComfyUI's /ws?clientId= socket: a status message first, then the messages of the client's prompts (and the
    queue's status to all). It holds nothing of a model (a checkpoint server serves it apart, `socket_app`: an open
    socket would keep the app it came through, and its model, in memory)."""

    async def ws(websocket: WebSocket):
        await websocket.accept()
        state.loop = asyncio.get_running_loop()
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        state.sockets[sid] = websocket
        try:
            await websocket.send_text(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": state.queue_remaining()}}, "sid": sid}}))
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if state.sockets.get(sid) is websocket:
                del state.sockets[sid]

    return ws


def socket_app(state: ComfyState):
    """The socket alone, as an ASGI app (a checkpoint server's, in front of its models' apps)."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    endpoint = socket_endpoint(state)
    return Starlette(routes=[WebSocketRoute("/ws", endpoint), WebSocketRoute("/api/ws", endpoint)])


async def _json(request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
