"""ComfyUI's mask nodes (comfy_extras/nodes_mask.py) against its code restated here, and a graph that grows and
feathers a picture's mask before SetLatentNoiseMask through a real server."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from imagine.server import comfyui as c
from test_comfyui_api_s35 import pipe, server  # noqa: F401 (the fixtures)
from test_k_diffusion import kd  # noqa: F401 (the fixture)

G = torch.Generator().manual_seed(0)


def test_composites():
    dest, src = torch.rand(2, 4, 10, 12, generator=G), torch.rand(1, 4, 6, 8, generator=G)
    mask = torch.rand(1, 12, 16, generator=G)
    for x, y, m, resize in ((16, 8, None, False), (40, 24, mask, False), (0, 0, mask, True), (200, 0, None, False)):
        got = c._latent_composite_masked(None, {"samples": dest}, {"samples": src}, x, y, resize, m)[0]["samples"]
        d, s = dest.clone(), src
        if resize:
            s = torch.nn.functional.interpolate(s, size=(10, 12), mode="bilinear")
        s = s.repeat(2, 1, 1, 1)[:2]
        xx, yy = max(-s.shape[3] * 8, min(x, 12 * 8)), max(-s.shape[2] * 8, min(y, 10 * 8))
        left, top = xx // 8, yy // 8
        mm = torch.ones_like(s) if m is None else torch.nn.functional.interpolate(
            m.reshape(-1, 1, 12, 16), size=s.shape[2:], mode="bilinear").repeat(2, 1, 1, 1)[:2]
        w, h = 12 - left + min(0, xx), 10 - top + min(0, yy)
        mm = mm[:, :, :h, :w]
        d[:, :, top:top + s.shape[2], left:left + s.shape[3]] = mm * s[:, :, :h, :w] + (1 - mm) * d[
            :, :, top:top + s.shape[2], left:left + s.shape[3]]
        assert torch.allclose(got, d), (x, y, resize)


def test_mask_operations():
    a, b = torch.rand(1, 8, 9, generator=G), torch.rand(1, 5, 4, generator=G)
    for op, f in (("multiply", lambda p, q: p * q), ("subtract", lambda p, q: p - q),
                  ("xor", lambda p, q: (p.round().bool() ^ q.round().bool()).float())):
        got = c._mask_composite(None, a, b, 6, 2, op)[0]
        want = a.clone()
        want[:, 2:7, 6:9] = f(a[:, 2:7, 6:9], b[:, :5, :3])
        assert torch.allclose(got, want.clamp(0, 1)), op
    got = c._feather_mask(None, a, 3, 0, 2, 4)[0]
    want = a.clone()
    for k in range(3):
        want[:, :, k] *= (k + 1.0) / 3
    for k in range(2):
        want[:, :, -k] *= (k + 1) / 2
    for k in range(4):
        want[:, -k, :] *= (k + 1) / 4
    assert torch.allclose(got, want)
    for expand, tapered in ((2, True), (-1, False)):
        got = c._grow_mask(None, a, expand, tapered)[0]
        kernel = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]) if tapered else np.ones((3, 3))
        want = a[0].numpy()
        for _ in range(abs(expand)):
            want = (scipy.ndimage.grey_dilation if expand > 0 else scipy.ndimage.grey_erosion)(want, footprint=kernel)
        assert torch.allclose(got[0], torch.from_numpy(want)), expand
    assert torch.equal(c._threshold_mask(None, a, 0.5)[0], (a > 0.5).float())
    assert torch.equal(c._crop_mask(None, a, 2, 1, 3, 4)[0], a[:, 1:5, 2:5])
    assert torch.equal(c._invert_mask(None, a)[0], 1 - a)
    assert c._mask_to_image(None, a)[0].shape == (1, 8, 9, 3)
    image = torch.rand(1, 8, 9, 3, generator=G)
    assert torch.equal(c._image_to_mask(None, image, "green")[0], image[:, :, :, 1])
    with pytest.raises(ValueError, match="no alpha channel"):
        c._image_to_mask(None, image, "alpha")


def test_a_grown_mask_inpaints_as_comfyui(server, pipe, kd):
    import io

    import requests
    from PIL import Image

    from test_comfyui_api_s35 import close, comfy_reference, graph, karras, pictures, run

    rgba = np.random.default_rng(4).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[5:9, 6:10, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    requests.post(server.url + "/upload/image", files={"image": ("grow.png", buffer.getvalue(), "image/png")},
                  data={"overwrite": "true"})
    g = graph(server.name, seed=5, steps=4, cfg=4.0, sampler="euler", scheduler="karras", batch=1, latent=["14", 0])
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "grow.png"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["12"] = {"class_type": "GrowMask", "inputs": {"mask": ["10", 1], "expand": 2, "tapered_corners": True}}
    g["14"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["12", 0]}}
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pixels = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)
    latent = pipe.vae.to_latent(pipe.vae_mode(pixels.permute(2, 0, 1)[None] * 2 - 1))
    mask = 1.0 - rgba[..., 3].astype(np.float32) / 255.0
    for _ in range(2):
        mask = scipy.ndimage.grey_dilation(mask, footprint=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    want = comfy_reference(kd, pipe, "a red circle", 5, 4, 4.0, "sample_euler", karras, 1, latent=latent,
                           mask=torch.from_numpy(mask)[None])
    assert close(pictures(server, entry)[0], want[0])
