"""Upscaler models against spandrel on identical weights: `imagine bench upscale`.

spandrel (0.4.2) is how ComfyUI (Upscale Image (using Model)) and AUTOMATIC1111 (1.8 and later) run these models
(ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, RealPLKSR); on a CPU both run them in float32. Per model shape,
spandrel's own network gets its default random initialisation (no download), imagine loads the same state dict
(imagine.upscalers), and each side enlarges one picture tile in turn, round after round (imagine.bench.speed's
`_alternate`). The sides:

  spandrel        spandrel's ImageModelDescriptor in float32, as ComfyUI and A1111 call it on a CPU
  imagine_exact   imagine.upscalers.UpscaleModel, precision "exact" (float32, weights packed once for oneDNN)
  imagine_fast    precision "fast" (text_to_image.fast_copy: bf16 channels-last where the CPU has native bf16)

Reported per side: median seconds per tile (wall and CPU), peak memory a call added, the relative difference of the
network's output from spandrel's (max |side - spandrel| / max |spandrel|) and the PSNR of the [0, 1] pictures against
spandrel's (peak 1).
"""

from __future__ import annotations

import argparse
import gc
import math

import torch

from imagine.bench.speed import _alternate, _finish, _in_process, _loadavg, _names, _rel, _table

SIDES = ("spandrel", "imagine_exact", "imagine_fast")
# spandrel's ESRGAN / Compact keywords: the shapes of the files people use
MODELS = {
    "esrgan4x": ("ESRGAN", dict(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4),
                 "ESRGAN 4x, 23 RRDBs of 64 features (R-ESRGAN 4x+, 4x-UltraSharp, Remacri)"),
    "anime6b": ("ESRGAN", dict(in_nc=3, out_nc=3, num_filters=64, num_blocks=6, scale=4),
                "ESRGAN 4x, 6 RRDBs (R-ESRGAN 4x+ Anime6B)"),
    "compact4x": ("Compact", dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4),
                  "Real-ESRGAN compact 4x, 32 convolutions (realesr-general-x4v3)"),
    "swinir4x": ("SwinIR", dict(img_size=64, embed_dim=240, depths=[6] * 9, num_heads=[8] * 9, window_size=8,
                                mlp_ratio=2.0, upscale=4, upsampler="nearest+conv", resi_connection="3conv"),
                 "SwinIR-L 4x real-world, 9 RSTBs of 6 layers, 240 wide (A1111's SwinIR 4x)"),
    "swinir_m4x": ("SwinIR", dict(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8,
                                  mlp_ratio=2.0, upscale=4, upsampler="nearest+conv", resi_connection="1conv"),
                   "SwinIR-M 4x real-world, 6 RSTBs of 6 layers, 180 wide"),
    "hat4x": ("HAT", dict(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=16,
                          compress_ratio=3, squeeze_factor=30, overlap_ratio=0.5, mlp_ratio=2.0, upscale=4),
              "HAT 4x, 6 groups of 6 blocks, 180 wide, 16-px windows (Real_HAT_GAN_SRx4)"),
    "dat4x": ("DAT", dict(img_size=64, embed_dim=180, split_size=[8, 32], depth=[6] * 6, num_heads=[6] * 6,
                          expansion_factor=2.0, upscale=4),
              "DAT 4x, 6 groups of 6 blocks, 180 wide, 8x32 rectangles (4xNomos8kDAT)"),
    "span4x": ("SPAN", dict(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=4),
               "SPAN 4x, 48 features (4x-ClearRealityV1)"),
    "realplksr4x": ("PLKSR", dict(dim=64, n_blocks=28, upscaling_factor=4, kernel_size=17),
                    "RealPLKSR 4x, 28 blocks of 64, 17x17 kernels (4xNomosWebPhoto_RealPLKSR)", "RealPLKSR"),
    "tiny": ("ESRGAN", dict(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=2), "test size: ESRGAN 2x, 2 RRDBs"),
    "tiny_swinir": ("SwinIR", dict(img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=8, upscale=2,
                                   upsampler="nearest+conv"), "test size: SwinIR 2x, one RSTB of 2 layers"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="esrgan4x,compact4x",
                   help="comma-separated: " + "; ".join(f"{k} ({v[2]})" for k, v in MODELS.items()))
    p.add_argument("--tile", type=int, default=128, help="the picture's side in pixels (default 128)")
    p.add_argument("--sides", default=None, help=f"comma-separated subset of: {', '.join(SIDES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (after two warm-up calls)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def load_peer():
    """The spandrel package (imagine.bench.peers: tests/spandrel_peer.py's offline import where a plain one fails on
    torchvision)."""
    from imagine.bench.peers import import_peer

    return import_peer("spandrel", "spandrel_peer.py", "pip install --no-deps spandrel==0.4.2 (with einops)")


def build(name: str, seed: int = 0):
    """spandrel's descriptor of a randomly initialised network of shape `name`, and imagine's model of its weights."""
    from imagine.upscalers import upscale_model_from_state

    spandrel = load_peer()
    arch, kwargs, _, *cls = MODELS[name]
    module = __import__(type(spandrel.MAIN_REGISTRY.get(arch).architecture).__module__, fromlist=[arch])
    torch.manual_seed(seed)
    net = getattr(module, cls[0] if cls else arch)(**kwargs).eval()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return spandrel.ModelLoader().load_from_state_dict(state).eval(), upscale_model_from_state(state)


def _psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double().clamp(0, 1) - b.double().clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _ratios(sides: dict, key: str = "median_s") -> dict:
    med = {n: s[key] for n, s in sides.items()}
    return {f"{n}_vs_spandrel": med["spandrel"] / med[n] for n in ("imagine_exact", "imagine_fast")
            if n in med and "spandrel" in med}


def bench(name: str, tile: int, repeats: int, side_names: list[str], log=print) -> dict:
    peer, ours = build(name)
    params = sum(p.numel() for p in ours.net.parameters())
    log(f"  {name}: {MODELS[name][2]}; {params / 1e6:.1f} M parameters, a {tile}x{tile} tile, "
        f"{torch.get_num_threads()} threads")
    x = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(1))
    # (the networks' outputs before the [0, 1] clamp: the descriptor's own call clamps)
    calls = {"spandrel": lambda: peer.model(x),
             "imagine_exact": lambda: ours.with_precision("exact").raw(x),
             "imagine_fast": lambda: ours.with_precision("fast").raw(x)}
    res = _alternate(_in_process({n: calls[n] for n in side_names}), repeats, log)
    with torch.inference_mode():
        reference = res["spandrel"]["output"] if "spandrel" in res else peer.model(x).float()
    for r in res.values():
        out = r.pop("output")
        r["rel_diff_vs_spandrel"] = _rel(out, reference)
        r["psnr_vs_spandrel_db"] = _psnr01(out, reference)
    return {"model": name, "about": MODELS[name][2], "parameters": params, "tile": tile, "scale": ours.scale,
            "sides": res, "ratios": {"wall": _ratios(res), "cpu": _ratios(res, "median_cpu_s")}}


def run(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1; got {args.threads}")
    if args.tile < 8:
        raise ValueError(f"--tile must be at least 8 pixels; got {args.tile}")
    models = _names(args.models, MODELS, "--models")
    side_names = _names(args.sides, SIDES, "--sides", SIDES)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_peer()
    from importlib.metadata import version

    from imagine.hardware import native_bf16

    results = {"torch": torch.__version__, "spandrel": version("spandrel"), "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
               "load_average_start": _loadavg(), "models": []}
    print(f"imagine bench upscale: torch {results['torch']}, spandrel {results['spandrel']}, {results['threads']} "
          f"threads, CPU {results['cpu_capability']}, native bf16: {'yes' if native_bf16() else 'no'}, load average "
          f"{_loadavg()}")
    for m in models:
        r = bench(m, args.tile, args.repeats, side_names)
        results["models"].append(r)
        print(_table(f"{m} ({r['tile']} -> {r['tile'] * r['scale']} px): seconds per tile", r["sides"],
                     "psnr_vs_spandrel_db", "%.1f dB", ratios=_ratios))
        for n, s in r["sides"].items():
            print(f"    {n}: output {s['rel_diff_vs_spandrel']:.1e} from spandrel's")
        gc.collect()
    return _finish(results, args.json)
