"""AUTOMATIC1111 (A1111) and its ControlNet extension, held to their own code (restated in each test): masked
content, the units' guidance window, an img2img unit without a picture, the mask blur and "Only masked"."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from test_controlnet import _edges  # noqa: E402
from test_controlnet_api import API, _pipe, _picture, _post, _unit, _units, models, server  # noqa: E402,F401
from test_inpainting_api import _b64, _image  # noqa: E402
from test_sd_parity import SIZE  # noqa: E402

from imagine.images import fit_picture  # noqa: E402
from imagine.inpainting import blur_mask, fill_masked, paste_over  # noqa: E402
from imagine.models import controlnet as cnmod  # noqa: E402
from imagine.server.app import prepare_inpainting  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# 1. masked content: A1111's processing.py StableDiffusionProcessingImg2Img.init
#        if self.inpainting_fill != 1:
#            image = masking.fill(image, latent_mask)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_every_masked_content_but_original_fills_the_picture(fill):
    g = np.random.default_rng(0)
    picture = Image.fromarray((g.random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 20, 22))
    out = prepare_inpainting([picture], mask, 32, 32, blur=4, fill=fill, full_res=False, padding=0, invert=0)
    want = picture if fill == 1 else fill_masked(picture, out.masks[0])
    assert out.inits[0].tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------
# 4. the guidance window. The extension (hook.py, guidance_schedule_handler, run from on_cfg_denoiser):
#        current_sampling_percent = (x.sampling_step / x.total_sampling_steps)
#        param.guidance_stopped = current_sampling_percent < param.start_guidance_percent or \
#                                 current_sampling_percent > param.stop_guidance_percent
#    with sampling_step = A1111's state.sampling_step, set to i by the sampler's callback after step i (so step i's
#    model calls see max(i - 1, 0), a second-order sampler's two calls of a step alike), and the total its steps.
#    diffusers (StableDiffusionControlNetPipeline): keep = 1 - (i / N < start or (i + 1) / N > end).
# ---------------------------------------------------------------------------------------------
def _extension_acts(i: int, n: int, start: float, end: float) -> bool:
    sampling_step = max(i - 1, 0)
    return not (sampling_step / n < start or sampling_step / n > end)


def _diffusers_acts(i: int, n: int, start: float, end: float) -> bool:
    return not (i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_a1111_rule_is_the_extensions(n):
    for start, end in ((0.0, 1.0), (0.0, 0.5), (0.2, 0.7), (0.3, 1.0), (0.4, 0.4), (1.0, 1.0)):
        for i in range(n):
            assert cnmod.a1111_acts(i, n, (start, end)) == _extension_acts(i, n, start, end)


def _acting_steps(pipe, sampler: str, window, a1111: bool, n: int = 10) -> list:
    """The sampler step (A1111's count: a two-call step counted once) of every model call, with whether the unit
    acted at it, for a run under A1111's rules (strength_rule "a1111") or diffusers'."""
    seen = []
    forward = cnmod.Controlled.forward

    def spy(self, x, t, guidance_half=None, **cond):
        step = self.a1111_step[0] if a1111 else self.step[0]
        seen.append((step, self._acts(self.controls[0][2])))
        return forward(self, x, t, guidance_half=guidance_half, **cond)

    cnmod.Controlled.forward = spy
    try:
        pipe.generate("a", control_image=_edges(), steps=n, sampler=sampler, seed=1, progress=False,
                      output_type="latent", guidance_scale=5.0, control_guidance_start=window[0],
                      control_guidance_end=window[1], **({"strength_rule": "a1111"} if a1111 else {}))
    finally:
        cnmod.Controlled.forward = forward
    return seen


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_units_act_by_the_extensions_window(models, sampler):
    """Under A1111's rules the windows are its ControlNet extension's (start == end runs too); under diffusers' the
    pipeline's (diffusers' rule, start == end refused)."""
    pipe, n = _pipe(models, "edges"), 10
    for start, end in ((0.2, 0.7), (0.4, 0.4), (0.0, 0.5)):
        seen = _acting_steps(pipe, sampler, (start, end), True, n)
        assert {s for s, _ in seen} == set(range(n))  # (steps, not calls, for Heun too)
        assert seen and all(acts == _extension_acts(s, n, start, end) for s, acts in seen), (start, end, seen)
    if sampler == "euler":  # (the library's default stays diffusers' rule)
        seen = _acting_steps(pipe, sampler, (0.2, 0.7), False, n)
        assert all(acts == _diffusers_acts(s, n, 0.2, 0.7) for s, acts in seen)
    with pytest.raises(ValueError, match="equal: under A1111's rules"):
        _acting_steps(pipe, sampler, (0.4, 0.4), False, n)


def test_api_unit_window_is_the_extensions_and_start_may_equal_end(server, models):
    """2 (the extension refuses only guidance_start > guidance_end) and 4 through the API."""
    pipe = _pipe(models, "edges")
    for start, end in ((0.2, 0.6), (0.4, 0.4)):
        r = _post(server, seed=17, steps=5, **_units(_unit("edges", _edges(), guidance_start=start,
                                                           guidance_end=end)))
        assert r.status_code == 200, r.text
        want = pipe.generate("a red circle", control_image=_edges(), seed=17, emphasis=True, progress=False,
                             control_guidance_start=start, control_guidance_end=end, **dict(API, steps=5)).images[0]
        assert _image(r.json()["images"][0]).tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------
# 3. a unit without a picture in img2img: the extension's get_input_data takes p.init_images and fits the map with
#        resize_mode = external_code.resize_mode_from_value(p.resize_mode)
#    (0 Just Resize, 1 Crop and Resize, 2 Resize and Fill), the init picture's own resize mode.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,name", [(1, "crop_and_resize"), (2, "resize_and_fill")])
def test_img2img_unit_without_a_picture_is_fitted_by_resize_mode(server, models, mode, name):
    from imagine.preprocessors import fit

    wide = Image.new("RGB", (2 * SIZE, SIZE), (20, 20, 20))
    d = ImageDraw.Draw(wide)
    d.rectangle((2, 2, SIZE // 2, SIZE - 3), fill=(250, 250, 250))
    d.ellipse((SIZE + 2, 2, 2 * SIZE - 3, SIZE - 3), fill=(200, 0, 0))
    r = _post(server, "img2img", seed=14, init_images=[_b64(wide)], width=SIZE, height=SIZE, denoising_strength=0.7,
              resize_mode=mode, **_units(_unit("edges")))
    assert r.status_code == 200, r.text
    pipe = _pipe(models, "edges")
    want = pipe.generate("a red circle", init_image=wide, strength=0.7, resize_mode=name,
                         control_image=fit(wide, SIZE, SIZE, name), seed=14, height=SIZE, width=SIZE, emphasis=True,
                         progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------
# 5. the mask blur: A1111's StableDiffusionProcessingImg2Img.init
#        if self.mask_blur_x > 0:
#            np_mask = np.array(image_mask)
#            kernel_size = 2 * int(2.5 * self.mask_blur_x + 0.5) + 1
#            np_mask = cv2.GaussianBlur(np_mask, (kernel_size, 1), self.mask_blur_x)
#            image_mask = Image.fromarray(np_mask)
#        if self.mask_blur_y > 0:  (the same along y: (1, kernel_size))
#    OpenCV (not installed here) restated: cv2.getGaussianKernel weights, BORDER_DEFAULT = BORDER_REFLECT_101
#    (borderInterpolate: p < 0 -> -p, p >= n -> 2n - 2 - p, repeated). Its 8-bit blur computes in fixed point:
#    imagine matches within 1 grey level, not bit for bit.
# ---------------------------------------------------------------------------------------------
def _opencv_blur_1d(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    k = 2 * int(2.5 * sigma + 0.5) + 1
    w = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n, out = a.shape[0], np.zeros(a.shape)

    def border(p):
        if n == 1:
            return 0
        while p < 0 or p >= n:
            p = -p if p < 0 else 2 * n - 2 - p
        return p

    for y in range(n):
        for t in range(k):
            out[y] += w[t] * a[border(y + t - k // 2)]
    return np.moveaxis(out, 0, axis)


def _a1111_blur(mask: Image.Image, bx: float, by: float) -> np.ndarray:
    a = np.asarray(mask, dtype=np.float64)
    if bx > 0:
        a = np.rint(_opencv_blur_1d(a, bx, 1))
    if by > 0:
        a = np.rint(_opencv_blur_1d(a, by, 0))
    return a


@pytest.mark.parametrize("bx,by", [(1, 1), (4, 4), (8, 8), (16, 16), (4, 0), (0, 6), (3, 9), (40, 40)])
def test_mask_blur_is_a1111s(bx, by):
    m = Image.new("L", (48, 40))
    ImageDraw.Draw(m).rectangle((12, 9, 30, 26), fill=255)
    m.putpixel((1, 38), 255)
    got = np.asarray(blur_mask(m, bx, by)).astype(int)
    assert np.abs(got - _a1111_blur(m, bx, by)).max() <= 1


# ---------------------------------------------------------------------------------------------
# 6. "Only masked": A1111's init crops picture and mask and brings them to the image's size by
#        images.resize_image(2, image.crop(crop_region), self.width, self.height)       (resize and fill)
#    and its apply_overlay pastes the result back by
#        image = images.resize_image(1, image, w, h); base_image.paste(image, (x, y))  (crop and resize)
# ---------------------------------------------------------------------------------------------
def test_only_masked_resizes_and_fills_then_crops_back():
    g = np.random.default_rng(1)
    picture = Image.fromarray((g.random((16, 40, 3)) * 255).astype(np.uint8))  # 40 wide, 16 tall
    mask = Image.new("L", picture.size)
    mask.paste(255, (14, 4, 26, 12))
    out = prepare_inpainting([picture], mask, 16, 32, blur=0, fill=1, full_res=True, padding=0, invert=0)
    box = out.boxes[0]
    w, h = box[2] - box[0], box[3] - box[1]
    assert w * 32 != h * 16  # (too short a picture for the 1:2 crop: a box of other proportions)
    assert out.inits[0].tobytes() == fit_picture(picture.crop(box), 16, 32, "resize_and_fill").tobytes()
    assert out.masks[0].tobytes() == fit_picture(mask.crop(box), 16, 32, "resize_and_fill").tobytes()
    result = Image.fromarray((g.random((32, 16, 3)) * 255).astype(np.uint8))
    whole = picture.copy()
    whole.paste(fit_picture(result, w, h, "crop_and_resize"), box[:2])
    assert out.finish(result, 0).tobytes() == paste_over(whole, picture, out.overlays[0]).tobytes()


def test_mask_blur_x_and_y_blur_apart(server):
    """A1111 reads mask_blur_x and mask_blur_y apart (mask_blur sets both); its infotext's "Mask blur" is its
    mask_blur property, None (left out) when they differ."""
    m = Image.new("L", (SIZE, SIZE))
    m.paste(255, (5, 4, 11, 12))
    out = prepare_inpainting([_picture()], m, SIZE, SIZE, blur=2, blur_y=6, fill=1, full_res=False, padding=0,
                             invert=0)
    assert out.masks[0].tobytes() == blur_mask(m, 2, 6).tobytes() != blur_mask(m, 2).tobytes()
    assert "Mask blur" not in out.extra_generation_params()
    r = _post(server, "img2img", seed=3, init_images=[_b64(_picture())], mask=_b64(m), mask_blur_x=2, mask_blur_y=6,
              denoising_strength=0.5)
    assert r.status_code == 200, r.text
    assert "Mask blur" not in r.json()["info"]
