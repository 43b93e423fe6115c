"""Inpainting (imagine.inpainting): a 9-channel inpainting model sees the mask and the masked picture's latents
beside its noisy latents (sampling.ConcatChannels); any other model keeps the known part by the replacement method
(sampling.Denoiser.keep_known). Both give diffusers' StableDiffusionInpaintPipeline's image on the same weights,
seed and scheduler (50 dB, the parity bar of the text-to-image tests), from a folder and from an original single
file; the known part of a plain model's result is the picture's latents exactly; an inpainting model runs text to
image as inpainting with everything masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_img2img import _picture  # noqa: E402
from test_loading import make_scheduler, save_diffusers_folder, write_clip_tokenizer, write_single_file  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.inpainting import a1111_latent_mask, latent_mask, prepare_masks  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.sampling import make_generators, posterior_generators, sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(size: int = SIZE, box=None) -> Image.Image:
    """White (paint anew) in a box, black elsewhere; an RGB picture, as masks drawn in an editor often are."""
    a = np.zeros((size, size, 3), np.uint8)
    top, bottom, left, right = box or (size // 4, 3 * size // 4, size // 8, size // 2)
    a[top:bottom, left:right] = 255
    return Image.fromarray(a)


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def _diffusers_inpaint(ref, steps, strength, image=None, mask=None):
    pipe = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, image=image or _picture(), mask_image=mask or _mask(), strength=strength,
                    negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, height=SIZE, width=SIZE,
                    generator=[torch.Generator().manual_seed(SEED)], output_type="pt").images[0].float()


# (input channels, sampler, strength, steps): 9 = an inpainting model, 4 = a plain one (the replacement method).
# euler_a pins the generator draws (diffusers encodes the masked picture even for a plain model); heun pins the
# known part at the second evaluation of each step.
# ddpm: DDPMScheduler (whose clip_sample diffusers' SD pipeline sets False, as imagine reads SD).
CASES = [(9, "ddim", 1.0, 12), (9, "euler", 0.75, 12), (9, "dpmpp_2m", 0.6, 10),
         (4, "ddim", 1.0, 12), (4, "dpmpp_2m", 0.6, 10), (4, "euler_a", 1.0, 8), (4, "heun", 0.8, 6),
         (4, "ddpm", 1.0, 8), (9, "ddpm", 0.7, 8)]


@pytest.mark.parametrize("channels,sampler,strength,steps", CASES)
def test_inpainting_matches_diffusers(tmp_path, channels, sampler, strength, steps):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler=sampler, in_channels=channels)
    want = _diffusers_inpaint(ref, steps, strength)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert pipe.image_conditioned == (channels == 9)
    res = pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), mask_image=_mask(), strength=strength, steps=steps,
                        guidance_scale=CFG, sampler=sampler, seed=SEED, progress=False)
    assert res.parameters["inpainting"] is True and res.parameters["strength"] == strength
    assert psnr(_tensor(res.images[0]), want) >= 50


def test_an_inpainting_single_file_loads_and_matches_diffusers(tmp_path):
    """SD 1.5-inpainting-style original checkpoints (input_blocks.0.0 with 9 input channels) load and run."""
    path = tmp_path / "single" / "inpainting.safetensors"
    unet, vae, text = write_single_file(path, "sd1", in_channels=9)
    tok = transformers.CLIPTokenizer.from_pretrained(path.parent / "tokenizer", local_files_only=True)
    ref = diffusers.StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                                   scheduler=make_scheduler("dpmpp_2m"), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_inpaint(ref, 10, 1.0)
    pipe = TextToImagePipeline.from_pretrained(path)
    assert pipe.unet.config.in_channels == 9 and pipe.image_conditioned
    res = pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), mask_image=_mask(), steps=10, guidance_scale=CFG,
                        sampler="dpmpp_2m", seed=SEED, progress=False)
    assert psnr(_tensor(res.images[0]), want) >= 50


def test_an_inpainting_model_paints_from_text_as_with_everything_masked(tmp_path):
    """With no picture an inpainting model sees an all-ones mask and an all-zeros masked picture (AUTOMATIC1111's
    conditioning for it in text to image): diffusers' inpainting with a white mask, whatever the picture."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim", in_channels=9)
    white = Image.new("L", (SIZE, SIZE), 255)
    want = _diffusers_inpaint(ref, 8, 1.0, mask=white)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=8, guidance_scale=CFG, sampler="ddim", seed=SEED, progress=False)
    text_only = pipe.generate(PROMPT, NEGATIVE, height=SIZE, width=SIZE, **kw)
    assert psnr(_tensor(text_only.images[0]), want) >= 50
    masked_all = pipe.generate(PROMPT, NEGATIVE, init_image=_picture(seed=5), mask_image=white, **kw)
    assert torch.equal(text_only.latents, masked_all.latents)
    assert "inpainting" not in text_only.parameters and "strength" not in text_only.parameters


def test_a_plain_models_known_part_is_the_pictures_latents(tmp_path):
    """Where the latent mask is 0 the result is the picture's own latents (the replacement method's last step),
    drawn with the image's generator first, as diffusers draws them; where it is 1 the model painted anew."""
    save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="dpmpp_2m")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    res = pipe.generate(PROMPT, init_image=_picture(), mask_image=_mask(), steps=6, seed=SEED, progress=False,
                        output_type="latent")
    z0 = pipe.encode_images([_picture()], SIZE, SIZE, make_generators(1, [SEED]))
    keep = latent_mask(prepare_masks([_mask()], SIZE, SIZE), z0.shape[-2:]).expand_as(z0) == 0
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(res.latents[keep], z0[keep])
    assert float((res.latents[~keep] - z0[~keep]).abs().mean()) > 0.1


def test_an_images_result_does_not_depend_on_its_batch(tmp_path):
    save_diffusers_folder(tmp_path / "folder", "sd1", in_channels=9)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=5, progress=False, output_type="latent", sampler="euler_a")
    inits = [_picture(seed=1), _picture(seed=2), _picture(seed=3)]
    masks = [_mask(box=(0, 16, 0, 16)), _mask(), _mask(box=(8, 32, 16, 32))]
    batch = pipe.generate(["a", "b", "c"], init_image=inits, mask_image=masks, seeds=[7, 8, 9], **kw).latents
    alone = pipe.generate("b", init_image=inits[1], mask_image=masks[1], seed=8, **kw).latents
    assert torch.equal(batch[1:2], alone)


def test_an_inpainting_model_at_strength_1_under_a1111s_rule_starts_from_the_picture(tmp_path):
    """At strength 1 an inpainting model starts from noise under diffusers' rule: with everything masked the picture
    does not matter. A1111's img2img starts from q(x_t | x_0) at strength 1 too (strength_rule "a1111"), so there the
    picture does."""
    save_diffusers_folder(tmp_path / "folder", "sd1", in_channels=9)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=4, progress=False, output_type="latent", seed=3, strength=1.0,
              mask_image=Image.new("L", (SIZE, SIZE), 255))
    for rule, same in (("diffusers", True), ("a1111", False)):
        a, b = (pipe.generate("a", init_image=_picture(seed=k), strength_rule=rule, **kw).latents for k in (1, 2))
        assert torch.equal(a, b) == same, rule


def test_masks_follow_diffusers_rule():
    """Resized with Lanczos, made grey, cut at 0.5: 0/1 at the picture's size and (nearest) at the latents'."""
    grey = Image.fromarray(np.array([[0, 127, 128, 255]] * 4, np.uint8))
    m = prepare_masks([grey], 4, 4)
    assert m.shape == (1, 1, 4, 4) and m[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    proc = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                                       do_convert_grayscale=True)
    big = _mask(37)
    assert torch.equal(prepare_masks([big], 24, 16), proc.preprocess(big, height=16, width=24))
    assert set(latent_mask(prepare_masks([big], 24, 16), (2, 3)).unique().tolist()) <= {0.0, 1.0}


def test_a1111s_latent_mask_rounds_its_bicubic_resize():
    """A1111's latent mask (a1111_latent_mask): the mask picture resized to the latents' size (PIL's bicubic) and
    rounded, so an edge cell a quarter painted is kept, where diffusers' nearest neighbour of the binarized mask
    paints it; a cell three quarters painted is painted by both."""
    a = np.zeros((64, 64), np.uint8)
    a[:, :26] = 255  # cell 3 (pixels 24..31): 2 of 8 columns painted
    a[:, 32:38] = 255  # cell 4 (pixels 32..39): 6 of 8
    pic = Image.fromarray(a)
    ours = a1111_latent_mask([pic], 64, 64, (8, 8))[0, 0, 0].tolist()
    theirs = latent_mask(prepare_masks([pic], 64, 64), (8, 8))[0, 0, 0].tolist()
    assert ours[:3] == [1.0, 1.0, 1.0] and ours[3] == 0.0 and ours[4] == 1.0 and ours[5:] == [0.0] * 3
    assert theirs[3] == 1.0  # (nearest neighbour reads pixel 24)
    assert set(a1111_latent_mask([pic], 64, 64, (8, 8)).unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("channels", [4, 9])
def test_a1111_rules_keep_the_picture_on_a1111s_latent_mask(tmp_path, channels):
    """generate() under A1111's rules (strength_rule "a1111") keeps the picture's latents exactly where A1111's latent
    mask keeps them, for a plain model and an inpainting model alike (A1111 blends for both); under diffusers' rules
    a plain model keeps them on the nearest-neighbour mask and an inpainting model keeps none by blending."""
    from PIL import ImageFilter

    save_diffusers_folder(tmp_path / "folder", "sd1", in_channels=channels)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    mask = _mask(box=(SIZE // 4, 3 * SIZE // 4, 3, SIZE // 2 + 3)).filter(ImageFilter.GaussianBlur(4))
    z0 = pipe.encode_images([_picture()], SIZE, SIZE, make_generators(1, [3]))
    kept_a1111 = (a1111_latent_mask([mask], SIZE, SIZE, z0.shape[-2:]) == 0).expand_as(z0)
    kept_diffusers = (latent_mask(prepare_masks([mask], SIZE, SIZE), z0.shape[-2:]) == 0).expand_as(z0)
    assert not torch.equal(kept_a1111, kept_diffusers)  # (the blurred edge falls differently)
    # (under A1111's rules the picture's posterior is drawn from a stream of its own: sampling.posterior_generators)
    z0_a1111 = pipe.encode_images([_picture()], SIZE, SIZE, posterior_generators([3]))
    for rule in ("a1111", "diffusers"):
        got = pipe.generate("a", init_image=_picture(), mask_image=mask, seed=3, steps=4, progress=False,
                            output_type="latent", sampler="euler_a", strength=0.75, strength_rule=rule).latents
        kept = kept_a1111 if rule == "a1111" else kept_diffusers
        picture = z0_a1111 if rule == "a1111" else z0
        if rule == "diffusers" and channels == 9:
            assert not torch.equal(got[kept], picture[kept])
        else:
            assert torch.equal(got[kept], picture[kept]), rule
            assert not torch.equal(got[~kept], picture[~kept])


def test_sample_with_a_mask_closed_forms():
    """sample(init=, mask=): mask 0 everywhere returns init exactly; mask 1 everywhere is the run without a mask
    from the same start (the replacement changes nothing); a mask must fit the sample and lie in [0, 1]."""
    schedule = NoiseSchedule.from_diffusers_config({"num_train_timesteps": 1000, "beta_start": 0.00085,
                                                    "beta_end": 0.012, "beta_schedule": "scaled_linear"})

    def model(x, t, **_):  # a denoiser with some structure: eps depends on x and t
        return torch.tanh(x) * (t[:, None, None, None] / 1000)

    shape = (2, 4, 6, 6)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    kw = dict(schedule=schedule, sampler="dpmpp_2m", steps=8, progress=False)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    kept = sample(model, noise, init=init, mask=torch.zeros(1, 1, 6, 6), strength=1.0, **kw)
    assert torch.equal(kept, init)
    free = sample(model, noise, init=init, mask=torch.ones(2, 1, 6, 6), strength=0.7, **kw)
    plain = sample(model, noise, init=init, strength=0.7, **kw)
    assert torch.allclose(free, plain, atol=1e-6)
    from_noise = sample(model, noise, init=init, mask=torch.ones(2, 4, 6, 6), strength=1.0, **kw)
    assert torch.allclose(from_noise, sample(model, noise, **kw), atol=1e-6)  # strength 1: pure noise start
    # what the model sees: the start as it is (pure noise at strength 1), then the known part at each level
    seen = []

    def recording(x, t, **_):
        seen.append(x.clone())
        return model(x, t)

    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1
    sample(recording, noise, init=init, mask=mask, strength=1.0, **{**kw, "sampler": "ddim"})
    assert torch.equal(seen[0], noise)
    plan = schedule.plan(8, rule="ddim", spacing="leading")
    abar = float(plan.alphas_cumprod[1])
    known = abar ** 0.5 * init.double() + (1 - abar) ** 0.5 * noise.double()
    assert torch.allclose(seen[1][..., 3:].double(), known[..., 3:], atol=1e-6)
    assert not torch.allclose(seen[1][..., :3].double(), known[..., :3], atol=1e-2)
    with pytest.raises(ValueError, match="mask needs init"):
        sample(model, shape, mask=torch.ones(2, 1, 6, 6), **kw)
    with pytest.raises(ValueError, match=r"mask must be a tensor \[2 or 1, 1 or 4, 6, 6\]"):
        sample(model, shape, init=init, mask=torch.ones(2, 1, 3, 3), **kw)
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        sample(model, shape, init=init, mask=torch.full((2, 1, 6, 6), 2.0), **kw)


def test_bad_inputs_are_clear_errors(tmp_path):
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=2, seed=1, progress=False)
    with pytest.raises(ValueError, match="mask_image needs init_image"):
        pipe.generate("x", mask_image=_mask(), **kw)
    with pytest.raises(ValueError, match="2 masks for 3 prompts"):
        pipe.generate(["a", "b", "c"], init_image=_picture(), mask_image=[_mask(), _mask()], **kw)
    with pytest.raises(TypeError, match="mask_image must be a PIL image"):
        pipe.generate("x", init_image=_picture(), mask_image="mask.png", **kw)
    with pytest.raises(ValueError, match="strength is image to image's"):
        pipe.generate("x", strength=0.5, **kw)
    with pytest.raises(ValueError, match="hires. fix starts from text"):
        pipe.generate_hires("x", mask_image=_mask(), **kw)


def test_unets_imagine_cannot_run_are_refused_when_the_pipeline_is_made(tmp_path):
    """A U-Net of another input width (here 5 channels) in a diffusers folder: refused at load, naming what runs
    (instruct-pix2pix's 8: tests/test_instruct_pix2pix.py)."""
    save_diffusers_folder(tmp_path / "folder", "sd1", in_channels=5)
    with pytest.raises(ValueError, match=r"takes 5 input channels; imagine runs U-Nets that take the 4 channels of "
                                         r"the noisy latents, or 9 \(an inpainting model's.*or 8 \(instruct-pix2pix"):
        TextToImagePipeline.from_pretrained(tmp_path / "folder")


@pytest.mark.parametrize("content", ["latent_noise", "latent_nothing"])
def test_masked_content_replaces_the_start_where_painted_anew(tmp_path, content):
    """AUTOMATIC1111's masked content (its img2img inpainting_fill 2 and 3): where the latent mask is 1 the picture's
    latents are the run's start noise, or zeros, before the start level's noise; the known part stays the picture's."""
    from imagine.sampling import PerSampleNoise

    save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    shape = (1, 4, SIZE // 2, SIZE // 2)
    gens = make_generators(1, [SEED])
    init, _ = pipe._inpainting([_picture()], [_mask()], shape, SIZE, SIZE, gens, gens, 0.6, masked_content=content)
    g = make_generators(1, [SEED])
    z0 = pipe.encode_images([_picture()], SIZE, SIZE, g)
    eps = PerSampleNoise(g).draw(shape)
    m = latent_mask(prepare_masks([_mask()], SIZE, SIZE), shape[-2:]).expand(shape).bool()
    assert torch.equal(init[~m], z0[~m])
    assert torch.equal(init[m], eps[m] if content == "latent_noise" else torch.zeros_like(init[m]))
    res = pipe.generate(PROMPT, init_image=_picture(), mask_image=_mask(), strength=0.6, steps=6, seed=SEED,
                        masked_content=content, progress=False, output_type="latent")
    plain = pipe.generate(PROMPT, init_image=_picture(), mask_image=_mask(), strength=0.6, steps=6, seed=SEED,
                          progress=False, output_type="latent")
    assert res.parameters["masked_content"] == content and not torch.equal(res.latents, plain.latents)
    with pytest.raises(ValueError, match="masked_content must be one of original, latent_noise, latent_nothing"):
        pipe.generate(PROMPT, init_image=_picture(), mask_image=_mask(), masked_content="noise", steps=2)
    with pytest.raises(ValueError, match="is for inpainting: give mask_image"):
        pipe.generate(PROMPT, init_image=_picture(), masked_content=content, steps=2)
