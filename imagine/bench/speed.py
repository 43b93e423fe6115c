"""U-Net step and VAE decode time against diffusers on identical weights: `imagine bench speed`.

For each model shape (a small SD-shaped U-Net and the real SD 1.5 shape), one diffusers
`UNet2DConditionModel` gets random weights and ours gets a copy of them; each side then runs
the same guidance step (classifier-free guidance: conditional and unconditional halves of one
latent in one pass; diffusers as a batch of 2, ours as the guidance batch our sampler passes, x
once with 2 rows of context) in turn, round after round, so that the load of a shared machine
falls on all sides alike.
The sides:

  diffusers fp32          the reference
  diffusers autocast      torch.autocast("cpu", bfloat16) around the fp32 model
  diffusers bf16          the model's weights cast to bfloat16
  imagine exact           fp32 (TextToImagePipeline(precision="exact"))
  imagine fast            what TextToImagePipeline(precision="fast") runs

Reported per side: the median seconds per call, the peak resident memory the call added on top
of what was there before it (sampled every 5 ms), and the output's error against the fp32
reference. The ratios: exact against diffusers fp32, fast against the faster of diffusers'
two bf16 settings. The VAE decode (SD's autoencoder, 64x64 latents to a 512x512 image) is timed
the same way, with the PSNR of each side's image against diffusers' fp32 image.

Needs diffusers (a test dependency); weights are random (no download), so the numbers measure
speed, not image quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import threading
import time
from typing import Callable

import torch

MODELS = ("small", "sd15", "sdxl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="small,sd15",
                   help="comma-separated: small (SD-shaped, 1/5 of SD 1.5's channels, 32x32 latents), "
                        "sd15 (the real SD 1.5 U-Net, 64x64 latents), sdxl (SDXL base's U-Net, 128x128 latents: "
                        "about 10 GB in float32 per side; run its sides one at a time with --sides)")
    p.add_argument("--parts", default="unet,vae", help="comma-separated: unet, vae")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (after two warm-up calls)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--vae-size", type=int, default=512, help="decoded image size in pixels (multiple of 8)")
    p.add_argument("--sides", default=None,
                   help="comma-separated subset of: diffusers_fp32, diffusers_autocast, diffusers_bf16, "
                        "imagine_exact, imagine_fast")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast mode compiled with torch.compile (what IMAGINE_COMPILE=1 does); "
                        "the compile time shows as that side's warm-up")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing the sides: where the fast U-Net step's time goes (torch.profiler, by "
                        "operator), and the self-attention kernel against a bare exp over as many values")
    p.add_argument("--isolate", action="store_true",
                   help="run each side in a process of its own (spawned), so that no side's allocations can "
                        "disturb another's (glibc's heap and its page faults); the rounds still alternate")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    """Peak resident memory during a block, above the level at its start (sampled every 5 ms)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.added = self.peak - self.base


def _trim_heap() -> None:
    """Hand the allocator's free memory back to the system (glibc's malloc_trim; elsewhere nothing), so that the
    resident memory a call adds is memory it takes, not whatever the heap kept from the calls before (a heap
    holding a previous call's freed blocks would show the same call adding nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _timed_call(side: Callable[[], torch.Tensor], keep_output: bool = False) -> dict:
    """One call: wall and process CPU seconds, the peak resident memory it added (above the level after the
    heap's free memory is returned), and (if asked) its output in float32."""
    gc.collect()
    _trim_heap()
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        with _PeakRSS() as mem:
            y = side()
        r = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
             "peak_added_mb": mem.added / 2**20, "pid": os.getpid()}
        if keep_output:
            r["output"] = y.float()
    return r


def _alternate(sides: dict[str, Callable[[], dict]], repeats: int, log=print) -> dict[str, dict]:
    """Two warm-up calls per side, then `repeats` rounds of one timed call per side; the order
    rotates every round so no side always follows the same neighbour. A side is a function that
    makes one `_timed_call` (in this process, or in the side's own process: `_isolated_sides`). Two: a compiled
    fast side's first call runs eagerly (it builds the Winograd filters the graph reads), its second compiles;
    the output kept (the error, the PSNR) is the second's, the one the timed calls repeat."""
    names = list(sides)
    out = {n: {"seconds": [], "cpu_seconds": [], "peak_added_mb": 0.0, "output": None} for n in names}
    for n in names:
        first = sides[n](False)
        r = sides[n](True)
        out[n]["output"] = r["output"]
        out[n]["warmup_s"] = first["seconds"] + r["seconds"]
        # (includes one-time copies, filters and compiles)
        out[n]["warmup_peak_added_mb"] = max(first["peak_added_mb"], r["peak_added_mb"])
        out[n]["pid"] = r["pid"]
        log(f"    warm-up {n}: {out[n]['warmup_s']:.2f} s")
        gc.collect()
    for k in range(repeats):
        order = names[k % len(names):] + names[:k % len(names)]
        for n in order:
            r = sides[n](False)
            out[n]["seconds"].append(r["seconds"])
            out[n]["cpu_seconds"].append(r["cpu_seconds"])
            out[n]["peak_added_mb"] = max(out[n]["peak_added_mb"], r["peak_added_mb"])
        log("    round %d: %s" % (k + 1, ", ".join(f"{n} {out[n]['seconds'][-1]:.2f} s" for n in names)))
    for n in names:
        out[n]["median_s"] = statistics.median(out[n]["seconds"])
        out[n]["median_cpu_s"] = statistics.median(out[n]["cpu_seconds"])
    return out


def _in_process(sides: dict[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[bool], dict]]:
    return {n: (lambda keep, f=f: _timed_call(f, keep)) for n, f in sides.items()}


def _isolated_sides(spec: tuple, names: list[str], log=print) -> tuple[dict, Callable[[], None], Callable]:
    """Each side in a process of its own (spawned, so that nothing of this one's heap is shared): the
    sides' allocations cannot disturb each other's (glibc's heap, page faults). Returns the sides as
    `_alternate` calls them, a function that stops the processes, and `ask(name, command)`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    conns = {}
    procs = []
    # One at a time (building SD 1.5 in several processes at once would only contend), ours first: the
    # fast copy's Winograd budget is half the memory available when it is made, which the other sides'
    # processes would otherwise have taken.
    owner = {}

    def receive(n: str, send=None):
        try:
            if send is not None:
                conns[n].send(send)
            return conns[n].recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):  # the child is gone: say how, not wait forever
            p = owner[n]
            p.join(timeout=5)
            how = ("killed by signal %d%s" % (-p.exitcode, ", likely out of memory: run fewer sides at once "
                                              "(--sides)" if p.exitcode == -9 else "")
                   if p.exitcode is not None and p.exitcode < 0 else f"exit code {p.exitcode}")
            raise RuntimeError(f"bench side {n}: its process died ({how})") from None

    for n in sorted(names, key=lambda n: not n.startswith("imagine")):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_side_process, args=(spec, n, torch.get_num_threads(), child), daemon=True)
        p.start()
        child.close()  # the child's end lives in the child only, so its death reaches receive() as EOF
        procs.append(p)
        conns[n], owner[n] = parent, p
        reply = receive(n)
        if reply != "ready":
            raise RuntimeError(f"bench side {n} failed to start: {reply}")
        log(f"    {n}: its own process ready")

    def ask(n: str, command, *args):
        reply = receive(n, (command, *args))
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def stop():
        for n, c in conns.items():
            try:
                c.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=30)

    return {n: (lambda keep, n=n: ask(n, "call", keep)) for n in names}, stop, ask


def _side_process(spec: tuple, name: str, threads: int, conn) -> None:
    """A spawned process that builds one side (`spec` says which bench: ("unet", model, compile) or
    ("vae", image)) and answers commands: call, reference, winograd, stop."""
    try:
        torch.set_num_threads(threads)
        reference = name == "diffusers_fp32"  # only that side's process is asked for the fp32 reference
        if spec[0] == "unet":
            sides, extras = _unet_sides(spec[1], [name], compile=spec[2], reference=reference)
        else:
            sides, extras = _vae_sides(spec[1], [name], reference=reference)
        conn.send("ready")
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(repr(e))
        return
    while True:
        command, *args = conn.recv()
        if command == "stop":
            return
        try:
            if command == "call":
                conn.send(_timed_call(sides[name], *args))
            elif command == "reference":
                with torch.inference_mode():
                    conn.send(extras["reference"]().float())
            elif command == "winograd":
                conn.send(_winograd_info(extras.get("fast")))
            elif command == "info":
                conn.send(extras["info"])
        except BaseException as e:  # noqa: BLE001
            conn.send(e)


def _names(text: str | None, valid, flag: str, default=None) -> list[str]:
    """A comma-separated flag's names (--models, --sides), each one of `valid`; None or empty: `default`."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(default or [])
    if not names:
        raise ValueError(f"{flag}: name at least one of {', '.join(valid)}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"{flag}: unknown {unknown}; valid: {', '.join(valid)}")
    return names


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------
def unet_config(name: str):
    from imagine.models.unet import UNetConfig

    sd = UNetConfig.sd15()
    if name == "sd15":
        return sd, 64
    if name == "sdxl":
        return UNetConfig.sdxl(), 128
    if name == "small":
        d = sd.to_dict()
        d.update(block_out_channels=[c // 5 for c in sd.block_out_channels], sample_size=32)  # 64..256
        return UNetConfig.from_dict(d), 32
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


def _random_diffusers_unet(cfg, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items()
                                            if k not in ("num_attention_heads",)})
    return ref.eval().requires_grad_(False)


def default_sides() -> list[str]:
    """Every side; diffusers' two bf16 settings only where the CPU has native bf16: elsewhere they
    emulate it and are many times slower than its fp32, which is then diffusers' fastest setting
    (ask for them with --sides to time them anyway)."""
    from imagine.hardware import native_bf16

    bf16 = ["diffusers_autocast", "diffusers_bf16"] if native_bf16() else []
    return ["diffusers_fp32", *bf16, "imagine_exact", "imagine_fast"]


def _unet_sides(name: str, want: list[str], compile: bool = False, log=None, reference: bool = True
                ) -> tuple[dict, dict]:
    """The U-Net sides named in `want` (functions of no argument that make one step) and extras:
    "reference" (diffusers' fp32 step, if `reference`), "fast" (the fast copy, for its Winograd report),
    "info". A model no side needs is dropped (a side's own process holds only its own)."""
    from imagine.models.unet import UNet2DConditionModel
    from imagine.pipelines.text_to_image import _Autocast, exact_copy

    cfg, size = unet_config(name)
    ref = _random_diffusers_unet(cfg)
    ours = UNet2DConditionModel(cfg).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    # A guidance step: both halves of the batch see the same latent and timestep, with the
    # unconditional and the conditional text states. diffusers gets the batch of 2; ours gets it
    # as our sampler passes it, a guidance batch (x and t once, 2 rows of context: see
    # UNet2DConditionModel.forward), which answers the same 2 rows.
    x1 = torch.randn(1, cfg.in_channels, size, size, generator=g)
    x, t1 = torch.cat([x1, x1]), torch.tensor([801.0])
    t = torch.cat([t1, t1])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = {}  # SDXL's pooled text vector and size codes, one row per half
    if cfg.addition_embed_type == "text_time":
        width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = 8 * size
        added = {"text_embeds": torch.randn(2, width, generator=g),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)}
    params = sum(p.numel() for p in ours.parameters())
    if log:
        log(f"  U-Net {name}: {params / 1e6:.0f} M parameters, batch 2, latents {size}x{size}, "
            f"{torch.get_num_threads()} threads")

    import copy

    sides: dict[str, Callable[[], torch.Tensor]] = {}
    extras = {"info": {"parameters": params, "latent": size}}
    if reference:
        extras["reference"] = lambda: ref(x, t, ctx, added_cond_kwargs=added).sample
    if not any(n.startswith("imagine") for n in want):
        ours = None
    if "diffusers_fp32" in want or "diffusers_autocast" in want:
        if "diffusers_fp32" in want:
            sides["diffusers_fp32"] = lambda: ref(x, t, ctx, added_cond_kwargs=added).sample
        if "diffusers_autocast" in want:
            def diffusers_autocast():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return ref(x, t, ctx, added_cond_kwargs=added).sample
            sides["diffusers_autocast"] = diffusers_autocast
    if "diffusers_bf16" in want:
        ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
        xb, cb = x.bfloat16(), ctx.bfloat16()
        added_b = {k: (v.bfloat16() if k == "text_embeds" else v) for k, v in added.items()}
        sides["diffusers_bf16"] = lambda: ref_bf16(xb, t, cb, added_cond_kwargs=added_b).sample
    if not (reference or {"diffusers_fp32", "diffusers_autocast"} & set(want)):
        # Frees diffusers' fp32 model where nothing calls it, before the fast copy is made: its Winograd
        # budget is half the memory available then, as in a process that holds only our model.
        ref = None  # noqa: F841
        gc.collect()
    if "imagine_exact" in want:
        exact = exact_copy(ours)  # what the exact mode runs: float32, packed weights
        sides["imagine_exact"] = lambda: exact(x1, t1, context=ctx, **added)
    if "imagine_fast" in want:
        fast = _Autocast(ours, compile=False)
        sides["imagine_fast"] = lambda: fast(x1, t1, context=ctx, **added)
        extras["fast"] = fast.fast
    if compile and "imagine_fast_compiled" in want:
        fast_c = _Autocast(ours, compile=True)
        sides["imagine_fast_compiled"] = lambda: fast_c(x1, t1, context=ctx, **added)
    return sides, extras


def _run_sides(spec: tuple, build: Callable, names: list[str], repeats: int, isolate: bool, log) -> tuple:
    """Time the sides (in this process, or each in its own), then fetch what the report needs: the fp32
    reference output and the fast copy's Winograd report."""
    if not isolate:
        sides, extras = build(names)
        res = _alternate(_in_process(sides), repeats, log)
        with torch.inference_mode():
            reference = res["diffusers_fp32"]["output"] if "diffusers_fp32" in res else extras["reference"]().float()
        return res, reference, _winograd_info(extras.get("fast")), extras["info"]
    sides, stop, ask = _isolated_sides(spec, names, log)
    try:
        res = _alternate(sides, repeats, log)
        winograd = ask("imagine_fast", "winograd") if "imagine_fast" in names else None
        info = ask(names[0], "info")
    finally:
        stop()
    if "diffusers_fp32" in res:
        reference = res["diffusers_fp32"]["output"]
    else:  # one more process, for diffusers' fp32 output alone
        ref_sides, stop, ask = _isolated_sides(spec, ["diffusers_fp32"], log)
        try:
            reference = ask("diffusers_fp32", "reference")
        finally:
            stop()
    return res, reference, winograd, info


def bench_unet(name: str, repeats: int, side_names: list[str] | None, log=print, compile: bool = False,
               isolate: bool = False) -> dict:
    names = list(side_names or default_sides()) + (["imagine_fast_compiled"] if compile else [])
    res, reference, winograd, info = _run_sides(
        ("unet", name, compile), lambda want: _unet_sides(name, want, compile, log), names, repeats, isolate, log)
    if winograd:
        res["imagine_fast"].update(winograd)
        _log_winograd(winograd, log)
    for n, r in res.items():
        r["rel_err_vs_diffusers_fp32"] = _rel(r.pop("output"), reference)
    return {"model": name, **info, "batch": 2, "isolated": isolate, "sides": res}


def _winograd_info(module: torch.nn.Module | None) -> dict | None:
    """The fast copy's Winograd filters (built in the warm-up call, so not in its peak +MB)."""
    if module is None:
        return None
    if not isinstance(module, torch.nn.Module):
        module = module()
    from imagine.models.winograd import TRANSFORMS, WinogradConv2d, winograd_bytes

    convs = [m for m in module.modules() if isinstance(m, WinogradConv2d)]
    tiles = {t: sum(t in (m._u or {}) for m in convs) for t in sorted(TRANSFORMS)}
    return {"winograd_layers": len(convs), "winograd_filter_mb": winograd_bytes(module) / 2**20,
            "winograd_filters_by_tile": {f"F({t}x{t},3x3)": k for t, k in tiles.items()}}


def _log_winograd(result: dict, log) -> None:
    convs = result["winograd_layers"]
    tiles = {int(k[2]): v for k, v in result["winograd_filters_by_tile"].items()}
    if convs:
        built = ", ".join(f"F({t}x{t}, 3x3) for {k}" for t, k in tiles.items() if k)
        log(f"    imagine_fast: {convs} convolutions eligible for Winograd; filters built so far: "
            f"{built or 'none'} ({result['winograd_filter_mb']:.0f} MB; a layer never called builds none)")


def _vae_sides(image: int, want: list[str], log=None, reference: bool = True) -> tuple[dict, dict]:
    """The VAE-decode sides named in `want` and extras ("reference": diffusers' fp32 decode, "fast",
    "info"), as `_unet_sides`."""
    import copy

    import diffusers

    from imagine.models.vae import AutoencoderKL, VAEConfig
    from imagine.pipelines.text_to_image import decode_latents

    cfg = VAEConfig.sd()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=cfg.block_out_channels, layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4).eval().requires_grad_(False)
    ours = AutoencoderKL(cfg).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 4, image // 8, image // 8, generator=g)
    z = lat / cfg.scaling_factor
    if log:
        log(f"  VAE decode: latent {image // 8}x{image // 8} -> {image}x{image}, {torch.get_num_threads()} threads")
    sides: dict[str, Callable[[], torch.Tensor]] = {}
    extras = {"info": {"image": image}}
    if reference:
        extras["reference"] = lambda: ref.decode(z).sample
    if "diffusers_fp32" in want:
        sides["diffusers_fp32"] = lambda: ref.decode(z).sample
    if "diffusers_autocast" in want:
        def diffusers_autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ref.decode(z).sample
        sides["diffusers_autocast"] = diffusers_autocast
    if "diffusers_bf16" in want:
        ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
        zb = z.bfloat16()
        sides["diffusers_bf16"] = lambda: ref_bf16.decode(zb).sample
    if "imagine_exact" in want:
        sides["imagine_exact"] = lambda: decode_latents(ours, lat, "exact")
    if "imagine_fast" in want:
        from imagine.pipelines.text_to_image import fast_copy

        sides["imagine_fast"] = lambda: decode_latents(ours, lat, "fast")
        extras["fast"] = lambda: fast_copy(ours)  # made by the first fast call
    return sides, extras


def bench_vae(repeats: int, image: int, side_names: list[str] | None, log=print, isolate: bool = False) -> dict:
    if image % 8:
        raise ValueError(f"--vae-size must be a multiple of 8; got {image}")
    names = list(side_names or default_sides())
    res, reference, winograd, info = _run_sides(
        ("vae", image), lambda want: _vae_sides(image, want, log), names, repeats, isolate, log)
    if winograd:
        res["imagine_fast"].update(winograd)
        _log_winograd(winograd, log)
    outputs = {n: r.pop("output") for n, r in res.items()}
    for n, out in outputs.items():
        res[n]["psnr_vs_diffusers_fp32_db"] = psnr(out, reference)
    if "imagine_fast" in outputs and "imagine_exact" in outputs:  # the warm-up calls' images
        res["imagine_fast"]["psnr_vs_imagine_exact_db"] = psnr(outputs["imagine_fast"], outputs["imagine_exact"])
    return {**info, "isolated": isolate, "sides": res}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _ratios(sides: dict, key: str = "median_s") -> dict:
    """Speed-ups from the medians (`key`: median_s = wall clock, median_cpu_s = process CPU time,
    which a busy machine's other processes disturb less)."""
    r = {}
    med = {n: s[key] for n, s in sides.items()}
    if "imagine_exact" in med and "diffusers_fp32" in med:
        r["exact_speedup_vs_diffusers_fp32"] = med["diffusers_fp32"] / med["imagine_exact"]
    # diffusers' fastest setting on this machine: bf16 weights or autocast where bf16 is native,
    # else fp32 (default_sides); whichever of the timed ones was fastest.
    fastest = [n for n in ("diffusers_autocast", "diffusers_bf16", "diffusers_fp32") if n in med]
    if "imagine_fast" in med and fastest:
        best = min(fastest, key=med.get)
        r["fast_speedup_vs_diffusers_fastest"] = med[best] / med["imagine_fast"]
        if "imagine_fast_compiled" in med:
            r["compiled_speedup_vs_diffusers_fastest"] = med[best] / med["imagine_fast_compiled"]
        r["diffusers_fastest"] = best
    if "imagine_fast" in med and "diffusers_fp32" in med:
        r["fast_speedup_vs_diffusers_fp32"] = med["diffusers_fp32"] / med["imagine_fast"]
    return r


def _table(title: str, sides: dict, quality_key: str, quality_fmt: str, ratios: Callable = _ratios) -> str:
    """The sides' figures, one line each, then `ratios(sides, key)` by wall clock and by CPU time."""
    lines = [title, f"  {'side':<22} {'median s':>9} {'cpu s':>7} {'calls (wall s)':<30} {'peak +MB':>9} "
                    f"{quality_key:>14}"]
    for n, s in sides.items():
        calls = " ".join(f"{v:.2f}" for v in s["seconds"])
        q = s.get(quality_key)
        lines.append(f"  {n:<22} {s['median_s']:>9.3f} {s['median_cpu_s']:>7.2f} {calls:<30} "
                     f"{s['peak_added_mb']:>9.0f} {(quality_fmt % q) if q is not None else '-':>14}")
    for label, key in (("wall", "median_s"), ("cpu", "median_cpu_s")):
        parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ratios(sides, key).items()]
        lines.append(f"  ratios ({label}): " + ", ".join(parts))
    return "\n".join(lines)


def profile_fast_unet(name: str, rows: int = 12) -> dict:
    """The fast mode's U-Net step under torch.profiler (self CPU time by operator), and the largest self-attention
    (batch 2, the top level's token count) in SDPA's kernel against torch.exp over as many values, both in the
    fast copy's dtype: how much of that kernel the softmax's exponentials take (diffusers calls the same one)."""
    from torch.profiler import ProfilerActivity, profile

    from imagine.models.unet import UNet2DConditionModel
    from imagine.pipelines.text_to_image import _Autocast

    cfg, size = unet_config(name)
    fast = _Autocast(UNet2DConditionModel(cfg).eval().requires_grad_(False), compile=False)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, cfg.in_channels, size, size, generator=g), torch.tensor([801.0])  # a guidance batch
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.inference_mode():
        fast(x, t, context=ctx)
        t0 = time.process_time()
        fast(x, t, context=ctx)
        step = time.process_time() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fast(x, t, context=ctx)
    table = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in table)
    ops = sorted(((e.key, e.self_cpu_time_total / total, e.count) for e in table), key=lambda r: -r[1])[:rows]
    heads = cfg.attention_head_dim[0] if isinstance(cfg.attention_head_dim, (list, tuple)) else cfg.attention_head_dim
    width = cfg.block_out_channels[0] // heads
    from imagine.hardware import fast_dtype

    dtype = fast_dtype()  # what the fast copy attends in: bf16 where native, else float32
    q, k, v = (torch.randn(2, heads, size * size, width, generator=g).to(dtype) for _ in range(3))

    def cpu_time(f):
        f()
        t0 = time.process_time()
        f()
        return time.process_time() - t0

    attention = cpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    scores = torch.randn(size * size, size * size).to(dtype)
    exp = cpu_time(lambda: [torch.exp(scores) for _ in range(2 * heads)])
    return {"model": name, "step_cpu_s": step, "ops": ops, "attention": {
        "tokens": size * size, "heads": heads, "head_width": width, "sdpa_cpu_s": attention, "exp_cpu_s": exp}}


def run(args) -> int:
    if getattr(args, "profile", False):
        if args.threads:
            torch.set_num_threads(args.threads)
        for m in [m.strip() for m in args.models.split(",") if m.strip()]:
            r = profile_fast_unet(m)
            a = r["attention"]
            print(f"fast U-Net {m}: {r['step_cpu_s']:.2f} CPU-s a step; self time by operator (under the profiler):")
            for key, share, count in r["ops"]:
                print(f"  {share:6.1%}  {key} ({count} calls)")
            print(f"  one self-attention over {a['tokens']} tokens ({a['heads']} heads of {a['head_width']}, batch 2): "
                  f"SDPA {a['sdpa_cpu_s']:.3f} CPU-s; torch.exp over the same {2 * a['heads']} x {a['tokens']}^2 "
                  f"values {a['exp_cpu_s']:.3f} CPU-s")
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("imagine bench speed compares against diffusers: pip install diffusers") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1; got {args.repeats}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
    for p in parts:
        if p not in ("unet", "vae"):
            raise ValueError(f"--parts: unknown part {p!r}; valid: unet, vae")
    side_names = [s.strip() for s in args.sides.split(",")] if args.sides else None
    valid_sides = {"diffusers_fp32", "diffusers_autocast", "diffusers_bf16", "imagine_exact", "imagine_fast"}
    if side_names and not set(side_names) <= valid_sides:
        raise ValueError(f"--sides: unknown {sorted(set(side_names) - valid_sides)}; valid: {sorted(valid_sides)}")
    import diffusers as _d

    from imagine.hardware import native_bf16

    results = {"torch": torch.__version__, "diffusers": _d.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
               "load_average_start": _loadavg(), "isolated": args.isolate, "unet": [], "vae": None}
    print(f"imagine bench speed: torch {torch.__version__}, diffusers {_d.__version__}, "
          f"{torch.get_num_threads()} threads, CPU {results['cpu_capability']}, native bf16: "
          f"{'yes' if native_bf16() else 'no (bf16 sides left out unless --sides names them)'}, "
          f"load average {_loadavg()}")
    if "unet" in parts:
        for m in models:
            r = bench_unet(m, args.repeats, side_names, compile=args.compile, isolate=args.isolate)
            r["ratios"] = {"wall": _ratios(r["sides"]), "cpu": _ratios(r["sides"], "median_cpu_s")}
            results["unet"].append(r)
            print(_table(f"U-Net {m} (batch 2, {r['latent']}x{r['latent']} latents): seconds per step",
                         r["sides"], "rel_err_vs_diffusers_fp32", "%.1e"))
            gc.collect()
    if "vae" in parts:
        r = bench_vae(args.repeats, args.vae_size, side_names, isolate=args.isolate)
        r["ratios"] = {"wall": _ratios(r["sides"]), "cpu": _ratios(r["sides"], "median_cpu_s")}
        results["vae"] = r
        print(_table(f"VAE decode to {r['image']}x{r['image']}: seconds", r["sides"], "psnr_vs_diffusers_fp32_db",
                     "%.1f dB"))
        if "psnr_vs_imagine_exact_db" in r["sides"].get("imagine_fast", {}):
            print(f"  imagine fast vs exact image: {r['sides']['imagine_fast']['psnr_vs_imagine_exact_db']:.1f} dB")
    return _finish(results, args.json)


def _finish(results: dict, json_path: str | None) -> int:
    """The run's end: the load average then (printed and kept), the results written to `json_path` if given."""
    results["load_average_end"] = _loadavg()
    print(f"load average at the end: {results['load_average_end']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
