"""Tensors to images and back, PNG files with their generation parameters, grids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image (rounded, clipped)."""
    if x.ndim != 3:
        raise ValueError(f"to_pil expects one image [C, H, W]; got {tuple(x.shape)}")
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a if a.shape[2] != 1 else a[:, :, 0])


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def save_png(img: Image.Image, path: str | os.PathLike, parameters: dict | None = None) -> Path:
    """Save a PNG with the generation parameters in its text chunks: `parameters` in
    AUTOMATIC1111's one-line form (so its PNG-info tab reads it) and `imagine` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", a1111_parameters(parameters))
        info.add_text("imagine", json.dumps(parameters, sort_keys=True))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def a1111_parameters(p: dict) -> str:
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", "steps"), ("Sampler", "sampler"), ("Schedule type", "schedule_type"),
              ("Schedule rho", "schedule_rho"), ("CFG scale", "guidance_scale"), ("Seed", "seed"), ("Size", None),
              ("Model", "model"), ("VAE", "vae"), ("Lora", "lora"), ("Final step", "final_step"), ("Start", "start"), ("Version", "version")]
    out = []
    for label, key in fields:
        if key == "schedule_type" and p.get(key):
            out.append(f"{label}: {str(p[key]).capitalize()}")  # A1111 writes "Schedule type: Karras"
        elif key is None:
            if "width" in p and "height" in p:
                out.append(f"Size: {p['width']}x{p['height']}")
        elif key in p and p[key] is not None:
            out.append(f"{label}: {p[key]}")
    # sampler settings as A1111 writes its own (e.g. "s_tmin: 1.5")
    out.extend(f"{k}: {v}" for k, v in (p.get("sampler_options") or {}).items())
    lines.append(", ".join(out))
    return "\n".join(lines)


def grid(images: list[Image.Image], cols: int, pad: int = 2, bg=(255, 255, 255)) -> Image.Image:
    if not images:
        raise ValueError("grid of no images")
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
