"""Weights packed once into oneDNN's blocked layout, for the fast copies' linear layers and direct
convolutions.

torch's F.linear and F.conv2d on a CPU hand oneDNN a plain (or channels-last) weight, and oneDNN
reorders it into the blocked layout its kernels read at every call: for a layer whose weight is large
next to its input (SD's 8x8 level, the feed-forward matrices) the reorder costs as much as the
products. Packing each weight once removes it. It is what torch.compile's freezing pass does, with the
same ops (`torch.ops.mkldnn._reorder_convolution_weight` / `_reorder_linear_weight`, then
`_convolution_pointwise` / `_linear_pointwise`); here it runs eagerly.

Measured on a Zen 4, one thread, bf16, where the outputs are bit-identical to F.conv2d's and F.linear's
(in float32 they are not always: for some shapes oneDNN runs the packed weight through another kernel,
which rounds otherwise; measured within 2e-6 of the float64 convolution, against 4e-7 for F.conv2d):

| layer (batch 2) | plain | packed |
|---|---|---|
| 3x3 conv 2560 -> 1280 on 8x8 | 68.4 ms | 33.6 ms |
| 3x3 conv 1280 -> 1280 on 8x8 | 21.2 ms | 17.4 ms |
| 3x3 stride-2 conv 1280 on 16x16 | 22.8 ms | 18.3 ms |
| linear 2048 x 640 -> 5120 | 69.8 ms | 63.0 ms |
| linear 8192 x 320 -> 320 | 9.4 ms | 8.1 ms |

(in float32 the 8x8 convolutions gain 2.2x: 146.6 against 67.1 ms for 2560 -> 1280). The packed weight
is a second copy of the layer's weight (the plain one stays, for the paths that cannot use it: autograd,
torch.compile, other devices); it is built at the layer's first call and rebuilt if the weight changes.
One pack serves every input size (its layout chosen without a batch-size hint, so that results do not
depend on the calls before; measured equally fast). `IMAGINE_PREPACK=0` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models.attention import GEGLU

ENV = "IMAGINE_PREPACK"


def available() -> bool:
    """oneDNN is in this torch build and IMAGINE_PREPACK is not 0."""
    return os.environ.get(ENV, "").strip() != "0" and torch.backends.mkldnn.is_available()


class WeightStamp(tuple):
    """`weight_stamp`'s key, (address, version counter, dtype, device, shape), compared as a tuple; `pin()`
    makes it hold the weight's storage (not part of the comparison)."""

    def pin(self, weight: torch.Tensor | None) -> "WeightStamp":
        """Keep `weight`'s storage alive as long as this stamp: while a cache built from it lives, no new
        tensor can be given its address, so a replaced weight (`.data = new`, which keeps the version counter)
        always changes the address, where a freed one could be handed to the new tensor and the stale cache
        be used."""
        self._pinned = None if weight is None else weight.detach()
        return self


def weight_stamp(weight: torch.Tensor | None, pin: bool = False) -> WeightStamp:
    """What a cache built from `weight` is keyed on: it changes when the weight is replaced or modified
    in place (its storage, its version counter, its dtype, device or shape). A cache keeps its stamp made
    with `pin=True` (see `WeightStamp.pin`); the stamps compared with it at each call need no pin."""
    if weight is None:
        stamp = WeightStamp(())
    else:
        try:
            version = weight._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            version = -1
        stamp = WeightStamp((weight.data_ptr(), version, weight.dtype, weight.device, weight.shape))
    return stamp.pin(weight) if pin else stamp


class _Packs:
    """The mixin's state: the packed weight and the stamp of the weight it came from. A failed pack (an
    op this torch build lacks, a layout oneDNN refuses) is remembered, and the layer stays plain."""

    _pack: torch.Tensor | None = None
    _pack_stamp: tuple | None = None
    _pack_failed: bool = False

    def _usable(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (not self._pack_failed and x.device.type == "cpu" and x.dtype == w.dtype
                and w.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
                and available())

    def _stamp(self, pin: bool = False) -> tuple:
        """What the pack is built from: the weight."""
        return weight_stamp(self.weight, pin)

    def _packed(self, build) -> torch.Tensor | None:
        pack = self._pack
        if pack is None or self._pack_stamp != self._stamp():
            self._pack = pack = None  # the stale pack goes before the new one is made
            try:
                # Not an inference tensor even when the first call runs under torch.inference_mode.
                with torch.inference_mode(False), torch.no_grad():
                    pack, stamp = build(), self._stamp(pin=True)
            except (RuntimeError, AttributeError, NotImplementedError):
                self._pack, self._pack_stamp, self._pack_failed = None, None, True
                return None
            self._pack, self._pack_stamp = pack, stamp
        return pack


def _linear_pack(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight in oneDNN's layout, chosen without a batch-size hint: with the first call's row count
    as the hint, later calls of other sizes could round differently, so that an image depended on what the
    process had run before (1e-6 per layer, 5.9e-5 in a generation's latents). Measured equally fast on a
    Zen 4 (bf16 and float32, SD's shapes from 2 to 8192 rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


class PackedLinear(_Packs, nn.Linear):
    """An nn.Linear (same parameters and state-dict keys) that multiplies by its packed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim >= 2 and self._usable(x):
            w = self._packed(lambda: _linear_pack(self.weight.detach()))
            if w is not None:
                # contiguous: on a strided input the op rounds differently from F.linear
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class PackedConv2d(_Packs, nn.Conv2d):
    """An nn.Conv2d (same parameters and state-dict keys) that convolves with its packed weight, for
    zero padding; its output is channels-last, as F.conv2d's with a channels-last weight."""

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and self.padding_mode == "zeros" and isinstance(self.padding, tuple) and self._usable(x):
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            w = self._packed(lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), *args, list(x.shape)))
            if w is not None:
                return torch.ops.mkldnn._convolution_pointwise(x, w, self.bias, *args, "none", [], "")
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._direct(x)


class PackedGEGLU(_Packs, GEGLU):
    """A GEGLU (same `proj`, same state-dict keys) whose value and gate halves of `proj` are packed apart:
    the gate's product takes GELU as a oneDNN post-op and the value's product is multiplied by that gate
    as a second post-op, (x W + b) * GELU(x V + c) in two calls, with no 2x-wide intermediate map and no
    GELU or product pass of its own. On a Zen 4, one thread, SD 1.5's feed-forward chunks: 1024 x 320
    tokens 8.67 against 9.76 ms in bf16; 2048 x 640 127.7 against 146.7 ms in float32. In bf16 each
    output is rounded once instead of three times (2.3e-3 against 3.4e-3 relative to float64)."""

    @property
    def weight(self) -> torch.Tensor:  # what _Packs checks: the packs come from proj's weight
        return self.proj.weight

    def _stamp(self, pin: bool = False) -> tuple:
        """The packs hold proj's weight and its bias's halves: a replaced bias Parameter changes them too."""
        return weight_stamp(self.proj.weight, pin), weight_stamp(self.proj.bias, pin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim >= 2 and self._usable(x):
            half = self.proj.out_features // 2
            w, b = self.proj.weight.detach(), self.proj.bias

            def build():
                value, gate = (_linear_pack(w[s].contiguous()) for s in (slice(0, half), slice(half, None)))
                bias = (None, None) if b is None else (b.detach()[:half].contiguous(), b.detach()[half:].contiguous())
                return value, gate, bias

            packs = self._packed(build)
            if packs is not None:
                value, gate, (bv, bg) = packs
                x = x.contiguous()
                g = torch.ops.mkldnn._linear_pointwise(x, gate, bg, "gelu", [], "none")  # "none": erf, F.gelu's
                return torch.ops.mkldnn._linear_pointwise.binary(x, g, value, bv, "mul")
        return super().forward(x)


def use_prepacked(module: nn.Module) -> int:
    """Turn the plain nn.Linear and nn.Conv2d layers inside `module` into PackedLinear and PackedConv2d,
    and its GEGLUs into PackedGEGLU, in place (same objects, same parameters); returns how many. Subclasses
    of theirs are left alone (WinogradConv2d packs its own direct path). Nothing happens where `available()`
    is False."""
    if not available():
        return 0
    kinds = {nn.Linear: PackedLinear, nn.Conv2d: PackedConv2d, GEGLU: PackedGEGLU}
    n = 0
    for m in module.modules():
        if type(m) in kinds:
            m.__class__ = kinds[type(m)]
            n += 1
    return n
