"""Stable Diffusion's x4 upscaler, a super-resolution stage of a cascade (`imagine/pipelines/upscale.py`): a tiny
random model of its layout (a 7-channel U-Net with the noise level as its class label, a VAE that downsamples by 4,
a low-resolution scheduler) saved by diffusers loads offline and gives diffusers' StableDiffusionUpscalePipeline's
images (two samplers, v-prediction, a batch with per-image seeds and negative prompts) at 50 dB or more."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_loading import TEXT_WIDTH, VOCAB, save_diffusers_folder, write_clip_tokenizer  # noqa: E402
from test_sd_parity import psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_upscaler(folder, only_cross_attention=False, width=16, groups=8):
    """only_cross_attention: per level, as the real x4's disable_self_attentions (its attention levels but the last);
    width, groups: the first level's channels and the GroupNorms' groups (an original single file has SD's 32)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, norm_num_groups=groups, block_out_channels=(width, 2 * width),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        num_class_embeds=1000, use_linear_projection=True, only_cross_attention=only_cross_attention).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(width,) * 3, layers_per_block=1,
                                  latent_channels=4, norm_num_groups=groups,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333).eval()
    with torch.no_grad():  # spread the weights so that every path shows, the class embedding's above all
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=96, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=TEXT_WIDTH, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
        pad_token_id=0, num_hidden_layers=2, hidden_act="gelu")).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "_tok_x4", "!"),
                                                     local_files_only=True)
    schedule = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, max_noise_level=350,
        low_res_scheduler=diffusers.DDPMScheduler(**schedule),
        scheduler=diffusers.DDIMScheduler(**schedule, prediction_type="v_prediction", clip_sample=False,
                                          set_alpha_to_one=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _picture(seed: int, size=(16, 12)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("x4") / "folder"
    _tiny_upscaler(folder)
    # (read back from the folder, as a user loads it: a scheduler made in memory marks the settings it was not
    # given, and from_config then takes another class's defaults for them, e.g. Euler's linspace spacing)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, ref, TextToImagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_upscale_matches_diffusers(x4, sampler, scheduler):
    """Two prompts, each with its picture, negative prompt and seed, noise level 40, 10 steps, guidance 7.5; the
    result is 4x the picture; without the noise level's class label, or with the picture's noise at another level,
    the image is visibly not diffusers'."""
    folder, ref, ours = x4
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    pictures, prompts, negatives = [_picture(1), _picture(2)], ["a red circle", "a blue square"], ["blurry", ""]
    want = ref(prompts, image=pictures, negative_prompt=negatives, num_inference_steps=10, guidance_scale=7.5,
               noise_level=40, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="pt").images
    got = ours.upscale(prompts, pictures, negatives, steps=10, guidance_scale=7.5, noise_level=40, seeds=[3, 4],
                       sampler=sampler, progress=False, output_type="latent")
    images = ((ours.decode(got.latents) + 1) / 2).clamp(0, 1)
    assert images.shape[-2:] == (48, 64) and got.parameters["upscaled_from"] == "16x12"
    for a, b in zip(images, want):
        assert psnr(a, b.float()) >= 50, psnr(a, b.float())
    other = ours.upscale(prompts, pictures, negatives, steps=10, guidance_scale=7.5, noise_level=200, seeds=[3, 4],
                         sampler=sampler, progress=False, output_type="latent")
    assert psnr(((ours.decode(other.latents)[0] + 1) / 2).clamp(0, 1), want[0].float()) < 40


def test_conditioning_augmentation_is_the_low_res_schedulers_add_noise(x4):
    """z_s = sqrt(abar_s) x + sqrt(1 - abar_s) eps at every level the model takes (0, 20, 40, 350), against diffusers'
    DDPMScheduler.add_noise with the folder's low-res scheduler and the same noise."""
    from imagine.diffusion import augment

    folder, ref, ours = x4
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(2, 3, 12, 16, generator=g) * 2 - 1, torch.randn(2, 3, 12, 16, generator=g)
    for level in (0, 20, 40, 350):
        want = ref.low_res_scheduler.add_noise(x, eps, torch.tensor([level]))
        assert torch.allclose(augment(x, level, ours.c.low_res_schedule, eps), want, atol=2e-5), level  # (float32 there)


def test_a_picture_whose_sides_are_not_multiples_of_the_factor(x4):
    """diffusers brings a 17 x 14 picture down to 16 x 12 (bicubic) before upscaling it: the same image here."""
    folder, ref, ours = x4
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    picture = _picture(3, (17, 14))
    want = ref("a red circle", image=picture, num_inference_steps=4, noise_level=20, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(1), output_type="pt").images[0].float()
    got = ours.upscale("a red circle", picture, steps=4, noise_level=20, seed=1, sampler="ddim", guidance_scale=7.5,
                       progress=False,
                       output_type="latent")
    image = ((ours.decode(got.latents)[0] + 1) / 2).clamp(0, 1)
    assert image.shape[-2:] == (48, 64) and psnr(image, want) >= 50


def test_one_picture_for_every_prompt_and_the_fast_mode(x4):
    folder, ref, ours = x4
    picture = _picture(5)
    a = ours.upscale("a red circle", picture, steps=4, seed=7, num_images_per_prompt=2, progress=False)
    b = ours.upscale(["a red circle"] * 2, [picture, picture], steps=4, seeds=[7, 8], progress=False)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images] and a.seeds == [7, 8]
    fast = TextToImagePipeline.from_pretrained(folder, precision="fast")
    f = fast.upscale("a red circle", picture, steps=4, seed=7, progress=False, output_type="latent")
    x = ((fast.decode(f.latents) + 1) / 2).clamp(0, 1)
    y = ((ours.decode(a.latents[:1]) + 1) / 2).clamp(0, 1)
    assert psnr(x, y) >= 30


def test_upscaler_errors(x4, tmp_path):
    folder, ref, ours = x4
    with pytest.raises(ValueError, match="super-resolution model.*use upscale"):
        ours.generate("a red circle", steps=2, progress=False)
    with pytest.raises(ValueError, match="noise_level must be a whole number from 0 to 350"):
        ours.upscale("a", _picture(1), noise_level=351)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        ours.upscale("a", _picture(1), num_images_per_prompt=0)
    with pytest.raises(ValueError, match="no prompt given"):
        ours.upscale([], _picture(1))
    with pytest.raises(ValueError, match="pictures of one size"):
        ours.upscale(["a", "b"], [_picture(1), _picture(2, (8, 8))])
    save_diffusers_folder(tmp_path / "sd", "sd1")
    with pytest.raises(ValueError, match="not a super-resolution model"):
        TextToImagePipeline.from_pretrained(tmp_path / "sd").upscale("a", _picture(1))
    # (an upscaler's folder without its low_res_scheduler: named, not read as a U-Net of unknown inputs)
    import shutil

    half = tmp_path / "half_x4"
    shutil.copytree(folder, half)
    index = json.loads((half / "model_index.json").read_text())
    (half / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "low_res_scheduler"}))
    with pytest.raises(ValueError, match="4 \\+ 3 input channels, an upscaler's .* names no low_res_scheduler"):
        TextToImagePipeline.from_pretrained(half)


def test_generate_cli_upscales(x4, tmp_path, capsys):
    from imagine.cli import main

    folder, ref, ours = x4
    low = tmp_path / "low.png"
    _picture(9).save(low)
    out = tmp_path / "big.png"
    assert main(["generate", "--model", str(folder), "--init-image", str(low), "a red circle", "--steps", "4",
                 "--seed", "2", "--noise-level", "30", "-o", str(out)]) == 0
    want = ours.upscale("a red circle", Image.open(low).convert("RGB"), steps=4, seed=2, noise_level=30,
                        progress=False).images[0]
    assert Image.open(out).size == (64, 48) and Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert json.loads(Image.open(out).info["imagine"])["noise_level"] == 30
    for extra, words in ((["--strength", "0.5"], "--strength: not for a super-resolution model"),
                         ([], "is a super-resolution model (SD's x4 upscaler): give the picture with --init-image")):
        args = ["generate", "--model", str(folder), "a", "--steps", "2", "-o", str(tmp_path / "x.png"), *extra]
        if extra:
            args += ["--init-image", str(low)]
        assert main(args) != 0
        assert words in capsys.readouterr().err


def test_serve_refuses_a_super_resolution_model(x4, capsys):
    """imagine serve runs text-to-image models: an upscaler is refused at start, with what to do instead."""
    from imagine.cli import main

    folder, ref, ours = x4
    assert main(["serve", "--model", str(folder)]) != 0
    assert "super-resolution model (SD's x4 upscaler)" in capsys.readouterr().err


def test_single_file_x4_matches_diffusers(tmp_path):
    """An original x4-upscaler single file (LDM names: label_emb for the noise-level classes, the OpenCLIP text tower
    with the layer SD 2.x drops, the x4's betas, a 3-level VAE; the first attention level reading the text only, as
    the released model's disable_self_attentions) loads offline as an upscaler: its v-prediction, 0.08333 latent
    scale, the low-resolution schedule and 350 levels from the released config; its images are diffusers' (from the
    same weights as a folder) at 50 dB or more."""
    from safetensors.torch import save_file

    from test_loading import compvis_checkpoint

    from imagine.loading.single_file import load_single_file

    _tiny_upscaler(tmp_path / "folder", only_cross_attention=(False, True), width=64, groups=32)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    state = compvis_checkpoint(ref.unet, ref.vae, ref.text_encoder, openclip=True, betas_range=(0.0001, 0.02))
    assert "model.diffusion_model.label_emb.weight" in state
    # (its noise augmenter's schedule buffers, as LDM's LatentUpscaleDiffusion saves them)
    low = torch.linspace(0.0001 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - low, 0)
    state.update({"low_scale_model.betas": low.float(), "low_scale_model.alphas_cumprod": abar.float(),
                  "low_scale_model.sqrt_alphas_cumprod": abar.sqrt().float()})
    path = tmp_path / "single" / "x4-upscaler-ema.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    write_clip_tokenizer(path.parent / "tokenizer", "!")
    ours = TextToImagePipeline(load_single_file(path))
    c = ours.c
    assert ours.picture_model and c.prediction_type == "v_prediction" and c.defaults["max_noise_level"] == 350
    assert c.vae.config.scaling_factor == 0.08333 and c.unet.config.only_cross_attention == (False, True)
    assert torch.allclose(c.low_res_schedule.alphas_cumprod.float(), ref.low_res_scheduler.alphas_cumprod, atol=1e-6)
    pictures = [_picture(1), _picture(2)]
    for sampler, scheduler in (("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")):
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
        want = ref(["a red circle", "a blue square"], image=pictures, num_inference_steps=10, guidance_scale=7.5,
                   noise_level=40, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                   output_type="pt").images
        got = ours.upscale(["a red circle", "a blue square"], pictures, steps=10, guidance_scale=7.5, noise_level=40,
                           seeds=[3, 4], sampler=sampler, progress=False, output_type="latent")
        images = ((ours.decode(got.latents) + 1) / 2).clamp(0, 1)
        for a, b in zip(images, want):
            assert psnr(a, b.float()) >= 50, (sampler, psnr(a, b.float()))
    # SD 2.1 unCLIP's single file (label_emb.0.*: its image-embedding projection; its image tower and noise augmentor
    # beside the U-Net) without its image tower is refused by name (session 39: with it, it loads,
    # test_unclip_single_file_s39)
    from imagine.loading.single_file import components_from_state

    del state["model.diffusion_model.label_emb.weight"]
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(512, 2048)
    with pytest.raises(ValueError, match="reads an image embedding .label_emb.0.*SD 2.1 unCLIP. but the file has no"):
        components_from_state(state, str(path))
    state["noise_augmentor.betas"] = torch.zeros(1000)
    with pytest.raises(ValueError, match="looks like SD 2.1 unCLIP .a noise augmentor.*no CLIP image tower"):
        components_from_state(state, str(path))


def test_defaults_and_a_scale_at_or_below_one_are_diffusers(x4):
    """A call with no steps or guidance runs diffusers' own defaults for the upscaler (75 steps at guidance 9), and a
    guidance scale at or below 1 runs the prompt's side alone, as diffusers' gate (guidance_scale > 1) does."""
    folder, ref, ours = x4
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    assert (ours.defaults["steps"], ours.defaults["guidance_scale"]) == (75, 9.0)
    want = ref("a red circle", image=_picture(1), generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = ours.upscale("a red circle", _picture(1), seed=3, progress=False, output_type="latent")
    assert psnr(((ours.decode(got.latents) + 1) / 2).clamp(0, 1)[0], want[0].float()) >= 50
    for scale in (0.5, 0.0):
        want = ref("a red circle", image=_picture(1), num_inference_steps=4, guidance_scale=scale, noise_level=20,
                   generator=torch.Generator().manual_seed(3), output_type="pt").images[0].float()
        got = ours.upscale("a red circle", _picture(1), steps=4, guidance_scale=scale, noise_level=20, seed=3,
                           sampler="ddim", progress=False, output_type="latent")
        assert psnr(((ours.decode(got.latents) + 1) / 2).clamp(0, 1)[0], want) >= 50, scale
    # (a NumPy integer is a noise level too; a picture under the VAE's factor is refused, as diffusers refuses it)
    assert ours.upscale("x", _picture(1), steps=1, noise_level=np.int64(20), seed=1,
                        progress=False).parameters["noise_level"] == 20
    with pytest.raises(ValueError, match="a picture of 2x2 is under the VAE's factor 4 on a side"):
        ours.upscale("x", _picture(1, (2, 2)), steps=1, progress=False)
