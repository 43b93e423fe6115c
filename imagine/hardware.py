"""What this CPU computes fast: the choices that depend on the machine, made in one place.

bfloat16 pays only where the CPU multiplies it natively (AVX512-BF16 or AMX, e.g. Xeon Sapphire
Rapids): there oneDNN's bf16 kernels run about 2x faster than float32. On a CPU without them
(AVX2-only parts such as many AMD EPYC and older Xeons) every bf16 op is emulated: measured on a
2-core AVX2 EPYC, one training step of the default model took 110 s under bf16 autocast against
5 s in float32. So "bf16" in our fast modes and the trainer's `mixed_precision: auto` follow
`native_bf16()`.
"""
from __future__ import annotations

import functools
import os

import torch

BF16_ENV = "IMAGINE_BF16"  # "1" / "0" overrides the detection (e.g. to measure emulated bf16)


# the --precision flag's help (generate, serve, eval)
PRECISION_HELP = ("exact: fp32 (on weights packed for oneDNN); fast: bf16 weights and channels-last where the CPU "
                  "has native bf16 (AVX512-BF16 or AMX), else float32 with Winograd convolutions (as exact for a "
                  "model with no convolution that takes them)")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo's names of bf16 dot products


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions: AVX512-BF16 or AMX (the flags
    `avx512_bf16` / `amx_bf16` of /proc/cpuinfo). oneDNN's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not that: it is true on any AVX512BW/VL/DQ CPU
    (Skylake-SP, Cascade Lake, Ice Lake), where oneDNN emulates bf16 dot products and a bf16 convolution
    is slower than a float32 one; it is the answer only where the flags cannot be read (no
    /proc/cpuinfo, or a CPU that lists no x86 flags there, such as an ARM one)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags()
    if flags:
        return bool(flags & NATIVE_BF16_FLAGS)
    return _onednn_bf16()


def _onednn_bf16() -> bool:
    """oneDNN's "bf16 supported" (AVX512BW/VL/DQ, AVX-NE-CONVERT, or an ARM CPU's bf16), False where this
    torch build cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def amx() -> bool:
    """True on CPUs with AMX bf16 tiles (Xeon Sapphire Rapids and later), where oneDNN's bf16 convolutions
    and matrix products are several times faster than AVX-512's: float32 Winograd and our attention
    kernel, which beat them on AVX512-BF16 without AMX, are not used there."""
    return "amx_bf16" in cpu_flags()


def fast_dtype() -> torch.dtype:
    """The dtype of the fast mode's weights and activations on this machine: bfloat16 where it is
    native, float32 otherwise (the fast mode then keeps only its layout changes)."""
    return torch.bfloat16 if native_bf16() else torch.float32


def resolve_mixed_precision(value) -> str:
    """A trainer's `mixed_precision` setting -> accelerate's 'no' | 'bf16' | 'fp16'. 'auto' picks
    bf16 on a GPU or on a CPU with native bf16, else 'no'. YAML reads a bare `no` as False: taken
    as 'no'."""
    if value is False or value is None:
        return "no"
    if value == "auto":
        return "bf16" if torch.cuda.is_available() or native_bf16() else "no"
    if value not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision must be 'auto', 'no', 'bf16' or 'fp16'; got {value!r}")
    return value
