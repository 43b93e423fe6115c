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


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions (oneDNN's own check, the one
    torch.compile's inductor uses; /proc/cpuinfo's avx512_bf16 / amx_bf16 flags as a fallback)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
