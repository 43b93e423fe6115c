"""Loading an original Stable Diffusion 1.x / 2.x single-file checkpoint, offline.

A single file (`.safetensors`, or a `.ckpt` pickle read with `torch.load(weights_only=True)`)
holds the three networks of latent diffusion under the CompVis names (Rombach et al. 2022):
`model.diffusion_model.*` (the U-Net), `first_stage_model.*` (the KL autoencoder) and
`cond_stage_model.transformer.*` (SD 1.x: OpenAI CLIP ViT-L/14, a transformers CLIPTextModel)
or `cond_stage_model.model.*` (SD 2.x: OpenCLIP ViT-H/14). It carries no config: each network's
shape is read off its weights (channels per level, residual blocks per level, which levels
attend, transformer depth, context width, 1x1-conv vs linear projections), and the names are
mapped by `imagine.loading.keymap`. Three things cannot be seen in the weights:

- Attention heads. The released configs use 8 heads per level for SD 1.x (CLIP context, 768)
  and 64-channel heads for SD 2.x (OpenCLIP context, 1024, linear projections); we follow them
  (override with `unet_config={"attention_head_dim": ...}`).
- The prediction type. SD 1.x and SD 2.x "base" (512 px) predict the noise (epsilon); the SD 2.x
  768-v models (stable-diffusion-2, 2-1) predict v (Salimans & Ho 2022). `prediction_type=...`
  or Stability's `<name>.yaml` next to the file (`parameterization: "v"`, the convention of the
  original repo and of AUTOMATIC1111) decide; else ComfyUI's empty `v_pred` marker key means v
  (`sdxl.MARKERS`, read as for SDXL; its `ztsnr` means zero terminal SNR); else SD 1.x is epsilon,
  and SD 2.x is epsilon when a .ckpt stores global_step 875000 (the 512-base, diffusers' rule) and
  otherwise what AUTOMATIC1111's one-call U-Net probe says (`sd2_prediction_type`).
- The tokenizer. Its vocab.json + merges.txt are in neither the checkpoint nor transformers; pass
  `tokenizer=FOLDER`, or put a `tokenizer/` folder next to the checkpoint, or set
  IMAGINE_CLIP_TOKENIZER, or have it in the local Hugging Face cache (searched, never fetched).

The noise schedule is SD's: 1000 steps, "scaled_linear" betas from 0.00085 to 0.012 (LDM's
`linear_start`/`linear_end`, betas linear in sqrt). When the checkpoint carries its `betas`
buffer (the .ckpt files do) and they differ from that beyond the rounding of their dtype, the
stored betas are used.

SDXL base checkpoints (text encoders under `conditioner.embedders.*`) are read by
`imagine.loading.sdxl`, to which `components_from_state` hands them; it reuses the shape inference and
key maps here. SD 2.1 Turbo, saved by the same sgm code, keeps its OpenCLIP tower under
`conditioner.embedders.0.model.*` and its schedule as `denoiser.sigmas`; it is read as SD 2.x
(`_sgm_sd2_to_ldm`).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from imagine.models import io
from imagine.loading import keymap
from imagine.loading.folder import X4_DEFAULTS, Components

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_ENV = "IMAGINE_CLIP_TOKENIZER"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header

# Stable Diffusion's training schedule (LDM configs: linear_start 0.00085, linear_end 0.012,
# 1000 timesteps; diffusers' "scaled_linear"), and the sampling conventions of its releases.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
}
SD_SCALING_FACTOR = 0.18215  # LDM sec. 4.3.2: 1 / std of the SD autoencoder's latents
# SD's x4 upscaler, from stablediffusion's configs/stable-diffusion/x4-upscaling.yaml: v-prediction on LDM's "linear"
# (diffusers' scaled_linear) schedule from 1e-4 to 0.02 (its low-resolution augmentation's too), latents scaled by
# 0.08333, augmentation levels up to 350
X4_UPSCALER = {"prediction_type": "v_prediction", "beta_start": 0.0001, "beta_end": 0.02, "scaling_factor": 0.08333,
               "max_noise_level": 350}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys an original checkpoint carries besides the three networks: the diffusion buffers of
# LDM's DDPM module, its learned-logvar parameter, the EMA copy, and training bookkeeping.
IGNORED_PREFIXES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_alphas_cumprod",
                    "posterior_", "logvar", "model_ema.", "lvlb_weights", "ucg_", "cond_stage_model.model.visual.",
                    # (the OpenCLIP tower's text_projection / logit_scale stay in its part: they tell a released
                    # file from a converted one, `openclip_is_whole_tower`; keymap drops them)
                    # SD's x4 upscaler: its low-resolution augmentation's schedule buffers (ImageConcatWithNoise-
                    # Augmentation), checked against the released config where the file has them
                    "low_scale_model.")
SD_LAYOUT = ("an original SD 1.x/2.x checkpoint (model.diffusion_model.* U-Net, first_stage_model.* VAE, "
             "cond_stage_model.transformer.* or cond_stage_model.model.* text encoder)")  # (for errors)
SD2_BASE_GLOBAL_STEP = 875000  # the step count stored in SD 2.0/2.1 512-base .ckpt files (epsilon)
KNOWN_OTHER_LAYOUTS = {  # SDXL (conditioner.embedders.*) goes to imagine.loading.sdxl before these are checked
    "conditioner.embedders.": "an SDXL checkpoint (conditioner.embedders.*) without its U-Net; imagine loads whole "
                              "SD 1.x, 2.x and SDXL checkpoints",
    "model.diffusion_model.joint_blocks.": "an SD3 checkpoint (MMDiT joint_blocks); imagine loads SD 1.x, 2.x and SDXL",
    "model.diffusion_model.double_blocks.": "a Flux checkpoint; imagine loads SD 1.x, 2.x and SDXL",
    "down_blocks.": "the weights of one diffusers component (down_blocks.* at the top level); load the model "
                    "folder it belongs to (with model_index.json) instead",
    "encoder.down.": "a standalone VAE checkpoint; imagine loads whole SD 1.x/2.x checkpoints",
    "text_model.": "a standalone CLIP text encoder; imagine loads whole SD 1.x/2.x checkpoints",
}


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict of a .safetensors or (weights-only) pickle checkpoint, with a
    clear error for a missing, truncated or corrupt file, a file that is no checkpoint at all, or a
    pickle that holds more than weights."""
    return _read_checkpoint_and_step(path)[0]


def _read_checkpoint_and_step(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int | None]:
    """`read_checkpoint`, plus the `global_step` a Lightning/LDM .ckpt stores beside its
    state_dict (None when absent): it tells SD 2's 512-px base (875000 steps) from the 768-v models."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; load_single_file takes a .safetensors or .ckpt file "
                         "(use load_folder for a model folder with model_index.json)")
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    step = _as_int(state.get("global_step"))
    # Lightning / LDM checkpoints nest the weights: {"state_dict": {...}, "global_step": ...}
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        found = sorted(str(k) for k in state)[:8]
        hint = ("; it looks like an AUTOMATIC1111 textual-inversion embedding (string_to_param): give it with "
                "--embedding (load_embedding)" if "string_to_param" in state else "")
        raise ValueError(f"{path} holds no tensors at its top level or under 'state_dict' (found keys {found}){hint}")
    return tensors, step


def read_weights_file(path: str | os.PathLike) -> Any:
    """What a weights file holds, read as its first bytes say (`_file_kind`), not as its suffix does: a
    safetensors file's dict, or a weights-only pickle's object. The one reader of checkpoints and embeddings."""
    path = Path(path)
    return _read_safetensors(path) if _file_kind(path) == "safetensors" else _read_pickle(path)


def _as_int(value: Any) -> int | None:
    """An integer stored in a checkpoint's metadata (int, numpy integer or 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    if torch.is_tensor(value):
        return int(value.item()) if value.numel() == 1 and not value.is_floating_point() else None
    return int(value) if isinstance(value, numbers.Integral) else None  # numpy integers are Integral


def _file_kind(path: Path) -> str:
    """The file's format, "pickle" or "safetensors", from its first bytes (a download saved under
    the wrong name is common), falling back to the suffix for a .safetensors file too damaged to
    tell; a file that is neither gets an error saying what it looks like."""
    with open(path, "rb") as f:
        head = f.read(512)
    # safetensors' whole layout first: its first byte is the header length's low byte, which may be 0x80, a
    # pickle's first byte
    if _is_safetensors_head(head, path.stat().st_size):
        return "safetensors"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[8:9] != b"{"):  # torch.save: a zip, or a legacy pickle
        return "pickle"
    if head[8:9] == b"{" or path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return "safetensors"  # damaged (cut short): load_tensors says truncated or corrupt, naming the file
    raise ValueError(f"{path} is not a torch checkpoint or a safetensors file: it is {_describe_head(head)}. "
                     f"Expected a .safetensors file or a torch checkpoint ({'/'.join(PICKLE_SUFFIXES)}: a zip "
                     "archive or pickle, as torch.save writes them)")


def _is_safetensors_head(head: bytes, size: int) -> bool:
    """Whether a file starts as safetensors does: an 8-byte little-endian header length n, then the n-byte JSON
    header ("{..."), all within the file."""
    n = int.from_bytes(head[:8], "little")
    return len(head) >= 9 and head[8:9] == b"{" and n < SAFETENSORS_MAX_HEADER and 8 + n <= size


def _describe_head(head: bytes) -> str:
    """What a non-checkpoint file looks like, from its first bytes (for the error message)."""
    if not head:
        return "empty (0 bytes): the download or copy did not finish; fetch it again"
    text = head.lstrip()
    low = text[:100].lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file: fetch it with git lfs pull (or download the file itself)"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head.lower():
        return ("an HTML/XML page (e.g. a login or error page saved in place of the download), not the model: "
                "download the file itself")
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive: unpack it first"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = None if len(head) < 512 else _utf8_prefix(head)
    if decoded is not None and decoded.strip() and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        first = _first_line(decoded)[:80]
        if text.startswith((b"{", b"[")):
            return (f"JSON text (starting {first!r}; e.g. a server's error message saved in place of the "
                    "download), not the model")
        return f"a text file (starting {first!r}), not the model"
    return (f"binary data that is neither a zip/pickle torch checkpoint nor safetensors (it starts with bytes "
            f"{head[:8].hex(' ')}); it may be corrupt, or another format")


def _utf8_prefix(head: bytes) -> str | None:
    """The text of `head` when only its last (cut) character fails to decode."""
    for cut in range(1, 4):
        try:
            return head[:-cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from imagine.models.io import load_tensors

    return load_tensors(path)  # names the file when it is truncated or corrupt


def _numpy_safe_globals() -> list:
    """What torch.load(weights_only=True) must allow to read numpy scalars, which Lightning/LDM
    training checkpoints keep in their metadata (e.g. callbacks' best_model_score): numpy's scalar
    reconstructor and the dtype classes, as torch's docs recommend for numpy scalars. None of these
    can run code: `scalar(dtype, bytes)` builds a number from raw bytes, `dtype(...)` a dtype.
    (`_codecs.encode`, which such pickles also use, torch allows by default.) Files written with
    numpy 1.x name the reconstructor numpy.core.multiarray.scalar, numpy 2 numpy._core.multiarray.scalar."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25: a dtype instance's class, needed to BUILD it
        allowed += [getattr(dtypes, n) for n in dir(dtypes)
                    if n.endswith("DType") and n != "ObjectDType" and isinstance(getattr(dtypes, n), type)]
    return allowed


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            # legacy (non-zip) torch.save format: no memory mapping possible
            return torch.load(path, map_location="cpu", weights_only=True)


# torch's weights-only messages for a pickle that needs a global it does not allow
_NEEDS_GLOBAL = (re.compile(r"GLOBAL (\S+) was not an allowed global"),
                 re.compile(r"unsupported GLOBAL (\S+) whose module"))


def _read_pickle(path: Path) -> Any:
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as e:
        msg = str(e)
        needed = next((m.group(1) for rx in _NEEDS_GLOBAL if (m := rx.search(msg))), None)
        if needed:
            raise ValueError(
                f"{path} is a pickle that holds more than weights (it needs {needed}); imagine only loads tensors "
                "(torch.load(weights_only=True)), since unpickling arbitrary objects can run code. If you "
                "trust the file, re-save its state_dict as .safetensors and load that") from None
        detail = msg.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in msg else msg
        detail = _first_line(detail.replace("Weights only load failed.", ""))
        raise ValueError(f"{path} is not a readable checkpoint ({detail}); it may be truncated or corrupt - "
                         "re-download it or use the .safetensors version") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {_first_line(str(e))}); "
                         "it may be truncated or corrupt - re-download it or use the .safetensors version") from None


def _first_line(s: str) -> str:
    return (s.strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------------------------------------
# What is in it
# ---------------------------------------------------------------------------------------------
def split_checkpoint(state: dict[str, torch.Tensor], source: str = "checkpoint",
                     vae_given: bool = False) -> dict[str, Any]:
    """Split an original SD checkpoint into its networks: {"unet": {...}, "vae": {...},
    "text": {...}, "text_kind": "clip" | "openclip", "betas": tensor | None, "markers": set of
    `sdxl.MARKERS` present}, prefixes removed. Raises ValueError naming what was found when the layout is not
    SD 1.x/2.x."""
    from imagine.loading.sdxl import MARKERS  # (ComfyUI writes them into SD 1.x/2.x files too)

    keys = list(state)
    add_on = _add_on(state)
    if add_on:
        raise ValueError(f"{source} {add_on}")
    # SD 2.1 unCLIP (sd21-unclip-h / -l): its CLIP image tower (embedder.model.visual.*: OpenCLIP's ViT-H/14, or
    # OpenAI's ViT-L/14 whose text half and pixel statistics, embedder.model.* / embedder.mean/std, are not used) and
    # its noise augmentor's schedule buffers beside the U-Net
    image_tower = {k[len(UNCLIP_TOWER_PREFIX):]: state[k] for k in keys if k.startswith(UNCLIP_TOWER_PREFIX)}
    if any(k.startswith("noise_augmentor.") for k in keys) and not image_tower:
        raise ValueError(f"{source} looks like SD 2.1 unCLIP (a noise augmentor, noise_augmentor.*) but has no CLIP "
                         f"image tower ({UNCLIP_TOWER_PREFIX}*); it cannot embed a picture")
    if image_tower:
        # (OpenAI's tower, sd21-unclip-l's ClipImageEmbedder, comes with its text half; OpenCLIP's, -h's, alone)
        openai = any(k.startswith("embedder.model.transformer.") for k in keys)
        state = {k: v for k, v in state.items() if not k.startswith(("embedder.", "noise_augmentor."))}
        keys = list(state)
    if any(k.startswith("depth_model.") for k in keys):  # AUTOMATIC1111 tells it by its MiDaS estimator's keys
        raise ValueError(f"{source} looks like SD 2 depth (stable-diffusion-2-depth: a MiDaS depth estimator, "
                         "depth_model.*, beside a U-Net that takes the depth map as a 5th channel); imagine runs "
                         "SD 1.x/2.x text-to-image, inpainting and instruct-pix2pix models, not depth-to-image")
    for prefix, what in KNOWN_OTHER_LAYOUTS.items():
        if any(k.startswith(prefix) for k in keys) and not any(k.startswith(keymap.UNET_PREFIX + "input_blocks.")
                                                             for k in keys):
            raise ValueError(f"{source} looks like {what}")
    split, other = split_by_prefix(state, {keymap.UNET_PREFIX: "unet", keymap.VAE_PREFIX: "vae",
                                           keymap.CLIP_PREFIX: "clip", keymap.OPENCLIP_PREFIX: "openclip"},
                                   IGNORED_PREFIXES)
    kind = "clip" if split["clip"] else "openclip" if split["openclip"] else None
    parts: dict[str, Any] = {"unet": split["unet"], "vae": split["vae"], "text": split[kind] if kind else {},
                             "text_kind": kind, "betas": state.get("betas"),
                             "markers": {k for k in other if k in MARKERS}, "image_tower": image_tower,
                             "image_tower_act": "quick_gelu" if image_tower and openai else "gelu"}
    other = [k for k in other if k not in MARKERS]
    if any(k.startswith(keymap.CLIP_PREFIX) for k in keys) and any(k.startswith(keymap.OPENCLIP_PREFIX) for k in keys):
        raise ValueError(f"{source} has both a CLIP (cond_stage_model.transformer.*) and an OpenCLIP "
                         "(cond_stage_model.model.*) text encoder; expected one")
    missing = [name for name, part, prefix in (("U-Net", "unet", keymap.UNET_PREFIX),
                                               ("VAE", "vae", keymap.VAE_PREFIX),
                                               ("text encoder", "text", "cond_stage_model.transformer.* or "
                                                                        "cond_stage_model.model."))
               if not parts[part] and not (part == "vae" and vae_given)]
    if missing or other:
        tops = sorted({".".join(k.split(".")[:2]) for k in keys})
        shown = ", ".join(tops[:10]) + (f" ... ({len(tops)} groups)" if len(tops) > 10 else "")
        expected = ("expected an original Stable Diffusion 1.x/2.x checkpoint with model.diffusion_model.* "
                    "(U-Net), first_stage_model.* (VAE) and cond_stage_model.transformer.* (SD 1.x CLIP) or "
                    "cond_stage_model.model.* (SD 2.x OpenCLIP)")
        if missing:
            raise ValueError(f"{source}: no {' and no '.join(missing)} weights found; {expected}; found {shown}"
                             + (NO_VAE_HINT if missing == ["VAE"] else ""))
        raise ValueError(f"{source}: unexpected weights {', '.join(other[:6])}"
                         + (f" ... ({len(other)} in all)" if len(other) > 6 else "") + f"; {expected}")
    return parts


# a checkpoint pruned of its VAE ("no VAE" releases) runs with one given beside it, as diffusers' from_single_file takes
# vae= and A1111 its "SD VAE" setting
NO_VAE_HINT = (" (a checkpoint saved without its VAE: give one, --vae FILE or from_pretrained(vae=...), "
               "e.g. vae-ft-mse-840000-ema-pruned.safetensors for SD 1.x, sdxl_vae.safetensors for SDXL)")


def given_vae(vae, scaling_factor: float) -> Any:
    """The VAE given for a checkpoint that has none (`load_single_file(vae=...)`), in the model's latent space: the
    family's scaling factor, as a VAE file takes its model's (`replace_vae`)."""
    if vae is None:
        return None
    vae.config.scaling_factor = float(scaling_factor)
    return vae


# what a LoRA's keys have (kohya / AUTOMATIC1111 / LyCORIS prefixes; diffusers' and peft's down / up entries)
LORA_KEY = re.compile(r"^lora_(?:unet|te\d?)_|\.(?:lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|"
                      r"lora_linear_layer\.down|lora_linear_layer\.up)\.")
EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g"}  # AUTOMATIC1111's .safetensors embeddings, SDXL's


def _add_on(state: dict[str, torch.Tensor]) -> str | None:
    """What a file given as the model looks like when it is an add-on to a model, a LoRA or a textual-inversion
    embedding (for the error), else None."""
    lora = next((k for k in state if LORA_KEY.search(k)), None)
    if lora is not None:
        return (f"looks like a LoRA (lora_down/lora_up keys, e.g. {lora}), not a model: give it with --lora "
                "(TextToImagePipeline.load_lora) beside the model it was made for")
    token, vectors = next(iter(state.items()), ("", None))  # diffusers' {token: vectors}, e.g. {"<cat-toy>": [768]}
    single = len(state) == 1 and "." not in token and vectors.ndim in (1, 2)
    if state and (set(state) <= EMBEDDING_KEYS or single):
        return (f"looks like a textual-inversion embedding ({', '.join(sorted(state))}), not a model: give it with "
                "--embedding (TextToImagePipeline.load_embedding) beside the model it was made for")
    return None


def split_by_prefix(state: dict[str, torch.Tensor], parts: dict[str, str], ignored: tuple[str, ...] = ()
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """An original checkpoint's weights by network: {part: {name without its prefix: tensor}} for `parts` (prefix ->
    part), with the keys starting with an `ignored` prefix dropped, and the keys of neither."""
    split: dict[str, dict[str, torch.Tensor]] = {part: {} for part in parts.values()}
    other = []
    for k, v in state.items():
        if k.startswith(ignored):
            continue
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is None:
            other.append(k)
        else:
            split[parts[prefix]][k[len(prefix):]] = v
    return split, other


def _need(state: dict, key: str, what: str, ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """`state[key]`, or a ValueError naming the weight and the layout it belongs to; with `ndim`, also one when
    the tensor has another number of dimensions (a damaged file), before the shape inference reads them."""
    if key not in state:
        near = sorted(state)[:6]
        raise ValueError(f"{what}: expected the weight {key!r} of an SD 1.x/2.x layout; found e.g. {near}")
    t = state[key]
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.ndim not in dims:
        want = " or ".join(f"{d}-d" for d in dims)
        raise ValueError(f"{what}: {key} should be a {want} weight of an SD 1.x/2.x layout; got shape {tuple(t.shape)}")
    return t


def _inferred(name: str, expected: str, infer, *args, **kwargs):
    """`infer(*args, **kwargs)` (a shape inference), with a KeyError / IndexError / StopIteration it raises made a
    ValueError naming the file and the layout expected. The inference checks the weights it reads (`_need`); this
    is the backstop for a damaged or pruned file that lacks a weight or a dimension those checks do not cover,
    which would otherwise surface as a bare KeyError from deep inside."""
    try:
        return infer(*args, **kwargs)
    except (KeyError, IndexError, StopIteration) as e:
        raise ValueError(f"{name}: the weights do not have the layout of {expected} ({type(e).__name__}: {e}); the "
                         "file may be damaged, pruned, or another kind of model") from None


def infer_unet_config(unet: dict[str, torch.Tensor], encoder_only: bool = False,
                      what: str = "U-Net (model.diffusion_model.*)") -> tuple[dict[str, Any], list[int], list[bool]]:
    """The diffusers-style config of an LDM U-Net read off its weights (prefix removed), plus the
    residual blocks and attention flag per level (what the key map needs). `encoder_only`: the weights are
    a ControlNet's copy of the contracting path and bottleneck (`imagine.loading.controlnet`): no output
    blocks, so no out_channels in the config. `what` names the weights in errors."""
    conv_in = _need(unet, "input_blocks.0.0.weight", what, ndim=4)
    # (its input channels: 4, or an inpainting model's 9, or instruct-pix2pix's 8: the pipeline tells them apart)
    levels: list[dict[str, Any]] = [{"channels": [], "attention": [], "depth": [], "only_cross": []}]
    n = 1
    while f"input_blocks.{n}.0.op.weight" in unet or f"input_blocks.{n}.0.in_layers.0.weight" in unet:
        if f"input_blocks.{n}.0.op.weight" in unet:
            levels.append({"channels": [], "attention": [], "depth": [], "only_cross": []})
        else:
            lv = levels[-1]
            lv["channels"].append(_need(unet, f"input_blocks.{n}.0.in_layers.2.weight", what, ndim=4).shape[0])
            depth = len({k.split(".")[4] for k in unet if k.startswith(f"input_blocks.{n}.1.transformer_blocks.")})
            lv["attention"].append(f"input_blocks.{n}.1.norm.weight" in unet)
            lv["depth"].append(depth)
            # LDM's disable_self_attn (SD's x4 upscaler): the first attention reads the text, so its keys take the
            # context's width, not the tokens' (where the two widths are equal the weights cannot tell; self-attention)
            k1 = unet.get(f"input_blocks.{n}.1.transformer_blocks.0.attn1.to_k.weight")
            q1 = unet.get(f"input_blocks.{n}.1.transformer_blocks.0.attn1.to_q.weight")
            lv["only_cross"].append(k1 is not None and q1 is not None and k1.shape[1] != q1.shape[1])
        n += 1
    if any(k.startswith((f"input_blocks.{n}.", f"input_blocks.{n + 1}.")) for k in unet) or not levels[0]["channels"]:
        raise ValueError(f"{what}: input_blocks.{n} is neither a residual block nor a downsampler; "
                         "not the LDM U-Net layout of SD 1.x/2.x")
    if not levels[-1]["channels"]:
        raise ValueError(f"{what}: the last level has a downsampler but no residual block; unknown layout")
    for i, lv in enumerate(levels):
        if len(set(lv["channels"])) != 1 or len(set(lv["attention"])) != 1 or len(set(lv["depth"])) != 1 \
                or len(set(lv["only_cross"])) != 1:
            raise ValueError(f"{what}: level {i} mixes residual blocks of different widths or attention "
                             f"({lv}); not an SD 1.x/2.x U-Net")
    channels = [lv["channels"][0] for lv in levels]
    attention = [lv["attention"][0] for lv in levels]
    layers = [len(lv["channels"]) for lv in levels]
    depth = [max(lv["depth"][0], 1) for lv in levels]
    mid_depth = len({k.split(".")[3] for k in unet if k.startswith("middle_block.1.transformer_blocks.")})
    if mid_depth and not attention[-1]:
        # the middle block's transformer takes the last level's depth (diffusers' rule); a last level without
        # attention leaves that number free, so it carries the middle's (SDXL's refiner: 4)
        depth[-1] = mid_depth
    first_attn = next((k for k in sorted(unet) if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if first_attn is None:
        raise ValueError(f"{what}: no cross-attention (…transformer_blocks.0.attn2.to_k.weight) found: not a "
                         "text-conditioned SD 1.x/2.x U-Net")
    context_dim = _need(unet, first_attn, what, ndim=2).shape[1]
    proj_in_key = next((k for k in sorted(unet) if k.endswith(".proj_in.weight")), None)
    if proj_in_key is None:
        raise ValueError(f"{what}: its spatial transformers have no proj_in weight (…1.proj_in.weight, a 1x1 conv in "
                         "SD 1.x, a linear layer in SD 2.x); not a complete SD 1.x/2.x U-Net")
    linear = _need(unet, proj_in_key, what, ndim=(2, 4)).ndim == 2
    # Heads are not visible in the weights; follow the released configs (see module docstring): SD's x4 upscaler
    # (the U-Net with noise-level classes, label_emb.weight) has num_heads 8 at every level
    upscaler = "label_emb.weight" in unet
    if (linear or context_dim == 1024) and not upscaler:
        heads: Any = [c // 64 for c in channels]
    else:
        heads = 8
    time_dim = _need(unet, "time_embed.0.weight", what, ndim=2).shape[0]
    cfg = {
        "in_channels": conv_in.shape[1],
        **({} if encoder_only else {"out_channels": _need(unet, "out.2.weight", what, ndim=4).shape[0]}),
        "block_out_channels": channels, "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "middle_block.1.norm.weight" in unet else None,
        "cross_attention_dim": context_dim, "attention_head_dim": heads, "use_linear_projection": linear,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        # SD 2.1's attention logits overflow float16 (diffusers' upcast_attention): the SD 2.x family
        "upcast_attention": linear or context_dim == 1024,
    }
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    only_cross = [lv["only_cross"][0] for lv in levels]
    if any(only_cross):
        cfg["only_cross_attention"] = only_cross
    if upscaler:  # the noise level of the low-resolution picture's augmentation, as a class label (one per level)
        cfg["num_class_embeds"] = unet["label_emb.weight"].shape[0]
    elif any(k.startswith("label_emb.") for k in unet):
        # SD 2.1 unCLIP's vector input (LDM's num_classes "sequential", adm_in_channels): the noised image embedding
        # and its level's code, through Linear-SiLU-Linear into the time embedding (diffusers' "projection")
        cfg["class_embed_type"] = "projection"
        cfg["projection_class_embeddings_input_dim"] = _need(unet, "label_emb.0.0.weight", what, ndim=2).shape[1]
    return cfg, layers, attention


def infer_vae_config(vae: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int, int]:
    what = "VAE (first_stage_model.*)"
    levels = len({k.split(".")[2] for k in vae if k.startswith("encoder.down.")})
    if levels == 0:
        raise ValueError(f"{what}: no encoder.down.* blocks; found e.g. {sorted(vae)[:6]}")
    channels = [_need(vae, f"encoder.down.{i}.block.0.conv1.weight", what, ndim=4).shape[0] for i in range(levels)]
    layers = len({k.split(".")[4] for k in vae if k.startswith("encoder.down.0.block.")})
    cfg = {
        "in_channels": _need(vae, "encoder.conv_in.weight", what, ndim=4).shape[1],
        "out_channels": _need(vae, "decoder.conv_out.weight", what, ndim=4).shape[0],
        "block_out_channels": channels, "layers_per_block": layers,
        "latent_channels": _need(vae, "decoder.conv_in.weight", what, ndim=4).shape[1],
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "use_quant_conv": "quant_conv.weight" in vae, "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "scaling_factor": SD_SCALING_FACTOR, "sample_size": 512,
    }
    return cfg, levels, layers


def infer_text_config(text: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, Any], int]:
    """A transformers CLIPTextConfig dict for the text encoder (prefix removed), and for OpenCLIP
    the number of transformer layers to keep (SD 2.x's penultimate layer: see below)."""
    if kind == "clip":
        s = keymap.clip_to_transformers(text)
        what = "text encoder (cond_stage_model.transformer.*)"
        tok = _need(s, "embeddings.token_embedding.weight", what, ndim=2)
        pos = _need(s, "embeddings.position_embedding.weight", what, ndim=2)
        layers = len({k.split(".")[2] for k in s if k.startswith("encoder.layers.")})
        inter = _need(s, "encoder.layers.0.mlp.fc1.weight", what, ndim=2).shape[0]
        act = "quick_gelu"  # OpenAI CLIP's x * sigmoid(1.702 x)
        keep = layers
    else:
        what = "text encoder (cond_stage_model.model.*)"
        tok = _need(text, "token_embedding.weight", what, ndim=2)
        pos = _need(text, "positional_embedding", what, ndim=2)
        total = keymap.openclip_layers(text)
        keep = total - 1 if openclip_is_whole_tower(text) else total
        if keep < 1:
            raise ValueError(f"{what}: {total} transformer blocks; SD 2.x's OpenCLIP text tower has 24 (23 used)")
        layers = keep
        inter = _need(text, "transformer.resblocks.0.mlp.c_fc.weight", what, ndim=2).shape[0]
        act = "gelu"  # OpenCLIP ViT-H/14: exact GELU
    width = tok.shape[1]
    cfg = {"vocab_size": tok.shape[0], "hidden_size": width, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": max(1, width // 64),  # 64-wide heads in both
           "max_position_embeddings": pos.shape[0], "hidden_act": act, "layer_norm_eps": 1e-5,
           "projection_dim": width}
    return cfg, keep


VIT_H_WIDTH, VIT_H_BLOCKS = 1024, 24  # OpenCLIP ViT-H/14's text tower, SD 2.x's


def openclip_is_whole_tower(text: dict[str, torch.Tensor]) -> bool:
    """Whether an SD 2.x file's OpenCLIP text tower (prefix removed) is the whole of it, its last block unused.

    SD 2.x conditions on the penultimate layer (Stability's FrozenOpenCLIPEmbedder(layer="penultimate")). Released
    files carry the whole ViT-H/14 tower, 24 blocks and the contrastive text_projection, and the last block is
    dropped here (AUTOMATIC1111 builds all 24 and stops one short at run time). A file converted from a diffusers
    model (diffusers' convert_diffusers_to_original_stable_diffusion.py) holds only the blocks diffusers' text
    encoder has, the unused one already gone (23 for SD 2.x), and no text_projection / logit_scale: every block
    is used, and dropping one would condition on the wrong layer without a word. So: the whole tower when the
    file has the projection, or has ViT-H's 24 blocks at its 1024 width (a file pruned of the projection)."""
    if keymap.openclip_projection(text) is not None:
        return True
    tok = text.get("token_embedding.weight")
    width = tok.shape[-1] if tok is not None and tok.ndim else None
    whole = width == VIT_H_WIDTH and keymap.openclip_layers(text) == VIT_H_BLOCKS
    if not whole:
        log.info("SD 2.x text encoder without text_projection and %d blocks: converted from a diffusers model, "
                 "every block kept", keymap.openclip_layers(text))
    return whole


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
def find_tokenizer(checkpoint: Path, kind: str, tokenizer: str | os.PathLike | None = None) -> Path:
    """The CLIP tokenizer folder to use: `tokenizer` if given, else `tokenizer/` next to the
    checkpoint, else $IMAGINE_CLIP_TOKENIZER, else a local Hugging Face cache copy."""
    tried = []
    candidates: list[tuple[str, Path]] = []
    if tokenizer is not None:
        p = Path(tokenizer)
        if not _is_tokenizer_folder(p):
            raise FileNotFoundError(f"tokenizer={p}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, "
                                    f"or tokenizer.json); found {_listing(p)}")
        return p
    candidates.append(("next to the checkpoint", checkpoint.parent / "tokenizer"))
    candidates.append(("next to the checkpoint", checkpoint.parent / checkpoint.stem / "tokenizer"))
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        candidates.append((f"${TOKENIZER_ENV}", Path(env)))
        candidates.append((f"${TOKENIZER_ENV}", Path(env) / "tokenizer"))
    for repo, sub in _hf_cache_repos(kind):
        candidates.extend(("the Hugging Face cache", snap / sub) for snap in _hf_snapshots(repo))
    for where, p in candidates:
        tried.append(str(p))
        if _is_tokenizer_folder(p):
            log.info("single-file checkpoint: using the tokenizer in %s (%s)", p, where)
            return p
    model = "SD 1.x (openai/clip-vit-large-patch14)" if kind == "clip" else "SD 2.x (OpenCLIP ViT-H/14)"
    raise FileNotFoundError(
        f"no CLIP tokenizer found for {checkpoint.name} ({model} text encoder): a single-file checkpoint does not "
        "contain the tokenizer's vocab.json and merges.txt. Pass tokenizer=FOLDER (load_single_file) or put a "
        f"'tokenizer' folder next to the checkpoint, or set {TOKENIZER_ENV}=FOLDER; e.g. the tokenizer/ folder "
        "of the matching diffusers model. Looked in: " + ", ".join(tried))


def _is_tokenizer_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()
                           or (p / "tokenizer.json").is_file())


def _listing(p: Path) -> str:
    if not p.exists():
        return "no such folder"
    if not p.is_dir():
        return "a file, not a folder"
    return str(sorted(q.name for q in p.iterdir())[:10])


def _hf_cache_repos(kind: str) -> list[tuple[str, str]]:
    if kind == "clip":
        return [("openai/clip-vit-large-patch14", ""), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                ("runwayml/stable-diffusion-v1-5", "tokenizer"), ("CompVis/stable-diffusion-v1-4", "tokenizer")]
    return [("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"), ("stabilityai/stable-diffusion-2-base", "tokenizer")]


def _hf_snapshots(repo: str) -> list[Path]:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
    snaps = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    return sorted(snaps.iterdir()) if snaps.is_dir() else []


def load_tokenizer(folder: Path, kind: str, vocab_size: int, max_positions: int):
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: not a loadable CLIP tokenizer ({_first_line(str(e))})") from None
    if len(tok) > vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {len(tok)} tokens but the checkpoint's text encoder only "
                         f"{vocab_size}: they do not belong together")
    # The padding each release was trained with: OpenAI's CLIP tokenizer pads with the end token
    # (SD 1.x), open_clip.tokenize pads with id 0 (SD 2.x).
    pad = tok.eos_token if kind == "clip" else tok.convert_ids_to_tokens(0)
    if tok.pad_token != pad:
        log.info("tokenizer %s: padding with %r as the %s text encoder was trained (was %r)", folder, pad,
                 "SD 1.x" if kind == "clip" else "SD 2.x", tok.pad_token)
        tok.pad_token = pad
    max_len = tok.model_max_length if tok.model_max_length < 10_000 else max_positions
    return tok, min(max_len, max_positions)


# ---------------------------------------------------------------------------------------------
# Building the networks
# ---------------------------------------------------------------------------------------------
def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True, assign=True): the checkpoint's tensors become the parameters
    (no second copy of a multi-GB model), with an error listing missing/unexpected/misshapen keys."""
    io.load_state_into(model, state, source, assign=True, layout="as inferred")


def _build(cls, config, state, source: str, dtype: torch.dtype):
    """Build on the meta device (no init work: every weight is about to be replaced), then take
    the checkpoint's tensors as the parameters."""
    from imagine.models.io import without_random_init

    with torch.device("meta"), without_random_init():
        model = cls(config)
    _assign(model, _cast(state, dtype), source)
    return model.eval()


def build_clip_text_model(config: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                          dtype: torch.dtype = torch.float32, token_ids: dict[str, int] | None = None):
    """A transformers CLIPTextModel with these weights (built on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagine.models.io import without_random_init

    cfg = CLIPTextConfig(**config, **(token_ids or {}))
    with torch.device("meta"), without_random_init():
        model = CLIPTextModel(cfg)
    state = _cast(state, dtype)
    _assign(model, state, source)
    return finish_clip_text_model(model, state)


def finish_clip_text_model(model, state: dict[str, torch.Tensor]):
    """A transformers CLIP text (or vision) model whose weights were assigned from `state`: the buffers outside the
    state dict,
    still on the meta device, rebuilt (position_ids), or a clear error for one this loader does not know."""
    device = next(iter(state.values())).device
    emb = getattr(model, "text_model", None) or getattr(model, "vision_model", model)  # (a text or image tower)
    emb = emb.embeddings
    if hasattr(emb, "position_ids"):
        n = emb.position_ids.shape[-1]
        emb.register_buffer("position_ids", torch.arange(n, device=device).expand(1, -1), persistent=False)
    for name, buf in model.named_buffers():
        if buf.device.type == "meta" and device.type != "meta":
            raise RuntimeError(f"{type(model).__name__} buffer {name} is not in the checkpoint and this loader does "
                               "not rebuild it (a transformers version this loader does not know)")
    return model.eval()


def load_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                     tokenizer: str | os.PathLike | None = None, prediction_type: str | None = None,
                     scaling_factor: float | None = None, unet_config: dict[str, Any] | None = None,
                     clip_skip: int = 0, tokenizer_2: str | os.PathLike | None = None, vae=None) -> Components:
    """Load an original SD 1.x/2.x or SDXL base checkpoint (.safetensors or .ckpt) into Components, offline
    (SDXL: `imagine.loading.sdxl`, whose docstring says what differs; tokenizer_2 is its second tokenizer).
    vae: an AutoencoderKL (`imagine.loading.vae.load_vae`) for a checkpoint saved without its VAE weights (taken in
    the family's latent space); a checkpoint with its own keeps them (the pipeline's `replace_vae` swaps them).

    tokenizer: a CLIP tokenizer folder (vocab.json + merges.txt); see `find_tokenizer` for where
        it is looked for when omitted. prediction_type: "epsilon" (SD 1.x, SD 2.x base) or
        "v_prediction" (SD 2.x 768-v); default: from `<name>.yaml` next to the file, else v when the
        file carries ComfyUI's `v_pred` marker, else epsilon for SD 1.x and, for SD 2.x, as
        `sd2_prediction_type` decides.
    scaling_factor: the VAE latent scale (default SD's 0.18215). unet_config: entries that
        override the inferred U-Net config (e.g. attention_head_dim)."""
    path = Path(path)
    _check_options(prediction_type, dtype)
    if prediction_type is None and path.is_file():
        prediction_type = _prediction_type_from_yaml(path)
    state, step = _read_checkpoint_and_step(path)
    return components_from_state(state, str(path), dtype, tokenizer=tokenizer, prediction_type=prediction_type,
                                 scaling_factor=scaling_factor, unet_config=unet_config, clip_skip=clip_skip,
                                 checkpoint_path=path, global_step=step, tokenizer_2=tokenizer_2, vae=vae)


def _check_options(prediction_type, dtype) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...); got {dtype!r}")


def components_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint",
                          dtype: torch.dtype = torch.float32, *, tokenizer: str | os.PathLike | None = None,
                          prediction_type: str | None = None, scaling_factor: float | None = None,
                          unet_config: dict[str, Any] | None = None, clip_skip: int = 0,
                          checkpoint_path: Path | None = None, global_step: int | None = None,
                          tokenizer_2: str | os.PathLike | None = None, vae=None) -> Components:
    """`load_single_file` after the file is read: an original SD 1.x/2.x state dict -> Components (an SDXL
    one, with conditioner.embedders.*, goes to `imagine.loading.sdxl.components_from_state`). The
    tensors are taken as they are (no copy when already in `dtype`); meta tensors give a model
    on the meta device (shape checks without memory). global_step: the training step a .ckpt
    stores beside its state_dict, if any (see `sd2_prediction_type`)."""
    from imagine.models.text_encoders import CLIPTextEncoder
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.models.vae import AutoencoderKL, VAEConfig
    from imagine.schedules import NoiseSchedule
    from imagine.loading import sdxl

    state = _sgm_sd2_to_ldm(state, Path(source).name)
    if sdxl.is_sdxl(state):
        return sdxl.components_from_state(state, source, dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                          prediction_type=prediction_type, scaling_factor=scaling_factor,
                                          unet_config=unet_config, clip_skip=clip_skip,
                                          checkpoint_path=checkpoint_path, global_step=global_step, vae=vae)
    if tokenizer_2 is not None:
        raise ValueError(f"tokenizer_2 is the second tokenizer of an SDXL checkpoint; {Path(source).name} is not one "
                         "(no conditioner.embedders.* weights)")
    _check_options(prediction_type, dtype)
    parts = split_checkpoint(state, source, vae_given=vae is not None)
    name = Path(source).name
    if prediction_type is None:  # (the caller's or the .yaml's first; then ComfyUI's v_pred, before the SD 2 probe)
        prediction_type = sdxl.marked_prediction_type(parts["markers"], name)

    # U-Net
    ucfg, layers, attention = _inferred(name, SD_LAYOUT, infer_unet_config, parts["unet"])
    # SD's x4 upscaler (stablediffusion's x4-upscaling.yaml): a U-Net with the low-resolution picture's noise level as
    # its class label, the picture concatenated to the latents
    upscaler = ucfg.get("num_class_embeds") is not None
    # the released configs' latent size (64: 512 px; the upscaler's 128), before the caller's unet_config, which
    # overrides what was inferred, sample_size included
    ucfg["sample_size"] = 128 if upscaler else 64
    ucfg.update(unet_config or {})
    unet_weights = {k: v for k, v in parts["unet"].items() if not k.startswith("label_emb.")}
    mapped = keymap.unet_to_diffusers(unet_weights, layers, attention, ucfg["mid_block_type"] is not None)
    if upscaler:
        mapped["class_embedding.weight"] = parts["unet"]["label_emb.weight"]
    unclip = ucfg.get("class_embed_type") == "projection"
    if unclip:
        if not parts["image_tower"]:
            raise ValueError(f"{name}: its U-Net reads an image embedding (label_emb.0.*: SD 2.1 unCLIP) but the file "
                             f"has no CLIP image tower ({UNCLIP_TOWER_PREFIX}*) to make one")
        for i, layer in ((0, "linear_1"), (2, "linear_2")):
            for leaf in ("weight", "bias"):
                mapped[f"class_embedding.{layer}.{leaf}"] = _need(parts["unet"], f"label_emb.0.{i}.{leaf}",
                                                                  f"{name} (U-Net)")
    text_kind = parts["text_kind"]
    sd2 = text_kind == "openclip"
    try:
        unet_cfg = UNetConfig.from_dict(ucfg)
    except ValueError as e:
        raise ValueError(f"{name}: the U-Net read off the weights is not buildable: {e}") from None
    unet = _build(UNet2DConditionModel, unet_cfg, mapped, f"{name} (U-Net)", dtype)
    if prediction_type is None and upscaler:
        prediction_type = X4_UPSCALER["prediction_type"]
    if prediction_type is None and unclip:  # (the released configs, v2-1-stable-unclip-*-inference.yaml: v)
        prediction_type = "v_prediction"
    if prediction_type is None:
        prediction_type = sd2_prediction_type(unet, global_step, name) if sd2 else "epsilon"
    if sd2 and prediction_type == "v_prediction" and not upscaler and "sample_size" not in (unet_config or {}):
        # the 768-v models: 768 px, 96x96 latents (unless the caller said the size)
        unet_cfg = dataclasses.replace(unet_cfg, sample_size=96)
        unet.config = unet_cfg

    # VAE
    scale = float(scaling_factor) if scaling_factor is not None else \
        X4_UPSCALER["scaling_factor"] if upscaler else VAEConfig.scaling_factor
    if parts["vae"]:
        vcfg, vlevels, vlayers = _inferred(name, SD_LAYOUT, infer_vae_config, parts["vae"])
        vcfg["scaling_factor"] = scale
        vmapped = keymap.vae_to_diffusers(parts["vae"], vlevels, vlayers, vcfg["mid_block_add_attention"])
        vae = _build(AutoencoderKL, VAEConfig.from_dict(vcfg), vmapped, f"{name} (VAE)", dtype)
    else:  # (pruned of its VAE: the one given)
        vae = given_vae(vae, scale)

    # Text encoder + tokenizer
    tcfg, keep = _inferred(name, SD_LAYOUT, infer_text_config, parts["text"], text_kind)
    tstate = (keymap.clip_to_transformers(parts["text"]) if text_kind == "clip"
              else keymap.openclip_to_transformers(parts["text"], keep))
    tok_dir = find_tokenizer(checkpoint_path or Path(source), text_kind, tokenizer)
    tok, max_len = load_tokenizer(tok_dir, text_kind, tcfg["vocab_size"], tcfg["max_position_embeddings"])
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text_model = build_clip_text_model(tcfg, tstate, f"{name} (text encoder)", dtype, ids)
    text_encoder = CLIPTextEncoder(text_model, tok, max_len, f"{source} (text encoder)", clip_skip)

    # Noise schedule
    sched_cfg = sdxl.marked_schedule(dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type), parts["markers"],
                                     name)
    if upscaler:
        sched_cfg.update(beta_start=X4_UPSCALER["beta_start"], beta_end=X4_UPSCALER["beta_end"])
    betas = parts["betas"]
    if betas is not None and betas.device.type != "meta":
        if not _is_sd_schedule(betas, sched_cfg):
            log.warning("%s: its betas differ from %s scaled_linear schedule; using the stored betas", name,
                        "the x4 upscaler's" if upscaler else "SD's")
            sched_cfg = dict(sched_cfg, trained_betas=betas.double().tolist(), num_train_timesteps=len(betas))
    schedule = NoiseSchedule.from_diffusers_config(sched_cfg)
    size = 8 * unet_cfg.sample_size
    defaults: dict[str, Any] = {"height": size, "width": size}
    low_res = None
    if upscaler:  # the low-resolution picture's own noise schedule (its ImageConcatWithNoiseAugmentation) and limit
        low_cfg = {"beta_start": X4_UPSCALER["beta_start"], "beta_end": X4_UPSCALER["beta_end"],
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
        low_betas = state.get("low_scale_model.betas")
        if low_betas is not None and low_betas.device.type != "meta" and not _is_sd_schedule(low_betas, low_cfg):
            log.warning("%s: its low-resolution augmentation's betas differ from the x4 upscaler's; using the "
                        "stored betas", name)
            low_cfg = dict(low_cfg, trained_betas=low_betas.double().tolist(), num_train_timesteps=len(low_betas))
        low_res = NoiseSchedule.from_diffusers_config(low_cfg)
        defaults = {"max_noise_level": X4_UPSCALER["max_noise_level"], **X4_DEFAULTS}
    embedder = image_noise = None
    if unclip:
        from imagine.loading.folder import UNCLIP_DEFAULTS

        embedder, image_noise = unclip_parts(parts["image_tower"], name, dtype, parts["image_tower_act"])
        if 2 * embedder.dim != unet_cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"{name}: the image tower projects to {embedder.dim} dimensions; the U-Net's image input "
                             f"(label_emb.0.0) takes {unet_cfg.projection_class_embeddings_input_dim}, not twice that")
        defaults.update(UNCLIP_DEFAULTS)
    return Components(unet=unet, text_encoder=text_encoder, schedule=schedule, prediction_type=prediction_type,
                      vae=vae, scheduler_config=sched_cfg, defaults=defaults, source=str(source),
                      low_res_schedule=low_res, image_embedder=embedder, image_noise_schedule=image_noise)


UNCLIP_TOWER_PREFIX = "embedder.model.visual."
# SD 2.1 unCLIP's noise augmentor (LDM's CLIPEmbeddingNoiseAugmentation in the released configs): 1000 steps of the
# squaredcos_cap_v2 schedule; its embedding statistics are not saved in the file (a non-persistent buffer, mean 0 and
# std 1 unless its config names a stats file), so the identity, as ComfyUI runs these files
UNCLIP_NOISE_SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
CLIP_PIXEL_MEAN, CLIP_PIXEL_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def unclip_parts(tower: dict[str, torch.Tensor], name: str, dtype: torch.dtype, act: str = "gelu"):
    """An unCLIP file's image embedder (its CLIP vision tower in transformers' CLIPVisionModelWithProjection, CLIP's
    picture processing at the tower's size, the identity statistics) and its augmentation's noise schedule."""
    from imagine.schedules import NoiseSchedule

    config, state = keymap.openclip_visual_to_transformers(tower, f"{name} ({UNCLIP_TOWER_PREFIX}*)", act)
    return clip_image_embedder(config, state, f"{name} (image tower)", dtype), \
        NoiseSchedule.from_diffusers_config(dict(UNCLIP_NOISE_SCHEDULE))


def clip_image_embedder(config: dict[str, Any], state: dict[str, torch.Tensor], source: str, dtype: torch.dtype):
    """A CLIP image tower (transformers' CLIPVisionConfig arguments and CLIPVisionModelWithProjection's state dict) as
    an ImageEmbedder: CLIP's picture processing at the tower's size, the identity statistics (an unCLIP file's
    tower and ComfyUI's clip_vision files carry none)."""
    import transformers

    from imagine.models.image_encoder import ImageEmbedder

    model = _build(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(**config), state, source,
                   dtype)
    model = finish_clip_text_model(model, state)  # (its position_ids, built on the meta device)
    kind = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = config["image_size"]
    processor = kind(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                     image_mean=CLIP_PIXEL_MEAN, image_std=CLIP_PIXEL_STD)
    width = config["projection_dim"]
    return ImageEmbedder(model, processor, torch.zeros(width), torch.ones(width))


# SD 2.1 Turbo (stabilityai/sd-turbo) is saved by Stability's sgm code: its OpenCLIP ViT-H tower sits where the SDXL
# refiner keeps bigG (conditioner.embedders.0.model.*) and its schedule is sgm's denoiser.sigmas. AUTOMATIC1111
# (sd_models.get_state_dict_from_checkpoint, is_sd2_turbo) renames conditioner.embedders.0. to cond_stage_model.;
# diffusers reads the tower from there too. Told from the refiner by its U-Net: no label_emb (no size conditioning).
SGM_TEXT_PREFIX = "conditioner.embedders.0."


def _sgm_sd2_to_ldm(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """An SD 2.x state dict in sgm's layout (SD 2.1 Turbo) -> the LDM layout; any other state dict as it is."""
    if SGM_TEXT_PREFIX + "model.ln_final.weight" not in state or \
            any(k.startswith(keymap.UNET_PREFIX + "label_emb.") for k in state):
        return state
    out = {("cond_stage_model." + k[len(SGM_TEXT_PREFIX):] if k.startswith(SGM_TEXT_PREFIX) else k): v
           for k, v in state.items()}
    sigmas = out.pop("denoiser.sigmas", None)
    if sigmas is not None and "betas" not in out and sigmas.device.type != "meta":
        from imagine.loading.sdxl import _betas_from_sigmas

        betas = _betas_from_sigmas(sigmas, name)  # None: SD's own schedule
        if betas is not None:
            out["betas"] = betas
    log.info("%s: an SD 2.x checkpoint in sgm's layout (SD 2.1 Turbo: conditioner.embedders.0.model.*)", name)
    return out


def _is_sd_schedule(betas: torch.Tensor, c: dict = SD_SCHEDULER_CONFIG) -> bool:
    """Whether stored betas are the scaled_linear schedule of the config `c` (SD's: linear in sqrt(beta) from
    sqrt(0.00085) to sqrt(0.012), 1000 steps), up to the rounding of the dtype they were stored in (fp16/bf16 prunes
    round them by up to half an ulp, far more than float32's 1e-7; then the exact float64 schedule is used)."""
    n = c["num_train_timesteps"]
    if betas.ndim != 1 or betas.shape[0] != n:
        return False
    sd = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    eps = torch.finfo(betas.dtype).eps if betas.is_floating_point() else 0.0
    return torch.allclose(betas.double(), sd, rtol=max(1e-4, 4 * eps), atol=1e-8)


def sd2_prediction_type(unet: torch.nn.Module, global_step: int | None, name: str = "checkpoint") -> str:
    """The prediction type of SD 2.x weights given neither a prediction_type nor a .yaml.

    A .ckpt that stores global_step 875000 is SD 2.0/2.1's 512-px base: epsilon (diffusers'
    single-file rule). Otherwise AUTOMATIC1111's probe (modules/sd_models_config.py,
    is_using_v_parameterization_for_sd2): run the U-Net once on x = 0.5 (1x4x8x8), t = 999,
    context = 0.5 (1x2xwidth); a v-prediction model's output at the last step is close to -x
    (v = -x0 there, for a flat input), an epsilon model's is noise-like, so mean(out - x) < -1
    means v. The threshold is calibrated on the released SD 2 weights; a U-Net that takes more than the
    latents (SD 2 inpainting's 9 channels) is epsilon unprobed, as in AUTOMATIC1111. One call on an 8x8 latent is
    cheap; on the meta device (no weights) there is nothing to run, and epsilon is kept."""
    if global_step == SD2_BASE_GLOBAL_STEP:
        log.info("%s: SD 2.x weights with global_step %d (the 512-px base models): epsilon prediction", name,
                 global_step)
        return "epsilon"
    if unet.config.in_channels != unet.config.out_channels:
        # an inpainting U-Net (9 channels): AUTOMATIC1111 picks v2-inpainting-inference.yaml (epsilon) without the
        # probe, which feeds 4 latent channels, and diffusers stabilityai/stable-diffusion-2-inpainting's config
        log.info("%s: SD 2.x weights whose U-Net takes %d channels, not the latents alone (inpainting): epsilon "
                 "prediction", name, unet.config.in_channels)
        return "epsilon"
    first = next(unet.parameters())
    if first.device.type == "meta":
        log.info("%s: SD 2.x weights on the meta device: epsilon prediction (no weights to probe)", name)
        return "epsilon"
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=first.device)
    context = torch.full((1, 2, cfg.cross_attention_dim), 0.5, device=first.device)
    try:
        with torch.no_grad():
            out = unet(x, torch.tensor([999.0], device=first.device), context=context)
        score = (out.float() - x).mean().item()
    except Exception as e:  # noqa: BLE001 - the probe is a heuristic; loading must not fail on it
        log.warning("%s: SD 2.x weights; could not probe the U-Net for its prediction type (%s: %s), assuming "
                    "epsilon (the 512-px base models). For the 768-v models (stable-diffusion-2, 2-1) pass "
                    "prediction_type='v_prediction' or put the model's .yaml next to it", name, type(e).__name__,
                    _first_line(str(e)))
        return "epsilon"
    chosen = "v_prediction" if score < -1 else "epsilon"
    log.info("%s: SD 2.x weights without a .yaml: %s (AUTOMATIC1111's U-Net probe: mean(out - x) = %.3f, %s -1); "
             "pass prediction_type to override", name, chosen, score, "<" if score < -1 else ">=")
    return chosen


def _prediction_type_from_yaml(path: Path) -> str | None:
    """Stability's inference config next to the checkpoint (`<name>.yaml`, as AUTOMATIC1111
    reads it): `parameterization: "v"` marks a v-prediction model (LDM's configs, SD 1.x/2.x); in sgm's
    (SDXL, SD 2.1 Turbo), which have no `parameterization`, the denoiser's scaling_config does."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(errors="replace")
    m = re.search(r"^\s*parameterization\s*:\s*[\"']?(\w+)[\"']?", text, re.MULTILINE)
    if not m:
        return _sgm_prediction_type(text, yaml)
    value = m.group(1)
    if value == "v":
        return "v_prediction"
    if value == "eps":
        return "epsilon"
    if value == "x0":
        return "sample"
    raise ValueError(f"{yaml}: unknown parameterization {value!r}; valid: eps, v, x0")


# sgm's denoiser scalings (sgm/modules/diffusionmodules/denoiser_scaling.py) -> the prediction type; AUTOMATIC1111
# (sd_models_xl.extend_sdxl) runs v-prediction for VScaling, epsilon otherwise
SGM_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}


def _sgm_prediction_type(text: str, yaml: Path) -> str:
    """The prediction type of an sgm config's `denoiser_scaling.<Class>` target; epsilon when it names none (LDM's
    default parameterization), an error for one of the EDM scalings imagine does not run."""
    m = re.search(r"denoiser_scaling\.(\w+)", text)
    if not m:
        return "epsilon"
    if m.group(1) not in SGM_SCALINGS:
        raise ValueError(f"{yaml}: its denoiser's scaling is {m.group(1)} (an EDM model); imagine runs DDPM-trained "
                         f"models, whose sgm scaling is one of {', '.join(SGM_SCALINGS)}")
    return SGM_SCALINGS[m.group(1)]
