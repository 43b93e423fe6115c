"""DAT upscalers (imagine.models.dat): files of each kind load and run as spandrel 0.4.2 runs the same weights, on
sizes its rectangles do not divide (the zero-padded queries, keys and values take part) and through shifted blocks;
the dynamic position bias's offsets against a closed form; bad files named."""

from __future__ import annotations

import pytest
import torch

import spandrel_peer
from imagine.upscalers import upscale_model_from_state


def spandrel_dat(seed=0, **kw):
    spandrel = spandrel_peer.load()
    module = __import__(type(spandrel.MAIN_REGISTRY.get("DAT").architecture).__module__, fromlist=["DAT"])
    config = dict(img_size=64, embed_dim=32, split_size=[2, 4], depth=[2, 2], num_heads=[2, 4], expansion_factor=2.0,
                  upscale=2)
    net = module.DAT(**{**config, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (random weights and BatchNorm statistics: the eval-mode normalisation matters)
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name and name.endswith("weight")
                                                                else 0.0))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


KINDS = {  # (spandrel's loader builds an upsampling width of 64, so the pixelshuffle files here have it)
    "x2_two_groups": dict(),
    "x4_six_blocks_shifted": dict(depth=[6], num_heads=[4], upscale=4, seed=1),  # (blocks 2 ... of group 0 shift)
    "x3_odd_group_shifts_first": dict(depth=[1, 4], num_heads=[2, 2], upscale=3, seed=2),
    "x4_direct_3conv_8x16": dict(upsampler="pixelshuffledirect", resi_connection="3conv", split_size=[4, 8],
                                 depth=[2, 2], upscale=4, seed=3),
    "no_qkv_bias": dict(qkv_bias=False, seed=4),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_loads_and_runs_as_spandrel_runs_it(kind):
    kw = dict(KINDS[kind])
    seed = kw.pop("seed", 0)
    state = spandrel_dat(seed, **kw)
    theirs = spandrel_peer.load().ModelLoader().load_from_state_dict({k: v.clone() for k, v in state.items()}).eval()
    ours = upscale_model_from_state(state)
    assert (ours.scale, ours.architecture) == (theirs.scale, "DAT")
    for h, w in ((19, 21), (16, 16), (8, 12)):  # (not multiples of the rectangles; 8 x 12 is padded to 16 first)
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.inference_mode():
            want = theirs(x.clone())
            size = max(16, h), max(16, w)  # (both pad to 16 first; the magnitude before the clamp, roughly)
            reach = theirs.model(torch.nn.functional.pad(x, (0, size[1] - w, 0, size[0] - h), "replicate")).abs().max()
        got = ours(x)
        assert got.shape == want.shape == (1, 3, h * ours.scale, w * ours.scale)
        err = (got - want).abs().max()
        # (random weights reach +-30 before the clamp: float32's rounding relative to that)
        assert err < 2e-6 * reach + 1e-6, (kind, (h, w), float(err), float(reach))
        assert want.std() > 0.02


def test_the_offsets_and_their_index():
    """Every offset of a 2 x 4 rectangle, dy major; positions i, j point at the row of their difference."""
    from imagine.models.dat import offset_index, offsets

    o = offsets(2, 4)
    assert o.shape == (3 * 7, 2) and o[0].tolist() == [-1, -3] and o[-1].tolist() == [1, 3]
    idx = offset_index(2, 4)
    for i in range(8):
        for j in range(8):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            assert o[idx[i, j]].tolist() == [yi - yj, xi - xj]


def test_bad_dat_files_are_named():
    state = spandrel_dat(5)
    with pytest.raises(ValueError, match="rpe_biases"):
        upscale_model_from_state({k: v for k, v in state.items() if not k.endswith("rpe_biases")})
    wrong = dict(state)
    wrong["layers.0.blocks.0.attn.attns.0.relative_position_index"] = torch.zeros(8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="rectangle"):
        upscale_model_from_state(wrong)
    with pytest.raises(ValueError, match="DAT upscaler whose weights do not fit"):
        upscale_model_from_state({k: v for k, v in state.items() if "ffn.sg.norm" not in k})
