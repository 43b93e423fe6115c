"""Score an upscaler on the shapes task: `imagine eval upscaler`.

Held-out scenes (the shapes generator's held-out split, seeded) are drawn at 64 pixels and, as the truth, k times
finer (imagine.data.shapes.render_array's scale: the same sub-pixel coverage); the 64-pixel picture is enlarged k times
by the model (imagine.upscalers.upscale_image, 8 bits out, as `imagine upscale` makes it) and by Pillow's bicubic and
Lanczos, and each is scored against the truth: PSNR per picture (peak 255) averaged over the scenes, and the PSNR of
the mean squared error over all of them. Optionally the model's pictures of the embedded default model's own samples
are written beside the 64-pixel ones (no truth there: to look at).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--model", default="default", metavar="PATH|NAME",
                   help="the upscaler: a file or folder, a name in --upscaler-dir, or default (the embedded shapes "
                        "upscaler, x4)")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR")
    p.add_argument("--n", type=int, default=200, help="held-out scenes (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--grid", default=None, metavar="PNG",
                   help="also write a picture: 64-pixel inputs (nearest), bicubic, the model, the truth, for 6 scenes")


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run(args) -> int:
    from PIL import Image

    from imagine.data.shapes import ShapesDataset, render_array
    from imagine.upscalers import upscale_image, upscaler_named

    if args.n < 1:
        raise ValueError(f"--n must be at least 1; got {args.n}")
    model = upscaler_named(args.model, args.upscaler_dir)
    if model is None:
        raise ValueError(f"--model {args.model!r}: no such upscaler model")
    k = model.scale
    scenes = ShapesDataset(args.n, seed=args.seed, split="heldout")
    sides = {"model": [], "bicubic": [], "lanczos": []}
    grid = []
    t0 = time.perf_counter()
    for i in range(args.n):
        scene, _ = scenes.scene(i)
        small, truth = Image.fromarray(render_array(scene)), render_array(scene, k).astype(np.float64)
        size = (64 * k, 64 * k)
        outs = {"model": upscale_image(model, small), "bicubic": small.resize(size, Image.BICUBIC),
                "lanczos": small.resize(size, Image.LANCZOS)}
        for name, out in outs.items():
            sides[name].append(float(((np.asarray(out, np.float64) - truth) ** 2).mean()))
        if i < 6:
            grid.append([small.resize(size, Image.NEAREST), outs["bicubic"], outs["model"],
                         Image.fromarray(render_array(scene, k))])
    seconds = time.perf_counter() - t0
    results = {"model": model.path or args.model, "architecture": model.architecture, "scale": k, "n": args.n,
               "seed": args.seed, "seconds": round(seconds, 1),
               "sides": {n: {"psnr_mean_db": float(np.mean([_psnr(m) for m in v])),
                             "psnr_of_mean_mse_db": _psnr(float(np.mean(v)))} for n, v in sides.items()}}
    print(f"imagine eval upscaler: {results['model']} ({model.architecture} x{k}) on {args.n} held-out shapes scenes, "
          f"64 -> {64 * k} px ({seconds:.1f} s)")
    for name, r in results["sides"].items():
        print(f"  {name:<8} PSNR {r['psnr_mean_db']:6.2f} dB (mean over pictures), {r['psnr_of_mean_mse_db']:6.2f} dB "
              "(of the mean squared error)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.grid:
        from imagine.images import save_grid

        save_grid([im for row in grid for im in row], args.grid, cols=4)
    return 0
