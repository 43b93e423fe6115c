"""AUTOMATIC1111's img2img resize modes (`imagine.images.fit_picture`; the pipeline's, the CLI's and the A1111 API's
`resize_mode`): the fitted picture is diffusers' VaeImageProcessor.resize (which states A1111's rule) bit for bit,
and image to image and inpainting with a mode give the image of the same run on the picture (and mask) fitted
beforehand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_inpainting_api import API, BODY, KW, _b64, _image, _mask, _picture, _post, plain  # noqa: F401, E402
from test_loading import save_diffusers_folder  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.images import RESIZE_MODES, fit_picture  # noqa: E402
from imagine.inpainting import blur_mask, fill_masked, paste_over  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fitting_is_diffusers_resize_bit_for_bit():
    """crop_and_resize = diffusers' resize_mode "crop", resize_and_fill = "fill", just_resize = "default", on 300
    random picture and target sizes each (wider, taller and equal aspect ratios); a grey picture keeps its mode."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(resample="lanczos")
    g = np.random.default_rng(0)
    for _ in range(300):
        w0, h0, w, h = (int(v) for v in g.integers(5, 120, 4))
        im = Image.fromarray(g.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
        for mode, theirs in (("crop_and_resize", "crop"), ("resize_and_fill", "fill"), ("just_resize", "default")):
            got, want = fit_picture(im, w, h, mode), proc.resize(im, h, w, resize_mode=theirs)
            assert got.size == want.size and got.tobytes() == want.tobytes(), (mode, (w0, h0), (w, h))
    for (w0, h0), (w, h) in (((64, 32), (32, 16)), ((30, 45), (20, 30)), ((17, 17), (40, 40))):  # equal ratios
        im = Image.fromarray(g.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
        for mode, theirs in (("crop_and_resize", "crop"), ("resize_and_fill", "fill")):
            assert fit_picture(im, w, h, mode).tobytes() == proc.resize(im, h, w, resize_mode=theirs).tobytes()
    grey = Image.fromarray(g.integers(0, 256, (30, 50), dtype=np.uint8))
    got = fit_picture(grey, 40, 40, "resize_and_fill")
    assert got.mode == "L" and got.tobytes() == proc.resize(grey, 40, 40, resize_mode="fill").convert("L").tobytes()
    # the picture's middle is kept whole by crop_and_resize: a 2:1 picture cut to a square is its middle half
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (16, 0, 48, 32))
    assert fit_picture(wide, 32, 32, "crop_and_resize").getcolors() == [(32 * 32, (0, 0, 255))]
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        fit_picture(wide, 32, 32, "stretch")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("resize") / "folder"
    save_diffusers_folder(folder, "sd1")
    return TextToImagePipeline.from_pretrained(folder)


def test_the_pipelines_modes_are_the_picture_fitted_first(pipe):
    """Image to image of a 48x24 picture at 32x32, and inpainting with its mask: each mode gives, bit for bit, the
    run on the picture (and mask) fitted beforehand; the modes give different images. latent_upscale at the
    picture's own size is just_resize; at another size it is neither, and it is refused with a mask."""
    picture = _picture(48).resize((48, 24), Image.LANCZOS)
    mask = _mask(48).resize((48, 24), Image.NEAREST)
    run = dict(strength=0.7, seed=3, progress=False, output_type="latent", height=32, width=32, **KW)
    seen = []
    for mode in ("just_resize", "crop_and_resize", "resize_and_fill"):
        got = pipe.generate("a red circle", init_image=picture, resize_mode=mode, **run)
        want = pipe.generate("a red circle", init_image=fit_picture(picture, 32, 32, mode), **run)
        assert torch.equal(got.latents, want.latents), mode
        assert got.parameters.get("resize_mode") == (None if mode == "just_resize" else mode)
        got = pipe.generate("a red circle", init_image=picture, mask_image=mask, resize_mode=mode, **run)
        want = pipe.generate("a red circle", init_image=fit_picture(picture, 32, 32, mode),
                             mask_image=fit_picture(mask, 32, 32, mode), **run)
        assert torch.equal(got.latents, want.latents), mode
        seen.append(got.latents)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    square = _picture(32)
    same = dict(run, height=32, width=32)
    assert torch.equal(pipe.generate("a", init_image=square, resize_mode="latent_upscale", **same).latents,
                       pipe.generate("a", init_image=square, **same).latents)
    up = pipe.generate("a", init_image=square, resize_mode="latent_upscale", **dict(run, height=64, width=64))
    assert up.latents.shape[-1] == 64 // pipe.scale
    assert not torch.equal(up.latents, pipe.generate("a", init_image=square, **dict(run, height=64, width=64)).latents)
    # latent_upscale encodes the picture at its own size (sides down to the VAE's factor) and resizes the latents
    # bilinearly to the output's, as A1111 (F.interpolate, align_corners False)
    import torch.nn.functional as F

    seen = []
    original = F.interpolate

    def spy(x, *args, **kwargs):
        seen.append((tuple(x.shape[-2:]), kwargs.get("size"), kwargs.get("mode"), kwargs.get("align_corners")))
        return original(x, *args, **kwargs)

    odd = _picture(40).resize((37, 26), Image.LANCZOS)
    F.interpolate = spy
    try:
        pipe.generate("a", init_image=odd, resize_mode="latent_upscale", **dict(run, height=64, width=48))
    finally:
        F.interpolate = original
    f = pipe.scale
    assert seen[0] == ((26 // f, 37 // f), (64 // f, 48 // f), "bilinear", False), seen
    with pytest.raises(ValueError, match="resize_mode 'crop_and_resize' brings an init_image to the size"):
        pipe.generate("a", resize_mode="crop_and_resize", **{k: v for k, v in same.items() if k != "strength"})
    with pytest.raises(ValueError, match="latent_upscale' is for image to image"):
        pipe.generate("a", init_image=square, mask_image=_mask(32), resize_mode="latent_upscale", **same)
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        pipe.generate("a", init_image=square, resize_mode="fill", **same)
    assert RESIZE_MODES[1] == "crop_and_resize"  # A1111's API numbers them in this order


def test_a1111_img2img_resize_mode(plain):  # noqa: F811
    """The API's resize_mode 0-3: 1 and 2 give the pipeline's image of the fitted picture; with a mask and
    inpaint_full_res false, the picture and mask are fitted before A1111's inpainting steps; 3 with a mask, a
    number out of range, are 422s naming the field; the field is no longer listed as ignored."""
    pipe, picture = plain.pipe, _picture().resize((32, 16), Image.LANCZOS)
    for mode in (1, 2):
        r = _post(plain, init_images=[_b64(picture)], seed=4, width=32, height=32, denoising_strength=0.6,
                  resize_mode=mode)
        assert r.status_code == 200, r.text
        want = pipe.generate("a red circle", init_image=fit_picture(picture, 32, 32, RESIZE_MODES[mode]),
                             strength=0.6, seed=4, emphasis=True, progress=False, **API).images[0]
        assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
        assert "resize_mode" not in json.loads(r.json()["info"])["ignored_fields"]
    r = _post(plain, init_images=[_b64(picture)], seed=4, width=32, height=32, denoising_strength=0.6, resize_mode=3)
    assert r.status_code == 200, r.text
    want = pipe.generate("a red circle", init_image=picture, strength=0.6, seed=4, emphasis=True, progress=False,
                         resize_mode="latent_upscale", height=32, width=32, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()

    mask = _mask().resize((32, 16), Image.NEAREST)
    r = _post(plain, init_images=[_b64(picture)], mask=_b64(mask), seed=5, width=32, height=32,
              inpaint_full_res=False, mask_blur=0, resize_mode=2)
    assert r.status_code == 200, r.text
    fitted, fitted_mask = fit_picture(picture, 32, 32, "resize_and_fill"), fit_picture(blur_mask(mask.convert("L"), 0),
                                                                                       32, 32, "resize_and_fill")
    result = pipe.generate("a red circle", init_image=fill_masked(fitted, fitted_mask), mask_image=fitted_mask,
                           strength=0.75, seed=5, emphasis=True, progress=False, **API).images[0]
    want = paste_over(result, fitted, fitted_mask.point(lambda v: min(255, 2 * v)))
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    for body, words, field in (({"resize_mode": 4}, "resize_mode must be 0", "resize_mode"),
                               ({"resize_mode": 3, "mask": _b64(mask)}, "latent_upscale' is for image to image",
                                "resize_mode"),
                               ({"resize_mode": 3, "init_images": [_b64(Image.new("RGB", (200, 40)))], "width": 32,
                                 "height": 32},
                                "encodes the picture at its own size, 200x40", "init_images")):
        r = _post(plain, **{"init_images": [_b64(picture)], **body})
        assert r.status_code == 422 and words in r.text and r.json()["field"] == field, r.text


def test_generate_cli_resize_mode(tmp_path, pipe, capsys):
    from imagine.cli import main

    assert main(["generate", "--model", str(pipe.c.source), "a", "--resize-mode", "crop_and_resize", "-o",
                 str(tmp_path / "x.png")]) != 0
    assert "--resize-mode needs --init-image" in capsys.readouterr().err
    src = tmp_path / "wide.png"
    _picture(48).resize((48, 24), Image.LANCZOS).save(src)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(pipe.c.source), "a red circle", "--init-image", str(src), "--height",
                 "32", "--width", "32", "--resize-mode", "crop_and_resize", "--steps", "4", "--sampler", "euler",
                 "--guidance-scale", "5", "--seed", "3", "-o", str(out)]) == 0
    want = pipe.generate("a red circle", init_image=fit_picture(Image.open(src).convert("RGB"), 32, 32,
                                                                "crop_and_resize"),
                         strength=0.75, seed=3, progress=False, **KW).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert json.loads(Image.open(out).info["imagine"])["resize_mode"] == "crop_and_resize"
