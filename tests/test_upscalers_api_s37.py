"""Upscaler models behind the servers and the hires. fix: A1111's /sdapi/v1/upscalers, extra-single-image and
extra-batch-images and hr_upscaler with a model of serve --upscaler-dir; ComfyUI's UpscaleModelLoader and
ImageUpscaleWithModel; the pipeline's hires. fix with a model. Each picture against A1111's / ComfyUI's code restated
over spandrel's run of the same file (tests/test_upscalers_s37.py's restatements)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_upscalers_s37 import (a1111_upscale_with_model, a1111_upscaler_upscale, comfyui_tiled_scale, peer,
                                spandrel_compact, spandrel_esrgan, to_real_esrgan)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("upscalers")
    torch.save({"params_ema": to_real_esrgan(spandrel_esrgan(2, shuffle=2, seed=21))}, d / "RealESRGAN_x2plus.pth")
    torch.save(spandrel_compact(2, convs=2, seed=22), d / "2x-Compact.pth")
    return d


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, folder):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    p = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    p.upscaler_dir = folder
    return p


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServerConfig(max_width=256, max_height=256, max_steps=10)),
                    raise_server_exceptions=False) as c:
        yield c


def b64_png(img, texts=None) -> str:
    info = PngImagePlugin.PngInfo()
    for k, v in (texts or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def opened(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def picture(w, h, seed=3):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def close(a, b):
    d = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return a.size == b.size and d.max() <= 1 and (d > 0).mean() < 0.001


def a1111_extras(img, scale, model_file, folder):
    """A1111's postprocessing upscale with a model, restated: Upscaler.upscale over upscale_with_model's tiles."""
    theirs = peer(torch.load(folder / model_file, weights_only=True))
    return a1111_upscaler_upscale(img, scale, lambda im: a1111_upscale_with_model(theirs, im, 192, 8))


def test_the_models_are_listed_under_a1111s_names(client):
    ups = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest", "2x-Compact", "R-ESRGAN 2x+"]
    assert ups[-1]["model_name"] == "RealESRGAN_x2plus" and ups[-1]["scale"] == 2
    assert [m["name"] for m in client.get("/sdapi/v1/realesrgan-models").json()] == ["R-ESRGAN 2x+"]


def test_extra_single_image_is_a1111s_upscale(client, folder):
    img = picture(20, 12)  # (smaller than A1111's 192-pixel tile: one tile reaching out of the picture)
    r = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64_png(img, {"parameters": "a cat\nSteps: 20"}), "upscaler_1": "R-ESRGAN 2x+",
        "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    got = opened(r.json()["image"])
    assert close(got.convert("RGB"), a1111_extras(img, 3, "RealESRGAN_x2plus.pth", folder))
    assert got.info["parameters"] == "a cat\nSteps: 20"  # (the picture's own parameters kept)
    assert got.info["postprocessing"] == "Postprocess upscale by: 3, Postprocess upscaler: R-ESRGAN 2x+"
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 3, Postprocess upscaler: R-ESRGAN 2x+</p>"


def test_extras_to_a_size_cut_and_a_second_upscaler_blended(client, folder):
    img = picture(20, 12, seed=4)
    body = {"image": b64_png(img), "upscaler_1": "2x-Compact", "resize_mode": 1, "upscaling_resize_w": 40,
            "upscaling_resize_h": 40, "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.4}
    got = opened(client.post("/sdapi/v1/extra-single-image", json=body).json()["image"]).convert("RGB")
    scale = max(40 / 20, 40 / 12)  # (A1111's upscale to a size: by the larger ratio, then cut about the centre)
    first = a1111_extras(img, scale, "2x-Compact.pth", folder)
    lanczos = a1111_upscaler_upscale(img, scale, lambda im: im.resize((int(im.width * scale), int(im.height * scale)),
                                                                      Image.LANCZOS))
    both = Image.blend(first, lanczos, 0.4)
    want = Image.new("RGB", (40, 40))
    want.paste(both, box=(20 - both.width // 2, 20 - both.height // 2))
    assert close(got, want)
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        **{k: v for k, v in body.items() if k != "image"},
        "imageList": [{"data": b64_png(img), "name": "a.png"}, {"data": b64_png(picture(8, 8)), "name": "b.png"}]})
    assert batch.status_code == 200, batch.text
    images = [opened(b).convert("RGB") for b in batch.json()["images"]]
    assert np.array_equal(np.asarray(images[0]), np.asarray(got)) and images[1].size == (40, 40)


def test_extras_refusals_name_the_field(client):
    img = b64_png(picture(8, 8))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "upscaler_1": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and "upscaler_1" in r.text and "R-ESRGAN 2x+" in r.text
    r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "upscaler_1": "Lanczos",
                                                         "gfpgan_visibility": 1})
    assert r.status_code == 422 and "face restorers" in r.text
    r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "upscaler_1": "../2x-Compact.pth"})
    assert r.status_code == 422
    same = client.post("/sdapi/v1/extra-single-image", json={"image": img})  # (no upscaler: the picture back)
    assert np.array_equal(np.asarray(opened(same.json()["image"]).convert("RGB")), np.asarray(picture(8, 8)))


def test_hires_fix_with_a_model_upscales_the_first_pass_as_a1111(pipe, folder, monkeypatch):
    from imagine.upscalers import upscaler_named

    model = upscaler_named("R-ESRGAN 2x+", folder)
    seen = []
    generate = pipe.generate

    def spy(*a, **kw):
        out = generate(*a, **kw)
        seen.append((kw, out))
        return out

    monkeypatch.setattr(pipe, "generate", spy)
    res = pipe.generate_hires("a red circle", hires_scale=2.5, hires_upscaler=model, hires_strength=0.5, steps=3,
                              seed=4, progress=False)
    (_, first), (second_kw, _) = seen
    theirs = peer(torch.load(folder / "RealESRGAN_x2plus.pth", weights_only=True))
    for got, low in zip(second_kw["init_image"], first.images):
        # (A1111's resize_image with an upscaler: Upscaler.upscale by 40 / 16, then Lanczos to 40 x 40)
        want = a1111_upscaler_upscale(low, 2.5, lambda im: a1111_upscale_with_model(theirs, im, 192, 8))
        want = want.resize((40, 40), Image.LANCZOS) if want.size != (40, 40) else want
        assert close(got, want)
    assert res.images[0].size == (40, 40) and res.parameters["hires_upscaler"] == "R-ESRGAN 2x+"


def test_hr_upscaler_names_a_model_of_the_folder(client):
    body = {"prompt": "a red circle", "steps": 3, "width": 16, "height": 16, "enable_hr": True, "hr_scale": 2,
            "denoising_strength": 0.5, "hr_upscaler": "R-ESRGAN 2x+", "seed": 5}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    import json

    assert "Hires upscaler: R-ESRGAN 2x+" in json.loads(r.json()["info"])["infotexts"][0]
    assert opened(r.json()["images"][0]).size == (32, 32)
    lanczos = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Lanczos"})
    assert r.json()["images"][0] != lanczos.json()["images"][0]


def listen(srv, graph):
    """A prompt run while its client listens on ComfyUI's socket: (prompt id, the messages up to the end)."""
    import asyncio
    import json

    import websockets

    async def go():
        async with websockets.connect(srv.url.replace("http", "ws") + "/ws?clientId=up") as ws:
            await ws.recv()
            pid = requests.post(srv.url + "/prompt", json={"prompt": graph, "client_id": "up"}).json()["prompt_id"]
            seen = []
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if m["type"] != "status":
                    seen.append(m)
                if m["type"] == "executing" and m["data"]["node"] is None:
                    return pid, seen

    return asyncio.run(go())


def test_comfyui_upscale_image_using_model(pipe, folder, tmp_path):
    app = create_app(pipe, ServerConfig(max_width=2048, max_height=256, max_steps=10), model_name="tiny",
                     comfyui=str(tmp_path / "comfy"))
    img = picture(530, 20, seed=6)  # (wider than ComfyUI's 512-pixel tile: two tiles, blended)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "wide.png"}},
         "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "RealESRGAN_x2plus.pth"}},
         "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
         "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    from test_comfyui_api_s35 import pictures

    with BackgroundServer(app) as srv:
        names = requests.get(srv.url + "/object_info/UpscaleModelLoader").json()["UpscaleModelLoader"]
        assert names["input"]["required"]["model_name"][0] == ["2x-Compact.pth", "RealESRGAN_x2plus.pth"]
        assert requests.get(srv.url + "/models/upscale_models").json() == ["2x-Compact.pth", "RealESRGAN_x2plus.pth"]
        requests.post(srv.url + "/upload/image", files={"image": ("wide.png", buf.getvalue(), "image/png")})
        pid, seen = listen(srv, g)
        progress = [m["data"] for m in seen if m["type"] == "progress"]  # (one per tile: two)
        assert [(p["value"], p["max"], p["node"], p["prompt_id"]) for p in progress] == [(1, 2, "3", pid),
                                                                                        (2, 2, "3", pid)]
        entry = requests.get(srv.url + f"/history/{pid}").json()[pid]
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry, node="4")[0]
        bad = dict(g, **{"2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "nope.pth"}}})
        assert requests.post(srv.url + "/prompt", json={"prompt": bad}).status_code == 400
    theirs = peer(torch.load(folder / "RealESRGAN_x2plus.pth", weights_only=True))
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    want = torch.clamp(comfyui_tiled_scale(x, theirs, 512, 32, 2), 0, 1)[0].permute(1, 2, 0).numpy()
    want = np.clip(want * 255, 0, 255).astype(np.uint8)  # (SaveImage's 8 bits: truncated)
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert got.shape == want.shape == (40, 1060, 3) and d.max() <= 1 and (d > 0).mean() < 0.01


def test_generate_with_a_model_upscaler_and_an_infotext_naming_one(pipe, folder, tmp_path):
    from imagine.commands.generate import infotext_defaults
    from imagine.images import parse_a1111_parameters
    from imagine.testing import run_cli

    text = ("a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16, Denoising strength: 0.5, "
            "Hires upscale: 2, Hires upscaler: R-ESRGAN 2x+")
    found = infotext_defaults(parse_a1111_parameters(text), upscaler_dir=str(folder))
    assert found["hires_upscaler"] == "R-ESRGAN 2x+" and not any("Hires" in n for n in found["_infotext_notes"])
    missing = infotext_defaults(parse_a1111_parameters(text))
    assert missing["hires_upscaler"] == "lanczos"
    assert any("R-ESRGAN 2x+ (upscaled with Lanczos here" in n for n in missing["_infotext_notes"])
    model_dir = pipe.c.source
    r = run_cli("generate", "a red circle", "--model", model_dir, "--steps", 2, "--width", 16, "--height", 16,
                "--hires-scale", 2, "--hires-upscaler", "R-ESRGAN 2x+", "--upscaler-dir", folder,
                "-o", tmp_path / "h.png", "-q")
    assert r.returncode == 0, r.stderr
    out = Image.open(tmp_path / "h.png")
    assert out.size == (32, 32) and "Hires upscaler: R-ESRGAN 2x+" in out.info["parameters"]
    r = run_cli("generate", "x", "--model", model_dir, "--hires-scale", 2, "--hires-upscaler", "R-ESRGAN 2x",
                "--upscaler-dir", folder)
    assert r.returncode == 2 and "did you mean 'R-ESRGAN 2x+'" in r.stderr and "models in" in r.stderr, r.stderr


@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_sd_upscale_script_is_a1111s(client, folder, batch_size):
    """A1111's "SD upscale" (scripts/sd_upscale.py) restated: the picture through Upscaler.upscale, cut by
    split_grid into width x height tiles, each through img2img (batch j of batch_size tiles from the seed of the
    batch before + 1), put back by combine_grid; here each tile's img2img is a plain img2img request."""
    from test_upscalers_s37 import a1111_combine_grid, a1111_split_grid

    img = picture(20, 12, seed=8)
    common = {"prompt": "a red circle", "steps": 2, "width": 16, "height": 16, "denoising_strength": 0.5,
              "sampler_name": "Euler"}
    r = client.post("/sdapi/v1/img2img", json={**common, "init_images": [b64_png(img)], "seed": 7,
                                               "batch_size": batch_size, "script_name": "SD upscale",
                                               "script_args": [None, 4, "R-ESRGAN 2x+", 2.0]})
    assert r.status_code == 200, r.text
    got = opened(r.json()["images"][0])
    big = a1111_extras(img, 2.0, "RealESRGAN_x2plus.pth", folder)
    grid = a1111_split_grid(big, 16, 16, 4)
    tiles = [t for _, _, row in grid for _, _, t in row]
    done, seed = [], 7
    for j in range(0, len(tiles), batch_size):
        part = tiles[j:j + batch_size]
        a = client.post("/sdapi/v1/img2img", json={**common, "init_images": [b64_png(t) for t in part], "seed": seed,
                                                   "batch_size": len(part)})
        done += [opened(b).convert("RGB") for b in a.json()["images"]]
        seed += 1
    k = iter(done)
    for row in grid:
        for cell in row[2]:
            cell[2] = next(k)
    want = a1111_combine_grid([[y * 1, h, [[x, w, t] for x, w, t in row]] for y, h, row in grid], 16, 40, 24, 4)
    assert got.size == (40, 24) and close(got.convert("RGB"), want)
    assert "SD upscale overlap: 4, SD upscale upscaler: R-ESRGAN 2x+" in got.info["parameters"]
    import json

    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"], info["seed"]) == (40, 24, 7)
    bad = client.post("/sdapi/v1/img2img", json={**common, "init_images": [b64_png(img)], "script_name": "SD upscale",
                                                 "script_args": [None, 4, 99, 2.0]})
    assert bad.status_code == 422 and "0: None" in bad.text
