"""Winograd's F(4x4, 3x3) and F(6x6, 3x3) (Lavin & Gray 2016) against the float64 direct
convolution, and their use in the fast mode on CPUs without native bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imagine.models import winograd
from imagine.models.winograd import (
    WinogradConv2d,
    default_budget_bytes,
    use_winograd,
    winograd_candidates,
    winograd_conv3x3,
    winograd_filter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("m", sorted(winograd.TRANSFORMS))
def test_one_dimensional_minimal_filtering_is_exact_correlation(m):
    """Lavin & Gray eq. 10: Y = A^T [(G g) . (B^T d)] gives the m outputs of a 3-tap correlation
    over m + 2 inputs, exactly (float64), for random d and g and for every basis pair."""
    bt, g_, at = (torch.tensor(t, dtype=torch.float64) for t in winograd.TRANSFORMS[m])
    assert bt.shape == (m + 2, m + 2) and g_.shape == (m + 2, 3) and at.shape == (m, m + 2)
    gen = torch.Generator().manual_seed(m)
    d, g = torch.randn(m + 2, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    y = at @ ((g_ @ g) * (bt @ d))
    want = torch.stack([(d[i:i + 3] * g).sum() for i in range(m)])
    assert torch.allclose(y, want, rtol=0, atol=1e-12)
    eye_d, eye_g = torch.eye(m + 2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    for i in range(m + 2):
        for k in range(3):
            y = at @ ((g_ @ eye_g[k]) * (bt @ eye_d[i]))
            want = torch.tensor([float(i - j == k) for j in range(m)], dtype=torch.float64)
            assert torch.allclose(y, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("b,c,co,h,w", [(2, 8, 5, 12, 12), (1, 7, 3, 13, 9), (3, 16, 16, 5, 22), (1, 4, 6, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", sorted(winograd.TRANSFORMS))
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-ops"])
def test_conv_matches_float64_direct_as_closely_as_float32_direct(b, c, co, h, w, bias, tile, kernel, monkeypatch):
    """Both ways to the transforms: our C++ kernel (where the CPU has AVX-512) and torch's ops."""
    if kernel and not winograd.transform_kernel():
        pytest.skip("the transform kernel needs AVX-512")
    if not kernel:
        monkeypatch.setenv(winograd.KERNEL_ENV, "0")
    gen = torch.Generator().manual_seed(b * 100 + h)
    x = torch.randn(b, c, h, w, generator=gen)
    weight = torch.randn(co, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    bvec = torch.randn(co, generator=gen) if bias else None
    truth = F.conv2d(x.double(), weight.double(), None if bvec is None else bvec.double(), padding=1)
    direct = F.conv2d(x, weight, bvec, padding=1)
    u = winograd_filter(weight, tile)
    # F(6x6)'s transforms have larger weights (B^T up to 21/4, A^T up to 32): measured 3-4x the
    # direct float32 error on SD's shapes, F(4x4)'s about 2x; F(2x2)'s (0, +-1, 1/2) less than 1x.
    factor = {2: 2, 4: 4, 6: 8}[tile]
    for layout in (torch.contiguous_format, torch.channels_last):
        for band in (None, 1):  # one band, and one tile row per band
            y = winograd_conv3x3(x.contiguous(memory_format=layout), u, bvec, band_elements=band)
            assert y.shape == direct.shape
            assert _rel(y, truth) <= max(factor * _rel(direct, truth), factor / 2 * 1e-6)


@pytest.mark.parametrize("m", sorted(winograd.TRANSFORMS))
def test_filter_transform_is_G_g_G_transposed(m):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.tensor(winograd.TRANSFORMS[m][1], dtype=torch.float64)
    u = winograd_filter(weight, m)
    n = m + 2
    assert u.shape == (n * n, 3, 2) and winograd.filter_bytes(weight, m) == u.numel() * 8
    for o in range(3):
        for i in range(2):
            assert torch.allclose(u[:, o, i].view(n, n), g @ weight[o, i] @ g.T, atol=1e-12)


def test_best_tile_counts_the_products_of_whole_tiles():
    """F(6x6) needs 64 products per 36 outputs, F(4x4) 36 per 16: 6 wins by 10% or more on SD's 64x64
    and 48x48 maps (and 24, 96, ...); on 32x32 the padding to 36 eats the gain (36 tiles of 64 against
    64 tiles of 36), and under 24x24 the measured transform cost decides for 4. Where F(4x4) would
    have fewer than FEW_TILES tiles a map, F(2x2)'s smaller U wins."""
    sides = (4, 8, 12, 16, 23, 24, 32, 48, 64, 96, 128, 512)
    assert [winograd.best_tile(s, s) for s in sides] == [2, 2, 4, 4, 4, 6, 4, 6, 6, 6, 6, 6]
    assert winograd.best_tile(64, 16) == 4 and winograd.best_tile(64, 30) == 6


def test_an_image_is_computed_alike_in_any_batch():
    """The tile is chosen per map, not per call: an image's output is bit-identical alone and in a batch of 4
    (on 8x8 maps a per-call count once picked F(2x2) for one image and F(4x4) for four)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    assert use_winograd(conv, budget_bytes=2**30, min_pixels=1) == 1
    x = torch.randn(4, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(x)[2:3], conv(x[2:3]))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"3x3 filters \[C_out, C_in, 3, 3\]"):
        winograd_filter(torch.zeros(4, 4, 5, 5))
    with pytest.raises(ValueError, match="does not take 8 input channels"):
        winograd_conv3x3(torch.zeros(1, 8, 4, 4), winograd_filter(torch.zeros(2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"output tiles \[2, 4, 6\]; got 5"):
        winograd_filter(torch.zeros(2, 3, 3, 3), 5)
    with pytest.raises(ValueError, match="planes"):
        winograd_conv3x3(torch.zeros(1, 3, 4, 4), torch.zeros(49, 2, 3))


def _conv(cin=256, cout=8, **kw):
    torch.manual_seed(0)
    return torch.nn.Conv2d(cin, cout, 3, padding=1, **kw).eval().requires_grad_(False)


def test_layer_keeps_its_parameters_and_falls_back_to_direct_where_winograd_does_not_pay():
    conv = _conv()
    keys = list(conv.state_dict())
    weight = conv.weight
    x_big = torch.randn(1, 256, 8, 8)
    want = conv(x_big)
    assert use_winograd(conv, budget_bytes=2**30) == 1 and type(conv) is WinogradConv2d
    assert list(conv.state_dict()) == keys and conv.weight is weight
    y = conv(x_big)
    assert _rel(y, want) < 1e-5 and not torch.equal(y, want)  # the Winograd path ran
    # Under MIN_PIXELS: direct, with the weight packed for oneDNN (packed at this first direct call),
    # which rounds as a direct float32 convolution does (not always as F.conv2d's own kernel choice).
    x_small = torch.randn(1, 256, 3, 3)
    assert conv._pack is None
    assert _rel(conv(x_small), F.conv2d(x_small.double(), conv.weight.double(), conv.bias.double(), padding=1)) < 1e-6
    assert conv._pack is not None
    with torch.no_grad():  # an in-place change of the weight rebuilds U
        conv.weight.mul_(2)
    assert _rel(conv(x_big), 2 * want - conv.bias.view(1, -1, 1, 1)) < 1e-5


def test_layer_runs_direct_under_autograd():
    conv = _conv().requires_grad_(True)
    use_winograd(conv, budget_bytes=2**30)
    x = torch.randn(1, 256, 8, 8)
    y = conv(x)
    assert y.requires_grad and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_only_eligible_layers_are_converted_smallest_weights_first_within_the_budget():
    torch.manual_seed(0)
    small, large = _conv(256, 8), _conv(512, 64)
    net = torch.nn.Sequential(large, small, _conv(255, 8), _conv(256, 8, stride=2), _conv(256, 8, dilation=2),
                              torch.nn.Conv2d(256, 8, 1), _conv(256, 8, groups=2))
    one = 4 * small.weight.numel() * 4
    assert use_winograd(net, budget_bytes=one) == 1
    assert type(small) is WinogradConv2d and type(large) is torch.nn.Conv2d
    assert use_winograd(net, budget_bytes=0) == 0
    assert use_winograd(net, budget_bytes=2**40) == 1 and type(large) is WinogradConv2d
    assert sum(type(m) is WinogradConv2d for m in net) == 2  # channels < 256, stride, dilation, 1x1, groups: direct


def test_the_larger_tile_is_given_where_the_budget_allows_smallest_weights_first():
    """Each layer reserves its F(4x4) U (36/9 of the weight); what the use_winograd call has left gives F(6x6)
    (64/9) to layers, smallest weights first, each the difference. A layer without it runs F(4x4) on large maps
    too; a layer with it runs F(4x4) on the maps where 4 is the tile, letting its F(6x6) U go where no memory
    is left to hold both (rebuilt when needed again): the tile of a map never depends on the calls before."""
    a, b = _conv(256, 8), _conv(256, 8)
    net = torch.nn.Sequential(b, a)
    f4, f6 = winograd.filter_bytes(a.weight, 4), winograd.filter_bytes(a.weight, 6)
    assert use_winograd(net, budget_bytes=2 * f4 + (f6 - f4)) == 2  # room for one F(6) U
    assert a._tiles == {2, 4, 6} and b._tiles == {2, 4}  # equal sizes: the later module (an up path's larger map)
    x_big, x_small = torch.randn(1, 256, 24, 24), torch.randn(1, 256, 20, 20)
    for conv in (b, a):  # (b first: the order of the calls decides nothing)
        want = F.conv2d(x_big, conv.weight, conv.bias, padding=1)
        assert _rel(conv(x_big), want) < 1e-5
    assert sorted(a._u) == [6] and sorted(b._u) == [4]
    assert a._budget is b._budget and a._budget.free == 0
    assert winograd.winograd_bytes(net) == f6 + f4
    small = a(x_small)
    assert torch.equal(small, winograd_conv3x3(x_small, winograd_filter(a.weight, 4), a.bias))
    assert sorted(a._u) == [4] and winograd.winograd_bytes(net) == 2 * f4  # no memory for both: F(6)'s let go
    assert torch.equal(a(x_big), winograd_conv3x3(x_big, winograd_filter(a.weight, 6), a.bias))
    assert sorted(a._u) == [6] and a._budget.free == 0 and a._reserved == 0
    assert _rel(b(x_small), F.conv2d(x_small, b.weight, b.bias, padding=1)) < 1e-5 and sorted(b._u) == [4]
    with torch.no_grad():  # a new weight rebuilds the same tiles within the same memory
        a.weight.mul_(2)
    assert _rel(a(x_big), 2 * F.conv2d(x_big, a.weight / 2, None, padding=1) + a.bias.view(1, -1, 1, 1)) < 1e-5
    assert winograd.winograd_bytes(net) == f6 + f4 and a._budget.free == 0
    c = _conv(256, 8)  # a generous budget: F(4) and F(6) both held, the second from what was left
    assert use_winograd(c, budget_bytes=2**30) == 1
    c(x_big), c(x_small)
    assert sorted(c._u) == [4, 6] and c._budget.free == 2**30 - f4 - f6


def test_calls_with_few_tiles_use_the_small_tile_within_the_reservation():
    """F(2x2)'s U is 16/9 of the weight: built where F(4x4) would have under FEW_TILES tiles, from the
    layer's reservation (its F(4x4) U). A later call that wants F(4x4), without memory for both, lets it go
    and builds F(4x4): each map runs its own tile, as in a fresh process."""
    conv = _conv(256, 8)
    f2, f4 = (winograd.filter_bytes(conv.weight, m) for m in (2, 4))
    assert use_winograd(conv, budget_bytes=f4) == 1 and conv._budget.free == 0
    assert conv._tiles == {2, 4}
    small = torch.randn(2, 256, 8, 8)  # 8 tiles of F(4x4)
    first = conv(small)
    assert _rel(first, F.conv2d(small, conv.weight, conv.bias, padding=1)) < 1e-5
    assert sorted(conv._u) == [2] and winograd.winograd_bytes(conv) == f2 and conv._reserved == f4 - f2
    x = torch.randn(2, 256, 16, 16)  # 32 tiles: F(4x4) is the tile
    assert torch.equal(conv(x), winograd_conv3x3(x, winograd_filter(conv.weight, 4), conv.bias))
    assert sorted(conv._u) == [4] and conv._reserved == 0
    assert torch.equal(conv(small), first) and sorted(conv._u) == [2]


def test_default_budget_is_half_the_available_memory_less_what_is_promised(monkeypatch):
    monkeypatch.delenv(winograd.BUDGET_ENV, raising=False)
    monkeypatch.setattr(winograd, "_available_bytes", lambda: 10 * 2**30)
    monkeypatch.setattr(winograd, "_CONVERTED", __import__("weakref").WeakSet())
    assert default_budget_bytes() == 5 * 2**30
    conv = _conv(256, 8)
    assert use_winograd(conv, budget_bytes=2**30) == 1  # 1 GB promised: reserved plus the shared pool
    assert default_budget_bytes() == (9 * 2**30) // 2
    conv(torch.randn(1, 256, 20, 20))  # the F(4) U is built: no longer promised (it is no longer available either)
    assert default_budget_bytes() == (9 * 2**30 + winograd.filter_bytes(conv.weight, 4)) // 2
    monkeypatch.setattr(winograd, "_available_bytes", lambda: None)  # no /proc/meminfo: a quarter of the RAM
    assert 0 < default_budget_bytes() <= __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES") // 4


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(winograd.BUDGET_ENV, "1.5")
    assert default_budget_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv(winograd.BUDGET_ENV, "0")
    assert default_budget_bytes() == 0
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(winograd.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=winograd.BUDGET_ENV):
            default_budget_bytes()
    monkeypatch.delenv(winograd.BUDGET_ENV)
    assert default_budget_bytes() > 0


def test_layer_compiles_with_torch_compile():
    """IMAGINE_COMPILE=1 compiles the fast copy: the graph reads the U an eager call built (no second
    copy of it), the bands are concatenated; before any U is built the compiled layer runs direct."""
    import torch._inductor.config as inductor_config

    conv = _conv(256, 16)
    use_winograd(conv, budget_bytes=2**30)
    conv.band_elements = 1  # several bands
    x = torch.randn(1, 256, 12, 8)
    want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.inference_mode():
        torch._dynamo.reset()
        direct = torch.compile(conv)(x)  # no U yet: the direct convolution
        assert conv._u == {} or conv._u is None
        assert _rel(direct, want) < 1e-5
        torch._dynamo.reset()
        eager = conv(x)  # builds U
        (u,) = conv._u.values()
        with inductor_config.patch(freezing=True):
            got = torch.compile(conv)(x)
    assert _rel(got, want) < 1e-5 and not torch.equal(got, direct)
    assert torch.allclose(got, eager, rtol=0, atol=1e-5)
    assert next(iter(conv._u.values())) is u  # the same U, not rebuilt


@pytest.mark.usefixtures("no_bf16_mode")
def test_compiled_fast_unet_reads_the_eagerly_built_filters():
    """_Autocast with compile=True: its first call runs eagerly (building U under the budget), the next
    compiled; U is built once and the compiled answer is the eager one (float32 rounding apart)."""
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.pipelines.text_to_image import _Autocast

    try:
        torch.manual_seed(0)
        # (one level without attention: inductor's compile is most of the test's time, 80 s on an AVX2 CPU with two
        # levels and attention; the Winograd layers are what it checks)
        cfg = UNetConfig(block_out_channels=(256,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                         layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, mid_block_type=None)
        unet = UNet2DConditionModel(cfg).eval().requires_grad_(False)
        fast = _Autocast(unet, compile=True)
        x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), None  # (no text: no attention)
        assert fast._needs_eager_call()
        with torch.inference_mode():
            torch._dynamo.reset()
            first = fast(x, t, context=ctx)
            assert not fast._needs_eager_call()
            us = {id(u) for m in fast.fast.modules() if isinstance(m, WinogradConv2d) for u in (m._u or {}).values()}
            second = fast(x, t, context=ctx)
            exact = unet(x, t, context=ctx)
        assert us == {id(u) for m in fast.fast.modules() if isinstance(m, WinogradConv2d) for u in (m._u or {}).values()}
        assert _rel(first, exact) < 1e-5 and _rel(second, exact) < 1e-5
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("no_bf16_mode")
def test_fast_copy_without_native_bf16_shares_weights_and_runs_winograd(monkeypatch):
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.pipelines.text_to_image import _Autocast, exact_copy, fast_copy

    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(256, 256), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     cross_attention_dim=32, attention_head_dim=4)
    unet = UNet2DConditionModel(cfg).eval().requires_grad_(False)
    monkeypatch.setenv(winograd.BUDGET_ENV, "0")
    assert fast_copy(unet) is exact_copy(unet)  # Winograd turned off: the exact mode's float32 copy
    monkeypatch.delenv(winograd.BUDGET_ENV)
    copy = fast_copy(unet)
    assert copy is not unet and fast_copy(unet) is copy
    assert sum(type(m) is WinogradConv2d for m in copy.modules()) > 0
    assert not any(type(m) is WinogradConv2d for m in unet.modules())  # the exact model stays direct
    ours = dict(copy.named_parameters())
    # No second copy of the weights, but for the 3x3 filters that stay direct (here the stride-2
    # downsampler): channels-last copies, so that oneDNN does not reorder them at every call.
    copied = [k for k, p in unet.named_parameters() if p is not ours[k]]
    assert copied == ["down_blocks.0.downsamplers.0.conv.weight"]
    assert torch.equal(ours[copied[0]], unet.get_parameter(copied[0]))
    assert ours[copied[0]].is_contiguous(memory_format=torch.channels_last)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    exact = unet(x, torch.tensor([10.0, 900.0]), context=ctx)
    fast = _Autocast(unet, compile=False)(x, torch.tensor([10.0, 900.0]), context=ctx)
    assert fast.dtype == torch.float32 and _rel(fast, exact) < 1e-5 and not torch.equal(fast, exact)


def test_workspace_serves_calls_in_and_out_of_inference_mode():
    """The reused buffers made under inference_mode are inference tensors: a later call under
    no_grad (or with autograd off by requires_grad=False) must not write into them."""
    conv = _conv(256, 16)
    use_winograd(conv, budget_bytes=2**30)
    x = torch.randn(1, 256, 12, 12)
    want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.inference_mode():
        a = conv(x)
    with torch.no_grad():
        b = conv(x)
    c = conv(x)  # grad mode on, nothing requires grad: still the workspace path
    with torch.inference_mode():
        d = conv(x)
    for got in (a, b, c, d):
        assert _rel(got, want) < 1e-5
    assert conv._u


def test_bf16_map_with_float32_filters_is_closer_than_the_direct_bf16_convolution():
    """A bf16 copy's layer: the bf16 map, U from the float32 weight, float32 arithmetic, a bf16 output.
    Against float64 from the same bf16 input and the float32 weight, its only loss is the output's
    rounding to bf16, less than the direct bf16 convolution's (whose weight is rounded too)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 256, 20, 20, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(256, 256, 3, 3, generator=g) * 0.02, torch.randn(256, generator=g)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    direct = F.conv2d(x, weight.bfloat16(), bias.bfloat16(), padding=1)
    for tile in (2, 4, 6):
        y = winograd_conv3x3(x, winograd_filter(weight, tile), bias)
        assert y.dtype == torch.bfloat16
        assert _rel(y, want) < 0.85 * _rel(direct, want) and _rel(y, want) < 3e-3  # measured 0.72x for F(2x2)


def test_bf16_copy_builds_its_filters_from_the_float32_original():
    original = torch.nn.Sequential(_conv(256, 8), torch.nn.Conv2d(256, 256, 1))
    copy = __import__("copy").deepcopy(original).bfloat16()
    assert use_winograd(copy, budget_bytes=2**30, float32_from=original, min_pixels=16 * 16) == 1
    conv = copy[0]
    assert conv._source[0] is not original[0].weight and torch.equal(conv._source[0], original[0].weight)
    x_small = torch.randn(1, 256, 8, 8).bfloat16()  # under min_pixels: the bf16 copy's direct convolution
    assert torch.equal(conv(x_small), F.conv2d(x_small, conv.weight, conv.bias, padding=1))
    conv(torch.randn(1, 256, 16, 16).bfloat16())
    assert [u.dtype for u in conv._u.values()] == [torch.float32]
    with pytest.raises(ValueError, match="no convolution '0'"):
        use_winograd(__import__("copy").deepcopy(original).bfloat16(), float32_from=torch.nn.Sequential())


@pytest.mark.usefixtures("bf16_mode")
@pytest.mark.parametrize("amx", [False, True], ids=["AVX512-BF16", "AMX"])
def test_bf16_fast_copy_uses_float32_winograd_except_with_amx(monkeypatch, amx):
    """A bf16 fast copy converts its large 3x3 convolutions to float32 Winograd from the original's float32
    weights, unless the CPU has AMX (whose bf16 convolutions are the faster); the step agrees with exact."""
    from imagine import hardware
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.pipelines.text_to_image import _Autocast, fast_copy

    monkeypatch.setattr(hardware, "amx", lambda: amx)
    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(256, 256), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     cross_attention_dim=32, attention_head_dim=4)
    unet = UNet2DConditionModel(cfg).eval().requires_grad_(False)
    copy = fast_copy(unet)
    convs = [m for m in copy.modules() if type(m) is WinogradConv2d]
    assert next(copy.parameters()).dtype == torch.bfloat16
    assert bool(convs) is not amx
    assert all(m._source[0].dtype == torch.float32 and m.min_pixels == 16 * 16 for m in convs)
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 5, 32)
    with torch.inference_mode():
        exact = unet(x, torch.tensor([10.0, 900.0]), context=ctx)
        fast = _Autocast(unet, compile=False)(x, torch.tensor([10.0, 900.0]), context=ctx)
    assert _rel(fast, exact) < 3e-2
    assert all(m._u for m in convs if m.in_channels >= 256)  # the 32x32 and 16x16 maps ran Winograd


def test_narrow_layers_run_winograd_only_on_large_maps():
    """With `narrow`, 128-255 input channels and 128 or more out are converted too, but run Winograd
    only on maps of NARROW_MIN_PIXELS or more; a narrow output (128 -> 3) stays a plain convolution."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.Conv2d(128, 3, 3, padding=1),
                              torch.nn.Conv2d(64, 128, 3, padding=1)).eval()
    assert winograd_candidates(net) == [] and winograd_candidates(net, narrow=True) == [net[0]]
    assert use_winograd(net, budget_bytes=2**30, narrow=True) == 1
    conv = net[0]
    assert type(conv) is WinogradConv2d and type(net[1]) is torch.nn.Conv2d
    assert conv.min_channels == winograd.NARROW_CHANNELS and conv.min_pixels == winograd.NARROW_MIN_PIXELS
    side = int(winograd.NARROW_MIN_PIXELS ** 0.5)
    with torch.inference_mode():
        small = torch.randn(1, 128, side // 2, side // 2)
        direct = F.conv2d(small.double(), conv.weight.double(), conv.bias.double(), padding=1)
        assert _rel(conv(small), direct) < 1e-5
        assert not conv._u  # the direct path ran
        large = torch.randn(1, 128, side, side)
        got = conv(large)
        truth = F.conv2d(large.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert conv._u  # Winograd ran
    assert _rel(got, truth) < 1e-5
