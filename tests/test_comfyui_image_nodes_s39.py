"""ComfyUI's picture nodes of comfy_extras (nodes_post_processing.py, nodes_images.py) through a real server:
ImageScaleToTotalPixels, ImageCrop, RepeatImageBatch, ImageFromBatch, ImageBlend, ImageBlur and ImageSharpen, each
held to its code restated here and to closed forms (a blur keeps a flat picture and a picture's mean away from its
edges, a sharpen of alpha 0 is the picture, a blend of factor 0 is image1, "normal" at 1 is image2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import pictures, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    root = tmp_path_factory.mktemp("comfy_images")
    make_tiny_model(root / "model")
    app = create_app(TextToImagePipeline.from_pretrained(root / "model"),
                     ServerConfig(max_width=256, max_height=256, max_steps=20), model_name="tiny",
                     comfyui=str(root / "comfy"))
    (root / "comfy" / "input").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "comfy" / "input" / "a.png")
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "comfy" / "input" / "b.png")
    Image.new("RGB", (10, 10), (90, 160, 30)).save(root / "comfy" / "input" / "flat.png")
    with BackgroundServer(app) as srv:
        yield srv, root


def load(root, name) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(root / "comfy" / "input" / name).convert("RGB"),
                                       dtype=np.float32) / 255.0)[None]


def eight_bits(x: torch.Tensor) -> list[np.ndarray]:
    return [np.clip(255.0 * im.numpy(), 0, 255).astype(np.uint8) for im in x]


def through(srv, node: dict, images=("a.png",), names=("image",)) -> list[np.ndarray]:
    g = {f"1{i}": {"class_type": "LoadImage", "inputs": {"image": im}} for i, im in enumerate(images)}
    node["inputs"].update({n: [f"1{i}", 0] for i, n in enumerate(names)})
    g["2"] = node
    g["9"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "nodes"}}
    _, entry = run(srv, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return pictures(srv, entry)


def kernel(size, sigma):  # (its gaussian_kernel)
    x, y = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def conv(image, k, r):
    c = image.shape[3]
    x = F.pad(image.permute(0, 3, 1, 2), (r, r, r, r), "reflect")
    return F.conv2d(x, k.repeat(c, 1, 1).unsqueeze(1), padding=k.shape[0] // 2, groups=c)[:, :, r:-r, r:-r] \
        .permute(0, 2, 3, 1)


def test_blur_and_sharpen(server):
    srv, root = server
    a = load(root, "a.png")
    got = through(srv, {"class_type": "ImageBlur", "inputs": {"blur_radius": 2, "sigma": 0.7}})
    assert np.array_equal(got[0], eight_bits(conv(a, kernel(5, 0.7), 2))[0])
    flat = through(srv, {"class_type": "ImageBlur", "inputs": {"blur_radius": 3, "sigma": 2.0}}, ("flat.png",))
    assert np.abs(flat[0].astype(int) - np.array([90, 160, 30])).max() <= 1  # (a flat picture stays flat)
    k = kernel(3, 1.5) * -(0.8 * 10)
    k[1, 1] = k[1, 1] - k.sum() + 1.0
    got = through(srv, {"class_type": "ImageSharpen", "inputs": {"sharpen_radius": 1, "sigma": 1.5, "alpha": 0.8}})
    assert np.array_equal(got[0], eight_bits(torch.clamp(conv(a, k, 1), 0, 1))[0])
    same = through(srv, {"class_type": "ImageSharpen", "inputs": {"sharpen_radius": 2, "sigma": 1.0, "alpha": 0.0}})
    assert np.abs(same[0].astype(int) - eight_bits(a)[0].astype(int)).max() <= 1  # (alpha 0: the picture)


@pytest.mark.parametrize("mode", ["normal", "multiply", "screen", "overlay", "soft_light", "difference"])
def test_blend_modes(server, mode):
    srv, root = server
    a, b = load(root, "a.png"), load(root, "b.png")
    # (image2 to image1's size: bicubic after a centre crop to its aspect, ComfyUI's common_upscale)
    bb = b.movedim(-1, 1)
    w, h = bb.shape[3], bb.shape[2]
    aspect, target = w / h, 30 / 20
    if aspect > target:
        cut = round(w * (1 - target / aspect) / 2)
        bb = bb[:, :, :, cut:w - cut]
    elif aspect < target:
        cut = round(h * (1 - aspect / target) / 2)
        bb = bb[:, :, cut:h - cut]
    b2 = F.interpolate(bb, size=(20, 30), mode="bicubic").movedim(1, -1)
    g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
    blended = {"normal": b2, "multiply": a * b2, "screen": 1 - (1 - a) * (1 - b2),
               "overlay": torch.where(a <= 0.5, 2 * a * b2, 1 - 2 * (1 - a) * (1 - b2)),
               "soft_light": torch.where(b2 <= 0.5, a - (1 - 2 * b2) * a * (1 - a), a + (2 * b2 - 1) * (g - a)),
               "difference": a - b2}[mode]
    got = through(srv, {"class_type": "ImageBlend", "inputs": {"blend_factor": 0.7, "blend_mode": mode}},
                  ("a.png", "b.png"), ("image1", "image2"))
    assert np.array_equal(got[0], eight_bits(torch.clamp(a * 0.3 + blended * 0.7, 0, 1))[0])
    first = through(srv, {"class_type": "ImageBlend", "inputs": {"blend_factor": 0.0, "blend_mode": mode}},
                    ("a.png", "b.png"), ("image1", "image2"))
    assert np.array_equal(first[0], eight_bits(a)[0])


def test_scale_to_total_pixels_crop_and_batches(server):
    srv, root = server
    a = load(root, "a.png")
    got = through(srv, {"class_type": "ImageScaleToTotalPixels",
                        "inputs": {"upscale_method": "bilinear", "megapixels": 0.01}})
    scale = math.sqrt(int(0.01 * 1024 * 1024) / (30 * 20))  # (10485 pixels: 125 x 84 for a 3:2 picture)
    w, h = round(30 * scale), round(20 * scale)
    assert got[0].shape == (h, w, 3) == (84, 125, 3)
    want = F.interpolate(a.movedim(-1, 1), size=(h, w), mode="bilinear").movedim(1, -1)
    assert np.array_equal(got[0], eight_bits(want)[0])
    got = through(srv, {"class_type": "ImageCrop", "inputs": {"width": 8, "height": 50, "x": 25, "y": 3}})
    assert np.array_equal(got[0], eight_bits(a[:, 3:53, 25:33])[0]) and got[0].shape == (17, 5, 3)
    got = through(srv, {"class_type": "ImageCrop", "inputs": {"width": 4, "height": 4, "x": 100, "y": 100}})
    assert np.array_equal(got[0], eight_bits(a[:, 19:, 29:])[0])  # (the corner held inside: its last pixel)
    g = {"10": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
         "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 3}},
         "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
         "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
         "5": {"class_type": "ImageFromBatch", "inputs": {"image": ["4", 0], "batch_index": 2, "length": 10}},
         "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "batch"}}}
    _, entry = run(srv, g)
    got = pictures(srv, entry)
    plain, inverted = eight_bits(a)[0], eight_bits(1 - a)[0]
    assert len(got) == 4 and np.array_equal(got[0], plain) and all(np.array_equal(p, inverted) for p in got[1:])
    r = requests.post(srv.url + "/prompt", json={"prompt": {**g, "5": {**g["5"], "inputs": {
        **g["5"]["inputs"], "length": 0}}}})
    assert r.json()["node_errors"]["5"]["errors"][0]["type"] == "value_smaller_than_min"


def test_latent_math_and_batch_seed_behavior(server):
    """LatentAdd / LatentSubtract / LatentMultiply / LatentBatch as nodes_latent.py's (the second brought to the
    first's size bilinearly after a centre crop, its batch repeated to the first's; LatentBatch's places kept for the
    noise); LatentBatchSeedBehavior "fixed" gives every image of a batch the first one's start noise (so one picture
    a deterministic sampler makes from an empty latent), "random" each its own."""
    from imagine.server import comfyui as c

    a = {"samples": torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))}
    b = {"samples": torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(2)), "batch_index": [5]}
    b2 = F.interpolate(b["samples"], size=(6, 8), mode="bilinear").repeat(2, 1, 1, 1)  # (same aspect: no crop)
    assert torch.allclose(c._latent_add(None, a, b)[0]["samples"], a["samples"] + b2)
    assert torch.allclose(c._latent_subtract(None, a, b)[0]["samples"], a["samples"] - b2)
    assert torch.equal(c._latent_multiply(None, a, -0.5)[0]["samples"], a["samples"] * -0.5)
    batched = c._latent_batch(None, a, b)[0]
    assert torch.allclose(batched["samples"], torch.cat([a["samples"], b2[:1]])) and batched["batch_index"] == [0, 1, 5]
    assert c._latent_batch_seed_behavior(None, batched, "fixed")[0]["batch_index"] == [0, 0, 0]
    assert "batch_index" not in c._latent_batch_seed_behavior(None, batched, "random")[0]
    srv, _ = server

    def graph(behavior):
        return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny"}},
                "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
                "11": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["5", 0],
                                                                           "seed_behavior": behavior}},
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
                "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
                "3": {"class_type": "KSampler", "inputs": {
                    "model": ["4", 0], "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler",
                    "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0],
                    "denoise": 1.0}},
                "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
                "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "seeds"}}}

    _, fixed = run(srv, graph("fixed"))
    _, free = run(srv, graph("random"))
    fixed, free = pictures(srv, fixed), pictures(srv, free)
    assert all(np.array_equal(p, fixed[0]) for p in fixed) and np.array_equal(fixed[0], free[0])
    assert not np.array_equal(free[0], free[1])
