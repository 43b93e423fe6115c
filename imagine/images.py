"""Tensors to images and back, PNG files with their generation parameters, grids."""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(x: torch.Tensor, truncate: bool = False) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image ([1, H, W] -> grey): clipped to [-1, 1], then 127.5 (x + 1) rounded half
    to even, the 8-bit values diffusers' VaeImageProcessor.postprocess gives ((x / 2 + 0.5).clamp(0, 1) * 255,
    rounded; equal bit for bit). `truncate`: AUTOMATIC1111's instead (its processing.py: 255 x of the clamped
    (x + 1) / 2, cast to uint8, which truncates: every level rounded down, a picture half a level darker on
    average)."""
    if x.ndim != 3:
        raise ValueError(f"to_pil expects one image [C, H, W]; got {tuple(x.shape)}")
    if truncate:
        a = (255.0 * ((x.detach().float() + 1.0) / 2.0).clamp(0, 1)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(a if a.shape[2] != 1 else a[:, :, 0])
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a if a.shape[2] != 1 else a[:, :, 0])


def from_pil(img: Image.Image) -> torch.Tensor:
    """A picture -> [3, H, W] in [-1, 1] (Pillow's RGB of it: transparency dropped, not laid on a colour), v / 127.5 - 1
    of its 8-bit values, equal bit for bit to diffusers' VaeImageProcessor (2 (v / 255) - 1) and to AUTOMATIC1111's
    img2img (v / 255, then 2 x - 1)."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


# AUTOMATIC1111's img2img resize modes, in the order of its API's `resize_mode` 0-3
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale")


def fit_picture(picture: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """A picture brought to width x height as AUTOMATIC1111's img2img does it (modules/images.py resize_image;
    diffusers' VaeImageProcessor.resize states the same rule), Lanczos throughout, in the picture's own mode:
    - just_resize: stretched;
    - crop_and_resize: scaled (aspect kept) to cover width x height, centred, the overhang cut off;
    - resize_and_fill: scaled to fit inside, centred, and the two bands beside it filled with its first and last
      rows (or columns) stretched across them (with Pillow's default filter, as A1111 writes it).
    (latent_upscale leaves the picture as it is: the pipeline resizes its latents.)
    A palette picture is taken as RGB (RGBA where it has transparency) and a 1-bit one as grey, L: Pillow resizes
    those two modes by nearest neighbour whatever filter is asked, and a palette picture pasted on a new canvas
    would lose its colours (a black-and-white palette mask came out all black)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    if mode == "latent_upscale" or picture.size == (width, height):
        return picture
    if picture.mode in ("P", "PA"):
        picture = picture.convert("RGBA" if picture.mode == "PA" or "transparency" in picture.info else "RGB")
    elif picture.mode == "1":
        picture = picture.convert("L")
    if mode == "just_resize":
        return picture.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, picture.width / picture.height
    # (integer sizes as A1111 computes them: the side that fits is exact, the other floor-divided)
    wide = ratio > src_ratio if mode == "crop_and_resize" else ratio < src_ratio
    tall = ratio <= src_ratio if mode == "crop_and_resize" else ratio >= src_ratio
    src_w = width if wide else picture.width * height // picture.height
    src_h = height if tall else picture.height * width // picture.width
    resized = picture.resize((src_w, src_h), Image.LANCZOS)
    out = Image.new(picture.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "resize_and_fill":
        if ratio < src_ratio and (band := height // 2 - src_h // 2) > 0:  # bands above and below
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, src_h, width, src_h)), (0, band + src_h))
        elif ratio > src_ratio and (band := width // 2 - src_w // 2) > 0:  # bands left and right
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(src_w, 0, src_w, height)), (band + src_w, 0))
    return out


def save_png(img: Image.Image, path: str | os.PathLike, parameters: dict | None = None,
             exclusive: bool = False) -> Path:
    """Save a PNG with the generation parameters in its text chunks: `parameters` in
    AUTOMATIC1111's one-line form (so its PNG-info tab reads it) and `imagine` as JSON.
    Written to a temporary file beside it and renamed, so a reader never sees half a PNG; the
    temporary file is removed if either step fails. `exclusive`: FileExistsError if a file is at
    `path` when it is written (another process took the name meanwhile: it is left alone), by a
    hard link, which creates the name only if it is free; where the file system has none, the name
    is reserved by an exclusive create first (a reader may then see an empty file for a moment)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a PNG file path", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", a1111_parameters(parameters))
        info.add_text("imagine", json.dumps(parameters, sort_keys=True))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (per process: two writers never share one)
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        if exclusive:
            _place_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _place_exclusive(tmp: Path, path: Path) -> None:
    """Move the written file `tmp` to `path` only if no file is there (FileExistsError otherwise)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (e.g. FAT, some network shares): reserve the name, then replace it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    tmp.unlink()


_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _a1111_quote(value) -> str:
    """AUTOMATIC1111's `quote()` (modules/infotext_utils.py): a value holding ',', ':' or a newline is
    written as a JSON string, so its reader's regex takes it as one value (e.g. "Lora: \"style: 0.7, x: 1\"")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "CFG scale: 7", as A1111 writes it
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _a1111_model(name: str) -> str:
    """A1111 writes the checkpoint's name without its folder or extension (sd15/tiny-sd.safetensors -> tiny-sd, its
    name_for_extra); a model folder's name (a diffusers model, which may hold a dot, e.g. sd-v1.5) stays whole."""
    name = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def a1111_parameters(p: dict) -> str:
    """AUTOMATIC1111's infotext: the prompt, "Negative prompt: ..." and one line of "Label: value" fields, in
    its labels and order, values quoted as A1111 quotes them, so its PNG Info / "Send to txt2img" (and the
    tools that follow its format) read them back. One writer for the CLI's PNGs and the server's."""
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = []

    def put(label: str, value) -> None:
        if value is not None and value != "":
            fields.append(f"{label}: {_a1111_quote(value)}")

    put("Steps", p.get("steps"))
    from imagine.samplers import a1111_label

    sampler, karras = a1111_label(p["sampler"]) if p.get("sampler") else (None, False)
    put("Sampler", sampler)
    # A1111 (since 1.9) writes the schedule apart from the sampler: "Sampler: DPM++ 2M, Schedule type: Karras"
    schedule = p.get("schedule_type") or ("karras" if karras else None)
    if "a1111_schedule" in p:  # (a run as A1111 runs it: the schedule type its infotext names, or none)
        schedule = p["a1111_schedule"]
    from imagine.schedules import COMPVIS_SCHEDULES, SCHEDULE_LABELS

    if schedule in COMPVIS_SCHEDULES:  # (A1111's own DDIM/PLMS/UniPC timesteps: no schedule type)
        schedule = None

    def schedule_label(name):
        return SCHEDULE_LABELS.get(str(name), str(name).capitalize()) if name else None

    shown = schedule_label(schedule)
    put("Schedule type", shown)
    put("Schedule rho", p.get("schedule_rho"))
    cfg = p.get("guidance_scale")
    from imagine.samplers import A1111_CFGPP_SCALE, is_cfg_pp

    if cfg is not None and is_cfg_pp(p.get("sampler")):  # (CFG++'s lambda is A1111's CFG scale / 12.5: written so)
        cfg = round(float(cfg) / A1111_CFGPP_SCALE, 6)
    put("CFG scale", cfg)
    put("Image CFG scale", p.get("image_guidance_scale"))  # (instruct-pix2pix)
    if p.get("eta") is not None:  # (A1111 names DDIM's "Eta DDIM", the others' "Eta")
        from imagine.samplers import resolve_sampler

        ddim = bool(p.get("sampler")) and resolve_sampler(p["sampler"])[0] in ("ddim", "ddim_cfgpp")
        put("Eta DDIM" if ddim else "Eta", p["eta"])
    put("Seed", p.get("seed"))
    if p.get("subseed_strength"):  # A1111's variation seed
        put("Variation seed", p.get("subseed"))
        put("Variation seed strength", p.get("subseed_strength"))
    put("Seed resize from", p.get("seed_resize_from"))  # "WxH", A1111's
    # the noise's source (A1111's "RNG": its default "GPU" writes none, and would give an NVIDIA card's draws, which
    # are "NV" here) and its eta noise seed delta
    put("RNG", str(p.get("rng", "cpu")).upper())
    put("ENSD", p.get("noise_seed_delta") or None)
    put("Downcast alphas_cumprod", True if p.get("downcast_alphas_cumprod") else None)
    put("Old prompt editing timelines", True if p.get("old_prompt_editing") else None)
    # (A1111 writes its padding options only where a step was padded)
    put("Pad conds", True if p.get("pad_conds") == "empty" and p.get("padded_conds") else None)
    put("Pad conds v0", True if p.get("pad_conds") == "v0" and p.get("padded_conds") else None)
    put("Precision", p.get("precision"))  # (imagine's: fast mode's pictures differ from exact mode's)
    put("Noise Schedule", "Zero Terminal SNR" if p.get("zero_terminal_snr") else None)
    put("Denoising strength", p.get("strength"))  # image to image, hires. fix (A1111 writes it later; order is free)
    if p.get("inpainting"):  # A1111's inpainting fields; it writes "Mask blur" only above 0, here 0 says "no blur"
        if p.get("mask_invert"):
            put("Mask mode", "Inpaint not masked")
        put("Mask blur", p.get("mask_blur", 0))
        if p.get("inpaint_full_res"):
            put("Inpaint area", "Only masked")
            put("Masked area padding", p.get("inpaint_full_res_padding", 0))
        content = p.get("masked_content")  # A1111's labels: fill, latent noise, latent nothing (none for original)
        put("Masked content", content.replace("_", " ") if content and content != "original" else None)
    if p.get("width") is not None and p.get("height") is not None:
        put("Size", f"{p['width']}x{p['height']}")
    put("Model hash", p.get("model_hash"))
    put("Model", _a1111_model(p["model"]) if p.get("model") else None)
    put("VAE", p.get("vae"))
    if p.get("clip_skip"):  # diffusers' k layers skipped is A1111's "Clip skip: k + 1" (1 = the last layer)
        put("Clip skip", int(p["clip_skip"]) + 1)
    # (A1111's modes but its default "Original": None, brackets as text; "No norm"; "Ignore")
    put("Emphasis", {"none": "None", "no_norm": "No norm", "ignore": "Ignore"}.get(p.get("emphasis")))
    put("Lora", p.get("lora"))
    put("Lora hashes", p.get("lora_hashes"))
    put("TI hashes", p.get("ti_hashes"))
    # (A1111 writes its "switch by sampling steps" before the refiner's own fields, as its denoiser sets them)
    put("Refiner switch by sampling steps", True if p.get("refiner_switch_by_steps") else None)
    put("Refiner", _a1111_model(p["refiner"]) if p.get("refiner") else None)
    put("Refiner switch at", p.get("refiner_switch_at"))
    for i, unit in enumerate(controlnet_units(p)):
        put(f"ControlNet {i}", controlnet_unit_text(*unit))
    if p.get("hires_resize"):  # A1111 writes the size asked in place of the scale
        put("Hires resize", p["hires_resize"])
    else:
        put("Hires upscale", p.get("hires_scale"))
    put("Hires steps", p.get("hires_steps"))
    put("Hires upscaler", p.get("hires_upscaler"))
    hires = p.get("hires_sampling")
    if hires:  # A1111's "Hires sampler" / "Hires schedule type": written where they differ from the first pass's
        label, named_karras = a1111_label(hires["sampler"])
        put("Hires sampler", label if label != sampler else None)
        after = p["a1111_hires_schedule"] if "a1111_hires_schedule" in p else (
            hires.get("sigma_schedule") or ("karras" if named_karras or hires.get("karras") else None))
        after = None if after in COMPVIS_SCHEDULES else schedule_label(after)
        put("Hires schedule type", after if after != shown else None)
    put("Hires prompt", p.get("hires_prompt"))
    put("Hires negative prompt", p.get("hires_negative_prompt"))
    put("SD upscale overlap", p.get("sd_upscale_overlap"))  # (A1111's SD upscale script)
    put("SD upscale upscaler", p.get("sd_upscale_upscaler"))
    put("Final step", p.get("final_step"))
    put("Start", p.get("start"))
    for k, v in (p.get("sampler_options") or {}).items():  # (A1111's labels for its four, "Sigma churn"...)
        put(A1111_SIGMA_LABELS.get(k, k), v)
    if p.get("version"):
        version = str(p["version"])
        put("Version", version if version.startswith("imagine") else f"imagine {version}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


# the sampler options AUTOMATIC1111 writes in its infotext, under its labels (sd_samplers_kdiffusion, where they differ
# from the sampler's defaults)
A1111_SIGMA_LABELS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
# AUTOMATIC1111's reading of an infotext (modules/infotext_utils.py): its field regex and its "WxH" values
# (a label of up to 64 characters: A1111's are far shorter, and the bound keeps the regex's backtracking linear in the
# line's length, where A1111's unbounded label takes seconds on 40 kB of words; quoted values cannot backtrack badly)
_A1111_FIELD = re.compile(r'\s*(\w[\w \-/]{1,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
MAX_INFOTEXT = 65536  # characters of an infotext read (A1111's are a few thousand)
_A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
# the fields A1111 1.10's parse_generation_parameters fills in where an infotext has none (its /sdapi/v1/png-info
# answers with them)
A1111_INFOTEXT_DEFAULTS = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
    "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
    "Hires schedule type": "Use same scheduler", "Refiner switch by sampling steps": False,
}


# the versions AUTOMATIC1111's infotext_versions.backcompat compares an infotext's "Version" with
_A1111_V160, _A1111_V170_TSNR, _A1111_V180 = "1.6.0", "v1.7.0-225", "1.8.0"


def a1111_version(text):
    """An infotext's "Version" as AUTOMATIC1111 reads it (infotext_versions.parse_version): cut after its second "-"
    part ("v1.7.0-375-gf92d6149" -> "v1.7.0-375", a post-release of 1.7.0), then a PEP 440 version; None where it is
    none (a fork's "f0.0.17v1.8.0rc-latest-276-g29be1da7")."""
    from packaging import version

    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", str(text))
    try:
        return version.parse(m.group(1) if m else str(text))
    except version.InvalidVersion:
        return None


def a1111_backcompat(fields: dict) -> list[str]:
    """AUTOMATIC1111's infotext_versions.backcompat (its "auto_backcompat" option, on by default): the compatibility
    options it turns on for a picture its older versions made, set in `fields` as its reader sets them; the notes
    that say so. Before 1.6.0: "Old prompt editing timelines" (a prompt with "[") and "Pad conds v0" (DDIM, PLMS);
    before 1.7.0-225: "Downcast alphas_cumprod"; before 1.8.0: "Refiner switch by sampling steps" (with a refiner)."""
    from packaging import version

    ver = a1111_version(fields.get("Version"))
    if ver is None:
        return []
    turned = []
    if ver < version.parse(_A1111_V160) and "[" in fields.get("Prompt", ""):
        turned.append("Old prompt editing timelines")
    if ver < version.parse(_A1111_V160) and fields.get("Sampler", "") in ("DDIM", "PLMS"):
        turned.append("Pad conds v0")
    if ver < version.parse(_A1111_V170_TSNR):
        turned.append("Downcast alphas_cumprod")
    if ver < version.parse(_A1111_V180) and fields.get("Refiner"):
        turned.append("Refiner switch by sampling steps")
    fields.update({label: True for label in turned})
    return [f"Version {fields['Version']}: A1111 turns on {', '.join(turned)} for its pictures"] if turned else []


def parse_a1111_parameters(text: str, defaults: bool = False) -> dict:
    """An infotext read as AUTOMATIC1111's parse_generation_parameters reads it: "Prompt" (the lines before one that
    starts "Negative prompt:"), "Negative prompt" (that line on), and the fields of the last line, which counts as
    fields only when it holds three or more; a quoted value is read as JSON (its unquote), a "WxH" value becomes
    "Label-1" and "Label-2" (e.g. "Size-1": "512"), an empty value ("RNG: ,") is skipped. Values stay text, as A1111
    keeps them. Its old hires. fix form is turned into today's on every read (restore_old_hires_fix). defaults:
    A1111's values for the fields not there (A1111_INFOTEXT_DEFAULTS and a1111_derived_defaults), as its reader adds
    them, and the options it turns on for its older versions' pictures (a1111_backcompat). Longer than MAX_INFOTEXT:
    an error."""
    if len(str(text)) > MAX_INFOTEXT:
        raise ValueError(f"an infotext of {len(str(text))} characters; up to {MAX_INFOTEXT} are read (A1111's are a few "
                         "thousand)")
    *lines, last = str(text).strip().split("\n")
    if len(_A1111_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        # (A1111 puts the "\n" before a line only once the text has begun: "Negative prompt:" alone on its line
        # and the text on the next reads without a leading line break)
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    out = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _A1111_FIELD.findall(last):
        if not value:  # (A1111's reader fails on an empty value's first character and skips the field)
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass  # (A1111 keeps a value it cannot unquote as it is)
        size = _A1111_SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    restore_old_hires_fix(out)
    if defaults:
        out = {**A1111_INFOTEXT_DEFAULTS, **out}
        a1111_derived_defaults(out)
        a1111_backcompat(out)
    return out


def old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    """The first pass's size A1111's hires. fix before 1.0 picked for a width x height picture (its
    processing.old_hires_fix_first_pass_dimensions): scaled to about 512 x 512 pixels, each side rounded up to 64."""
    if width <= 0 or height <= 0:
        raise ValueError(f"First pass size: 0x0 with Size: {width}x{height}: A1111's old hires. fix takes its first "
                         "pass's size from the picture's, which has no pixels")
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def restore_old_hires_fix(fields: dict, old_width_height: bool = False) -> None:
    """A1111 1.10's restore_old_hires_fix_params (infotext_utils), which its reader runs on every infotext: one of its
    hires. fix before 1.0 ("Size" the picture's, "First pass size" where it started, 0x0 for its own choice,
    old_hires_first_pass) becomes today's form in `fields`: "Size" the first pass's, "Hires resize" the picture's
    (whole numbers, as A1111 sets them). old_width_height: A1111's use_old_hires_fix_width_height option (off by
    default): a "Hires resize" is then read as the picture's "Size" instead."""
    if old_width_height:
        width, height = int(fields.get("Hires resize-1", 0)), int(fields.get("Hires resize-2", 0))
        if width and height:
            fields["Size-1"], fields["Size-2"] = width, height
            return
    if fields.get("First pass size-1") is None or fields.get("First pass size-2") is None:
        return
    first = int(fields["First pass size-1"]), int(fields["First pass size-2"])
    width, height = int(fields.get("Size-1", 512)), int(fields.get("Size-2", 512))
    if first[0] == 0 or first[1] == 0:
        first = old_hires_first_pass(width, height)
    fields["Size-1"], fields["Size-2"] = first
    fields["Hires resize-1"], fields["Hires resize-2"] = width, height


def a1111_derived_defaults(fields: dict) -> None:
    """The defaults A1111 1.10's parse_generation_parameters derives from an infotext's other fields, set in `fields`
    (which holds A1111_INFOTEXT_DEFAULTS'): "Emphasis: Original" where the prompt or negative prompt weights a piece
    (its prompt_uses_emphasis), a "Hypernet" appended to the prompt as its <hypernet:name:strength> tag (after that
    test, as A1111 makes it), and "Cache FP16 weight for LoRA: False" where "FP8 weight" is not "Disable"."""
    from imagine.emphasis import parse_emphasis  # (A1111's parse_prompt_attention: the same weights, BREAKs aside)

    if "Emphasis" not in fields and any(
            weight not in (1.0, None) for text in (fields["Prompt"], fields["Negative prompt"])
            for _, weight in parse_emphasis(text, breaks=True)):
        fields["Emphasis"] = "Original"
    if fields.get("Hypernet") is not None:
        fields["Prompt"] += f"<hypernet:{fields['Hypernet']}:{fields.get('Hypernet strength', '1.0')}>"
    if "Cache FP16 weight for LoRA" not in fields and fields["FP8 weight"] != "Disable":
        fields["Cache FP16 weight for LoRA"] = False


# the EXIF UserComment's character codes (its first 8 bytes) A1111's piexif.helper.UserComment.load reads; UNICODE is
# UTF-16 (_user_comment_utf16). (Under "ASCII", UTF-8: the same text for ASCII, where piexif makes others "?".)
_USER_COMMENT_CODES = {b"ASCII\0\0\0": "utf-8", b"JIS\0\0\0\0\0": "shift_jis"}


def _user_comment_utf16(body: bytes) -> str:
    """A UNICODE UserComment's text. A1111 writes it big-endian (piexif), and reads it so; little-endian here only
    where a byte-order mark FF FE says so, or where no zero byte sits at an even offset and most code units end in
    one (Latin text written little-endian, as Windows does). A1111's own text always has its fields line's ASCII,
    whose zero bytes sit at even offsets in big-endian: read big-endian whatever else it holds (a Japanese prompt's
    ideographic spaces, U+3000, put theirs at odd offsets)."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return body[2:].decode("utf-16-le" if body[:2] == b"\xff\xfe" else "utf-16-be", "replace")
    little = body[0::2].count(0) == 0 and body[1::2].count(0) * 2 > len(body) // 2
    return body.decode("utf-16-le" if little else "utf-16-be", "replace")


def _user_comment_text(raw) -> str:
    """An EXIF UserComment's text as A1111 reads it (read_info_from_image): by its 8-byte character code, else (no
    known code: none, or a tool's raw text) the bytes as UTF-8, errors ignored. NUL padding is taken off (never text:
    A1111 would keep it)."""
    if isinstance(raw, str):
        return raw.strip("\0")
    head, body = raw[:8], raw[8:]
    if len(raw) >= 8 and head == b"UNICODE\0":
        return _user_comment_utf16(body).rstrip("\0")
    if len(raw) >= 8 and head in _USER_COMMENT_CODES:
        return body.decode(_USER_COMMENT_CODES[head], "replace").rstrip("\0")
    return raw.decode("utf-8", "ignore").strip("\0")


def _exif_comment(data) -> str:
    """The text of the UserComment in a picture's EXIF block (`image.info["exif"]`); "" where there is none or the
    block is broken, as A1111 passes over it."""
    try:
        exif = Image.Exif()
        exif.load(data)
        raw = exif.get_ifd(0x8769).get(0x9286, b"")  # (the Exif IFD's UserComment)
    except Exception:  # (a broken EXIF block)
        return ""
    return _user_comment_text(raw) if isinstance(raw, (bytes, str)) else ""


def picture_infotext(img: Image.Image) -> str | None:
    """A picture's infotext as A1111 1.10 reads it (modules/images.py read_info_from_image): a PNG's "parameters" text
    chunk, replaced by the EXIF UserComment (A1111's JPEG and WebP infotext, "UNICODE\\0" and UTF-16) where the
    picture has EXIF and the comment has text; a picture without EXIF whose "comment" (a GIF's or JPEG's) is read in
    its place, UTF-8. None where there is none. Reads what opening the file read, not the pixels."""
    info = img.info or {}
    text = info.get("parameters")
    if "exif" in info:
        comment = _exif_comment(info["exif"])
        if comment:
            text = comment
    elif "comment" in info:  # (A1111's "for gif"; it reads a JPEG's comment so too)
        comment = info["comment"]
        text = comment.decode("utf-8", "ignore") if isinstance(comment, bytes) else comment
    return text if isinstance(text, str) else None


def read_infotext(path: str | os.PathLike) -> str:
    """The infotext of a picture (its PNG "parameters" text chunk, as A1111 and imagine write it, or a JPEG's or
    WebP's EXIF UserComment) or of a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file (a PNG with A1111's parameters, or a text file)", str(path))
    try:
        with Image.open(path) as img:
            text = picture_infotext(img)
            if text is None:  # (a text chunk after the pixels is read with them)
                img.load()
                text = picture_infotext(img)
            if text is None:
                raise ValueError(f"{path}: this picture carries no parameters text (AUTOMATIC1111's PNG infotext); "
                                 "give a PNG A1111 or imagine wrote, or the text in a file")
            return str(text)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError):  # (not a picture: read as text)
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: neither a picture nor UTF-8 text") from None


def read_imagine_parameters(path: str | os.PathLike) -> dict | None:
    """The parameters imagine recorded in a PNG (its "imagine" JSON text chunk, save_png), or None: not a picture,
    or not one imagine wrote."""
    try:
        with Image.open(path) as img:
            text = img.info.get("imagine")
            if text is None:  # (a text chunk after the pixels is read with them)
                img.load()
                text = img.info.get("imagine")
    except (OSError, SyntaxError, Image.DecompressionBombError):
        return None
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def controlnet_unit_text(model: str, weight: float, start: float = 0.0, end: float = 1.0, module: str = "none",
                         resize: str = "just_resize", resolution: int | None = None, threshold_a: float | None = None,
                         threshold_b: float | None = None, pixel_perfect: bool = False, mode: str = "balanced") -> str:
    """AUTOMATIC1111's ControlNet extension's infotext of one unit (its field labels): the preprocessor (`module`,
    imagine.preprocessors) with its settings, the resize mode, both halves of the guidance batch; start / end: the
    fraction of the steps the ControlNet acts in."""
    from imagine.preprocessors import PREPROCESSORS

    resize_label = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                    "resize_and_fill": "Resize and Fill"}[resize]
    settings = "".join(f", {label}: {value:g}" for label, value in (
        ("Processor Res", resolution), ("Threshold A", threshold_a), ("Threshold B", threshold_b)) if value is not None)
    return (f"Module: {PREPROCESSORS.get(module, (module,))[0]}, Model: {model}, Weight: {float(weight):g}, Resize Mode: "
            f"{resize_label}{settings}, Guidance Start: {float(start):g}, Guidance End: {float(end):g}, Pixel Perfect: "
            f"{bool(pixel_perfect)}, Control Mode: " + {"balanced": "Balanced", "prompt": "My prompt is more important",
                                                       "controlnet": "ControlNet is more important",
                                                       "guess": "Guess"}[mode])


def controlnet_units(p: dict) -> list[tuple]:
    """The ControlNets of generation parameters as (model, weight, start, end[, module, resize, resolution, threshold
    a, threshold b, pixel perfect]): `controlnet_units` (the server's and the CLI's: the model as named, with the
    preprocessing) or the pipeline's `controlnet` text, "name: scale[ (start-end)], ..."."""
    units = p.get("controlnet_units")
    if units:
        return [(str(u[0]), float(u[1]), *(float(v) for v in (u[2:4] if len(u) >= 4 else (0.0, 1.0))), *u[4:])
                for u in units]
    text = p.get("controlnet")
    if not text:
        return []
    import re

    number = r"[-+.\deE]+|inf|nan"
    return [(m[1], float(m[2]), float(m[3] or 0.0), float(m[4] or 1.0))
            for m in re.finditer(rf"(.+?): ({number})(?: \(({number})-({number})\))?(?:, |$)", str(text))]


def grid(images: list[Image.Image], cols: int, pad: int = 2, bg=(255, 255, 255)) -> Image.Image:
    """The pictures in rows of `cols`, `pad` pixels apart on `bg`, each in a cell of the first picture's size."""
    if not images:
        raise ValueError("grid of no images")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1 or isinstance(pad, bool) or \
            not isinstance(pad, int) or pad < 0:
        raise ValueError(f"grid: cols must be a whole number >= 1 and pad one >= 0; got cols {cols!r}, pad {pad!r}")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), bg)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def save_grid(images: list[Image.Image], path: str | os.PathLike, cols: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols).save(path)
    return path
