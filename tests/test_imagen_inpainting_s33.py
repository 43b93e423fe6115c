"""Imagen inpainting (session 33): ImagenPipeline.sample(inpaint_images=, inpaint_masks=, inpaint_resample_times=),
RePaint (Lugmayr et al. 2022) over DDPM's steps, imagine.samplers.sample_repaint.

Two truths: imagen-pytorch 2.1.0's Imagen.sample on the same U-Nets where it runs the same method (one pass a step:
the replacement method with a fresh draw of the kept part at every step, at every stage), and, for the resampling,
the closed form of a Gaussian picture whose pixels share a common part: the painted half's mean given the kept half,
which RePaint reaches as the passes grow and one pass does not."""

from __future__ import annotations

import math

import pytest
import torch

import test_imagen_s31 as s31
from test_imagen_cli_s31 import folder  # noqa: F401 (fixture: a MiniLM cascade folder, 8 -> 16 px, 3 steps, guidance 2)

from imagine.pipelines.imagen import ImagenPipeline  # noqa: E402


@pytest.fixture(scope="module")
def imagen():
    return s31.build_imagen()


def picture_and_mask(batch: int = 2):
    g = torch.Generator().manual_seed(11)
    pictures = torch.rand(batch, 3, 16, 16, generator=g)
    keep = torch.zeros(batch, 16, 16, dtype=torch.bool)
    keep[:, :, :9] = True  # (the left part kept; 9 columns: stage 1's nearest resize keeps 4 or 5 of 8)
    keep[1, 12:, :] = True
    return pictures, keep


def test_one_pass_is_imagen_pytorchs_inpainting(imagen, scale=3.0):
    """inpaint_resample_times 1 (no resampling): imagen-pytorch's pictures, global generator, both stages, guided."""
    embeds, mask = s31.texts()
    pictures, keep = picture_and_mask()
    kw = dict(text_embeds=embeds, text_masks=mask, cond_scale=scale, inpaint_images=pictures, inpaint_masks=keep,
              inpaint_resample_times=1)
    theirs = s31.peer_sample(imagen, 5, **kw)
    torch.manual_seed(5)
    ours = s31.ours_of(imagen).sample(progress=False, **kw)
    assert float((ours - theirs).abs().max()) < s31.PICTURE_ATOL
    assert torch.equal(ours[:, :, keep[0]][0], pictures[0][:, keep[0]])  # (the kept part is the picture's own)
    plain = s31.ours_of(imagen)
    torch.manual_seed(5)
    free = plain.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, progress=False)
    assert float((free - ours)[:, :, ~keep[0]].abs().max()) > 1e-2  # (the painted part follows the kept one)


def test_refusals(imagen):
    embeds, mask = s31.texts()
    pictures, keep = picture_and_mask()
    ours = s31.ours_of(imagen)
    kw = dict(text_embeds=embeds, text_masks=mask, progress=False)
    with pytest.raises(ValueError, match="needs inpaint_images and inpaint_masks"):
        ours.sample(inpaint_images=pictures, **kw)
    with pytest.raises(ValueError, match="RePaint.*use 'ddpm'"):
        ours.sample(inpaint_images=pictures, inpaint_masks=keep, sampler="dpmpp_2m", **kw)
    with pytest.raises(ValueError, match="inpaint_resample_times must be an integer >= 1"):
        ours.sample(inpaint_images=pictures, inpaint_masks=keep, inpaint_resample_times=0, **kw)
    with pytest.raises(ValueError, match=r"inpaint_masks must be a tensor \[B, H, W\]"):
        ours.sample(inpaint_images=pictures, inpaint_masks=keep[:, None, None], **kw)
    with pytest.raises(ValueError, match="give no start_image"):
        ours.sample(inpaint_images=pictures, inpaint_masks=keep, start_at_unet_number=2, start_image=pictures, **kw)


# -- resampling, against a closed form -------------------------------------------------------------------------------
M, S_COMMON, S_OWN = 0.1, 0.3, 0.1  # x_0 = M + S_COMMON g + S_OWN e_j: one g per picture, e_j per pixel


def common_part_x0(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x] for x = alpha x_0 + sigma eps, x_0 ~ N(M, C) with C = S_OWN^2 I + S_COMMON^2 11^T over a picture's n
    values: M + alpha C (alpha^2 C + sigma^2 I)^-1 (x - alpha M), by Sherman-Morrison with d = alpha^2 S_OWN^2 +
    sigma^2, k = alpha^2 S_COMMON^2 (float64; alpha, sigma [B, 1, 1, 1])."""
    y = x.double() - alpha * M
    n = y[0].numel()
    d, k = alpha**2 * S_OWN**2 + sigma**2, alpha**2 * S_COMMON**2
    total = y.sum(dim=(1, 2, 3), keepdim=True)
    u = (y - k * total / (d + n * k)) / d  # (Cov^-1 y)
    return M + alpha * (S_OWN**2 * u + S_COMMON**2 * total / (d + n * k))


def left_half_kept():
    """(the picture, its kept left half as a mask, the painted half's closed-form mean and spread): the kept half
    tells the common part g (posterior precision 1 + n_kept S_COMMON^2 / S_OWN^2), so the painted half's mean is
    M + S_COMMON E[g | kept]."""
    g = torch.Generator().manual_seed(0)
    known = M + S_COMMON * 1.5 + S_OWN * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True
    precision = 1 + 3 * 8 * 4 * S_COMMON**2 / S_OWN**2
    mean = M + S_COMMON * (S_COMMON / S_OWN**2) * float((known[..., :4] - M).sum()) / precision
    return known, keep, mean, math.sqrt(S_OWN**2 + S_COMMON**2 / precision)


class CommonPartUnet:
    """The exact noise prediction for common_part_x0's data, read from the log-SNR the stage conditions on (alpha^2 =
    sigmoid(lambda)). Text is ignored."""

    def __call__(self, x, noise_cond, **_):
        a2 = torch.sigmoid(noise_cond.double()).view(-1, 1, 1, 1)
        alpha, sigma = a2.sqrt(), (1 - a2).sqrt()
        return ((x.double() - alpha * common_part_x0(x, alpha, sigma)) / sigma).to(x.dtype)


def test_resampling_reaches_the_conditional_mean():
    """The kept left half tells the common part g (posterior precision 1 + n_kept S_COMMON^2 / S_OWN^2), so the
    painted half's mean is M + S_COMMON E[g | kept]. Measured over 64 pictures at 50 steps, error of that mean: one
    pass 2.4e-2 (the replacement method: the kept part's fresh draws leave the painted part's coarse part to its own
    guess), 2 passes 6.7e-3, 10 passes 2.9e-4; the painted pixels' spread 0.089 against the closed form's 0.1005 (with
    imagen-pytorch's way back, less noise than the forward process adds, 0.066: measured with a copy of the loop)."""
    pipe = ImagenPipeline([CommonPartUnet()], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False,
                          timesteps=1000)
    known, keep, want_mean, want_std = left_half_kept()
    batch = 64

    def painted(passes: int) -> torch.Tensor:
        out = pipe.sample(text_embeds=torch.zeros(batch, 3, 4), seeds=list(range(batch)), steps=50, progress=False,
                          inpaint_images=((known + 1) / 2).float(), inpaint_masks=keep,
                          inpaint_resample_times=passes).double() * 2 - 1
        assert float((out[..., :4] - known[..., :4]).abs().max()) < 1e-6  # (kept)
        return out[..., 4:]

    errors = {p: abs(float(painted(p).mean()) - want_mean) for p in (1, 2)}
    ten = painted(10)
    errors[10] = abs(float(ten.mean()) - want_mean)
    assert errors[1] > 1.5e-2 and errors[1] > 2 * errors[2] > 4 * errors[10] and errors[10] < 2e-3, errors
    assert abs(float(ten.std()) / want_std - 1) < 0.15, float(ten.std())


def test_imagine_generate_inpaints_with_a_mask(folder, tmp_path):  # noqa: F811
    """`imagine generate --model CASCADE --init-image P --mask M` (white: painted anew), at --strength 0.67 (stage 1's
    RePaint from the picture noised two of three steps before the end) and 2 passes a step: sample's picture to the
    pixel, the kept part the picture's own (up to 8-bit rounding), the run's settings in the PNG."""
    import json

    import numpy as np
    from PIL import Image

    from test_imagen_cli_s31 import PROMPT, cli

    cascade, _ = folder
    rng = np.random.default_rng(2)
    start = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (6, 0, 16, 16))
    start.save(tmp_path / "start.png"), mask.save(tmp_path / "mask.png")
    out = tmp_path / "painted.png"
    run = cli("--model", cascade, PROMPT, "--seed", 4, "--init-image", tmp_path / "start.png", "--mask",
              tmp_path / "mask.png", "--strength", 0.67, "--inpaint-resample-times", 2, "-o", out)
    assert run.returncode == 0, run.stderr
    keep = torch.zeros(1, 16, 16, dtype=torch.bool)
    keep[..., :6] = True
    want = ImagenPipeline.from_pretrained(cascade).sample(
        [PROMPT], seeds=[4], steps=3, cond_scale=2.0, init_image=start, strength=0.67, inpaint_images=start,
        inpaint_masks=keep, inpaint_resample_times=2, output_type="pil", progress=False)[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.array_equal(got, np.asarray(want, dtype=np.int16))
    assert np.abs(got[:, :6] - np.asarray(start, dtype=np.int16)[:, :6]).max() <= 1
    params = json.loads(Image.open(out).info["imagine"])
    assert {k: params[k] for k in ("mask", "strength", "inpaint_resample_times")} == {
        "mask": "mask.png", "strength": 0.67, "inpaint_resample_times": 2}
    run = cli("--model", cascade, PROMPT, "--init-image", tmp_path / "start.png", "--mask", tmp_path / "mask.png",
              "--sampler", "ddim", "-o", tmp_path / "x.png")
    assert run.returncode != 0 and "use 'ddpm'" in run.stderr


class CommonPartF:
    """common_part_x0's data for an ElucidatedImagen stage: F = (D - c_skip x) / c_out with D(x; sigma) = E[x_0 | x]
    for x = x_0 + sigma n (alpha 1), read from c_in x and c_noise = ln(sigma) / 4."""

    def __call__(self, x_in, noise_cond, **_):
        from imagine import edm

        sigma = (4 * noise_cond.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in = edm.coefficients(sigma, 0.5)
        x = x_in.double() / c_in
        return ((common_part_x0(x, torch.ones_like(sigma), sigma) - c_skip * x) / c_out).to(x_in.dtype)


def test_elucidated_resampling_reaches_the_conditional_mean():
    """An ElucidatedImagen stage inpaints by the same RePaint over its Heun steps (S_churn 0 here; 32 levels): the
    painted half's mean against the closed form, 1 pass and 8 (measured: 1.1e-1 and 2.3e-3), the kept half the
    picture's; imagen-pytorch's ElucidatedImagen adds only the churn's noise to the kept part (none at S_churn 0), so
    there it keeps the clean picture at every level."""
    from imagine.pipelines.elucidated_imagen import ElucidatedImagenPipeline

    pipe = ElucidatedImagenPipeline([CommonPartF()], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False,
                                    S_churn=0.0)
    known, keep, want, _ = left_half_kept()
    batch = 32

    def error(passes: int) -> float:
        out = pipe.sample(text_embeds=torch.zeros(batch, 3, 4), seeds=list(range(batch)), steps=32, progress=False,
                          inpaint_images=((known + 1) / 2).float(), inpaint_masks=keep,
                          inpaint_resample_times=passes).double() * 2 - 1
        assert float((out[..., :4] - known[..., :4]).abs().max()) < 1e-6
        return abs(float(out[..., 4:].mean()) - want)

    one, eight = error(1), error(8)
    print(f"EDM RePaint: painted mean error 1 pass {one:.2e}, 8 passes {eight:.2e}")
    assert one > 5e-2 and eight < 5e-3, (one, eight)
    with pytest.raises(ValueError, match="RePaint.*use 'heun'"):
        pipe.sample(text_embeds=torch.zeros(1, 3, 4), steps=4, progress=False, sampler="dpmpp_2m",
                    inpaint_images=((known + 1) / 2).float(), inpaint_masks=keep)
