"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) (Lavin & Gray 2016, "Fast
Algorithms for Convolutional Neural Networks", sec. 4 and 5).

A stride-1 3x3 convolution is computed on 6x6 input tiles d that overlap by 2, each giving a 4x4
output tile (their eq. 10, nested to two dimensions):

    Y = A^T [ (G g G^T)  (.)  (B^T d B) ] A

with g the 3x3 filter and (.) the element-wise product. Summed over the input channels, the 36
element-wise products of each tile become 36 matrix products [tiles, C_in] x [C_in, C_out]
(their eq. 12): 36 multiplications per 4x4 outputs instead of 16 * 9 = 144, a quarter of a direct
convolution's. The filter transform U = G g G^T is computed once per weight (in float64).

The transforms B^T d B and A^T M A are additions with small integer weights, applied one axis at
a time as [6 x 6] matrix products over all tiles and channels; the work is split into bands of
tile rows so that the transformed tiles of a band stay in the CPU's cache.

Accuracy: in float32 the result is as close to the float64 convolution as oneDNN's direct one
(about 2e-6 relative for SD's shapes against 1-2e-6; tests/test_winograd.py). In bfloat16 it is
not: the transforms' weights up to 8 (A) and 5 (B) cost bf16's 8-bit mantissa about 9x the error
of a direct bf16 convolution (2.3e-2 against 2.6e-3 relative, measured here), so the fast mode
uses it only for float32 weights (CPUs without native bf16).

Cost: U takes 36/9 = 4x the memory of the weight it comes from, so `use_winograd` takes the
convolutions with the smallest weights first, up to a memory budget; on maps with few channels
the transforms cost more than the products save, and on tiny maps U is read for too few tiles,
so those stay direct. The thresholds are measured on a 2-core AVX2 EPYC (docs/stable-diffusion.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# F(4x4, 3x3) with the interpolation points 0, +-1, +-2 and infinity (Lavin & Gray, sec. 5.2).
_BT = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))

TILE = 4  # output tile side m; input tiles are m + 3 - 1 = 6 wide
BAND_ELEMENTS = 1 << 22  # transformed values per band (16 MB in float32): measured best for SD's U-Net maps
MIN_CHANNELS = 256  # input channels below which the transforms cost more than the products save
MIN_PIXELS = 8 * 8  # maps smaller than this read U (4x the weight) for too few tiles
BUDGET_ENV = "IMAGINE_WINOGRAD_GB"  # memory for the transformed filters; default a quarter of the RAM


def winograd_filter(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every (out, in) filter pair: [C_out, C_in, 3, 3] -> [36, C_out, C_in], one
    matrix product (G kron G) [36, 9] x [9, C_out C_in], in the weight's dtype (in float32 it is
    within 1e-7 relative of float64)."""
    if weight.ndim != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"winograd_filter takes 3x3 filters [C_out, C_in, 3, 3]; got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    taps = weight.detach().permute(2, 3, 0, 1).reshape(9, -1)  # [(a, b), (o, i)]
    return (torch.kron(g, g) @ taps).view(36, weight.shape[0], weight.shape[1])


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
                     band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """conv2d(x, g, bias, stride=1, padding=1) for x [B, C_in, H, W] and U = winograd_filter(g);
    returns [B, C_out, H, W] in channels-last memory (its natural layout here)."""
    b, c, h, w = x.shape
    if u.ndim != 3 or u.shape[0] != 36 or u.shape[2] != c:
        raise ValueError(f"the transformed filter {tuple(u.shape)} does not take {c} input channels")
    co = u.shape[1]
    bt = torch.tensor(_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(_AT, dtype=x.dtype, device=x.device)
    th, tw = -(-h // TILE), -(-w // TILE)
    # Zero padding: 1 for the convolution, plus what makes the map a whole number of tiles.
    xp = F.pad(x, (1, 1 + TILE * tw - w, 1, 1 + TILE * th - h)).permute(0, 2, 3, 1)  # [B, H', W', C]
    compiling = torch.compiler.is_compiling()
    out = None if compiling else torch.empty((b, th, TILE, tw, TILE, co), dtype=x.dtype, device=x.device)
    bands = []
    rows = max(1, band_elements // (36 * b * tw * max(c, co)))
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        n = b * (r1 - r0) * tw
        # The tiles of this band: [6, 6, B, rows, tw, C], channels innermost (one gather copy).
        d = xp[:, TILE * r0: TILE * r1 + 2].unfold(1, 6, TILE).unfold(2, 6, TILE)
        d = d.permute(4, 5, 0, 1, 2, 3).reshape(6, -1)
        v = torch.matmul(bt, (bt @ d).view(6, 6, -1)).view(36, n, c)  # B^T d B, one axis at a time
        m = torch.bmm(v, u.transpose(1, 2))  # the 36 products, summed over C_in (Lavin & Gray eq. 12)
        if bias is not None:
            # Column 1 of A^T is all ones, so A^T (b e_1 e_1^T) A adds b to all 16 outputs of a tile:
            # the bias goes into one of the 36 product matrices instead of a pass over the output.
            m[7] += bias.to(x.dtype)
        y = torch.matmul(at, (at @ m.view(6, -1)).view(4, 6, -1)).view(TILE, TILE, b, r1 - r0, tw, co)  # A^T M A
        y = y.permute(2, 3, 0, 4, 1, 5)  # [B, rows, 4, tw, 4, C_out]
        if out is None:  # torch.compile: no writes into a preallocated tensor
            bands.append(y.contiguous())
        else:
            out[:, r0:r1].copy_(y)
    if out is None:
        out = torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]
    return out.view(b, TILE * th, TILE * tw, co)[:, :h, :w].permute(0, 3, 1, 2)


def winograd_eligible(conv: nn.Conv2d) -> bool:
    """A 3x3, stride-1, padding-1 (zeros), undilated, ungrouped convolution."""
    return (type(conv) in (nn.Conv2d, WinogradConv2d) and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and tuple(conv.padding) == (1, 1))


class WinogradConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters and state-dict keys) that runs `winograd_conv3x3` on maps of
    at least `min_pixels` and with at least `min_channels` input channels, and the direct
    convolution otherwise. U is built at the first such call and rebuilt if the weight changes;
    it is a cache, not part of the state dict. Inference only: under autograd it runs direct."""

    min_channels = MIN_CHANNELS
    min_pixels = MIN_PIXELS
    band_elements = BAND_ELEMENTS
    _u: torch.Tensor | None = None
    _u_stamp: tuple | None = None

    def _transformed(self) -> torch.Tensor:
        wt = self.weight
        try:
            version = wt._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            version = -1
        stamp = (wt.data_ptr(), version, wt.dtype, wt.device)
        if self._u is None or self._u_stamp != stamp:
            self._u, self._u_stamp = winograd_filter(wt), stamp
        return self._u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.ndim == 4 and x.shape[1] >= self.min_channels and x.shape[-2] * x.shape[-1] >= self.min_pixels
                and x.dtype == self.weight.dtype and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            # Under torch.compile U is part of the graph: with frozen weights inductor folds it to a constant.
            u = winograd_filter(self.weight) if torch.compiler.is_compiling() else self._transformed()
            return winograd_conv3x3(x, u, self.bias, self.band_elements)
        return super().forward(x)


def default_budget_bytes() -> int:
    """$IMAGINE_WINOGRAD_GB gigabytes if set (0 turns Winograd off), else a quarter of the RAM."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if value:
        try:
            gb = float(value)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of gigabytes (0 turns Winograd off); got {value!r}")
        if not gb >= 0:
            raise ValueError(f"{BUDGET_ENV} must be >= 0; got {value!r}")
        return int(gb * 2**30)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def winograd_candidates(module: nn.Module) -> list[nn.Conv2d]:
    """The plain nn.Conv2d layers inside `module` that `use_winograd` may convert: eligible, with at
    least MIN_CHANNELS input channels."""
    return [m for m in module.modules()
            if type(m) is nn.Conv2d and winograd_eligible(m) and m.in_channels >= MIN_CHANNELS]


def use_winograd(module: nn.Module, budget_bytes: int | None = None) -> int:
    """Turn eligible nn.Conv2d layers inside `module` into WinogradConv2d in place (same objects,
    same parameters), as many as the transformed filters fit in `budget_bytes` (default
    `default_budget_bytes()`); returns how many.

    U costs 4x its weight, and in a U-Net or VAE the small weights are the ones on the large maps
    (the channels double as the map halves), where a convolution takes as long as a deep level's
    for a fraction of the memory: so the smallest weights are taken first. (SD 1.5's U-Net: its
    3x3 filters on maps of 32x32 and more need 1 GB of U, those on 16x16 3.1 GB more, those on 8x8
    4.7 GB more.) Whether a call runs Winograd or direct is decided per call (see WinogradConv2d)."""
    budget = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
    candidates = winograd_candidates(module)
    candidates.sort(key=lambda m: m.weight.numel())  # stable: equal sizes keep the module order
    n = 0
    for m in candidates:
        cost = 4 * m.weight.numel() * m.weight.element_size()
        if cost > budget:
            break
        budget -= cost
        m.__class__ = WinogradConv2d
        n += 1
    return n


def winograd_bytes(module: nn.Module) -> int:
    """Memory held by the transformed filters built so far inside `module` (they are built at a
    layer's first Winograd call)."""
    return sum(m._u.numel() * m._u.element_size() for m in module.modules()
               if isinstance(m, WinogradConv2d) and m._u is not None)
