"""Session 29's review of generate's options against diffusers' pipelines' __call__ arguments, on tiny random weights
at the same seed and sampler (PSNR >= 50 dB, the parity bar of tests/test_sd_parity.py):

- guidance_rescale (SD 2's v-prediction and SDXL), DDIM's eta (text to image, image to image, inpainting with a plain
  and an inpainting model), prompt lists with several images each (one generator per image, odd step counts where
  int(steps * strength) rounds), SDXL's inpainting model (9 channels) at SDXL's default strength 0.9999, below 1 and
  at 1, and the base + refiner ensemble (denoising_end / denoising_start) for prompt lists: diffusers' images;
- output_type other than "pil" / "latent" (diffusers' "np", "pt") and a steps count that is not a whole number are
  clear errors before any work (they ran the whole batch and gave no image, or ran int(steps) steps)."""

from __future__ import annotations

import pytest
import torch

from test_img2img import _picture  # noqa: E402
from test_inpainting import _mask  # noqa: E402
from test_loading import make_scheduler, save_diffusers_folder  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS, NEGATIVES = [PROMPT, "a blue cat"], [NEGATIVE, "a dog"]


def _images(pipe, res) -> torch.Tensor:
    return ((pipe.decode(res.latents) + 1) / 2).clamp(0, 1)


def _generators(n: int) -> list[torch.Generator]:
    """diffusers' way to give each image of a batch its own seed, as imagine's images have (seed + i)."""
    return [torch.Generator().manual_seed(SEED + i) for i in range(n)]


def _run(pipe, *args, **kw):
    with torch.no_grad():
        return pipe(*args, output_type="pt", **kw).images.float()


def test_guidance_rescale_matches_diffusers(tmp_path):
    """Lin et al.'s rescale on the model's raw output (v here, SD 2's prediction), as diffusers' rescale_noise_cfg;
    at a scale diffusers does not guide at (0.5) it does nothing, as there."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd2", scheduler="euler", prediction_type="v_prediction")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=10, guidance_rescale=0.7)
    ours = dict(steps=10, sampler="euler", seed=SEED, guidance_rescale=0.7, progress=False, output_type="latent")
    for scale in (CFG, 0.5):
        want = _run(ref, PROMPT, negative_prompt=NEGATIVE, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(SEED), **kw)
        got = _images(pipe, pipe.generate(PROMPT, NEGATIVE, guidance_scale=scale, **ours))
        assert psnr(got[0], want[0]) >= 50, scale
    plain = _images(pipe, pipe.generate(PROMPT, NEGATIVE, guidance_scale=CFG, **{**ours, "guidance_rescale": 0.0}))
    assert psnr(plain[0], _run(ref, PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG,
                               generator=torch.Generator().manual_seed(SEED), **kw)[0]) < 50  # (the rescale matters)


def test_sdxl_guidance_rescale_matches_diffusers(tmp_path):
    """SDXL's text to image, image to image and inpainting pipelines rescale (SD's img2img and inpainting pipelines
    take no guidance_rescale: diffusers swallows it there, unused)."""
    from test_sdxl import _mask as xl_mask, _picture as xl_picture, save_sdxl_folder

    ref = save_sdxl_folder(tmp_path / "folder", scheduler="euler")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=CFG, guidance_rescale=0.7)
    ours = dict(steps=8, guidance_scale=CFG, seed=SEED, guidance_rescale=0.7, progress=False, output_type="latent")
    runs = [(_run(ref, PROMPT, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), **kw),
             pipe.generate(PROMPT, NEGATIVE, height=SIZE, width=SIZE, **ours))]
    for cls, extra in ((diffusers.StableDiffusionXLImg2ImgPipeline, {}),
                       (diffusers.StableDiffusionXLInpaintPipeline, {"mask_image": xl_mask()})):
        other = cls(**ref.components)
        other.set_progress_bar_config(disable=True)
        runs.append((_run(other, PROMPT, image=xl_picture(), strength=0.6, generator=torch.Generator().manual_seed(SEED),
                          **extra, **kw),
                     pipe.generate(PROMPT, NEGATIVE, init_image=xl_picture(), strength=0.6, **extra, **ours)))
    for want, res in runs:
        assert psnr(_images(pipe, res)[0], want[0]) >= 50


@pytest.mark.parametrize("channels", [4, 9])
def test_ddim_eta_matches_diffusers(tmp_path, channels):
    """DDIM's eta: its noise drawn from each image's generator after the start noise (and, in image to image and
    inpainting, after the picture's posterior draws), as diffusers' DDIMScheduler.step draws it."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim", in_channels=channels)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    ours = dict(guidance_scale=CFG, sampler="ddim", seed=SEED, eta=0.6, progress=False, output_type="latent")
    runs = []
    if channels == 4:
        i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
        i2i.set_progress_bar_config(disable=True)
        runs += [(_run(ref, PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                       guidance_scale=CFG, eta=0.6, generator=torch.Generator().manual_seed(SEED)),
                  pipe.generate(PROMPT, NEGATIVE, steps=10, **ours)),
                 (_run(i2i, PROMPT, image=_picture(), strength=0.55, negative_prompt=NEGATIVE, num_inference_steps=11,
                       guidance_scale=CFG, eta=0.6, generator=torch.Generator().manual_seed(SEED)),
                  pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), strength=0.55, steps=11, **ours))]
    inpaint = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    inpaint.set_progress_bar_config(disable=True)
    for strength in (0.7, 1.0):
        runs.append((_run(inpaint, PROMPT, image=_picture(), mask_image=_mask(), strength=strength, eta=0.6,
                          negative_prompt=NEGATIVE, num_inference_steps=9, guidance_scale=CFG, height=SIZE, width=SIZE,
                          generator=[torch.Generator().manual_seed(SEED)]),
                     pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), mask_image=_mask(), strength=strength,
                                   steps=9, **ours)))
    for want, res in runs:
        assert res.parameters["eta"] == 0.6
        assert psnr(_images(pipe, res)[0], want[0]) >= 50


def test_prompt_lists_with_several_images_each_match_diffusers(tmp_path):
    """Two prompts, two negatives, two images each (diffusers: num_images_per_prompt=2 and one generator per image):
    text to image, and image to image at step counts where int(steps * strength) rounds down (7 x 0.35 = 2.45,
    10 x 0.29 = 2.9, 3 x 0.67 = 2.01)."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="dpmpp_2m")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    ours = dict(guidance_scale=CFG, sampler="dpmpp_2m", seed=SEED, num_images_per_prompt=2, progress=False,
                output_type="latent")
    runs = [(_run(ref, PROMPTS, negative_prompt=NEGATIVES, height=SIZE, width=SIZE, num_inference_steps=8,
                  guidance_scale=CFG, num_images_per_prompt=2, generator=_generators(4)),
             pipe.generate(PROMPTS, NEGATIVES, steps=8, **ours))]
    for steps, strength in ((7, 0.35), (10, 0.29), (3, 0.67)):
        runs.append((_run(i2i, PROMPTS, image=_picture(), strength=strength, negative_prompt=NEGATIVES,
                          num_inference_steps=steps, guidance_scale=CFG, num_images_per_prompt=2,
                          generator=_generators(4)),
                     pipe.generate(PROMPTS, NEGATIVES, init_image=_picture(), strength=strength, steps=steps, **ours)))
    for want, res in runs:
        got = _images(pipe, res)
        assert res.seeds == [SEED + i for i in range(4)]
        assert all(psnr(got[i], want[i]) >= 50 for i in range(4)), [psnr(got[i], want[i]) for i in range(4)]


@pytest.mark.parametrize("strength", [None, 0.55, 1.0])
def test_an_sdxl_inpainting_model_matches_diffusers(tmp_path, strength):
    """SDXL's inpainting model (9 input channels, as diffusers/stable-diffusion-xl-1.0-inpainting-0.1) in
    StableDiffusionXLInpaintPipeline: its default strength 0.9999 starts from the noised picture, 1 from noise."""
    from test_sdxl import SIZE as XL_SIZE, _mask as xl_mask, _picture as xl_picture, save_sdxl_folder

    base = save_sdxl_folder(tmp_path / "base", scheduler="euler")
    config = {**base.unet.config, "in_channels": 9}
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    unet.load_state_dict({k: v for k, v in base.unet.state_dict().items() if not k.startswith("conv_in.")},
                         strict=False)
    with torch.no_grad():
        unet.conv_in.weight.copy_(torch.randn(unet.conv_in.weight.shape, generator=torch.Generator().manual_seed(5))
                                  * 0.05)
    ref = diffusers.StableDiffusionXLInpaintPipeline(**{**base.components, "unet": unet})
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "inpaint")
    assert pipe.image_conditioned
    given = {} if strength is None else {"strength": strength}
    want = _run(ref, PROMPT, image=xl_picture(), mask_image=xl_mask(), negative_prompt=NEGATIVE, num_inference_steps=7,
                guidance_scale=CFG, generator=[torch.Generator().manual_seed(SEED)], **given)
    res = pipe.generate(PROMPT, NEGATIVE, init_image=xl_picture(), mask_image=xl_mask(), steps=7, guidance_scale=CFG,
                        seed=SEED, progress=False, output_type="latent", **given)
    assert res.latents.shape[-1] == XL_SIZE // pipe.scale
    assert psnr(_images(pipe, res)[0], want[0]) >= 50


def test_base_and_refiner_for_prompt_lists_match_diffusers_ensemble(tmp_path):
    """diffusers' base to denoising_end=0.75 and its refiner from denoising_start=0.75 (7 DDIM steps: the cut falls
    between steps), two prompts with two images each, one generator per image."""
    from test_refiner import tiny_refiner_unet
    from test_sdxl import SIZE as XL_SIZE, save_sdxl_folder

    base = save_sdxl_folder(tmp_path / "base", scheduler="ddim")
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=tiny_refiner_unet(), scheduler=make_scheduler("ddim"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.set_progress_bar_config(disable=True)
    refiner.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    with torch.no_grad():
        latents = base(PROMPTS, negative_prompt=NEGATIVES, height=XL_SIZE, width=XL_SIZE, num_inference_steps=7,
                       num_images_per_prompt=2, denoising_end=0.75, guidance_scale=CFG, generator=_generators(4),
                       output_type="latent").images
    want = _run(refiner, PROMPTS, image=latents, negative_prompt=NEGATIVES, num_inference_steps=7,
                denoising_start=0.75, num_images_per_prompt=2, guidance_scale=CFG, generator=_generators(4))
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "base", refiner=tmp_path / "refiner")
    res = pipe.generate(PROMPTS, NEGATIVES, refiner_switch=0.75, steps=7, guidance_scale=CFG, seed=SEED,
                        height=XL_SIZE, width=XL_SIZE, num_images_per_prompt=2, progress=False, output_type="latent")
    got = _images(pipe, res)
    assert res.parameters["refiner"] == "refiner"
    assert all(psnr(got[i], want[i]) >= 50 for i in range(4)), [psnr(got[i], want[i]) for i in range(4)]


def test_an_output_type_it_cannot_give_is_refused_before_any_work(tmp_path, monkeypatch):
    """diffusers' "np" and "pt" (and a misspelt "PIL") ran the whole batch and gave result.images == []."""
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing the output_type")

    kw = dict(steps=2, seed=1, progress=False)
    assert len(pipe.generate("x", **kw).images) == 1 and pipe.generate("x", output_type="latent", **kw).images == []
    monkeypatch.setattr(pipe, "_sample", no_sampling)
    for bad in ("np", "pt", "PIL", None):
        with pytest.raises(ValueError, match=r"output_type must be 'pil' \(PIL images\) or 'latent'.*got"):
            pipe.generate("x", output_type=bad, **kw)
        with pytest.raises(ValueError, match=r"output_type must be 'pil'"):
            pipe.generate_hires("x", output_type=bad, **kw)


def test_steps_that_are_not_a_whole_number_are_refused(tmp_path):
    """2.5 ran int(2.5) = 2 steps, True one step, without a word."""
    import numpy as np

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(seed=1, progress=False, output_type="latent")
    for bad in (2.5, 2.0, True, "2"):
        with pytest.raises(ValueError, match=rf"steps must be a whole number of sampling steps.*got {bad!r}"):
            pipe.generate("x", steps=bad, **kw)
    assert torch.equal(pipe.generate("x", steps=np.int64(2), **kw).latents, pipe.generate("x", steps=2, **kw).latents)
