"""AUTOMATIC1111's variation seed (subseed, subseed_strength; imagine.sampling.variation_noise): each image's start
noise moved towards its variation seed's by A1111's spherical interpolation. Checked: the interpolation against the
formula written out here in float32 as A1111 writes its `slerp`; strength 0 is the seed's image and strength 1 (DDIM,
no noise after the start) the variation seed's, bit for bit; image i takes variation seed subseed + i and does not
depend on its batch; the A1111 API and the CLI follow, with A1111's infotext."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from test_loading import save_diffusers_folder  # noqa: E402

from imagine.sampling import variation_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def _a1111_slerp(val, low, high):
    """A1111's formula (modules/processing.py slerp), in float32 as it runs."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def test_the_interpolation_is_a1111s():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    for s in (0.1, 0.5, 0.9):
        assert torch.allclose(variation_noise(s, a, b), _a1111_slerp(s, a, b), atol=1e-5, rtol=0)
    assert torch.equal(variation_noise(0.0, a, b), a)
    assert torch.allclose(variation_noise(1.0, a, b), b, atol=1e-6, rtol=0)
    near = a + 1e-3 * b  # nearly parallel: A1111's linear fallback, written as it writes it
    assert torch.allclose(variation_noise(0.3, a, near), _a1111_slerp(0.3, a, near), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"subseed_strength must be in \[0, 1\]"):
        variation_noise(1.5, a, b)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    save_diffusers_folder(folder, "sd1", scheduler="ddim")
    return TextToImagePipeline.from_pretrained(folder)


KW = dict(steps=4, height=16, width=16, progress=False, output_type="latent", sampler="ddim", guidance_scale=5.0)


def test_strengths_0_and_1_are_the_two_seeds_and_a_batch_changes_nothing(pipe):
    plain = pipe.generate("a red circle", seed=5, **KW)
    assert torch.equal(pipe.generate("a red circle", seed=5, subseed=9, subseed_strength=0.0, **KW).latents,
                       plain.latents)
    other = pipe.generate("a red circle", seed=9, **KW).latents
    full = pipe.generate("a red circle", seed=5, subseed=9, subseed_strength=1.0, **KW)
    assert torch.equal(full.latents, other)  # (DDIM draws no noise after the start)
    mid = pipe.generate(["a red circle"] * 2, seed=5, subseed=9, subseed_strength=0.4, **KW)
    # (A1111's processing: all_seeds = seed + (i if subseed_strength == 0 else 0), all_subseeds = subseed + i)
    assert mid.seeds == [5, 5] and mid.subseeds == [9, 10] and mid.parameters["subseed_strength"] == 0.4
    assert pipe.generate(["a red circle"] * 2, seed=5, subseed=9, subseed_strength=0.0, **KW).seeds == [5, 6]
    for i in range(2):
        alone = pipe.generate("a red circle", seed=5, subseed=9 + i, subseed_strength=0.4, **KW).latents
        assert torch.allclose(mid.latents[i:i + 1], alone, atol=1e-5, rtol=0)
    assert float((mid.latents[:1] - plain.latents).abs().max()) > 0.1 and \
        float((mid.latents[:1] - other).abs().max()) > 0.1


def test_hires_keeps_the_variation_seeds_for_both_passes(pipe):
    kw = {k: v for k, v in KW.items() if k != "output_type"}
    res = pipe.generate_hires("a red circle", hires_scale=1.5, seed=5, subseed=9, subseed_strength=0.5, **kw)
    assert res.subseeds == [9]
    again = pipe.generate_hires("a red circle", hires_scale=1.5, seed=5, subseeds=[9], subseed_strength=0.5, **kw)
    assert res.images[0].tobytes() == again.images[0].tobytes()
    randomly = pipe.generate_hires("a red circle", hires_scale=1.5, seed=5, subseed_strength=0.5, **kw)
    first = pipe.generate("a red circle", seed=5, subseeds=randomly.subseeds, subseed_strength=0.5, **KW)
    assert randomly.subseeds == first.subseeds  # (a random variation seed is drawn once, for both passes)


def test_the_a1111_api_and_the_cli_follow(pipe, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    from imagine.samplers import a1111_settings

    kw = {k: v for k, v in KW.items() if k != "output_type"}
    # (the API runs DDIM as A1111 does: its timesteps, stopping at t = 1's level)
    api_kw = {**{k: v for k, v in kw.items() if k != "sampler"}, **a1111_settings("DDIM")}
    want = pipe.generate("a red circle", seed=5, subseed=9, subseed_strength=0.3, emphasis=True, **api_kw).images[0]
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 4, "cfg_scale": 5, "width": 16, "height": 16, "seed": 5,
                "sampler_name": "DDIM", "subseed": 9, "subseed_strength": 0.3}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.convert("RGB").tobytes()
        info = json.loads(r.json()["info"])
        assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (9, [9], 0.3)
        assert "Variation seed: 9, Variation seed strength: 0.3" in info["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "subseed_strength": 2}, timeout=60)
        assert r.status_code == 422 and "subseed_strength" in r.text
    out = tmp_path / "v.png"
    code = main(["generate", "--model", pipe.c.source, "a red circle", "--seed", "5", "--variation-seed", "9",
                 "--variation-strength", "0.3", "--steps", "4", "--sampler", "ddim", "--guidance-scale", "5",
                 "--height", "16", "--width", "16", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    want_cli = pipe.generate("a red circle", seed=5, subseed=9, subseed_strength=0.3, **kw).images[0]
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want_cli.convert("RGB").tobytes()
    assert "Variation seed: 9, Variation seed strength: 0.3" in img.text["parameters"]
    two = tmp_path / "two"  # (two images: both keep seed 5, the variation seeds 9 and 10, as A1111 numbers them)
    assert main(["generate", "--model", pipe.c.source, "a red circle", "--seed", "5", "--variation-seed", "9",
                 "--variation-strength", "0.3", "--steps", "4", "--sampler", "ddim", "--guidance-scale", "5",
                 "--height", "16", "--width", "16", "--num-images", "2", "-o", str(two), "-q"]) == 0
    texts = [Image.open(f).text["parameters"] for f in sorted(two.glob("*.png"))]
    assert [("Seed: 5," in t, "Variation seed: 9," in t, "Variation seed: 10," in t) for t in texts] == \
        [(True, True, False), (True, False, True)]
