"""A KL autoencoder on its own, to decode (and encode) in place of a model's own: AUTOMATIC1111's
"SD VAE" setting, diffusers' `StableDiffusionPipeline(vae=...)`.

People keep fine-tuned VAEs as files beside their checkpoints: Stability's `vae-ft-mse-840000-ema-pruned`
(the SD 1.x decoder fine-tuned on an MSE + LPIPS loss, sharper faces and text), or a model's own
`*.vae.safetensors`. They come in three layouts, all read here offline:

- the original one (LDM's `model.py`: `encoder.down.0.block.0.conv1.weight`, ...), in a
  `.safetensors` file or a `.ckpt` pickle (read with `torch.load(weights_only=True)`, weights
  possibly under `state_dict`, with the training-only `loss.*` and `model_ema.*` entries dropped);
  a whole SD checkpoint's `first_stage_model.*` part is taken the same way;
- diffusers' names (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...) in one file, including
  the older attention names (`query`, `key`, `value`, `proj_attn`);
- a folder: `config.json` plus weights (ours or diffusers' `AutoencoderKL`), or a whole diffusers
  model folder, whose `vae/` is taken.

A file carries no config: the shape is read off the weights (`single_file.infer_vae_config`; GroupNorm's
group count, which no weight shows, is LDM's and every SD-family VAE's 32), and the latent scaling factor is the
caller's (the model being decoded keeps its own, as in AUTOMATIC1111).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from imagine.loading import keymap
from imagine.loading.single_file import SD_SCALING_FACTOR, _build, _inferred, infer_vae_config, read_checkpoint

ORIGINAL_MARK = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_MARK = "encoder.down_blocks.0.resnets.0.conv1.weight"
# diffusers before 0.14 named the VAE's mid-block attention like this
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
DROPPED = ("loss.", "model_ema.")  # LDM training: the discriminator and LPIPS, the EMA bookkeeping


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
             scaling_factor: float | None = None):
    """Our AutoencoderKL from a VAE folder or file (see the module docstring for the layouts).
    `scaling_factor` sets the latent scale of a file's VAE (default SD's 0.18215); a folder's
    config carries its own, which a given `scaling_factor` overrides."""
    from imagine.models.vae import AutoencoderKL

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE not found: {path} (give a .safetensors / .ckpt file or a folder with "
                                "config.json)")
    if path.is_dir():
        folder = path
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"  # a whole diffusers model folder: its VAE
        if not (folder / "config.json").is_file():
            raise ValueError(f"{path}: a VAE folder needs config.json and the weights beside it (ours or "
                             "diffusers' AutoencoderKL), or a vae/ sub-folder with them")
        vae = AutoencoderKL.from_pretrained(folder).to(dtype).eval()
        if scaling_factor is not None:
            vae.config.scaling_factor = float(scaling_factor)
        return vae
    return vae_from_state(read_checkpoint(path), str(path), dtype, scaling_factor=scaling_factor)


def vae_from_state(state: dict[str, torch.Tensor], source: str = "VAE", dtype: torch.dtype = torch.float32, *,
                   scaling_factor: float | None = None):
    """A VAE state dict in the original or diffusers' names -> our AutoencoderKL (tensors taken as
    they are when already in `dtype`)."""
    from imagine.models.vae import AutoencoderKL, VAEConfig

    name = Path(source).name
    if any(k.startswith(keymap.VAE_PREFIX) for k in state):  # a whole SD checkpoint: its autoencoder
        state = {k[len(keymap.VAE_PREFIX):]: v for k, v in state.items() if k.startswith(keymap.VAE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    if DIFFUSERS_MARK in state and ORIGINAL_MARK not in state:
        state = _diffusers_to_original(state)
    if ORIGINAL_MARK not in state:
        tops = sorted({".".join(k.split(".")[:2]) for k in state})
        shown = ", ".join(tops[:8]) + (f" ... ({len(tops)} groups)" if len(tops) > 8 else "")
        raise ValueError(f"{name}: not a KL autoencoder (VAE); expected {ORIGINAL_MARK} (the original layout), "
                         f"{DIFFUSERS_MARK} (diffusers' names) or first_stage_model.* (a whole SD checkpoint); "
                         f"found {shown or 'no weights'}")
    cfg, levels, layers = _inferred(name, "a KL autoencoder (VAE) checkpoint, SD's layout", infer_vae_config, state)
    cfg["scaling_factor"] = float(SD_SCALING_FACTOR if scaling_factor is None else scaling_factor)
    mapped = keymap.vae_to_diffusers(state, levels, layers, cfg["mid_block_add_attention"])
    return _build(AutoencoderKL, VAEConfig.from_dict(cfg), mapped, f"{name} (VAE)", dtype)


def _diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' VAE names -> the original ones (views, no copies), through keymap's table."""
    renamed = {}
    for k, v in state.items():
        parts = k.split(".")
        if ".mid_block.attentions." in k and len(parts) >= 2 and parts[-2] in OLD_ATTENTION_NAMES:
            k = ".".join(parts[:-2] + [OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
        if ".mid_block.attentions." in k and v.ndim == 4:  # 1x1 conv weights of a converted file: linear here
            v = v[:, :, 0, 0]
        renamed[k] = v
    levels = len({k.split(".")[2] for k in renamed if k.startswith("encoder.down_blocks.")})
    layers = len({k.split(".")[4] for k in renamed if k.startswith("encoder.down_blocks.0.resnets.")})
    mid_attention = any(k.startswith("encoder.mid_block.attentions.") for k in renamed)
    return keymap.vae_to_original(renamed, levels, layers, mid_attention)
