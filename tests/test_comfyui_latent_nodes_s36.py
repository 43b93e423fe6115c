"""ComfyUI's latent and picture utility nodes: each against its nodes.py code restated here (loops where its code
loops), and LatentFromBatch / RepeatLatentBatch through a real server: a picture taken out of a batch (its
batch_index) is sampled with the noise it had in the batch, so it is that batch's picture again."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagine.server import comfyui as c
from test_comfyui_api_s35 import graph, pictures, pipe, run, server  # noqa: F401 (the fixtures)

G = torch.Generator().manual_seed(0)


def latent(*shape):
    return {"samples": torch.randn(*shape, generator=G)}


def test_latent_composite_with_and_without_a_feather():
    to, src = latent(2, 4, 12, 16), latent(2, 4, 6, 20)
    for x, y, feather in ((16, 24, 0), (8, 16, 24), (0, 0, 16)):
        got = c._latent_composite(None, to, src, x, y, feather)[0]["samples"]
        xs, ys, f = x // 8, y // 8, feather // 8
        s = to["samples"].clone()
        fr = src["samples"][:, :, :12 - ys, :16 - xs]
        if f == 0:
            s[:, :, ys:ys + fr.shape[2], xs:xs + fr.shape[3]] = fr
        else:
            mask = torch.ones_like(fr)
            for t in range(f):
                if ys != 0:
                    mask[:, :, t:1 + t, :] *= (1.0 / f) * (t + 1)
                if ys + fr.shape[2] < 12:
                    mask[:, :, mask.shape[2] - 1 - t:mask.shape[2] - t, :] *= (1.0 / f) * (t + 1)
                if xs != 0:
                    mask[:, :, :, t:1 + t] *= (1.0 / f) * (t + 1)
                if xs + fr.shape[3] < 16:
                    mask[:, :, :, mask.shape[3] - 1 - t:mask.shape[3] - t] *= (1.0 / f) * (t + 1)
            region = s[:, :, ys:ys + fr.shape[2], xs:xs + fr.shape[3]]
            s[:, :, ys:ys + fr.shape[2], xs:xs + fr.shape[3]] = fr * mask + region * (1 - mask)
        assert torch.allclose(got, s, atol=1e-6), (x, y, feather)


def test_crop_rotate_flip_blend():
    z = latent(1, 4, 16, 12)
    assert torch.equal(c._latent_crop(None, z, 64, 72, 40, 200)[0]["samples"], z["samples"][:, :, 8:17, 4:12])
    assert torch.equal(c._latent_rotate(None, z, "90 degrees")[0]["samples"], torch.rot90(z["samples"], 1, [3, 2]))
    assert torch.equal(c._latent_flip(None, z, "y-axis: horizontally")[0]["samples"], z["samples"].flip(3))
    other = latent(1, 4, 16, 12)
    assert torch.allclose(c._latent_blend(None, z, other, 0.3)[0]["samples"],
                          z["samples"] * 0.3 + other["samples"] * 0.7)


@pytest.mark.parametrize("margins,feathering", [((8, 0, 16, 8), 3), ((0, 8, 0, 0), 2), ((8, 8, 8, 8), 40)])
def test_pad_for_outpainting(margins, feathering):
    image = torch.rand(1, 10, 12, 3, generator=G)
    left, top, right, bottom = margins
    out, mask = c._image_pad_for_outpaint(None, image, left, top, right, bottom, feathering)
    d2, d3 = 10, 12
    want = torch.ones(1, d2 + top + bottom, d3 + left + right, 3) * 0.5
    want[:, top:top + d2, left:left + d3] = image
    m = torch.ones(d2 + top + bottom, d3 + left + right)
    t = torch.zeros(d2, d3)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                d = min(i if top != 0 else d2, d2 - i if bottom != 0 else d2, j if left != 0 else d3,
                        d3 - j if right != 0 else d3)
                if d >= feathering:
                    continue
                t[i, j] = ((feathering - d) / feathering) ** 2
    m[top:top + d2, left:left + d3] = t
    assert torch.equal(out, want) and torch.allclose(mask, m)


def test_empty_image_batch_and_a_mask_channel(tmp_path):
    im = c._empty_image(None, 5, 3, 2, 0x336699)[0]
    assert im.shape == (2, 3, 5, 3) and torch.allclose(im[0, 0, 0], torch.tensor([0x33, 0x66, 0x99]) / 255.0)
    small = torch.rand(1, 6, 8, 3, generator=G)
    both = c._image_batch(None, im, small)[0]
    # (6 x 8 to 3 x 5: the centre crop to the aspect keeps rows 1-4, round((6 - 6 (8/6) / (5/3)) / 2) = 1 off each end)
    want = torch.nn.functional.interpolate(small.permute(0, 3, 1, 2)[:, :, 1:5, :], size=(3, 5), mode="bilinear")
    assert both.shape == (3, 3, 5, 3) and torch.allclose(both[2:], want.permute(0, 2, 3, 1), atol=1e-6)

    class Ctx:
        state = c.ComfyState(tmp_path)

    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(Ctx.state.folder("input") / "m.png")
    alpha = c._load_image_mask(Ctx, "m.png", "alpha")[0]
    green = c._load_image_mask(Ctx, "m.png", "green")[0]
    assert torch.allclose(alpha[0], 1 - torch.from_numpy(rgba[..., 3] / 255.0).float())
    assert torch.allclose(green[0], torch.from_numpy(rgba[..., 1] / 255.0).float())


def test_a_picture_taken_out_of_a_batch_is_sampled_with_its_noise_there(server):
    """(With a deterministic sampler: an ancestral one draws each step's noise for the batch it runs, in ComfyUI as
    here, so a sub-batch's steps get other noise.)"""
    from test_comfyui_api_s35 import close

    g = graph(server.name, seed=77, steps=3, batch=3, sampler="euler")
    _, whole = run(server, g)
    batch = pictures(server, whole)
    g2 = graph(server.name, seed=77, steps=3, batch=3, latent=["12", 0], sampler="euler")
    g2["11"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": 1, "length": 1}}
    g2["12"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["11", 0], "amount": 2}}
    _, part = run(server, g2)
    got = pictures(server, part)
    assert len(got) == 2 and close(got[0], batch[1]) and close(got[1], batch[2])
    assert not close(got[0], batch[0])
