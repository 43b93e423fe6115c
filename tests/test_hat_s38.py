"""HAT upscalers (imagine.models.hat): files of each kind load and run as spandrel 0.4.2 runs the same weights on sizes
the window does not divide; the overlapping windows' position index against a closed form; bad files named."""

from __future__ import annotations

import pytest
import torch

import spandrel_peer
from imagine.upscalers import upscale_model_from_state


def spandrel_hat(seed=0, **kw):
    spandrel = spandrel_peer.load()
    module = __import__(type(spandrel.MAIN_REGISTRY.get("HAT").architecture).__module__, fromlist=["HAT"])
    config = dict(img_size=64, embed_dim=60, depths=[2, 2], num_heads=[2, 3], window_size=8, overlap_ratio=0.5,
                  mlp_ratio=2.0, upscale=2)
    net = module.HAT(**{**config, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name and name.endswith("weight")
                                                                else 0.0))
    return {k: v.clone() for k, v in net.state_dict().items()}


KINDS = {
    "x2": dict(),
    "x4_three_groups_overlap_quarter": dict(depths=[1, 2, 3], num_heads=[2, 2, 4], upscale=4, overlap_ratio=0.25,
                                            seed=1),
    "x3_identity_residual_no_patch_norm": dict(upscale=3, resi_connection="identity", patch_norm=False, seed=2),
    "x2_window_12_compress_2": dict(window_size=12, compress_ratio=2, squeeze_factor=15, qkv_bias=False, seed=3),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_loads_and_runs_as_spandrel_runs_it(kind):
    kw = dict(KINDS[kind])
    seed = kw.pop("seed", 0)
    state = spandrel_hat(seed, **kw)
    theirs = spandrel_peer.load().ModelLoader().load_from_state_dict({k: v.clone() for k, v in state.items()}).eval()
    ours = upscale_model_from_state(state)
    assert (ours.scale, ours.architecture) == (theirs.scale, "HAT")
    for h, w in ((19, 27), (16, 16), (24, 40)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.inference_mode():
            want = theirs(x.clone())
            reach = theirs.model(x).abs().max()
        got = ours(x)
        assert got.shape == want.shape == (1, 3, h * ours.scale, w * ours.scale)
        err = (got - want).abs().max()
        assert err < 2e-6 * reach + 1e-6, (kind, (h, w), float(err), float(reach))
        assert want.std() > 0.02


def test_the_overlapping_windows_position_index():
    """Query position (yi, xi) of a 4 x 4 window, key position (yj, xj) of the 6 x 6 window around it: the authors'
    index is ((yj - yi) - 1) * 9 + (xj - xi) - 1 (each coordinate shifted by 4 - 6 + 1), negative for some pairs,
    read from the table's end; equal offsets share a row and different offsets never do (mod the table's 81 rows)."""
    from imagine.models.hat import overlap_position_index

    idx = overlap_position_index(4, 6)
    assert idx.shape == (16, 36) and int(idx.min()) < 0
    rows = {}
    for i in range(16):
        for j in range(36):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 6)
            assert idx[i, j] == (yj - yi - 1) * 9 + (xj - xi - 1)
            rows.setdefault((yj - yi, xj - xi), set()).add(int(idx[i, j]) % 81)
    assert all(len(r) == 1 for r in rows.values()) and len({r.pop() for r in rows.values()}) == len(rows)


def test_bad_hat_files_are_named():
    state = spandrel_hat(4)
    with pytest.raises(ValueError, match="absolute position embedding"):
        upscale_model_from_state({**state, "absolute_pos_embed": torch.zeros(1, 4096, 60)})
    wrong = dict(state, relative_position_index_OCA=torch.zeros(64, 144, dtype=torch.long))
    with pytest.raises(ValueError, match="overlapping"):
        upscale_model_from_state(wrong)
    with pytest.raises(ValueError, match="a HAT upscaler without layers.0.residual_group.blocks.0.conv_block"):
        upscale_model_from_state({k: v for k, v in state.items() if "conv_block" not in k})


def test_a_hat_file_through_imagine_upscale_and_a_dat_one_by_a1111s_name(tmp_path):
    """The command end to end with a HAT .safetensors (A1111's tiling: its ESRGAN folder runs spandrel's models through
    upscale_with_model), equal to imagine.upscalers.a1111_upscale in this process; A1111's "DAT x2" is DAT_x2.pth."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from imagine.testing import run_cli
    from imagine.upscalers import a1111_upscale, upscaler_named
    from test_dat_s38 import spandrel_dat

    save_file(spandrel_hat(5), str(tmp_path / "4x-HAT-test.safetensors"))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    picture.save(tmp_path / "in.png")
    r = run_cli("upscale", tmp_path / "in.png", "-m", tmp_path / "4x-HAT-test.safetensors", "--tiling", "a1111",
                "-o", tmp_path / "out.png")
    assert r.returncode == 0, r.stderr
    out = Image.open(tmp_path / "out.png")
    model = upscale_model_from_state(spandrel_hat(5))
    want = a1111_upscale(picture, model.scale, model)
    assert out.size == want.size == (56, 40)
    assert np.abs(np.asarray(out, int) - np.asarray(want, int)).max() <= 1
    torch.save(spandrel_dat(6), tmp_path / "DAT_x2.pth")
    found = upscaler_named("DAT x2", tmp_path)
    assert found is not None and (found.architecture, found.scale, found.a1111_name) == ("DAT", 2, "DAT x2")
