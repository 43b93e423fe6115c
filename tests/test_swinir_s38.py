"""SwinIR upscalers (imagine.models.swinir): files of each kind load and run as spandrel 0.4.2 (the loader ComfyUI and
A1111 use) runs the same weights; the window attention against a plain restatement of Swin's eq. 4 with the shift
mask built by hand; A1111's upscale_2 tiling restated; bad files named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import spandrel_peer
from imagine.upscalers import load_upscale_model, upscale_model_from_state


def spandrel_swinir(seed=0, net=False, **kw):
    """A random SwinIR in spandrel's own network (the authors' code): its state dict (and the network)."""
    spandrel = spandrel_peer.load()
    module = type(spandrel.MAIN_REGISTRY.get("SwinIR").architecture).__module__
    cls = __import__(module, fromlist=["SwinIR"]).SwinIR
    config = dict(img_size=32, embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=8, mlp_ratio=2.0,
                  upscale=4, upsampler="nearest+conv", resi_connection="3conv")
    model = cls(**{**config, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (random non-trivial weights everywhere: LayerNorms and biases too)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "bias_table" in name else 0.1)
                    + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return (state, model) if net else state


KINDS = {  # (spandrel's loader always builds num_feat 64, so the files here have it)
    "real_world_x4_3conv": dict(),  # the kind of "SwinIR 4x" (003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN)
    "real_world_x2": dict(upscale=2, resi_connection="1conv", seed=1),
    "classical_x2": dict(upscale=2, upsampler="pixelshuffle", resi_connection="1conv", seed=2),
    "classical_x3": dict(upscale=3, upsampler="pixelshuffle", resi_connection="1conv", seed=3),
    "classical_x4_window_7": dict(upscale=4, upsampler="pixelshuffle", window_size=7, img_size=28, seed=4),
    "lightweight_x4": dict(upscale=4, upsampler="pixelshuffledirect", resi_connection="1conv", seed=5),
    "denoise_gray_window_7": dict(upscale=1, upsampler="", in_chans=1, window_size=7, img_size=28,
                                  resi_connection="1conv", seed=6),
    # (spandrel's loader cannot read this one: it assumes a patch norm, and a training crop of 64 when the first RSTB
    # has no shifted layer; compared with its network as built)
    "three_layers_no_patch_norm": dict(depths=[1, 2, 3], num_heads=[2, 2, 4], patch_norm=False, seed=7),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_loads_and_runs_as_spandrel_runs_it(kind):
    kw = dict(KINDS[kind])
    seed = kw.pop("seed", 0)
    state, net = spandrel_swinir(seed, net=True, **kw)
    if kind == "three_layers_no_patch_norm":
        theirs = lambda x: net(x).clamp(0, 1)  # noqa: E731  (sizes of 16 or more: spandrel would not pad them)
        theirs.scale = 4
    else:
        theirs = spandrel_peer.load().ModelLoader().load_from_state_dict(dict(state)).eval()
    ours = upscale_model_from_state(state)
    assert (ours.scale, ours.architecture) == (theirs.scale, "SwinIR")
    channels = kw.get("in_chans", 3)
    for h, w in ((37, 29), (16, 16), (24, 40)):  # (sizes the windows do not divide: both pad by reflection)
        x = torch.rand(1, channels, h, w, generator=torch.Generator().manual_seed(h * w))
        if channels != 3:
            got = ours.raw(x)[..., :h * ours.scale, :w * ours.scale].clamp(0, 1)
        else:
            got = ours(x)
        want = theirs(x.clone())
        assert got.shape == want.shape == (1, channels, h * ours.scale, w * ours.scale)
        err = (got - want).abs().max()
        assert err < 2e-5, (kind, (h, w), float(err))
        assert want.std() > 0.01  # (not a flat picture: the comparison means something)


def test_a_file_that_starts_with_a_pixel_unshuffle():
    state, net = spandrel_swinir(8, net=True, start_unshuffle=2, upscale=8)  # (x4 pictures: x8 after folding by 2)
    for p in ("weight", "bias"):
        state[f"conv_first.1.{p}"] = state.pop(f"conv_first.{p}")
    theirs = spandrel_peer.load().ModelLoader().load_from_state_dict(dict(state)).eval()
    ours = upscale_model_from_state(state)
    assert ours.scale == theirs.scale == 4
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # (a multiple of window x unshuffle)
    with torch.no_grad():
        want = net(x)
    got = ours.raw(x)  # (random weights at x8 reach +-20: compared before the clamp, relative to that)
    assert got.shape == want.shape == (1, 3, 128, 192)
    assert (got - want).abs().max() < 1e-5 * want.abs().max(), (got - want).abs().max()
    assert torch.allclose(ours(x), theirs(x.clone()), atol=1e-4)
    # on other sizes spandrel leaves the window padding in (it cuts at h x 8); ours cuts at h x 4
    x = torch.rand(1, 3, 20, 36, generator=torch.Generator().manual_seed(1))
    assert ours(x).shape == (1, 3, 80, 144)


def test_the_window_attention_is_swin_eq_4_with_its_shift_mask():
    """A shifted layer against Swin's attention written out per window: softmax(QK^T/sqrt(d) + B + mask) V, the mask
    -100 between positions that came from different regions of the rolled map (built here pixel by pixel)."""
    from imagine.models.swinir import SwinLayer

    torch.manual_seed(0)
    layer = SwinLayer(dim=8, heads=2, window=4, shift=2, mlp_ratio=2.0).eval()
    with torch.no_grad():
        layer.attn.relative_position_bias_table.normal_()
    x = torch.randn(1, 8, 12, 8)  # (batch, H, W, C)
    m, s, heads, d = 4, 2, 2, 4
    y = layer.norm1(x)
    rolled = torch.roll(y, (-s, -s), (1, 2))
    region = lambda i, n: 0 if i < n - m else (1 if i < n - s else 2)  # noqa: E731
    out = torch.zeros_like(rolled)
    table = layer.attn.relative_position_bias_table
    for wy in range(0, 8, m):
        for wx in range(0, 12, m):
            pos = [(wy + i, wx + j) for i in range(m) for j in range(m)]
            tokens = torch.stack([rolled[0, p, q] for p, q in pos])
            q, k, v = layer.attn.qkv(tokens).view(len(pos), 3, heads, d).unbind(1)
            for h in range(heads):
                logits = (q[:, h] @ k[:, h].T) / d ** 0.5
                for a, (ya, xa) in enumerate(pos):
                    for b, (yb, xb) in enumerate(pos):
                        dy, dx = (ya - wy) - (yb - wy), (xa - wx) - (xb - wx)
                        logits[a, b] += table[(dy + m - 1) * (2 * m - 1) + dx + m - 1, h]
                        if (region(ya, 8), region(xa, 12)) != (region(yb, 8), region(xb, 12)):
                            logits[a, b] += -100.0
                head_out = logits.softmax(-1) @ v[:, h]
                for a, (p, qq) in enumerate(pos):
                    out[0, p, qq, h * d:(h + 1) * d] = head_out[a]
    attn = layer.attn.proj(torch.roll(out, (s, s), (1, 2)))
    want = x + attn
    want = want + layer.mlp(layer.norm2(want))
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a1111_runs_swinir_through_upscale_2():
    """A1111's SwinIR upscaler (extensions-builtin/SwinIR: upscaler_utils.upscale_2 with SWIN_tile 192 and
    SWIN_tile_overlap 8): the picture as BGR in float, tiles of min(tile, h, w) every tile - overlap pixels (the last at
    the edge), their results summed and divided by the count over each pixel, clamped and rounded to 8 bits;
    restated here over spandrel's model on the same weights."""
    from imagine.upscalers import a1111_tiled_2, a1111_upscale

    state = spandrel_swinir(9, upscale=2, resi_connection="1conv")
    theirs = spandrel_peer.load().ModelLoader().load_from_state_dict(dict(state)).eval()
    ours = upscale_model_from_state(state)
    rgb = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)

    def restated(tile, overlap):
        img = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)) / 255).float()[None]
        _, c, h, w = img.shape
        tile = min(tile, h, w)
        if tile <= 0:
            out = theirs(img)
        else:
            stride = tile - overlap
            hs = list(range(0, h - tile, stride)) + [h - tile]
            ws = list(range(0, w - tile, stride)) + [w - tile]
            out, weight = torch.zeros(1, c, h * 2, w * 2), torch.zeros(1, c, h * 2, w * 2)
            for y in hs:
                for x in ws:
                    patch = theirs(img[..., y:y + tile, x:x + tile])
                    out[..., y * 2:(y + tile) * 2, x * 2:(x + tile) * 2] += patch
                    weight[..., y * 2:(y + tile) * 2, x * 2:(x + tile) * 2] += 1
            out = out / weight
        arr = (255.0 * out[0].clamp(0, 1).permute(1, 2, 0).numpy()).round().astype(np.uint8)[:, :, ::-1]
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr), "RGB"))

    for tile, overlap in ((16, 4), (20, 8), (0, 0), (192, 8)):
        got = np.asarray(a1111_tiled_2(ours, image, tile, overlap)).astype(int)
        assert np.abs(got - restated(tile, overlap)).max() <= 1, (tile, overlap)
    # Upscaler.upscale with a SwinIR: upscale_2 by the model's scale, then Lanczos to int(side x 2) // 8 x 8
    assert a1111_upscale(image, 2, ours).size == (88, 56)
    out = np.asarray(a1111_upscale(image, 2, ours)).astype(int)
    want = np.asarray(Image.fromarray(restated(192, 8)).resize((88, 56), Image.LANCZOS)).astype(int)
    assert np.abs(out - want).max() <= 1


def test_swinir_files_on_disk_and_by_a1111_name(tmp_path):
    from imagine.upscalers import upscaler_named

    state = spandrel_swinir(10)
    torch.save({"params_ema": state}, tmp_path / "SwinIR_4x.pth")
    model = upscaler_named("SwinIR 4x", tmp_path)
    assert model is not None and (model.a1111_name, model.scale) == ("SwinIR 4x", 4)
    assert load_upscale_model(tmp_path / "SwinIR_4x.pth").architecture == "SwinIR"


def test_bad_swinir_files_are_named():
    state = spandrel_swinir(11)
    broken = {k: v for k, v in state.items() if not k.startswith("conv_hr")}
    with pytest.raises(ValueError, match="SwinIR upscaler whose weights do not fit"):
        upscale_model_from_state(broken)
    ape = dict(state, absolute_pos_embed=torch.zeros(1, 1024, 24))
    with pytest.raises(ValueError, match="absolute position embedding"):
        upscale_model_from_state(ape)
    wrong = dict(state)
    wrong["layers.0.residual_group.blocks.0.attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
    with pytest.raises(ValueError, match="relative position index"):
        upscale_model_from_state(wrong)
