"""softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017 eq. 1; LDM eq. 3) for bfloat16 on CPUs whose
AVX-512 has bf16 dot products but no AMX (AMD Zen 4 and Zen 5, Intel Cooper Lake).

On such CPUs torch's SDPA flash kernel computes its two matrix products at about float32's speed: on
a Zen 4, SD 1.5's largest self-attention (batch 2, 8 heads of 40, 4096 tokens) took 0.66 s in bf16
and 0.65 s in float32, while oneDNN's bf16 matrix products run twice as fast as float32 ones. The
kernel in `csrc/attention_bf16.cpp` does both products with VDPBF16PS (pairs of bf16 summed into
float32 lanes) and the softmax in float32 with the scores of a block of queries kept in cache:
0.30 s for that attention, with SDPA's numerics (float32 scores and sums, the weights rounded to
bf16 for the second product; its error against float64 equals SDPA's, tests/test_fused_attention.py).

On CPUs with AMX, SDPA's flash kernel multiplies on the AMX tiles, so it is kept there; on CPUs
without AVX512-BF16 the fast mode is float32 and never calls this. The kernel is compiled by
torch.utils.cpp_extension on first use (about 10 s, once per machine and torch version: torch
caches the build; see `native.py`). If it cannot be built (no compiler), a warning says so once and
SDPA is used. `IMAGINE_FUSED_ATTENTION=0` turns it off,
`=1` uses it wherever the CPU has AVX512-BF16, AMX included.
"""

from __future__ import annotations

import os

import torch

from imagine.hardware import amx
from imagine.models import native

ENV = "IMAGINE_FUSED_ATTENTION"
NEEDS = native.AVX512_FLAGS | {"avx512_bf16"}


def _register_fake():
    @torch.library.register_fake("imagine::attention_bf16")
    def _(q, k, v, scale):  # what torch.compile needs to trace through the op: the output's shape
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])


KERNEL = native.Kernel("imagine_attention_bf16", "attention_bf16.cpp", native.AVX512 + ("-mavx512bf16",),
                       what="the bf16 attention kernel", fallback="SDPA", env=ENV, after_load=_register_fake)
_op = None  # the built op


def wanted() -> bool:
    """Whether this machine should use the kernel: AVX512-BF16 without AMX, unless IMAGINE_FUSED_ATTENTION
    says otherwise (0: never; 1: wherever AVX512-BF16 is)."""
    forced = os.environ.get(ENV, "").strip()
    if forced == "0" or not native.has_cpu_flags(NEEDS):
        return False
    return forced == "1" or not amx()


def kernel():
    """The compiled op `(q, k, v, scale) -> [B, N, H*D]`, or None where it is not wanted or cannot be built."""
    global _op
    if not wanted():
        return None
    if _op is None and KERNEL.load():
        _op = torch.ops.imagine.attention_bf16
    return _op


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel takes bf16 CPU tensors q [B, H, N, D], k and v [B, H, M, D] (one head size for all three,
    as many values as keys, at least one key), unit last stride, and no gradient to carry (it has no
    backward). Anything else (SDPA takes v's own head size, say) goes to SDPA: the kernel's checks never
    refuse a call made here."""
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.device.type == k.device.type == v.device.type == "cpu" and q.ndim == k.ndim == v.ndim == 4
            and k.shape[:2] == q.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
            and q.shape[3] == k.shape[3] == v.shape[3] > 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d)) v with the heads merged, [B, N, H * d], by the kernel; None where it does
    not apply (the caller then uses SDPA)."""
    if not applies(q, k, v):
        return None
    op = kernel()
    if op is None:
        return None
    return op(q, k, v, q.shape[-1] ** -0.5)
