"""Inpainting: a picture, a mask of the part to paint anew, and a prompt for it.

Two ways, both as diffusers' StableDiffusionInpaintPipeline runs them:

- An *inpainting model* (LDM, Rombach et al. 2022, sec. 4.5; SD's 9-channel U-Nets) was trained to see,
  beside its noisy latents, the mask at the latents' size and the latents of the masked picture (the
  picture with the part to paint set to 0): `imagine.sampling.ConcatChannels` feeds them at every step.
- Any other model keeps the known part by the *replacement method* (Song et al. 2021, appendix G):
  before each model call the known part of x_t is set to the known latents at that step's noise level
  (`imagine.sampling.Denoiser.keep_known`).

Run with AUTOMATIC1111's image-to-image rules (`strength_rule="a1111"`, its API), the known part is kept as A1111
keeps it instead, for either kind of model: every prediction of x_0 is the known latents there (its k-diffusion
samplers), or the model sees the clean known latents there (its DDIM, PLMS and UniPC), over its latent mask
(`a1111_latent_mask`).

Masks follow diffusers' convention: white (1) is painted anew, black (0) is kept; a mask is made grey, resized
to the picture (Lanczos) and cut at 0.5, so that it is 0 or 1 everywhere, also at the latents' size
(nearest neighbour). AUTOMATIC1111's extras for its img2img API live here too: its mask blur, its "fill"
of the masked part before encoding, and the paste of the result over the original picture.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps


def prepare_masks(masks: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Mask pictures -> [B, 1, height, width] of 0 (keep) and 1 (paint anew): resized with Lanczos where the
    size differs, made grey (ITU-R 601 luma, PIL's "L"), then 1 where the grey level is 0.5 or more
    (diffusers' mask processor: resize, grayscale, binarize)."""
    out = []
    for m in masks:
        if m.size != (width, height):
            m = m.resize((width, height), Image.LANCZOS)
        a = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy((a >= 0.5).astype(np.float32))[None])
    return torch.stack(out)


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture an inpainting model sees: the pixels [B, 3, H, W] in [-1, 1] where the mask keeps them, 0
    (mid grey) where it is painted anew (LDM's masked image x * (1 - m))."""
    return pixels * (mask < 0.5)


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The pixel mask [B, 1, H, W] at the latents' size, by nearest neighbour (diffusers' default
    interpolation), so that a 0/1 mask stays 0/1."""
    return torch.nn.functional.interpolate(mask, size=tuple(size))


def a1111_latent_mask(masks: list[Image.Image], width: int, height: int, size) -> torch.Tensor:
    """AUTOMATIC1111's latent mask (its StableDiffusionProcessingImg2Img.init: latmask): each mask picture at the
    image's size (Lanczos where it differs) made RGB, resized to the latents' size by PIL's default filter for RGB
    (bicubic), its first channel / 255 rounded to 0 or 1 (its mask_round): [B, 1, h, w], 1 = painted anew. It decides
    the edge cells differently from the nearest-neighbour `latent_mask` of the binarized pixel mask."""
    h, w = (int(v) for v in size)
    out = []
    for m in masks:
        if m.size != (width, height):
            m = m.resize((width, height), Image.LANCZOS)
        a = np.asarray(m.convert("L").convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255.0
        out.append(torch.from_numpy(np.around(a))[None])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111's img2img inpainting options (its API's mask_blur, inpainting_fill, the paste back)
# ---------------------------------------------------------------------------------------------
A1111_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def blur_mask(mask: Image.Image, radius: float, radius_y: float | None = None) -> Image.Image:
    """A1111's mask blur (its StableDiffusionProcessingImg2Img.init): the grey mask blurred along x by mask_blur_x
    (`radius`), then along y by mask_blur_y (`radius_y`, else `radius`), each as its
    `cv2.GaussianBlur(np.array(mask), (2 * int(2.5 * sigma + 0.5) + 1, 1), sigma)` (and (1, k) for y); 0 leaves
    that direction as it is. Written without OpenCV (`gaussian_blur_1d`): its 8-bit GaussianBlur computes in fixed
    point, which this float computation matches to within 1 grey level, not bit for bit."""
    mask = mask.convert("L")
    radius_y = radius if radius_y is None else radius_y
    a = np.asarray(mask)
    if radius > 0:
        a = gaussian_blur_1d(a, radius, axis=1)
    if radius_y > 0:
        a = gaussian_blur_1d(a, radius_y, axis=0)
    return Image.fromarray(a) if radius > 0 or radius_y > 0 else mask


def gaussian_kernel(sigma: float) -> np.ndarray:
    """OpenCV's Gaussian kernel for A1111's mask blur: k = 2 * int(2.5 * sigma + 0.5) + 1 taps (A1111's size),
    weights exp(-(i - (k - 1) / 2)^2 / (2 sigma^2)) summing to 1 (cv2.getGaussianKernel)."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    w = np.exp(-x * x / (2.0 * sigma * sigma))
    return w / w.sum()


def gaussian_blur_1d(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """An 8-bit picture blurred along `axis` by `gaussian_kernel(sigma)`, its edges mirrored without repeating the
    edge pixel (OpenCV's BORDER_DEFAULT, BORDER_REFLECT_101: ..., 2, 1 | 0, 1, 2, ...), rounded to 0..255."""
    w = gaussian_kernel(sigma)
    r, n = len(w) // 2, a.shape[axis]
    period = max(2 * (n - 1), 1)
    j = np.arange(-r, n + r) % period  # (reflected as often as the kernel's reach asks)
    x = np.take(a.astype(np.float64), np.where(j < n, j, period - j), axis=axis)
    out = sum(wk * np.take(x, range(k, k + n), axis=axis) for k, wk in enumerate(w))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def fill_masked(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the part to paint anew filled with the colours around it, so that the model starts
    from a blur of its surroundings rather than from what was there. The kept part, weighted by its
    coverage (premultiplied alpha), is blurred at radii from coarse to fine and each blur laid over the
    last, the finest last, which leaves the kept pixels as they are."""
    keep = ImageOps.invert(mask.convert("L"))
    layer = Image.new("RGBa", picture.size)
    layer.paste(picture.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", picture.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def paste_over(result: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The result laid over the original where the (blurred) mask is white: the kept part is the original's
    own pixels, not their trip through the VAE (A1111 pastes the inpainted picture back so)."""
    original = original.convert("RGB").resize(result.size, Image.LANCZOS) if original.size != result.size \
        else original.convert("RGB")
    mask = mask.convert("L").resize(result.size, Image.LANCZOS) if mask.size != result.size else mask.convert("L")
    return Image.composite(result.convert("RGB"), original, mask)


def crop_region(mask: Image.Image, width: int, height: int, padding: int = 0) -> tuple[int, int, int, int] | None:
    """AUTOMATIC1111's "Only masked" region (its inpaint_full_res, with inpaint_full_res_padding): the box
    (left, top, right, bottom; right and bottom exclusive) around the mask's non-black pixels, grown by `padding`
    on each side and clipped to the picture, then grown along its short side, centred, to the aspect ratio of the
    `width` x `height` the crop will be inpainted at, moved back inside the picture if it runs over an edge and
    clipped to it (a picture too small for that ratio gives a box of other proportions). None if the mask is all
    black (nothing to paint). diffusers' VaeImageProcessor.get_crop_region and A1111's get_crop_region_v2 +
    expand_crop_region state the same rule, to the pixel."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    if width <= 0 or height <= 0 or padding < 0:
        raise ValueError(f"crop_region needs width, height > 0 and padding >= 0; got {width}, {height}, {padding}")
    w, h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, w), min(box[3] + padding, h)

    def grow(lo: int, hi: int, want: float, limit: int) -> tuple[int, int]:
        extra = int(want - (hi - lo))  # whole pixels to add, split evenly (the odd one after)
        lo, hi = lo - extra // 2, hi + extra - extra // 2
        if hi > limit:  # over the far edge: move back
            lo, hi = lo - (hi - limit), limit
        if lo < 0:  # over the near edge: move forward, then clip
            lo, hi = 0, hi - lo
        return lo, min(hi, limit)

    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide for the ratio: taller
        y1, y2 = grow(y1, y2, (x2 - x1) / ratio, h)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * ratio, w)
    return x1, y1, x2, y2
