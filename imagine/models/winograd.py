"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3), F(4x4, 3x3) and F(6x6, 3x3) (Lavin &
Gray 2016, "Fast Algorithms for Convolutional Neural Networks", sec. 4 and 5).

A stride-1 3x3 convolution is computed on (m+2)x(m+2) input tiles d that overlap by 2, each giving
an m x m output tile (their eq. 10, nested to two dimensions):

    Y = A^T [ (G g G^T)  (.)  (B^T d B) ] A

with g the 3x3 filter and (.) the element-wise product. Summed over the input channels, the
(m+2)^2 element-wise products of each tile become as many matrix products [tiles, C_in] x
[C_in, C_out] (their eq. 12): for m = 4, 36 multiplications per 16 outputs instead of 16 * 9 = 144,
a quarter of a direct convolution's; for m = 6, 64 per 36 (a fifth), with larger transform weights;
for m = 2, 16 per 4 (4/9), with the smallest U, for the deep levels' small maps.
The filter transform U = G g G^T is computed once per weight and tile.

The transforms B^T d B and A^T M A are additions with small weights. On CPUs with AVX-512 our kernel
(`csrc/winograd_transforms.cpp`, `transform_kernel`) does each in one pass: a tile's values for 16
channels are loaded into registers (zero past the map's edge: the convolution's padding), transformed
along both axes there and stored once, straight from the input map and straight into the output map.
Elsewhere they are torch ops, applied one axis at a time as [(m+2) x (m+2)] matrix products over all
tiles and channels. Either way the work is split into bands of tile rows, whose intermediates live in
reused buffers (fresh ones would fault their pages in again at every band): small bands, kept in cache,
for the five passes of the torch ops; large ones for the kernel, where tall products pay more.

Accuracy: in float32 F(2x2) is closer to the float64 convolution than a direct one (its transforms'
weights are 0, +-1 and 1/2), F(4x4) about as close to the float64 convolution as oneDNN's direct one
(about 2e-6 relative for SD's shapes against 1-2e-6), F(6x6) about 3.5e-6 (tests/test_winograd.py).
In bfloat16 neither is: the transforms' weights up to 8 (A) and 5 (B) cost bf16's 8-bit mantissa
about 9x the error of a direct bf16 convolution (2.3e-2 against 2.6e-3 relative, measured here for
F(4x4)), so the fast mode uses Winograd only for float32 weights (CPUs without native bf16).

Cost: U takes (m+2)^2 / 9 of the memory of the weight it comes from (1.8x for F(2x2), 4x for
F(4x4), 7.1x for F(6x6)), so `use_winograd` reserves F(4x4)'s U for the convolutions with the
smallest weights first, up to a memory budget, and what is left lets layers, again the smallest
weights first, hold F(6x6)'s, used on the large maps where it pays (`best_tile`). Where a call has
few tiles (the deep levels' 8x8 maps), reading U costs more than the products, and F(2x2)'s U, 4/9
of F(4x4)'s, wins. Which tiles a layer may use is fixed when it is converted, never by the calls
it has run, so that a map is computed alike whatever ran before (a layer without F(6x6) runs
F(4x4) on large maps); memory left over lets a layer hold a second U at once, else it rebuilds.
On maps with few channels the transforms cost more than the products save, and under 4x4 the
layers stay direct. The thresholds are measured on a 2-core AVX2 EPYC (docs/stable-diffusion.md).
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import native
from imagine.models.prepacked import PackedConv2d, weight_stamp

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

# F(6x6, 3x3) with the points 0, +-1, +-2, +-1/2 and infinity: the same construction (Lavin & Gray
# sec. 4; these points keep the transforms' weights smallest for a 6-wide tile). A^T and G follow
# from the points (A^T[i, j] = p_j^i, G[j, k] = p_j^k / prod_{l != j} (p_j - p_l)); B^T is what makes
# eq. 10 exact, solved in rational arithmetic and checked to 1e-12 in tests/test_winograd.py.
_BT6 = ((-1, 0, 21 / 4, 0, -21 / 4, 0, 1, 0),
        (0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0),
        (0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0),
        (0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0),
        (0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0),
        (0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0),
        (0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0),
        (0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1))
_G6 = ((-1, 0, 0),
       (-2 / 9, -2 / 9, -2 / 9),
       (-2 / 9, 2 / 9, -2 / 9),
       (1 / 90, 1 / 45, 2 / 45),
       (1 / 90, -1 / 45, 2 / 45),
       (32 / 45, 16 / 45, 8 / 45),
       (32 / 45, -16 / 45, 8 / 45),
       (0, 0, 1))
_AT6 = ((1, 1, 1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0),
        (0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0),
        (0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0),
        (0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0),
        (0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1))

# F(2x2, 3x3) with the points 0, +-1 and infinity (Lavin & Gray sec. 4.1, their eq. 7).
_BT2 = ((1, 0, -1, 0),
        (0, 1, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0, -1))
_G2 = ((1, 0, 0),
       (1 / 2, 1 / 2, 1 / 2),
       (1 / 2, -1 / 2, 1 / 2),
       (0, 0, 1))
_AT2 = ((1, 1, 1, 0),
        (0, 1, -1, -1))

# Output tile side m -> (B^T, G, A^T); input tiles are m + 3 - 1 wide.
TRANSFORMS = {2: (_BT2, _G2, _AT2), 4: (_BT, _G, _AT), 6: (_BT6, _G6, _AT6)}
TILE = 4  # the tile whose U use_winograd reserves (and the one on mid-sized maps)
# F(4x4) tiles per map under which F(2x2) is faster: U's read outweighs the products. Measured per call
# (12 tiles: a guided image, batch 2, of 6 tiles a map); counted per map so that the tile, and with it the
# rounding, does not depend on how many images share the call (the same seed gives the same image at any
# batch size).
FEW_TILES = 6
BAND_ELEMENTS = 1 << 22  # transformed values per band (16 MB in float32): measured best for SD's U-Net maps
# With the transform kernel the transforms are one pass each and the band's size is set by the products:
# fewer, larger bands keep their matrices tall (measured on a Zen 4, SD's layers at batch 2: 1280 -> 640
# channels on 32x32 89 ms with 16M-value bands against 98 with 4M, 640 -> 320 on 64x64 87 against 99).
KERNEL_BAND_ELEMENTS = 1 << 24
KERNEL_ENV = "IMAGINE_WINOGRAD_KERNEL"  # "0": the transforms in torch ops even where the kernel could run
MIN_CHANNELS = 256  # input channels below which the transforms cost more than the products save
MIN_PIXELS = 4 * 4  # maps smaller than this stay direct (F(2x2) measured 6x faster than direct on 4x4)
# With the transform kernel, a bf16 copy's 128-255-channel layers pay on large maps: 128 -> 128 on 512x512
# 326.6 against 372.0 ms direct (bf16, packed; one Zen 4 thread), on 256x256 73.0 against 83.6, on 128x128
# 18.5 against 21.2 (the VAE's top level), at float32 Winograd's accuracy; but 128 -> 3 (the VAE's conv_out)
# 54.3 against 49.7: so 128 channels in and out, on maps of 128x128 or more (`use_winograd(narrow=True)`).
NARROW_CHANNELS = 128
NARROW_MIN_PIXELS = 128 * 128
BUDGET_ENV = "IMAGINE_WINOGRAD_GB"  # memory for the transformed filters; default: half the available memory


def _tile_of(u: torch.Tensor) -> int:
    for m in TRANSFORMS:
        if u.shape[0] == (m + 2) ** 2:
            return m
    raise ValueError(f"a transformed filter has (m + 2)^2 = {', '.join(str((m + 2) ** 2) for m in TRANSFORMS)} "
                     f"planes (m = {', '.join(map(str, TRANSFORMS))}); got {tuple(u.shape)}")


def best_tile(h: int, w: int) -> int:
    """The output tile for h x w maps, whatever the batch (an image's rounding must not depend on it).

    - 2 where F(4x4) would have fewer than FEW_TILES tiles a map: reading U then costs more than
      the products. Measured at 1280 channels, F(2x2) against F(4x4): 8x8 at batch 2 (8 tiles) 41 ms
      against 52 on a Zen 3 EPYC, 25.9 against 28.5 on a Zen 4; at 16 tiles (8x8 at batch 4, 16x16 at
      batch 1) the two CPUs disagree (Zen 3 76 against 83 and 84 against 97, Zen 4 43.1 against 37.5
      and 44.7 against 39.6); at 32 tiles F(4x4) wins on both (143 against 125, 86.3 against 58.9).
    - 6 where it needs at least 10% fewer products than 4 once the map is padded to whole tiles
      ((m + 2)^2 products per tile). F(6x6) takes 64 products for 36 outputs (1.78 each) against
      F(4x4)'s 36 for 16 (2.25), but on 32x32 or 16x16 the padding to 6-wide tiles eats that, and
      below 24x24 the 8x8 transforms cost more per tile than the products save (measured on SD's
      layers, batch 2: 320 channels on 64x64 0.066 s against 0.077 s, 640 on 48x48 0.136 against
      0.163; but 640 on 32x32 0.095 against 0.084, 1280 on 12x12 0.078 against 0.069).
    - else 4."""
    if -(-h // 4) * -(-w // 4) < FEW_TILES:
        return 2
    if min(h, w) < 24:
        return 4
    cost = {m: -(-h // m) * -(-w // m) * (m + 2) ** 2 for m in (4, 6)}
    return 6 if cost[6] <= 0.9 * cost[4] else 4


def filter_bytes(weight: torch.Tensor, tile: int = TILE) -> int:
    """The memory U = winograd_filter(weight, tile) takes: (m + 2)^2 / 9 times the weight's."""
    return (tile + 2) ** 2 * weight.numel() // 9 * weight.element_size()


def winograd_filter(weight: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """U = G g G^T for every (out, in) filter pair: [C_out, C_in, 3, 3] -> [(m+2)^2, C_out, C_in], one
    matrix product (G kron G) [(m+2)^2, 9] x [9, C_out C_in], in the weight's dtype (in float32 it is
    within 1e-7 relative of float64)."""
    if weight.ndim != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"winograd_filter takes 3x3 filters [C_out, C_in, 3, 3]; got {tuple(weight.shape)}")
    if tile not in TRANSFORMS:
        raise ValueError(f"winograd_filter has output tiles {sorted(TRANSFORMS)}; got {tile!r}")
    g = torch.tensor(TRANSFORMS[tile][1], dtype=weight.dtype, device=weight.device)
    taps = weight.detach().permute(2, 3, 0, 1).reshape(9, -1)  # [(a, b), (o, i)]
    return (torch.kron(g, g) @ taps).view((tile + 2) ** 2, weight.shape[0], weight.shape[1])


class _Workspace(threading.local):
    """Grow-only scratch buffers for the band intermediates, one set per thread. Fresh tensors of
    tens of MB come from mmap and are returned at free, so each band would fault in its pages again
    (measured: a third of a Winograd call's time on SD's layers, AVX2 EPYC); reused buffers are
    faulted in once."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        # Buffers made under inference_mode are inference tensors, which cannot be written outside it.
        key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller buffer before the larger one is taken
            buf = self.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (at most about 5 x BAND_ELEMENTS values)."""
    _WORKSPACE.buffers.clear()


TRANSFORM_KERNEL = native.Kernel("imagine_winograd_transforms", "winograd_transforms.cpp", native.AVX512,
                                 what="the Winograd transform kernel", fallback="torch ops for the transforms",
                                 env=KERNEL_ENV)


def transform_kernel() -> bool:
    """Whether the transforms run in our C++ kernel (`csrc/winograd_transforms.cpp`): on CPUs with
    AVX-512, unless IMAGINE_WINOGRAD_KERNEL=0, once it is built. It does each transform in one pass
    (the torch ops take five passes and a dozen small ops per band): measured on a Zen 4, the
    transforms of SD's 320-channel 64x64 layer took 4.5 ms against 11 ms, and the whole layer 53 ms
    against 56 ms at one thread."""
    if os.environ.get(KERNEL_ENV, "").strip() == "0" or not native.has_cpu_flags(native.AVX512_FLAGS):
        return False
    return TRANSFORM_KERNEL.load()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
                     band_elements: int | None = None) -> torch.Tensor:
    """conv2d(x, g, bias, stride=1, padding=1) for x [B, C_in, H, W] and U = winograd_filter(g, m)
    (the tile m is read from U's shape); returns [B, C_out, H, W] in channels-last memory (its
    natural layout here). The arithmetic is in U's dtype and the output in x's: a bf16 map with a
    float32 U is converted in the copies that pad the input and gather the output tiles, or in the
    transform kernel's loads and stores. `band_elements`: transformed values per band of tile rows
    (default: BAND_ELEMENTS, or KERNEL_BAND_ELEMENTS with the transform kernel)."""
    b, c, h, w = x.shape
    if u.ndim != 3 or u.shape[2] != c:
        raise ValueError(f"the transformed filter {tuple(u.shape)} does not take {c} input channels")
    m = _tile_of(u)
    n = m + 2  # input tile side
    co = u.shape[1]
    if b * h * w == 0:  # an empty batch or map: nothing to compute (and no band to size)
        return x.new_empty((b, co, h, w)).contiguous(memory_format=torch.channels_last)
    bt_, _, at_ = TRANSFORMS[m]
    bt = torch.tensor(bt_, dtype=u.dtype, device=x.device)
    at = torch.tensor(at_, dtype=u.dtype, device=x.device)
    th, tw = -(-h // m), -(-w // m)
    # Under torch.compile (or autograd) the band values are fresh tensors and the bands are
    # concatenated; otherwise they go through the reused workspace into one preallocated output.
    functional = torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or u.requires_grad))
    if (not functional and u.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
            and x.device.type == "cpu" and transform_kernel()):
        return _conv_by_kernel(x, u, bias, m, KERNEL_BAND_ELEMENTS if band_elements is None else band_elements)
    band_elements = BAND_ELEMENTS if band_elements is None else band_elements
    # Zero padding: 1 for the convolution, plus what makes the map a whole number of tiles.
    if functional:
        xp = F.pad(x.to(u.dtype), (1, 1 + m * tw - w, 1, 1 + m * th - h)).permute(0, 2, 3, 1)  # [B, H', W', C]
    else:  # into a reused buffer (F.pad into a fresh one measured 6x slower on SD's 64x64 maps)
        hp, wp = m * th + 2, m * tw + 2
        xp = _WORKSPACE.get("x", b * hp * wp * c, u).view(b, hp, wp, c)
        xp[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
        xp[:, 0].zero_(), xp[:, h + 1:].zero_(), xp[:, 1:h + 1, 0].zero_(), xp[:, 1:h + 1, w + 1:].zero_()
    out = None if functional else torch.empty((b, th, m, tw, m, co), dtype=x.dtype, device=x.device)
    bands = []
    rows = max(1, band_elements // (n * n * b * tw * max(c, co)))
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        tiles = b * (r1 - r0) * tw
        # The tiles of this band: [n, n, B, rows, tw, C], channels innermost (one gather copy).
        d = xp[:, m * r0: m * r1 + 2].unfold(1, n, m).unfold(2, n, m).permute(4, 5, 0, 1, 2, 3)
        if functional:
            d = d.reshape(n, -1)
            v = torch.matmul(bt, (bt @ d).view(n, n, -1)).view(n * n, tiles, c)  # B^T d B, one axis at a time
            prod = torch.bmm(v, u.transpose(1, 2))  # the n^2 products, summed over C_in (Lavin & Gray eq. 12)
        else:
            ws = _WORKSPACE
            d = ws.get("d", n * n * tiles * c, u).view(d.shape).copy_(d).view(n, -1)
            half = torch.mm(bt, d, out=ws.get("bd", d.numel(), u).view(n, -1)).view(n, n, -1)
            v = torch.bmm(bt.expand(n, n, n), half, out=ws.get("v", d.numel(), u).view(n, n, -1))
            prod = torch.bmm(v.view(n * n, tiles, c), u.transpose(1, 2),
                             out=ws.get("prod", n * n * tiles * co, u).view(n * n, tiles, co))
        if bias is not None:
            # Column 1 of A^T is all ones (the point 1), so A^T (b e_1 e_1^T) A adds b to all m^2
            # outputs of a tile: the bias goes into one product matrix instead of a pass over the output.
            prod[n + 1] += bias.to(u.dtype)
        if functional:
            y = torch.matmul(at, (at @ prod.view(n, -1)).view(m, n, -1))  # A^T M A
        else:
            half = torch.mm(at, prod.view(n, -1), out=ws.get("am", m * n * tiles * co, u).view(m, -1))
            y = torch.bmm(at.expand(m, m, n), half.view(m, n, -1), out=ws.get("y", m * m * tiles * co, u).view(m, m, -1))
        y = y.view(m, m, b, r1 - r0, tw, co).permute(2, 3, 0, 4, 1, 5)  # [B, rows, m, tw, m, C_out]
        if out is None:
            bands.append(y.contiguous())
        else:
            out[:, r0:r1].copy_(y)
    if out is None:
        out = (torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]).to(x.dtype)
    return out.view(b, m * th, m * tw, co)[:, :h, :w].permute(0, 3, 1, 2)


def _conv_by_kernel(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, m: int,
                    band_elements: int) -> torch.Tensor:
    """winograd_conv3x3 with the transforms in our kernel: per band of tile rows, V = B^T d B straight
    from the map (the zero padding is the kernel's bounds check), the products by torch.bmm, and
    A^T M A + bias straight into the output map."""
    b, c, h, w = x.shape
    n, co = m + 2, u.shape[1]
    th, tw = -(-h // m), -(-w // m)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((b, co, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    rows = max(1, band_elements // (n * n * b * tw * max(c, co)))
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        tiles = b * (r1 - r0) * tw
        v = _WORKSPACE.get("v", n * n * tiles * c, u).view(n * n, tiles, c)
        torch.ops.imagine.winograd_input(x, m, r0, r1, v)
        prod = torch.bmm(v, u.transpose(1, 2), out=_WORKSPACE.get("prod", n * n * tiles * co, u).view(n * n, tiles, co))
        torch.ops.imagine.winograd_output(prod, bias, m, r0, r1, out)  # Lavin & Gray eq. 12, then eq. 10's A^T . A
    return out


def winograd_eligible(conv: nn.Conv2d) -> bool:
    """A 3x3, stride-1, padding-1 (zeros), undilated, ungrouped convolution."""
    return (type(conv) in (nn.Conv2d, WinogradConv2d) and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and tuple(conv.padding) == (1, 1))


class WinogradBudget:
    """Memory for transformed filters shared by the layers one `use_winograd` call converted, beyond what each
    layer holds for itself (`WinogradConv2d._reserved`): a layer that has built one U draws a second one from
    here, and where there is none left it lets its other U go (memory only: a layer's tiles are fixed)."""

    def __init__(self, free: int = 0):
        self.free = int(free)

    def take(self, n: int) -> bool:
        with _BUDGET_LOCK:
            if n > self.free:
                return False
            self.free -= n
            return True

    def give(self, n: int) -> None:
        with _BUDGET_LOCK:
            self.free += n


_BUDGET_LOCK = threading.Lock()  # (module-level: a budget, like the layers, stays deep-copyable)


_LAYER_LOCKS: "weakref.WeakKeyDictionary[WinogradConv2d, threading.Lock]" = weakref.WeakKeyDictionary()
_LAYER_LOCKS_LOCK = threading.Lock()


def _layer_lock(layer: "WinogradConv2d") -> threading.Lock:
    """The lock a layer builds its U under (kept outside the module, which stays deep-copyable)."""
    with _LAYER_LOCKS_LOCK:
        lock = _LAYER_LOCKS.get(layer)
        if lock is None:
            lock = _LAYER_LOCKS[layer] = threading.Lock()
        return lock


class WinogradConv2d(PackedConv2d):
    """An nn.Conv2d (same parameters and state-dict keys) that runs `winograd_conv3x3` on maps of
    at least `min_pixels` and with at least `min_channels` input channels, and the direct
    convolution otherwise, with its weight packed for oneDNN (`prepacked.PackedConv2d`). The tile is
    `best_tile` of the map if it is one of the layer's `_tiles`, else F(4x4) (`tile_for`): the tiles are
    fixed by `use_winograd`, so that the tile, and with it the rounding, of a map never depends on the calls
    before it (in this layer or in others). U is built at the first call that needs it and rebuilt if the
    weight changes; it is a cache, not part of the state dict. The layer holds memory (`_reserved`) for the
    largest of its tiles' U; a second U comes from its budget's shared memory, and where there is none
    left the U built before is let go (rebuilt when needed again). Inference only: under autograd it runs
    direct.

    `_source`, when set (a bf16 fast copy, see `use_winograd`'s `float32_from`), holds the float32
    weight and bias of the original layer: U is built from those and the Winograd arithmetic runs in
    float32 on the bf16 map, the output rounded to bf16 like the direct bf16 convolution's."""

    min_channels = MIN_CHANNELS
    min_pixels = MIN_PIXELS
    band_elements: int | None = None  # winograd_conv3x3's default
    _tiles: frozenset = frozenset((2, TILE))  # the output tiles this layer may use (TILE always)
    _reserved: int = 0  # bytes set aside for this layer by use_winograd and not held by a U
    _drawn: int = 0  # bytes of the U held that came from the budget's shared memory
    _budget: WinogradBudget | None = None
    _u: dict | None = None  # tile -> U
    _u_stamp: tuple | None = None
    _source: tuple | None = None  # (float32 weight, bias) to build U from, instead of self's

    def tile_for(self, h: int, w: int) -> int:
        """The output tile for h x w maps: `best_tile`'s, if this layer may use it, else F(4x4)."""
        tile = best_tile(h, w)
        return tile if tile in self._tiles else TILE

    def _release(self, nbytes: int) -> None:
        """A U of `nbytes` let go: its memory goes back where it came from (the shared memory first)."""
        back = min(nbytes, self._drawn)
        if back and self._budget is not None:
            self._budget.give(back)
        self._drawn -= back
        self._reserved += nbytes - back

    def _charge(self, nbytes: int) -> bool:
        """Memory for a new U of `nbytes`: the layer's own first, then the shared memory."""
        own = min(nbytes, self._reserved)
        need = nbytes - own
        if need and (self._budget is None or not self._budget.take(need)):
            return False
        self._reserved -= own
        self._drawn += need
        return True

    def _transformed(self, tile: int) -> torch.Tensor:
        wt = self.weight if self._source is None else self._source[0]
        built = self._u
        if built and tile in built and self._u_stamp == weight_stamp(wt):  # the per-call path: no lock
            return built[tile]
        with _layer_lock(self):  # two threads' first calls build one U and charge it once
            if self._u is None or self._u_stamp != weight_stamp(wt):  # a new weight: the old U go first
                for u in (self._u or {}).values():
                    self._release(u.numel() * u.element_size())
                self._u, self._u_stamp = {}, weight_stamp(wt, pin=True)
            if tile not in self._u:
                cost = filter_bytes(wt, tile)
                if not self._charge(cost):  # no shared memory left: the U built before make room
                    for u in self._u.values():
                        self._release(u.numel() * u.element_size())
                    self._u = {}
                    if not self._charge(cost):  # (not from use_winograd, whose reservation covers each tile)
                        self._reserved -= min(cost, self._reserved)
                # Not an inference tensor even when built under torch.inference_mode: autograd may read it later.
                with torch.inference_mode(False), torch.no_grad():
                    u = winograd_filter(wt, tile)
                self._u = {**self._u, tile: u}  # a new dict: calls on other threads read it without the lock
            return self._u[tile]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.ndim == 4 and x.shape[1] >= self.min_channels and x.shape[-2] * x.shape[-1] >= self.min_pixels
                and x.dtype == self.weight.dtype and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            if x.shape[0] == 0:  # an empty batch: no U to build for it
                return x.new_empty((0, self.out_channels, *x.shape[-2:])).contiguous(memory_format=torch.channels_last)
            tile = self.tile_for(x.shape[-2], x.shape[-1])
            if torch.compiler.is_compiling():
                # The graph reads the U built eagerly, under the memory budget (`_Autocast` makes one
                # eager call before it compiles). A U computed in the graph would be folded into a
                # second copy of every U and ignore the budget: SD 1.5's 8 GB twice, out of memory on
                # a 24 GB machine. Without this tile's U built the layer runs direct.
                u = (self._u or {}).get(tile)
                if u is None:
                    return self._direct(x)
            else:
                u = self._transformed(tile)
            return winograd_conv3x3(x, u, self.bias if self._source is None else self._source[1], self.band_elements)
        return self._direct(x)


_CONVERTED: "weakref.WeakSet[WinogradConv2d]" = weakref.WeakSet()


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_budget_bytes() -> int:
    """$IMAGINE_WINOGRAD_GB gigabytes if set (0 turns Winograd off), else half the memory available
    now less what earlier conversions reserved and have not built yet (the filters are built at
    the first call, so a VAE converted right after a U-Net must not count the U-Net's share as
    free); a quarter of the RAM where the available memory cannot be read."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if value:
        try:
            gb = float(value)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of gigabytes (0 turns Winograd off); got {value!r}")
        if not gb >= 0:
            raise ValueError(f"{BUDGET_ENV} must be >= 0; got {value!r}")
        return int(gb * 2**30)
    available = _available_bytes()
    if available is not None:
        promised = sum(m._reserved for m in _CONVERTED) + sum(
            b.free for b in {id(m._budget): m._budget for m in _CONVERTED if m._budget is not None}.values())
        return max(0, available - promised) // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _narrow(conv: nn.Conv2d) -> bool:
    return NARROW_CHANNELS <= conv.in_channels < MIN_CHANNELS and conv.out_channels >= NARROW_CHANNELS


def winograd_candidates(module: nn.Module, narrow: bool = False) -> list[nn.Conv2d]:
    """The plain nn.Conv2d layers inside `module` that `use_winograd` may convert: eligible, with at
    least MIN_CHANNELS input channels, or with `narrow` also NARROW_CHANNELS in and out."""
    return [m for m in module.modules()
            if type(m) is nn.Conv2d and winograd_eligible(m) and (m.in_channels >= MIN_CHANNELS or narrow and _narrow(m))]


def use_winograd(module: nn.Module, budget_bytes: int | None = None, float32_from: nn.Module | None = None,
                 min_pixels: int | None = None, narrow: bool = False) -> int:
    """Turn eligible nn.Conv2d layers inside `module` into WinogradConv2d in place (same objects,
    same parameters), as many as their F(4x4) filters fit in `budget_bytes` (default
    `default_budget_bytes()`); returns how many. What is left of the budget then gives F(6x6), for
    large maps, to as many of them as it covers, smallest weights first, the later of equal ones
    first (its U takes 64/9 of the weight against 36/9: each such layer is given the difference);
    the rest stays shared by these layers, to hold a second U at once.

    `float32_from`: the float32 module `module` is a lower-precision copy of (same layout): each
    converted layer builds its U from the original's float32 weight, and computes in float32
    (see WinogradConv2d). `min_pixels`: the converted layers' smallest map for Winograd (default
    MIN_PIXELS).

    U costs 4x its weight, and in a U-Net or VAE the small weights are the ones on the large maps
    (the channels double as the map halves), where a convolution takes as long as a deep level's
    for a fraction of the memory: so the smallest weights are taken first. (SD 1.5's U-Net: its
    3x3 filters on maps of 32x32 and more need 1 GB of U, those on 16x16 3.1 GB more, those on 8x8
    4.7 GB more.) Whether a call runs Winograd or direct, and with which of the layer's tiles, is
    decided per call from the map's size alone (see WinogradConv2d).

    `narrow`: also the layers with NARROW_CHANNELS to MIN_CHANNELS input channels (and NARROW_CHANNELS or
    more out), run by Winograd on maps of NARROW_MIN_PIXELS or more only (see NARROW_CHANNELS)."""
    budget = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
    candidates = winograd_candidates(module, narrow)
    position = {id(m): i for i, m in enumerate(candidates)}  # module order
    sources = {}
    if float32_from is not None:
        originals = dict(float32_from.named_modules())
        wanted = {id(c) for c in candidates}
        for name, m in module.named_modules():
            if id(m) in wanted:
                src = originals.get(name)
                if not isinstance(src, nn.Conv2d) or src.weight.shape != m.weight.shape:
                    raise ValueError(f"use_winograd: float32_from has no convolution {name!r} of shape "
                                     f"{tuple(m.weight.shape)}")
                sources[id(m)] = (src.weight.detach().float(),
                                  None if src.bias is None else src.bias.detach().float())
    candidates.sort(key=lambda m: m.weight.numel())  # stable: equal sizes keep the module order
    shared = WinogradBudget()
    converted = []
    for m in candidates:
        source = sources.get(id(m))
        cost = filter_bytes(m.weight if source is None else source[0], TILE)
        if cost > budget:
            break
        budget -= cost
        m.__class__ = WinogradConv2d
        m._reserved, m._drawn, m._budget, m._u, m._u_stamp, m._source = cost, 0, shared, None, None, source
        m._tiles = frozenset((2, TILE))  # F(2x2)'s U is smaller than F(4x4)'s: the same memory serves it
        if min_pixels is not None:
            m.min_pixels = int(min_pixels)
        if m.in_channels < MIN_CHANNELS:
            m.min_channels, m.min_pixels = NARROW_CHANNELS, max(m.min_pixels, NARROW_MIN_PIXELS)
        _CONVERTED.add(m)
        converted.append(m)
    # What is left gives F(6x6) to the layers with the smallest weights first (those on the largest maps): the
    # memory of its U over F(4x4)'s. Decided here, once, so that a map's tile does not depend on which layers
    # happened to run a large map first. Among equal weights the later layer first: in a U-Net's up path (and a
    # VAE's decoder, after its encoder) the later of two equal layers sits on the larger map, such as the
    # convolution of an upsampler (SD 1.5 at 512x512: its 12 layers on 64x64 maps take 220 MB more this way).
    for m in sorted(converted, key=lambda m: (m.weight.numel(), -position[id(m)])):
        wt = m.weight if m._source is None else m._source[0]
        extra = filter_bytes(wt, 6) - filter_bytes(wt, TILE)
        if extra > budget:
            break
        budget -= extra
        m._reserved += extra
        m._tiles = m._tiles | {6}
    shared.free = budget if converted else 0  # for a second U held at once
    return len(converted)


def winograd_bytes(module: nn.Module) -> int:
    """Memory held by the transformed filters built so far inside `module` (they are built at a
    layer's first Winograd call)."""
    return sum(t.numel() * t.element_size() for m in module.modules()
               if isinstance(m, WinogradConv2d) and m._u for t in m._u.values())
