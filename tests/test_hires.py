"""AUTOMATIC1111's hires. fix: text to image at the base size, the pictures upscaled (Lanczos), then image to
image at the large size with each image's own seed. It must be exactly that composition of the two tested
passes, give the large size, record A1111's fields, and refuse what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imagine.pipelines.text_to_image import TextToImagePipeline
from imagine.samplers import a1111_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.testing import make_tiny_model

    return TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_hires_is_text_to_image_then_image_to_image(pipe):
    kw = dict(steps=3, guidance_scale=4.0, sampler="euler", height=16, width=24, progress=False)
    res = pipe.generate_hires(["a red circle", "a blue square"], "green", hires_scale=2, hires_strength=0.6,
                              hires_steps=5, seeds=[4, 9], hires_upscaler="lanczos", **kw)
    first = pipe.generate(["a red circle", "a blue square"], "green", seeds=[4, 9], **kw)
    upscaled = pipe.generate(["a red circle", "a blue square"], "green", seeds=[4, 9], init_image=first.images,
                             strength=0.6, steps=5, guidance_scale=4.0, sampler="euler", height=32, width=48,
                             progress=False)
    assert [im.size for im in res.images] == [(48, 32), (48, 32)]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(res.images, upscaled.images))
    p = res.parameters
    assert (p["width"], p["height"], p["steps"], p["hires_scale"], p["hires_steps"], p["strength"]) == \
        (24, 16, 3, 2.0, 5, 0.6)


def test_latent_hires_is_a_bilinear_latent_upscale_then_image_to_image(pipe):
    """A1111's default "Latent" upscaler: the first pass's latents resized bilinearly, no VAE round trip."""
    kw = dict(steps=3, guidance_scale=4.0, sampler="euler", height=16, width=24, progress=False)
    res = pipe.generate_hires("a red circle", hires_scale=1.5, hires_strength=0.7, seed=4, **kw)
    first = pipe.generate("a red circle", seed=4, output_type="latent", **kw)
    up = torch.nn.functional.interpolate(first.latents, size=(12, 18), mode="bilinear", align_corners=False)
    second = pipe.generate("a red circle", seed=4, init_latents=up, strength=0.7, steps=3, guidance_scale=4.0,
                           sampler="euler", progress=False)
    assert res.images[0].size == (36, 24) and res.images[0].tobytes() == second.images[0].tobytes()
    assert res.parameters["hires_upscaler"] == "Latent"
    # A1111's hires prompt: the second pass reads it; the parameters keep the first pass's prompt and name it
    other = pipe.generate_hires("a red circle", hires_scale=1.5, hires_strength=0.7, seed=4, hires_prompt="a square",
                                hires_negative_prompt="blur", **kw)
    second = pipe.generate("a square", "blur", seed=4, init_latents=up, strength=0.7, steps=3, guidance_scale=4.0,
                           sampler="euler", progress=False)
    assert other.images[0].tobytes() == second.images[0].tobytes()
    assert (other.parameters["prompt"], other.parameters["hires_prompt"]) == (["a red circle"], "a square")
    with pytest.raises(ValueError, match="hires_upscaler must be one of latent, lanczos"):
        pipe.generate_hires("x", hires_upscaler="ESRGAN_4x", steps=2, progress=False)
    with pytest.raises(ValueError, match="init_latents must be"):
        pipe.generate("x", init_latents=torch.zeros(2, 4, 8, 8), steps=2, progress=False)


def test_hires_sizes_round_to_the_vae_factor_and_errors(pipe):
    assert pipe.scale == 2  # the tiny model's VAE factor
    res = pipe.generate_hires("x", hires_scale=1.5, steps=2, height=18, width=16, seed=1, progress=False)
    assert res.images[0].size == (24, 28)  # 16 x 1.5 = 24; 18 x 1.5 = 27 -> 28, a multiple of 2
    for bad in (1, 0.5, 5, True):
        with pytest.raises(ValueError, match=r"hires_scale must be a number in \(1, 4\]"):
            pipe.generate_hires("x", hires_scale=bad, steps=2, progress=False)
    with pytest.raises(ValueError, match="hires_steps"):
        pipe.generate_hires("x", hires_steps=0, steps=2, progress=False)
    with pytest.raises(ValueError, match="starts from text"):
        pipe.generate_hires("x", init_image=Image.new("RGB", (16, 16)), steps=2, progress=False)


def test_generate_cli_hires(tmp_path, pipe, capsys):
    from imagine.cli import main
    from imagine.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "big.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "2", "--seed", "3", "--hires-scale",
                 "2", "--hires-strength", "0.5", "-o", str(out), "-q"]) == 0
    img = Image.open(out)
    assert img.size == (32, 32)
    text = img.text["parameters"]
    assert "Size: 16x16" in text and "Hires upscale: 2" in text and "Denoising strength: 0.5" in text
    assert json.loads(img.text["imagine"])["hires_scale"] == 2.0
    want = TextToImagePipeline.from_pretrained(model).generate_hires("a red circle", hires_scale=2, hires_strength=0.5,
                                                                      steps=2, seed=3, progress=False)
    assert img.convert("RGB").tobytes() == want.images[0].tobytes()
    assert torch.is_tensor(want.latents)


def test_the_a1111_api_runs_hires_fix(tmp_path, pipe):
    """txt2img with enable_hr: the picture at width x height x hr_scale, as generate_hires gives it; the infotext
    names the first pass's size and A1111's hires fields."""
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 2, "seed": 5, "width": 16, "height": 16, "sampler_name": "Euler",
                "cfg_scale": 3, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 3}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings)
        a1111 = a1111_settings("Euler")
        want = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=3, steps=2, seed=5,
                                   width=16, height=16, guidance_scale=3, progress=False, **a1111)
        assert got.size == (32, 32) and got.convert("RGB").tobytes() == want.images[0].tobytes()
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert "Size: 16x16" in text and "Hires upscale: 2" in text and "Hires steps: 3" in text
        assert "Denoising strength: 0.5" in text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_prompt": "a blue square"}, timeout=120)
        assert r.status_code == 200, r.text
        want = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=3, steps=2, seed=5,
                                   width=16, height=16, guidance_scale=3, hires_prompt="a blue square",
                                   progress=False, **a1111)
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert got.convert("RGB").tobytes() == want.images[0].tobytes()
        assert "Hires prompt: a blue square" in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_prompt": "x" * 3000}, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "hr_prompt"
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_scale": 8}, timeout=120)
        assert r.status_code == 422
