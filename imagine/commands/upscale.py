"""Enlarge pictures with an upscaler model (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, RealPLKSR), as AUTOMATIC1111's
Extras tab and ComfyUI's "Upscale Image (using Model)" do.

  imagine upscale circle.png                      # the embedded shapes upscaler, x4
  imagine upscale photo.png --model RealESRGAN_x4plus.pth -o big.png
  imagine upscale a.png b.png --model "R-ESRGAN 4x+" --upscaler-dir ~/models/ESRGAN --scale 2 -o out/
  imagine upscale photos/ --model 4x-UltraSharp.pth    # a folder's pictures (A1111's batch from directory) into
                                                       # photos/upscaled/; a picture that cannot be read is skipped

The model runs over tiles (ComfyUI's: 512 pixels overlapping by 32, blended in float; or A1111's with --tiling
a1111: 192 overlapping by 8, pasted through 8-bit masks, its pictures in BGR) until the picture is at least the size
asked, then a Lanczos resize to it. The PNG keeps the source's text chunks (its generation parameters) and adds
A1111's "postprocessing" one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="pictures to enlarge (PNG, JPEG, WebP, ...), or folders of them (their pictures, not their "
                        "subfolders', each folder's into FOLDER/upscaled/ unless -o says where)")
    p.add_argument("--model", "-m", default="default", metavar="PATH|NAME",
                   help="the upscaler model: a .pth / .pt / .safetensors file (ESRGAN, ESRGAN+, BSRGAN, Real-ESRGAN, "
                        "Real-ESRGAN compact, SwinIR, HAT, DAT, SPAN, RealPLKSR), a folder imagine train upscaler "
                        "exported, or its name in --upscaler-dir (file stem, or A1111's name such as 'R-ESRGAN 4x+'); "
                        "default: the embedded shapes upscaler "
                        "(x4, for the embedded default model's pictures)")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR", help="a folder of upscaler models")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=None, help="how much larger (default: the model's own scale)")
    size.add_argument("--size", default=None, metavar="WxH", help="the size wanted in pixels, e.g. 1024x768")
    p.add_argument("--tiling", choices=("comfyui", "a1111"), default="comfyui",
                   help="comfyui (default): tiles blended in float, RGB; a1111: AUTOMATIC1111's tiles and its size "
                        "rule (sides down to a multiple of 8), for its pictures")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in pixels (default 512 for comfyui, 192 for a1111; 0: the whole picture at once)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default 32 / 8)")
    p.add_argument("--output", "-o", default=None, metavar="PATH",
                   help="a PNG file (one picture), or a folder (default: beside each picture, NAME-upscaled.png)")
    p.add_argument("--precision", choices=["exact", "fast"], default="exact",
                   help="exact: float32 (default); fast: bf16 where the CPU has it natively, about 2x (imagine bench "
                        "upscale: 1.9-3.5x spandrel's float32 on a Zen 4 by architecture, 40-75 dB from it on random "
                        "weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 1024x768; got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"--size must be positive; got {text!r}")
    return w, h


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif")


def _sources(args) -> list[tuple[Path, Path | None]]:
    """(picture, the folder it was found in or None) for each IMAGE: a file as it is; a folder's picture files
    (by suffix, sorted, not its subfolders'), none of them an error naming the folder."""
    out = []
    for item in args.images:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: a folder with no pictures in it ({', '.join(PICTURE_SUFFIXES)})")
            out += [(p, path) for p in found]
        elif path.is_file():
            out.append((path, None))
        else:
            raise FileNotFoundError(f"picture not found: {path}")
    return out


def _targets(args, sources: list[tuple[Path, Path | None]]) -> list[Path]:
    """Where each picture goes: -o (a PNG for one picture, else a folder of NAME-upscaled.png); without it, beside a
    picture named on its own, and into FOLDER/upscaled/ for a folder's."""
    if args.output is None:
        return [folder / "upscaled" / f"{p.stem}-upscaled.png" if folder is not None
                else p.with_name(f"{p.stem}-upscaled.png") for p, folder in sources]
    out = Path(args.output)
    if len(sources) == 1 and sources[0][1] is None and out.suffix.lower() == ".png" and not out.is_dir():
        return [out]
    if out.suffix and not out.is_dir():
        raise ValueError(f"-o {out}: for {len(sources)} pictures give a folder, or one PNG file for one picture")
    return [out / f"{p.stem}-upscaled.png" for p, _ in sources]


def run(args) -> int:
    import torch
    from PIL import Image, PngImagePlugin

    from imagine.upscalers import (A1111_OVERLAP, A1111_TILE, COMFYUI_OVERLAP, COMFYUI_TILE, a1111_resize,
                                   a1111_upscale, upscale_image, upscaler_named)

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    size = _size(args.size) if args.size else None
    if args.scale is not None and not 0 < args.scale <= 16:
        raise ValueError(f"--scale must be in (0, 16]; got {args.scale}")
    a1111 = args.tiling == "a1111"
    tile = (A1111_TILE if a1111 else COMFYUI_TILE) if args.tile is None else args.tile
    overlap = (A1111_OVERLAP if a1111 else COMFYUI_OVERLAP) if args.overlap is None else args.overlap
    if tile < 0 or overlap < 0 or (tile and overlap >= tile):
        raise ValueError(f"--tile must be 0 (whole pictures) or more than --overlap >= 0; got {tile} and {overlap}")
    sources = _sources(args)
    targets = _targets(args, sources)
    model = upscaler_named(args.model, args.upscaler_dir)
    if model is None:
        where = f" in {args.upscaler_dir}" if args.upscaler_dir else " (give a file path, or --upscaler-dir)"
        raise ValueError(f"--model {args.model!r}: no such upscaler model{where}")
    model = model.with_precision(args.precision)
    skipped = []
    for (src, _), dst in zip(sources, targets):
        t0 = time.perf_counter()
        try:
            with Image.open(src) as opened:
                texts = {k: v for k, v in opened.info.items() if isinstance(k, str) and isinstance(v, str)}
                picture = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:  # (the rest still run)
            skipped.append(src)
            print(f"imagine: skipped {src}: not a picture this program reads ({e})", file=sys.stderr)
            continue
        if a1111:
            if size is not None:
                out = a1111_resize(picture, *size, model)
            else:
                out = a1111_upscale(picture, args.scale or model.scale, model, tile, overlap)
        else:
            out = upscale_image(model, picture, args.scale, size, tile, overlap)
        info = PngImagePlugin.PngInfo()
        for k, v in texts.items():
            if k != "postprocessing":
                info.add_text(k, v)
        how = (f"Postprocess upscale to: {size[0]}x{size[1]}" if size else
               f"Postprocess upscale by: {args.scale or model.scale:g}")
        info.add_text("postprocessing", f"{how}, Postprocess upscaler: {model.a1111_name}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            out.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"{dst}: {picture.width}x{picture.height} -> {out.width}x{out.height} with {model.a1111_name} "
              f"({model.architecture} x{model.scale}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if skipped:
        print(f"imagine: {len(skipped)} of {len(sources)} pictures skipped (unreadable): "
              f"{', '.join(str(p) for p in skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
        return 1
    return 0
