"""GroupNorm (Wu & He 2018), and GroupNorm followed by SiLU, as the residual blocks use them.

On the bf16 fast copies' channels-last maps, on CPUs with AVX512-BF16, both run in one kernel
(`csrc/group_norm_silu.cpp`): torch's group_norm on such a map runs at about 0.7 G values a second
on one Zen 4 core and SiLU is another pass over the map, together 7.5% of the fast VAE decode. The
kernel takes one pass for the statistics (float32 sums of shifted values, gathered in float64) and one
that normalises, applies SiLU and stores, rounding once to bf16. Elsewhere (float32, autograd, other
layouts, no kernel) torch's ops serve. `IMAGINE_GROUP_NORM_KERNEL=0` turns the kernel off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import native

ENV = "IMAGINE_GROUP_NORM_KERNEL"
NEEDS = native.AVX512_FLAGS | {"avx512_bf16"}


# (not under torch.compile, which traces torch's ops instead: no fake implementation is registered)
KERNEL = native.Kernel("imagine_group_norm_silu", "group_norm_silu.cpp", native.AVX512 + ("-mavx512bf16",),
                       what="the GroupNorm-SiLU kernel", fallback="torch's group_norm and silu", env=ENV)


def _kernel_applies(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.ndim == 4 and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())))
            and not torch.compiler.is_compiling()
            and os.environ.get(ENV, "").strip() != "0" and native.has_cpu_flags(NEEDS) and KERNEL.load())


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, inplace: bool = False) -> torch.Tensor:
    """norm(x), then SiLU if `silu`. Without autograd the SiLU goes in place on the norm's fresh output,
    and with `inplace` (for a map the caller owns and no longer needs) the kernel writes over x: on the
    VAE decoder's 512x512 maps a new 64-128 MB tensor is a fresh mmap whose pages fault in at every call
    (about half the time of a GroupNorm-SiLU there)."""
    if _kernel_applies(norm, x):
        op = torch.ops.imagine.group_norm_silu_ if inplace else torch.ops.imagine.group_norm_silu
        return op(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)
    h = norm(x)
    if not silu:
        return h
    return F.silu(h) if torch.is_grad_enabled() else F.silu(h, inplace=True)


def silu_of_norm(norm: nn.GroupNorm, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SiLU(GroupNorm(x)), over x itself with `inplace` where the kernel runs."""
    return group_norm(norm, x, silu=True, inplace=inplace)
