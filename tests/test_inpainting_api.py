"""Inpainting through the CLI (`--mask`, `--invert-mask`) and AUTOMATIC1111's /sdapi/v1/img2img (`mask`,
`mask_blur`, `inpainting_fill`, `inpaint_full_res` with its padding, `inpainting_mask_invert`).

The truth each answer is held to is built here from the pipeline and the picture: the CLI's PNG is
`pipe.generate(..., mask_image=...)`'s image; the API's is that image laid over the original picture with the blurred
mask (A1111's paste back; "Only masked" crops first and pastes the result into the crop), and the kept part, away
from the blurred edge, is the original's pixels exactly. The crop follows diffusers' get_crop_region to the pixel."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from test_loading import save_diffusers_folder  # noqa: E402
from test_sd_parity import SIZE  # noqa: E402

diffusers = pytest.importorskip("diffusers")
httpx = pytest.importorskip("httpx")

from imagine.inpainting import blur_mask, crop_region, fill_masked, paste_over  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=4, guidance_scale=5.0, sampler="euler")  # the A1111 bodies below ask for the same
BODY = {"prompt": "a red circle", "steps": 4, "cfg_scale": 5, "sampler_name": "Euler"}
# (the A1111 API runs Euler as AUTOMATIC1111 does: samplers.a1111_settings; the CLI and the worker as KW)
API = dict(KW, **a1111_settings("Euler"))


def _picture(size: int = SIZE, seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x > 0.5) * 0.8 + 0.1], -1) + 0.05 * g.standard_normal((size, size, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _mask(size: int = SIZE, box=(12, 20, 10, 18)) -> Image.Image:
    """White (paint anew) in the box (top, bottom, left, right), black elsewhere; RGB, as an editor saves it."""
    a = np.zeros((size, size, 3), np.uint8)
    top, bottom, left, right = box
    a[top:bottom, left:right] = 255
    return Image.fromarray(a)


def run_queued(worker, jobs) -> list:
    """Queue every job before the worker starts (so that compatible ones batch), run them, stop the worker."""
    for job in jobs:
        worker.submit(job)
    worker.start()
    try:
        return [job.future.result(120) for job in jobs]
    finally:
        worker.stop()


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _a(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny SD 1.x folder with a plain (4-channel) U-Net, its pipeline, and a server around it."""
    folder = tmp_path_factory.mktemp("plain") / "folder"
    save_diffusers_folder(folder, "sd1")
    pipe = TextToImagePipeline.from_pretrained(folder)
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        srv.pipe = pipe
        yield srv


def _post(srv, **body):
    return httpx.post(f"{srv.url}/sdapi/v1/img2img", json={**BODY, **body}, timeout=120)


def test_the_crop_region_is_diffusers_rule():
    """Bounding box of the non-black pixels, padded, grown to the generation's aspect ratio and kept inside the
    picture: the same box as diffusers' VaeImageProcessor.get_crop_region, on 400 random masks; None when blank."""
    from diffusers.image_processor import VaeImageProcessor

    g = np.random.default_rng(1)
    for _ in range(400):
        h, w = (int(v) for v in g.integers(8, 70, 2))
        a = np.zeros((h, w), np.uint8)
        y0, x0 = int(g.integers(0, h)), int(g.integers(0, w))
        a[y0:int(g.integers(y0 + 1, h + 1)), x0:int(g.integers(x0 + 1, w + 1))] = int(g.integers(1, 256))
        a[int(g.integers(0, h)), int(g.integers(0, w))] = 200  # a stray dot counts too
        mask = Image.fromarray(a)
        gw, gh, pad = int(g.integers(8, 100)), int(g.integers(8, 100)), int(g.integers(0, 12))
        assert crop_region(mask, gw, gh, pad) == tuple(VaeImageProcessor.get_crop_region(mask, gw, gh, pad))
    assert crop_region(Image.new("L", (16, 16)), 16, 16, 4) is None


def test_generate_cli_inpaints(tmp_path, capsys):
    """--init-image with --mask is the pipeline's inpainting (strength 1 unless given); --invert-mask paints the
    black part; the PNG's parameters say so; --mask alone or unreadable is exit code 2 before the model loads."""
    from imagine.cli import main

    folder = tmp_path / "folder"
    save_diffusers_folder(folder, "sd1", in_channels=9)
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    _picture().save(picture)
    _mask().save(mask)
    pipe = TextToImagePipeline.from_pretrained(folder)
    base = ["generate", "--model", str(folder), "a red circle", "--init-image", str(picture), "--steps", "4",
            "--seed", "3", "-q"]

    assert main([*base, "--mask", str(mask), "-o", str(tmp_path / "a.png")]) == 0
    got = Image.open(tmp_path / "a.png")
    want = pipe.generate("a red circle", init_image=_picture(), mask_image=_mask(), steps=4, seed=3, progress=False)
    assert want.parameters["strength"] == 1.0 and got.convert("RGB").tobytes() == want.images[0].tobytes()
    text = got.text["parameters"]
    assert "Denoising strength: 1," in text and "Mask blur: 0" in text and "Mask mode" not in text
    assert json.loads(got.text["imagine"])["inpainting"] is True

    assert main([*base, "--mask", str(mask), "--invert-mask", "--strength", "0.6", "-o", str(tmp_path / "b.png")]) == 0
    got = Image.open(tmp_path / "b.png")
    want = pipe.generate("a red circle", init_image=_picture(), mask_image=ImageOps.invert(_mask().convert("L")),
                         strength=0.6, steps=4, seed=3, progress=False).images[0]
    assert got.convert("RGB").tobytes() == want.tobytes()
    assert "Mask mode: Inpaint not masked" in got.text["parameters"] and "Denoising strength: 0.6" in got.text[
        "parameters"]

    assert main([*base, "--mask", str(mask), "--strength", "0.6", "--masked-content", "latent_nothing",
                 "-o", str(tmp_path / "d.png")]) == 0
    want = pipe.generate("a red circle", init_image=_picture(), mask_image=_mask(), strength=0.6, steps=4, seed=3,
                         masked_content="latent_nothing", progress=False).images[0]
    assert Image.open(tmp_path / "d.png").convert("RGB").tobytes() == want.tobytes()
    assert "Masked content: latent nothing" in Image.open(tmp_path / "d.png").text["parameters"]

    assert main([*base, "-o", str(tmp_path / "c.png")]) == 0  # image to image keeps A1111's 0.75
    assert "Denoising strength: 0.75" in Image.open(tmp_path / "c.png").text["parameters"]
    capsys.readouterr()

    # errors come before the model loads: the model path here does not exist
    missing = ["generate", "--model", str(tmp_path / "no-such-model"), "x", "-q"]
    assert main([*missing, "--mask", str(mask)]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    assert main([*missing, "--init-image", str(picture), "--masked-content", "latent_noise"]) == 2
    assert "--masked-content needs --mask" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not a picture")
    assert main([*missing, "--init-image", str(picture), "--mask", str(tmp_path / "bad.png")]) == 2
    assert "--mask: " in (err := capsys.readouterr().err) and "is not an image Pillow can read" in err
    assert main([*missing, "--init-image", str(picture), "--mask", str(tmp_path / "none.png")]) == 2
    assert "--mask: " in capsys.readouterr().err
    assert main([*missing, "--init-image", str(picture), "--invert-mask"]) == 2
    assert "--invert-mask needs --mask" in capsys.readouterr().err


def test_a1111_inpainting_of_the_whole_picture(plain):
    """inpaint_full_res false: the picture (resized to width x height) with the masked part filled (inpainting_fill
    0), inpainted at denoising_strength, laid over the picture with the blurred mask doubled (A1111's overlay for
    the whole picture); the kept part away from the edge is the picture's own pixels. inpainting_fill 1 starts
    from the picture as it is; inpainting_mask_invert paints the black part; a mask of another size is resized."""
    pipe, picture, mask = plain.pipe, _picture(), _mask()
    r = _post(plain, init_images=[_b64(picture)], mask="data:image/png;base64," + _b64(mask), seed=5,
              denoising_strength=0.8, inpaint_full_res=False, mask_blur=2)
    assert r.status_code == 200, r.text
    got = _image(r.json()["images"][0])
    blurred = blur_mask(mask, 2)
    result = pipe.generate("a red circle", init_image=fill_masked(picture, blurred), mask_image=blurred,
                           strength=0.8, seed=5, emphasis=True, progress=False, **API).images[0]
    want = paste_over(result, picture, blurred.point(lambda v: min(255, 2 * v)))
    assert got.tobytes() == want.tobytes()
    a, p = _a(got), _a(picture)
    keep = np.ones(p.shape[:2], bool)
    keep[12 - 8:20 + 8, 10 - 8:18 + 8] = False  # the box and 4 blur radii around it
    assert (a[keep] == p[keep]).all()  # the original's pixels, not their trip through the VAE
    assert np.abs(a[13:19, 11:17] - p[13:19, 11:17]).mean() > 5  # the box was painted anew
    info = json.loads(r.json()["info"])
    assert (info["mask_blur"], info["inpainting_fill"], info["inpaint_full_res"], info["inpainting_mask_invert"]) \
        == (2, 0, False, 0)
    assert info["extra_generation_params"] == {"Mask blur": 2, "Masked content": "fill"}
    assert "Mask blur: 2" in info["infotexts"][0] and "Masked content: fill" in info["infotexts"][0]
    assert "Denoising strength: 0.8" in info["infotexts"][0] and "Inpaint area" not in info["infotexts"][0]
    assert not set(info["ignored_fields"]) & {"mask", "mask_blur", "inpaint_full_res", "inpainting_fill"}
    assert r.json()["parameters"]["mask"].endswith("base64 characters>")

    # inverted, "original" fill, A1111's default blur (4), a mask twice the picture's size
    big = _mask(box=(4, 28, 4, 28)).resize((2 * SIZE, 2 * SIZE), Image.NEAREST)
    r = _post(plain, init_images=[_b64(picture)], mask=_b64(big), seed=6, inpaint_full_res=False,
              inpainting_fill=1, inpainting_mask_invert=1)
    assert r.status_code == 200, r.text
    blurred = blur_mask(ImageOps.invert(big.convert("L")), 4).resize((SIZE, SIZE), Image.LANCZOS)
    result = pipe.generate("a red circle", init_image=picture, mask_image=blurred, strength=0.75, seed=6,
                           emphasis=True, progress=False, **API).images[0]
    want = paste_over(result, picture, blurred.point(lambda v: min(255, 2 * v)))
    got = _image(r.json()["images"][0])
    assert got.tobytes() == want.tobytes()
    assert (_a(got)[12:20, 12:20] == _a(picture)[12:20, 12:20]).all()  # the middle of the white box is kept now
    assert np.abs(_a(got)[:2] - _a(picture)[:2]).mean() > 5  # and the black border painted anew
    info = json.loads(r.json()["info"])
    assert info["inpainting_mask_invert"] == 1 and info["inpainting_fill"] == 1 and info["mask_blur"] == 4
    assert "Mask mode: Inpaint not masked" in info["infotexts"][0] and "Masked content" not in info["infotexts"][0]


def test_a1111_only_masked_inpaints_the_crop(plain):
    """inpaint_full_res (A1111's default): the crop around the blurred mask, padded and grown to width:height, is
    inpainted at width x height and pasted back; nothing outside the crop changes, and the answer has the
    picture's size. A blank mask there runs plain img2img, as A1111 does."""
    pipe, picture, mask = plain.pipe, _picture(), _mask(box=(14, 18, 12, 18))
    r = _post(plain, init_images=[_b64(picture)], mask=_b64(mask), seed=7, width=32, height=16, mask_blur=1,
              inpaint_full_res_padding=1)
    assert r.status_code == 200, r.text
    got = _image(r.json()["images"][0])
    assert got.size == picture.size
    blurred = blur_mask(mask, 1)
    box = crop_region(blurred, 32, 16, 1)
    x1, y1, x2, y2 = box
    assert (x2 - x1) == 2 * (y2 - y1) and 0 < x1 < x2 < SIZE and 0 < y1 < y2 < SIZE, box  # 2:1, inside
    crop_mask = blurred.crop(box).resize((32, 16), Image.LANCZOS)
    start = fill_masked(picture.crop(box).resize((32, 16), Image.LANCZOS), crop_mask)
    result = pipe.generate("a red circle", init_image=start, mask_image=crop_mask, strength=0.75, seed=7,
                           height=16, width=32, emphasis=True, progress=False, **API).images[0]
    whole = picture.copy()
    whole.paste(result.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    assert got.tobytes() == paste_over(whole, picture, blurred).tobytes()
    a, p = _a(got), _a(picture)
    outside = np.ones(p.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert (a[outside] == p[outside]).all() and np.abs(a[14:18, 12:18] - p[14:18, 12:18]).mean() > 5
    info = json.loads(r.json()["info"])
    assert info["inpaint_full_res"] is True and info["inpaint_full_res_padding"] == 1
    assert (info["width"], info["height"]) == (32, 16)
    assert "Inpaint area: Only masked" in info["infotexts"][0] and "Masked area padding: 1" in info["infotexts"][0]

    r = _post(plain, init_images=[_b64(picture)], mask=_b64(Image.new("L", picture.size)), seed=8)
    assert r.status_code == 200, r.text
    want = pipe.generate("a red circle", init_image=picture, strength=0.75, seed=8, emphasis=True, progress=False,
                         **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    assert json.loads(r.json()["info"])["inpaint_full_res"] is False


def test_inpainting_jobs_batch_with_their_own_masks(plain):
    """Two inpainting jobs with different masks share one forward pass, each with its own mask and picture (its
    image as alone, up to one 8-bit level of float rounding); an img2img job without a mask runs apart."""
    from imagine.server.worker import Job, ModelWorker, Settings

    pipe = plain.pipe
    worker = ModelWorker(pipe, max_batch=8)
    settings = Settings(height=SIZE, width=SIZE, steps=4, sampler="euler", guidance_scale=5.0, strength=0.9)
    masks = [_mask(box=(2, 12, 2, 12)), _mask(box=(18, 30, 16, 30))]
    pictures = [_picture(seed=1), _picture(seed=2)]
    inpainting = dataclasses.replace(settings, inpainting=True)
    jobs = [Job(prompts=["a red circle"], negative_prompts=[""], seeds=[40 + i], settings=inpainting,
                init_images=[pictures[i]], masks=[masks[i]]) for i in range(2)]
    jobs.append(Job(prompts=["a red circle"], negative_prompts=[""], seeds=[42], settings=settings,
                    init_images=[pictures[0]]))
    results = run_queued(worker, jobs)  # all queued before the worker starts: the two inpainting jobs go in one batch
    assert worker.stats["batches"] == 2 and results[0].batch_images == 2 and results[2].batch_images == 1
    for i in range(2):
        alone = pipe.generate("a red circle", init_image=pictures[i], mask_image=masks[i], strength=0.9, seed=40 + i,
                              progress=False, **KW).images[0]
        assert np.abs(_a(results[i].images[0]) - _a(alone)).max() <= 1, i
        assert results[i].parameters.get("inpainting") is True
    plain_i2i = pipe.generate("a red circle", init_image=pictures[0], strength=0.9, seed=42, progress=False,
                              **KW).images[0]
    assert results[2].images[0].tobytes() == plain_i2i.tobytes() and "inpainting" not in results[2].parameters
    with pytest.raises(ValueError, match="one init image and one mask per image"):
        Job(prompts=["x"], negative_prompts=[""], seeds=[1], settings=inpainting, init_images=[pictures[0]])


@pytest.mark.parametrize("body,field,words", [
    ({"mask": "bm90IGFuIGltYWdl"}, "mask", "not a base64 image"),
    ({"mask": "@@@"}, "mask", "not a base64 image"),
    ({"init_images": []}, "init_images", "mask needs init_images"),
    ({"inpainting_fill": 4}, "inpainting_fill", "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)"),
    ({"mask_blur": -1}, "mask_blur", "between 0 and"),
    # (mask_blur_x != mask_blur_y was refused here; A1111 blurs along x and y apart, as imagine now does:
    # test_controlnet_review_fixes)
    ({"mask_blur_x": -2, "mask_blur_y": 6}, "mask_blur_x", "between 0 and"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "must be 0"),
    ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding", ">= 0"),
])
def test_bad_inpainting_requests_are_422(plain, body, field, words):
    full = {"init_images": [_b64(_picture())], "mask": _b64(_mask()), "seed": 1, **body}
    r = _post(plain, **full)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["detail"], r.json()


def test_inpainting_fields_without_a_mask_are_listed_as_ignored(plain):
    """A1111 clients (webuiapi) send mask_blur, inpainting_fill, ... with every img2img: without a mask they are
    not used, and say so, as other unused fields do; their values are not checked then."""
    r = _post(plain, init_images=[_b64(_picture())], seed=2, mask_blur=4, inpainting_fill=2, inpaint_full_res=True)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert {"mask_blur", "inpainting_fill", "inpaint_full_res"} <= set(info["ignored_fields"])
    assert "mask_blur" not in info and info["extra_generation_params"] == {}


def test_latent_noise_and_latent_nothing_fills(plain):
    """inpainting_fill 2 and 3 run the pipeline's masked_content latent_noise / latent_nothing: the API's image is the
    pipeline's result laid over the original (as for the other fills), and the infotext says which."""
    pipe = plain.pipe
    for fill, content, label in ((2, "latent_noise", "latent noise"), (3, "latent_nothing", "latent nothing")):
        r = _post(plain, init_images=[_b64(_picture())], mask=_b64(_mask()), seed=5, inpainting_fill=fill,
                  inpaint_full_res=False, mask_blur=0, denoising_strength=0.6)
        assert r.status_code == 200, r.text
        got = _image(r.json()["images"][0])
        # (the picture is filled first for 2 and 3 too, as A1111's `if self.inpainting_fill != 1: image =
        # masking.fill(image, latent_mask)`; this test sent it unfilled before: test_controlnet_review_fixes)
        start = fill_masked(_picture(), _mask().convert("L"))
        want = pipe.generate("a red circle", init_image=start, mask_image=_mask(), strength=0.6, seed=5,
                             masked_content=content, progress=False, **{k: v for k, v in API.items()}).images[0]
        assert f"Masked content: {label}" in json.loads(r.json()["info"])["infotexts"][0]
        keep = np.asarray(_mask().convert("L")) < 128  # the kept part is the original's; the painted part the result's
        assert np.array_equal(np.asarray(got)[~keep], np.asarray(want.convert("RGB"))[~keep])


def test_latent_noise_fill_of_every_round_is_the_first_rounds(plain):
    """A1111 fills "latent noise" once for the whole job (StableDiffusionProcessingImg2Img.init, from
    all_seeds[0:batch_size]): with n_iter 2 the second round's image (seed 6) starts from seed 5's fill, its own
    noise from seed 6 (the pipeline's latent_noise_seeds)."""
    pipe = plain.pipe
    r = _post(plain, init_images=[_b64(_picture())], mask=_b64(_mask()), seed=5, inpainting_fill=2, n_iter=2,
              batch_size=1, inpaint_full_res=False, mask_blur=0, denoising_strength=0.6)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [5, 6]
    got = [np.asarray(_image(b)) for b in r.json()["images"][:2]]
    start = fill_masked(_picture(), _mask().convert("L"))
    kw = dict(init_image=start, mask_image=_mask(), strength=0.6, masked_content="latent_noise", progress=False, **API)
    first = pipe.generate("a red circle", seed=5, **kw).images[0]
    second = pipe.generate("a red circle", seed=6, latent_noise_seeds=[5], **kw).images[0]
    own = pipe.generate("a red circle", seed=6, **kw).images[0]
    keep = np.asarray(_mask().convert("L")) < 128
    for image, want in zip(got, (first, second)):
        assert np.array_equal(image[~keep], np.asarray(want.convert("RGB"))[~keep])
    assert not np.array_equal(np.asarray(second), np.asarray(own))  # (the first round's fill is not the own one)
    with pytest.raises(ValueError, match="latent_noise_seeds are for masked_content 'latent_noise'"):
        pipe.generate("a red circle", seed=6, latent_noise_seeds=[5],
                      **{**kw, "masked_content": "latent_nothing"})
