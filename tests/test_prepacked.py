"""Weights packed for oneDNN (imagine/models/prepacked.py): the packed layers against float64 and
against torch's own F.linear / F.conv2d on the same bf16 weights, where they must agree bit for bit
(channels-last, as in the fast copies)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from imagine.models import prepacked
from imagine.models.prepacked import PackedConv2d, PackedLinear, use_prepacked

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not prepacked.available(), reason="this torch build has no oneDNN")]
CL = torch.channels_last


def _bf16_packs() -> bool:
    """Whether this CPU packs bf16 weights: oneDNN's bf16 reorder needs AVX-512 (bw, vl, dq) or AVX-NE-CONVERT; on an
    AVX2-only CPU it refuses, and the layers run plain (the fast copy is float32 there: hardware.native_bf16)."""
    layer = PackedLinear(8, 8).bfloat16()
    with torch.inference_mode():
        layer(torch.zeros(2, 8, dtype=torch.bfloat16))
    return layer._pack is not None


# the bf16 packed path, where the CPU has it
needs_bf16_packs = pytest.mark.skipif(prepacked.available() and not _bf16_packs(),
                                      reason="this CPU has no bf16 weight packing (oneDNN needs AVX-512 or AVX-NE-CONVERT)")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.Linear(80, 32, bias=False))


@needs_bf16_packs
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48)])
def test_linear_matches_float64_and_torch_bit_for_bit_in_bf16(shape):
    ref = _layers()
    fast = _layers().bfloat16()
    assert use_prepacked(fast) == 2 and all(type(m) is PackedLinear for m in fast)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = fast(x.bfloat16())
        plain = F.linear(F.linear(x.bfloat16(), fast[0].weight, fast[0].bias), fast[1].weight)
        truth = ref.double()(x.double())
    assert fast[0]._pack is not None and fast[0]._pack.layout == torch._mkldnn  # the packed path ran
    assert torch.equal(got, plain)
    assert _rel(got, truth) < 2e-2  # bf16 weights and products


@needs_bf16_packs
@pytest.mark.parametrize("cin,cout,k,stride,size", [(32, 48, 3, 1, 9), (32, 16, 3, 2, 12), (24, 40, 1, 1, 7)])
def test_conv_matches_float64_and_torch_bit_for_bit_in_bf16_channels_last(cin, cout, k, stride, size):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2).eval()
    truth_of = lambda x: F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=stride, padding=k // 2)
    fast = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2).eval().bfloat16()
    fast.load_state_dict({n: v.bfloat16() for n, v in conv.state_dict().items()})
    fast.weight.data = fast.weight.data.contiguous(memory_format=CL)
    use_prepacked(fast)
    assert type(fast) is PackedConv2d and list(fast.state_dict()) == ["weight", "bias"]
    with torch.inference_mode():
        for batch, side in ((2, size), (1, size + 5)):  # one pack serves another input size
            x = torch.randn(batch, cin, side, side).bfloat16().contiguous(memory_format=CL)
            got = fast(x)
            assert torch.equal(got, F.conv2d(x, fast.weight, fast.bias, stride=stride, padding=k // 2))
            assert _rel(got, truth_of(x)) < 2e-2
    assert fast._pack is not None


def test_an_in_place_change_of_the_weight_repacks():
    lin = _layers()[0].bfloat16()
    use_prepacked(lin)
    x = torch.randn(3, 48).bfloat16()
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        after = lin(x)
    assert torch.equal(after, F.linear(x, lin.weight, lin.bias)) and not torch.equal(after, before)


def test_autograd_and_float64_take_the_plain_path():
    lin = _layers()[0]
    use_prepacked(lin)
    x = torch.randn(3, 48, requires_grad=True)
    y = lin(x)  # a gradient to carry: plain F.linear, no pack
    y.sum().backward()
    assert x.grad is not None and lin._pack is None
    assert torch.equal(lin.double()(x.double()), F.linear(x.double(), lin.weight, lin.bias))
    assert lin._pack is None


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(prepacked.ENV, "0")
    assert use_prepacked(_layers()) == 0


def test_a_pack_that_fails_leaves_the_layer_plain(monkeypatch):
    lin = _layers()[0].bfloat16()
    use_prepacked(lin)

    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    x = torch.randn(3, 48).bfloat16()
    with torch.inference_mode():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert lin._pack_failed and lin._pack is None


@needs_bf16_packs
@pytest.mark.usefixtures("bf16_mode")
def test_the_bf16_fast_copy_packs_its_linear_layers_and_direct_convolutions(monkeypatch):
    """The fast copy of an SD-shaped U-Net: every plain linear and convolution becomes packed, the
    original keeps plain layers, and the copy's output is as accurate as with packing turned off."""
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.pipelines import text_to_image

    monkeypatch.setattr(text_to_image, "_FAST_COPIES", type(text_to_image._FAST_COPIES)())
    torch.manual_seed(0)
    cfg = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, cross_attention_dim=24, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(cfg).eval()
    copy = text_to_image.fast_copy(unet)
    kinds = {type(m).__name__ for m in copy.modules()}
    assert "PackedLinear" in kinds and "PackedConv2d" in kinds
    assert not {"Linear", "Conv2d"} & kinds
    assert not {"PackedLinear", "PackedConv2d"} & {type(m).__name__ for m in unet.modules()}
    x, t, ctx = torch.randn(2, 4, 8, 8).bfloat16(), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24).bfloat16()
    with torch.inference_mode():
        packed = copy(x.contiguous(memory_format=CL), t, context=ctx)
        gegl = [m for m in copy.modules() if isinstance(m, prepacked.PackedGEGLU)]
        assert gegl and all(m._pack is not None for m in gegl)  # their projs run as the GEGLU's halves
        assert all(m._pack is not None for m in copy.modules()
                   if isinstance(m, PackedLinear) and not any(m is g.proj for g in gegl))
        monkeypatch.setenv(prepacked.ENV, "0")
        plain = copy(x.contiguous(memory_format=CL), t, context=ctx)
        truth = unet.double()(x.double(), t, context=ctx.double())
    out = lambda o: o.sample if hasattr(o, "sample") else o  # noqa: E731
    # Bit-identical but for the GEGLUs, whose fused halves round once instead of three times: the packed
    # copy is as close to float64 as the plain one, or closer.
    assert _rel(out(packed), out(plain)) < 2e-2
    assert _rel(out(packed), out(truth)) <= 1.1 * _rel(out(plain), out(truth))


def _sd_shaped_unet():
    from imagine.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, cross_attention_dim=24, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(cfg).eval().requires_grad_(False)


def test_the_exact_copy_shares_the_weights_packs_its_layers_and_stays_float32_exact(monkeypatch):
    """The exact mode's copy: the original's own weight tensors (packs aside, no second copy of any
    parameter), packed layers, and the float64 answer to float32's accuracy, as the plain module."""
    from imagine.pipelines import text_to_image

    monkeypatch.setattr(text_to_image, "_EXACT_COPIES", type(text_to_image._EXACT_COPIES)())
    unet = _sd_shaped_unet()
    copy = text_to_image.exact_copy(unet)
    assert copy is not unet and text_to_image.exact_copy(unet) is copy  # made once
    ours = dict(copy.named_parameters())
    assert all(p is ours[k] for k, p in unet.named_parameters())
    kinds = {type(m).__name__ for m in copy.modules()}
    assert {"PackedLinear", "PackedConv2d", "PackedGEGLU"} <= kinds and not {"Linear", "Conv2d", "GEGLU"} & kinds
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24)
    with torch.inference_mode():
        got, plain = copy(x, t, context=ctx), unet(x, t, context=ctx)
        truth = _sd_shaped_unet().double()(x.double(), t, context=ctx.double())
    projs = [m.proj for m in copy.modules() if isinstance(m, prepacked.PackedGEGLU)]  # packed as halves
    assert projs and all(m._pack is not None for m in copy.modules()
                         if isinstance(m, (PackedLinear, PackedConv2d, prepacked.PackedGEGLU))
                         and not any(m is p for p in projs))
    out = lambda o: o.sample if hasattr(o, "sample") else o  # noqa: E731
    assert got.dtype == torch.float32
    assert _rel(out(got), out(truth)) < 1e-5 and _rel(out(plain), out(truth)) < 1e-5
    with torch.no_grad():  # a changed weight makes a new copy, which sees it
        unet.conv_in.weight.mul_(2)
    again = text_to_image.exact_copy(unet)
    assert again is not copy and again.conv_in.weight is unet.conv_in.weight


def test_the_exact_copy_is_the_module_itself_where_packing_is_off_or_does_not_fit(monkeypatch):
    from imagine.models import winograd
    from imagine.pipelines import text_to_image

    monkeypatch.setattr(text_to_image, "_EXACT_COPIES", type(text_to_image._EXACT_COPIES)())
    unet = _sd_shaped_unet()
    packable = text_to_image._packable_bytes(unet)
    assert packable == sum(p.numel() * 4 for k, p in unet.named_parameters()
                           if k.endswith(".weight") and p.ndim in (2, 4))  # every linear and conv weight
    monkeypatch.setattr(winograd, "_available_bytes", lambda: 4 * packable - 4)  # the packs need a quarter
    assert text_to_image.exact_copy(unet) is unet
    monkeypatch.setattr(winograd, "_available_bytes", lambda: 4 * packable)
    monkeypatch.setenv(prepacked.ENV, "0")
    assert text_to_image.exact_copy(unet) is unet
    monkeypatch.delenv(prepacked.ENV)
    assert text_to_image.exact_copy(unet.double()) is unet  # not float32: nothing to do
    assert text_to_image.exact_copy(unet.float()) is not unet


@pytest.mark.parametrize("mode", ["bf16_mode", "no_bf16_mode"])
def test_the_fast_copy_runs_unpacked_where_the_packs_do_not_fit(monkeypatch, request, mode):
    """exact_copy's rule in the fast copy too: packs (a second copy of the weights, at the copy's precision) that
    would take more than a quarter of the memory available are not made (SDXL's U-Net on a 24 GB machine)."""
    from imagine.models import winograd
    from imagine.pipelines import text_to_image

    request.getfixturevalue(mode)
    monkeypatch.setenv(winograd.BUDGET_ENV, "1")
    unet = _sd_shaped_unet()
    per_element = 2 if mode == "bf16_mode" else 4
    need = sum(m.weight.numel() for m in unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)) * per_element
    for free, packed in ((4 * need, True), (4 * need - 4, False)):
        monkeypatch.setattr(text_to_image, "_FAST_COPIES", type(text_to_image._FAST_COPIES)())
        monkeypatch.setattr(text_to_image, "_EXACT_COPIES", type(text_to_image._EXACT_COPIES)())
        monkeypatch.setattr(winograd, "_available_bytes", lambda free=free: free)
        kinds = {type(m).__name__ for m in text_to_image.fast_copy(unet).modules()}
        assert ("PackedLinear" in kinds) == packed, (mode, free, kinds)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), pytest.param(torch.bfloat16, 6e-3, marks=needs_bf16_packs)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_geglu_matches_float64(dtype, tol, bias):
    """GEGLU(x) = (x W + b) * GELU(x V + c) from the two packed halves of proj, against float64; in bf16
    within bf16's rounding (each output rounded once), and never worse than the plain bf16 GEGLU."""
    from imagine.models.attention import GEGLU
    from imagine.models.prepacked import PackedGEGLU

    torch.manual_seed(1)
    ref = GEGLU(40, 96)
    if not bias:
        ref.proj.bias = None
    layer, plain = copy.deepcopy(ref).to(dtype), copy.deepcopy(ref).to(dtype)
    assert use_prepacked(layer) == 2 and type(layer) is PackedGEGLU  # the GEGLU and its proj
    x = torch.randn(2, 33, 40)
    with torch.inference_mode():
        got = layer(x.to(dtype))
        truth = ref.double()(x.double())
        unfused = plain(x.to(dtype))
    assert layer._pack is not None and len(layer._pack) == 3  # the split path ran
    assert got.dtype == dtype and got.shape == (2, 33, 96)
    assert _rel(got, truth) < tol and _rel(got, truth) <= _rel(unfused, truth) * 1.05


def test_packed_geglu_repacks_after_a_weight_change_and_stays_plain_under_autograd():
    from imagine.models.attention import GEGLU

    torch.manual_seed(2)
    layer = GEGLU(16, 24)
    use_prepacked(layer)
    x = torch.randn(5, 16)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        layer.proj.weight[30:].mul_(-1)  # the gate half
    with torch.inference_mode():
        again = layer(x)
    value, gate = F.linear(x, layer.proj.weight, layer.proj.bias).chunk(2, dim=-1)
    assert not torch.allclose(first, again)
    assert torch.allclose(again, value * F.gelu(gate), atol=1e-6)
    layer.requires_grad_(True)
    y = layer(x)  # autograd: the plain path, with gradients
    y.sum().backward()
    assert layer.proj.weight.grad is not None and layer.proj.weight.grad.abs().sum() > 0


def test_the_exact_copy_leaves_a_trainable_original_trainable(monkeypatch):
    """The copy shares the original's parameters: making it must not freeze them, and under autograd it
    takes the plain path, with gradients reaching the shared weights."""
    from imagine.pipelines import text_to_image

    monkeypatch.setattr(text_to_image, "_EXACT_COPIES", type(text_to_image._EXACT_COPIES)())
    unet = _sd_shaped_unet().train().requires_grad_(True)
    copy = text_to_image.exact_copy(unet)
    assert copy is not unet and all(p.requires_grad for p in unet.parameters()) and unet.training
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 5, 24)
    out = copy(x, t, context=ctx)
    (out.sample if hasattr(out, "sample") else out).square().mean().backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0


def test_a_trainable_bias_alone_keeps_the_layer_on_the_autograd_path():
    """Packed ops have no backward: a layer whose weight is frozen but whose bias trains runs plain."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(8, 4)
    use_prepacked(lin)
    lin.weight.requires_grad_(False)
    lin(torch.randn(3, 8)).sum().backward()
    assert lin.bias.grad is not None and torch.allclose(lin.bias.grad, torch.full((4,), 3.0))
    assert lin._pack is None  # never packed
