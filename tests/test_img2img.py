"""Image to image (SDEdit, Meng et al. 2022): the image encoded, its posterior sampled with the image's own seed,
taken to the level of the last int(steps * strength) steps and denoised from there, gives diffusers'
StableDiffusionImg2ImgPipeline's image on the same weights, seed and scheduler (50 dB, as the text-to-image
parity test); an image's result does not depend on its batch; strength 1 starts from pure noise of the first
level; bad strengths are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_loading import save_diffusers_folder  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A smooth picture with an edge: something the model's prior does not give by itself."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x > 0.5) * 0.8 + 0.1], -1) + 0.05 * g.standard_normal((size, size, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("sampler,strength,steps", [("ddim", 0.6, 20), ("euler", 0.75, 12), ("dpmpp_2m", 0.5, 10)])
def test_img2img_matches_diffusers(tmp_path, sampler, strength, steps):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler=sampler)
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    init = _picture()
    with torch.no_grad():
        want = i2i(PROMPT, image=init, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    res = ours.generate(PROMPT, NEGATIVE, init_image=init, strength=strength, steps=steps, guidance_scale=CFG,
                        sampler=sampler, seed=SEED, progress=False)
    got = _tensor(res.images[0])
    assert res.images[0].size == init.size and res.parameters["strength"] == strength
    assert psnr(got, want.float()) >= 50



def test_a_lower_strength_stays_nearer_the_image(tmp_path):
    """The run starts from the image's latent: at strength 0.3 the result's latent is far nearer it than at 1."""
    from imagine.sampling import make_generators

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    init = _picture()
    z0 = pipe.encode_images([init], SIZE, SIZE, make_generators(1, [SEED]))
    far = {}
    for strength in (0.3, 1.0):
        lat = pipe.generate(PROMPT, init_image=init, strength=strength, steps=10, seed=SEED, progress=False,
                            output_type="latent").latents
        far[strength] = float((lat - z0).norm() / z0.norm())
    assert far[0.3] < far[1.0] / 2, far


def test_an_images_result_does_not_depend_on_its_batch(tmp_path):
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=6, strength=0.7, progress=False, output_type="latent")
    inits = [_picture(seed=1), _picture(seed=2), _picture(seed=3)]
    batch = pipe.generate(["a", "b", "c"], init_image=inits, seeds=[7, 8, 9], **kw).latents
    alone = pipe.generate("b", init_image=inits[1], seed=8, **kw).latents
    assert torch.equal(batch[1:2], alone)


def test_sizes_and_errors(tmp_path):
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=4, seed=1, progress=False)
    odd = _picture(37)  # taken to the VAE's factor (2 here): 36 x 36
    assert pipe.generate("x", init_image=odd, strength=0.5, **kw).images[0].size == (36, 36)
    assert pipe.generate("x", init_image=odd, strength=0.5, height=16, width=24, **kw).images[0].size == (24, 16)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            pipe.generate("x", init_image=odd, strength=bad, **kw)
    with pytest.raises(ValueError, match="leaves no step to run"):
        pipe.generate("x", init_image=odd, strength=0.2, **kw)
    with pytest.raises(ValueError, match="2 init images for 3 prompts"):
        pipe.generate(["a", "b", "c"], init_image=[odd, odd], **kw)
    with pytest.raises(TypeError, match="PIL image"):
        pipe.generate("x", init_image="not an image", **kw)


def test_generate_cli_takes_an_init_image(tmp_path, capsys):
    from imagine.cli import main

    save_diffusers_folder(tmp_path / "folder", "sd1")
    src = tmp_path / "in.png"
    _picture().save(src)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(tmp_path / "folder"), "a red circle", "--init-image", str(src),
                 "--strength", "0.5", "--steps", "4", "--seed", "3", "-o", str(out), "-q"]) == 0
    img = Image.open(out)
    assert img.size == (SIZE, SIZE) and "Denoising strength: 0.5" in img.text["parameters"]
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    want = pipe.generate("a red circle", init_image=_picture(), strength=0.5, steps=4, seed=3, progress=False)
    assert img.convert("RGB").tobytes() == want.images[0].tobytes()
    (tmp_path / "bad.png").write_text("not a picture")
    assert main(["generate", "--model", str(tmp_path / "folder"), "x", "--init-image", str(tmp_path / "bad.png"),
                 "-q"]) == 2
    assert "is not an image Pillow can read" in capsys.readouterr().err


def test_the_a1111_img2img_endpoint(tmp_path):
    """POST /sdapi/v1/img2img gives the pipeline's own image (A1111's fields: init_images as base64, with or
    without a data: prefix, denoising_strength), and 422 for what it cannot use."""
    import base64
    import io
    import json

    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    buf = io.BytesIO()
    _picture().save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings)
    want = pipe.generate("a red circle", init_image=_picture(), strength=0.5, steps=4, seed=11, guidance_scale=5,
                         progress=False, **a1111_settings("Euler")).images[0]
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        def post(**body):
            base = {"prompt": "a red circle", "steps": 4, "seed": 11, "cfg_scale": 5, "sampler_name": "Euler",
                    "denoising_strength": 0.5, "init_images": [b64]}
            return httpx.post(f"{srv.url}/sdapi/v1/img2img", json={**base, **body}, timeout=120)

        for prefix in ("", "data:image/png;base64,"):
            r = post(init_images=[prefix + b64])
            assert r.status_code == 200, r.text
            got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            assert got.convert("RGB").tobytes() == want.tobytes()
            info = json.loads(r.json()["info"])
            assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
        assert post(init_images=[]).status_code == 422
        assert post(init_images=["bm90IGFuIGltYWdl"]).status_code == 422  # "not an image"
        assert post(denoising_strength=0).status_code == 422


def test_a_models_matched_start_does_not_stop_image_to_image(tmp_path):
    """A model whose defaults start text to image from the matched mean: image to image starts from its picture."""
    from imagine.testing import make_tiny_model

    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "tiny", defaults={"start": "matched"}))
    assert pipe.generate("x", steps=2, seed=1, progress=False).parameters["start"] == "matched"
    res = pipe.generate("x", init_image=_picture(16), strength=0.5, steps=4, seed=1, progress=False)
    assert "start" not in res.parameters
    with pytest.raises(ValueError, match="starts from the image"):  # asked for explicitly
        pipe.generate("x", init_image=_picture(16), strength=0.5, steps=4, seed=1, start="matched", progress=False)


def test_the_a1111_img2img_endpoint_takes_one_picture_per_image(tmp_path):
    """Several init_images: image i of the batch starts from picture i (AUTOMATIC1111 sets the batch to their
    number); more pictures than the batch is 422."""
    import base64
    import io
    import json

    httpx = pytest.importorskip("httpx")
    from imagine.samplers import a1111_settings
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    pictures = [_picture(seed=4), _picture(seed=5)]

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 4, "seed": 20, "batch_size": 2, "denoising_strength": 0.5,
                "init_images": [b64(im) for im in pictures]}
        r = httpx.post(f"{srv.url}/sdapi/v1/img2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["batch_size"] == 2
        for i, (data, picture) in enumerate(zip(r.json()["images"], pictures)):
            got = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").tobytes()
            # (the API runs the model's sampler, DDIM, as A1111 does: samplers.a1111_settings)
            want = pipe.generate("a red circle", init_image=picture, strength=0.5, steps=4, seed=20 + i,
                                 progress=False, **a1111_settings(pipe.defaults["sampler"])).images[0].tobytes()
            assert got == want, i
        r = httpx.post(f"{srv.url}/sdapi/v1/img2img", json={**body, "batch_size": 1}, timeout=120)
        assert r.status_code == 422 and "2 pictures for a batch_size of 1" in r.json()["detail"]


def test_a1111_rules_truncate_the_8_bit_picture(tmp_path):
    """Under A1111's rules the picture's 8-bit values are A1111's processing.py's: 255 (x + 1) / 2 of the clamped
    decode, cast to uint8 (truncated); diffusers' rounding otherwise (VaeImageProcessor.postprocess)."""
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=3, seed=SEED, progress=False, sampler="euler")
    latents = pipe.generate(PROMPT, output_type="latent", strength_rule="a1111", **kw).latents
    x = pipe.decode(latents)[0].float()
    a1111 = (255. * np.moveaxis(torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).numpy(), 0, 2)).astype(np.uint8)
    diffusers_way = (np.moveaxis(((x / 2 + 0.5).clamp(0, 1) * 255).numpy(), 0, 2)).round().astype(np.uint8)
    got = np.asarray(pipe.generate(PROMPT, strength_rule="a1111", **kw).images[0])
    assert np.array_equal(got, a1111) and not np.array_equal(a1111, diffusers_way)
    assert np.array_equal(np.asarray(pipe.generate(PROMPT, **kw).images[0]), diffusers_way)
