"""Imagen's U-Net step against imagen-pytorch's Unet on identical weights: `imagine bench imagen`.

For each shape, imagen-pytorch 2.1.0's `Unet` gets random weights (its zero-initialised ones, the final convolution
and the pixel-shuffle biases, drawn too: with them at zero every output is 0 and any two sides agree) and imagine's
`EfficientUNet` loads its state_dict strictly. Each side then makes one sampling step's U-Net work for one image under
classifier-free guidance (the conditional and the unconditional prediction), in turn, round after round
(imagine.bench.speed's `_alternate`: two warm-up calls a side, the order rotating), so that the load of a shared machine
falls on all alike.
The sides:

  imagen_pytorch          as imagen-pytorch samples (Unet.forward_with_cond_scale): two calls of batch 1, the
                          conditional one and the one with cond_drop_prob=1 (its null text)
  imagen_pytorch_batched  one call of batch 2, both rows conditional (imagen-pytorch has no call that drops the text
                          of chosen rows; the null text's rows cost the same: a torch.where on the tokens)
  imagine                 EfficientUNet itself, float32, as imagine's sampler calls a U-Net under guidance: one
                          call of batch 2, the second row's text dropped (`text_dropped`: the learned null text)
  imagine_exact           the same call on what ImagenPipeline's exact mode (its default) runs
                          (imagine.pipelines.text_to_image.exact_copy: weights packed once for oneDNN)
  imagine_fast            the same call on what its fast mode runs (fast_copy: bf16 where the CPU has it natively,
                          else float32 with Winograd 3x3 convolutions on the large maps)

Reported per side: the median seconds per step (wall and process CPU time), the peak resident memory a step added,
and the output's relative difference, max |side - peer| / max |peer|, against imagen-pytorch's two calls ([cond;
uncond]; the batched peer side against [cond; cond]). Weights are random (no download): the numbers measure speed.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from imagine.bench.speed import _alternate, _finish, _in_process, _loadavg, _names, _rel, _table
from imagine.models.efficient_unet import PRESETS, EfficientUNet, EfficientUNetConfig

SIDES = ("imagen_pytorch", "imagen_pytorch_batched", "imagine", "imagine_exact", "imagine_fast")
DEFAULT_SIDES = SIDES
T5_BASE_WIDTH, TOKENS = 768, 77  # the text: t5-v1_1-base's states (imagen-pytorch's default encoder), 77 tokens
TINY = dict(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, layer_attns=(False, True), layer_cross_attns=(False, True),
            attn_heads=2, attn_dim_head=8, max_text_len=8, attn_pool_num_latents=4)


@dataclass(frozen=True)
class Shape:
    """A U-Net (imagen-pytorch Unet keywords), the picture's size, the low-resolution picture's (a super-resolution
    stage), and the text's tokens and width."""

    about: str
    unet: dict = field(hash=False)
    size: int
    lowres: int | None = None
    tokens: int = TOKENS
    text_dim: int = T5_BASE_WIDTH


MODELS = {
    "tiny": Shape("test size: a 2-level base-shaped U-Net of width 16, 16 px", TINY, 16, tokens=8, text_dim=16),
    "tiny_sr": Shape("test size: a 2-level Efficient U-Net of width 16, 8 -> 16 px",
                     {**TINY, "memory_efficient": True}, 16, lowres=8, tokens=8, text_dim=16),
    # BaseUnet64's full width (512) is 1.6 G parameters (6 GB a copy, two copies here) and about 16x base64's step
    "base64": Shape("BaseUnet64 at a quarter of its width (dim 128, 107 M parameters), 64 px",
                    {**PRESETS["BaseUnet64"], "dim": 128}, 64),
    "sr256": Shape("SRUnet256 at half its width (dim 64, 185 M parameters), 64 -> 256 px",
                   {**PRESETS["SRUnet256"], "dim": 64}, 256, lowres=64),
    "base64_full": Shape("BaseUnet64 as imagen-pytorch has it (dim 512, 1.6 G parameters: 6 GB a copy), 64 px",
                         PRESETS["BaseUnet64"], 64),
    "sr256_full": Shape("SRUnet256 as imagen-pytorch has it (dim 128, 732 M parameters), 64 -> 256 px",
                        PRESETS["SRUnet256"], 256, lowres=64),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="base64,sr256",
                   help="comma-separated: " + "; ".join(f"{k} ({v.about})" for k, v in MODELS.items()))
    p.add_argument("--sides", default=None, help=f"comma-separated subset of: {', '.join(SIDES)} (default: "
                                                 f"{', '.join(DEFAULT_SIDES)})")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side (after two warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def load_peer():
    """The imagen_pytorch package (imagine.bench.peers: tests/imagen_peer.py's offline import where a plain one
    fails on torchvision, kornia or the hub)."""
    from imagine.bench.peers import import_peer

    return import_peer("imagen_pytorch", "imagen_peer.py",
                       "pip install --no-deps imagen-pytorch==2.1.0 (with einops, beartype, ema-pytorch)")


def build(shape: Shape, seed: int = 0) -> tuple[torch.nn.Module, EfficientUNet, dict]:
    """imagen-pytorch's Unet with random weights and ours loaded from its state_dict (strict), both in eval mode."""
    ip = load_peer()
    kwargs = {**shape.unet, "text_embed_dim": shape.text_dim, "lowres_cond": shape.lowres is not None}
    torch.manual_seed(seed)
    peer = ip.Unet(**kwargs).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in peer.parameters():
            if not p.any():  # zero-initialised (final conv, ICNR biases): drawn, so the outputs are not all zero
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ours = EfficientUNet(EfficientUNetConfig(**kwargs)).eval().requires_grad_(False)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours, kwargs


def _sides(shape: Shape, peer, ours: EfficientUNet, want: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """One guided step's U-Net work for one image, per side (the module doc)."""
    g = torch.Generator().manual_seed(2)
    size = shape.size
    x = torch.randn(1, 3, size, size, generator=g)
    noise_cond = torch.tensor([0.7])  # the log-SNR the U-Net is conditioned on (imagen-pytorch's `time`)
    text = torch.randn(1, shape.tokens, shape.text_dim, generator=g)
    mask = torch.ones(1, shape.tokens, dtype=torch.bool)  # one prompt: every token real (padding to the longest)
    lowres = {}
    if shape.lowres is not None:  # the previous stage's picture, nearest-upsampled, at a noise level's log-SNR
        small = torch.randn(1, 3, shape.lowres, shape.lowres, generator=g)
        lowres = {"lowres_cond_img": F.interpolate(small, size, mode="nearest"),
                  "lowres_noise_cond": torch.tensor([2.2])}
    peer_low = {("lowres_noise_times" if k == "lowres_noise_cond" else k): v for k, v in lowres.items()}

    def twice(d):
        return {k: torch.cat([v, v]) for k, v in d.items()}

    dropped = torch.tensor([False, True])  # [cond; uncond]
    guidance = dict(text_embeds=torch.cat([text, text]), text_mask=torch.cat([mask, mask]), text_dropped=dropped)
    x2, t2, low2 = torch.cat([x, x]), torch.cat([noise_cond] * 2), twice(lowres)
    sides: dict[str, Callable[[], torch.Tensor]] = {}
    if "imagen_pytorch" in want:
        def imagen_pytorch():  # Unet.forward_with_cond_scale's two forwards
            cond = peer(x, noise_cond, text_embeds=text, text_mask=mask, cond_drop_prob=0.0, **peer_low)
            null = peer(x, noise_cond, text_embeds=text, text_mask=mask, cond_drop_prob=1.0, **peer_low)
            return torch.cat([cond, null])
        sides["imagen_pytorch"] = imagen_pytorch
    if "imagen_pytorch_batched" in want:
        peer_low2 = twice(peer_low)
        sides["imagen_pytorch_batched"] = lambda: peer(x2, t2, text_embeds=guidance["text_embeds"],
                                                       text_mask=guidance["text_mask"], cond_drop_prob=0.0, **peer_low2)
    if "imagine" in want:
        sides["imagine"] = lambda: ours(x2, t2, **guidance, **low2)
    if "imagine_exact" in want:
        from imagine.pipelines.text_to_image import exact_copy

        exact = exact_copy(ours)
        sides["imagine_exact"] = lambda: exact(x2, t2, **guidance, **low2)
    if "imagine_fast" in want:
        from imagine.pipelines.text_to_image import _Autocast

        fast = _Autocast(ours, compile=False)  # (hands back float32; x and the text in the fast copy's dtype)
        sides["imagine_fast"] = lambda: fast(x2, t2, **guidance, **low2)
    return sides


def _ratios(sides: dict, key: str = "median_s") -> dict:
    """Speed-ups of imagine's sides over imagen-pytorch's (`key`: median_s = wall clock, median_cpu_s = process CPU
    time, which a busy machine's other processes disturb less)."""
    med = {n: s[key] for n, s in sides.items()}
    return {f"{ours}_vs_{peer}": med[peer] / med[ours]
            for ours in ("imagine", "imagine_exact", "imagine_fast") if ours in med
            for peer in ("imagen_pytorch", "imagen_pytorch_batched") if peer in med}


def bench(name: str, repeats: int, side_names: list[str], log=print) -> dict:
    """One shape: the sides timed in turn (speed._alternate), their outputs against imagen-pytorch's two calls."""
    shape = MODELS[name]
    peer, ours, kwargs = build(shape)
    params = sum(p.numel() for p in ours.parameters())
    log(f"  {name}: {shape.about}; {params / 1e6:.1f} M parameters, text {shape.tokens} x {shape.text_dim}, "
        f"{torch.get_num_threads()} threads")
    sides = _sides(shape, peer, ours, side_names)
    res = _alternate(_in_process(sides), repeats, log)
    if "imagen_pytorch" in res:
        reference = res["imagen_pytorch"]["output"]
    else:
        with torch.inference_mode():
            reference = _sides(shape, peer, ours, ["imagen_pytorch"])["imagen_pytorch"]().float()
    for n, r in res.items():
        out = r.pop("output")
        # the batched peer's rows are both conditional
        r["rel_diff_vs_imagen_pytorch"] = _rel(out, reference[[0, 0]] if n == "imagen_pytorch_batched" else reference)
    return {"model": name, "about": shape.about, "parameters": params, "size": shape.size, "lowres": shape.lowres,
            "tokens": shape.tokens, "text_dim": shape.text_dim,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}, "sides": res,
            "ratios": {"wall": _ratios(res), "cpu": _ratios(res, "median_cpu_s")}}


def run(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1; got {args.threads}")
    models = _names(args.models, MODELS, "--models")
    side_names = _names(args.sides, SIDES, "--sides", DEFAULT_SIDES)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_peer()
    from importlib.metadata import version

    from imagine.hardware import native_bf16

    results = {"torch": torch.__version__, "imagen_pytorch": version("imagen-pytorch"),
               "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "native_bf16": native_bf16(), "load_average_start": _loadavg(), "models": []}
    print(f"imagine bench imagen: torch {results['torch']}, imagen-pytorch {results['imagen_pytorch']}, "
          f"{results['threads']} threads, CPU {results['cpu_capability']}, native bf16: "
          f"{'yes' if native_bf16() else 'no (the fast side is float32)'}, load average {_loadavg()}")
    for m in models:
        r = bench(m, args.repeats, side_names)
        results["models"].append(r)
        low = f"{r['lowres']} -> " if r["lowres"] else ""
        print(_table(f"U-Net {m} ({low}{r['size']} px, one image's guided step): seconds per step", r["sides"],
                     "rel_diff_vs_imagen_pytorch", "%.1e", ratios=_ratios))
        gc.collect()
    return _finish(results, args.json)
