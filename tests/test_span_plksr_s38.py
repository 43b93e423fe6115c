"""SPAN and RealPLKSR upscalers (imagine.models.span, imagine.models.plksr): their files load and run as spandrel
0.4.2 runs the same weights; SPAN's re-parameterised convolution equals its branches run one after another (the
composition it stands for); files of kinds not read are named."""

from __future__ import annotations

import pytest
import torch

import spandrel_peer
from imagine.upscalers import upscale_model_from_state


def spandrel_net(arch: str, cls: str, seed: int, scale_weights: float = 0.1, **kw):
    spandrel = spandrel_peer.load()
    module = __import__(type(spandrel.MAIN_REGISTRY.get(arch).architecture).__module__, fromlist=[cls])
    net = getattr(module, cls)(**kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (random weights everywhere, norms' too, small enough to stay in range)
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale_weights + (1.0 if "norm" in name and
                                                                          name.endswith("weight") else 0.0))
    return net


def span_state(seed=0, **kw):
    net = spandrel_net("SPAN", "SPAN", seed, **{"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 16,
                                                 "upscale": 4, **kw})
    net.train()  # (state_dict as trained: its eval_conv is whatever it was last rebuilt to)
    return {k: v.clone() for k, v in net.state_dict().items()}


def plksr_state(seed=0, **kw):
    module = spandrel_peer.load().MAIN_REGISTRY.get("PLKSR").architecture
    mod = __import__(type(module).__module__.replace("PLKSR", "PLKSR.__arch.RealPLKSR"), fromlist=["RealPLKSR"])
    net = mod.RealPLKSR(**{"dim": 16, "n_blocks": 3, "upscaling_factor": 2, "kernel_size": 7, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return {k: v.clone() for k, v in net.state_dict().items()}


KINDS = {
    "span_x4": lambda: span_state(0),
    "span_x2_no_norm": lambda: span_state(1, upscale=2, norm=False),
    "span_x1": lambda: span_state(2, upscale=1),
    "realplksr_x2": lambda: plksr_state(3),
    "realplksr_x4_layer_norm": lambda: plksr_state(4, upscaling_factor=4, layer_norm=True),
    "realplksr_x3_no_attention": lambda: plksr_state(5, upscaling_factor=3, use_ea=False, split_ratio=0.5),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_loads_and_runs_as_spandrel_runs_it(kind):
    state = KINDS[kind]()
    theirs = spandrel_peer.load().ModelLoader().load_from_state_dict({k: v.clone() for k, v in state.items()}).eval()
    ours = upscale_model_from_state(state)
    assert ours.scale == theirs.scale and ours.architecture == ("SPAN" if kind.startswith("span") else "RealPLKSR")
    for h, w in ((13, 10), (8, 8), (3, 5)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.inference_mode():
            want = theirs(x.clone())
        got = ours(x)
        assert got.shape == want.shape == (1, 3, h * ours.scale, w * ours.scale)
        err = (got - want).abs().max()
        assert err < 2e-5, (kind, (h, w), float(err))
        assert 0.02 < want.std(), kind  # (a picture with something in it, not clamped flat)


def test_span_reparameterised_conv_is_its_branches_composed():
    """Conv3XC as trained: 1x1 -> 3x3 (no padding, on the zero-padded input) -> 1x1, plus a 1x1 skip; its fused 3x3
    equals that away from the border (where the trained form pads before the first 1x1's bias, the fused form after)."""
    from imagine.models.span import Conv3XC

    torch.manual_seed(0)
    conv = Conv3XC(5, 7)
    for p in conv.parameters():
        torch.nn.init.normal_(p, std=0.3)
    conv.fuse()
    x = torch.randn(2, 5, 12, 11)
    with torch.no_grad():
        branches = conv.conv(torch.nn.functional.pad(x, (1, 1, 1, 1))) + conv.sk(x)
        fused = conv(x)
    assert torch.allclose(fused[..., 1:-1, 1:-1], branches[..., 1:-1, 1:-1], atol=1e-5)


def test_other_kinds_are_named():
    state = plksr_state(6)
    with pytest.raises(ValueError, match="DySample"):
        upscale_model_from_state({**state, "to_img.init_pos": torch.zeros(1, 8, 1, 1)})
    paper = {k.replace("channel_mixer", "channe_mixer"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="only RealPLKSR files"):
        upscale_model_from_state(paper)
    with pytest.raises(ValueError, match="SPAN upscaler whose weights do not fit"):
        upscale_model_from_state({k: v for k, v in span_state(7).items() if not k.startswith("block_6")})
    with pytest.raises(ValueError, match="SwinIR, HAT, DAT, SPAN, RealPLKSR"):
        upscale_model_from_state({"unknown.weight": torch.zeros(3)})
