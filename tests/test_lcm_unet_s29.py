"""Guidance-distilled latent consistency models (Luo et al. 2023, LCM; diffusers' `time_cond_proj_dim`, e.g.
SimianLuo/LCM_Dreamshaper_v7) end to end, against diffusers on the same tiny random weights.

A tiny SD-1.x-shaped U-Net with a 256-wide guidance code (as LCM_Dreamshaper_v7's), the tiny CLIP tower, tokenizer
and VAE of test_loading.py, saved by diffusers' LatentConsistencyModelPipeline with its LCMScheduler (the
Dreamshaper folder's scheduler settings). imagine must load it (its config was refused before), give diffusers'
U-Net output with a guidance code (1e-4 relative), the code itself as diffusers' get_guidance_scale_embedding makes
it, and the image of diffusers' 4-step LatentConsistencyModelPipeline at the same seed (PSNR >= 50 dB, the bar of
test_sd_parity.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from test_loading import TEXT_WIDTH, TINY, rel_err, tiny_diffusers_parts, write_clip_tokenizer  # noqa: E402
from test_sd_parity import psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.models.embeddings import guidance_scale_embedding  # noqa: E402
from imagine.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SIZE, SEED, COND_DIM = "a red circle left of the blue square", 32, 1234, 256
# LCM_Dreamshaper_v7's scheduler/scheduler_config.json
LCM_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                    original_inference_steps=50, prediction_type="epsilon")
LCM = diffusers.LatentConsistencyModelPipeline


def tiny_lcm_unet(seed: int = 7):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=32,
                                          cross_attention_dim=TEXT_WIDTH, time_cond_proj_dim=COND_DIM,
                                          **TINY["sd1"]["unet"]).eval()
    with torch.no_grad():  # spread the weights out, as test_loading's parts are
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # and make the guidance code matter, as it does in a distilled model: at diffusers' initial cond_proj the
        # images of scales 7.5 and 8.5 agree to 49.7 dB, a hair under the bar; at 4x, to 38 dB
        unet.time_embedding.cond_proj.weight.mul_(4)
    return unet


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """(diffusers' LatentConsistencyModelPipeline, its folder, imagine's pipeline loaded from the folder)."""
    root = tmp_path_factory.mktemp("lcm")
    _, vae, text = tiny_diffusers_parts("sd1")
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tok"), local_files_only=True)
    ref = LCM(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_lcm_unet(), scheduler=diffusers.LCMScheduler(
        **LCM_SCHEDULE), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / "folder", safe_serialization=True)
    return ref, root / "folder", TextToImagePipeline.from_pretrained(root / "folder")


def _diffusers_image(ref, guidance_scale: float = 8.5, steps: int = 4) -> torch.Tensor:
    with torch.no_grad():
        out = ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(SEED), output_type="pt")
    return out.images[0].float()


def _our_image(pipe: TextToImagePipeline, **kw) -> torch.Tensor:
    res = pipe.generate(PROMPT, seed=SEED, height=SIZE, width=SIZE, progress=False, output_type="latent", **kw)
    return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()


# -- the guidance code ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [256, 32, 33, 4])
def test_guidance_scale_embedding_is_diffusers(dim):
    """w -> sinusoidal code as diffusers' LatentConsistencyModelPipeline makes it (its float32 rounding: the
    timestep code's rounding parts from it by up to 1e-3 at w = 7.5)."""
    w = torch.tensor([7.5, 0.0, 2.0, 14.0, -0.5])
    want = LCM.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.allclose(guidance_scale_embedding(w, dim), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("w,dim,match", [(torch.tensor(7.5), 256, "1-D"), ([7.5], 256, "1-D"),
                                         (torch.ones(2, 1), 256, "1-D"), (torch.tensor([True]), 256, "real"),
                                         (torch.tensor([7.5]), 3, "at least 4")])
def test_guidance_scale_embedding_refuses_bad_input(w, dim, match):
    with pytest.raises(ValueError, match=match):
        guidance_scale_embedding(w, dim)


# -- the U-Net --------------------------------------------------------------------------------------------------
def test_lcm_unet_config_loads_and_matches_diffusers(lcm):
    """The old refusal ("time_cond_proj_dim=256 is not supported") is gone: the folder's U-Net loads with diffusers'
    cond_proj weight, and its output with a guidance code is diffusers' to 1e-4."""
    ref, folder, pipe = lcm
    cfg = UNetConfig.from_dict(dict(ref.unet.config))
    assert cfg.time_cond_proj_dim == COND_DIM
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert torch.equal(unet.time_embedding.cond_proj.weight, ref.unet.time_embedding.cond_proj.weight)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g)
    t = torch.tensor([999.0, 259.0])
    ctx = torch.randn(2, 77, TEXT_WIDTH, generator=g)
    code = LCM.get_guidance_scale_embedding(None, torch.tensor([7.5, 1.0]), embedding_dim=COND_DIM)
    with torch.no_grad():
        want = ref.unet(x, t, ctx, timestep_cond=code).sample
        plain = ref.unet(x, t, ctx).sample  # (the code must matter, else the comparison says nothing about it)
        for ours in (unet, pipe.unet):
            assert rel_err(ours(x, t, context=ctx, timestep_cond=code), want) < 1e-4
    assert rel_err(plain, want) > 1e-2


def test_lcm_unet_guidance_batch_and_errors(lcm):
    _, _, pipe = lcm
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=g)
    ctx = torch.randn(2, 77, TEXT_WIDTH, generator=g)
    code = guidance_scale_embedding(torch.tensor([7.5, 1.0]), COND_DIM)
    with torch.no_grad():  # a guidance batch (x shared by two contexts, one code each) is the call on x twice
        shared = unet(x, torch.tensor([500.0]), context=ctx, timestep_cond=code)
        twice = unet(torch.cat([x, x]), torch.tensor([500.0, 500.0]), context=ctx, timestep_cond=code)
    assert rel_err(shared, twice) < 1e-5
    # (without the code the cond_proj term is left out, as diffusers' TimestepEmbedding: test_model_fixes_s30)
    with pytest.raises(ValueError, match=r"timestep_cond must be a tensor \[1, 256\]"):
        unet(x, 500.0, context=ctx[:1], timestep_cond=code[:, :32])
    plain = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    with pytest.raises(ValueError, match="time_cond_proj_dim is None"):
        plain(x, 500.0, context=ctx[:1], timestep_cond=code[:1])
    with pytest.raises(ValueError, match="time_cond_proj_dim must be"):
        UNetConfig(time_cond_proj_dim=0)


# -- the pipeline -----------------------------------------------------------------------------------------------
def test_defaults_are_diffusers_lcm_pipelines(lcm):
    _, _, pipe = lcm
    sig = inspect.signature(LCM.__call__).parameters
    assert pipe.guidance_embedded
    assert pipe.defaults["steps"] == sig["num_inference_steps"].default == 4
    assert pipe.defaults["guidance_scale"] == sig["guidance_scale"].default
    assert pipe.defaults["sampler"] == "lcm"


def test_generation_matches_diffusers_lcm_pipeline(lcm, monkeypatch):
    """The model's defaults (lcm, 4 steps, guidance 8.5) give LatentConsistencyModelPipeline's image, one U-Net call
    a step on the prompt alone; the bar tells guidance scales apart."""
    ref, _, pipe = lcm
    want = _diffusers_image(ref)
    assert want.std() > 0.02  # a real picture
    got = _our_image(pipe)
    assert psnr(got, want) >= 50, f"PSNR {psnr(got, want):.1f} dB"
    assert psnr(_our_image(pipe, negative_prompt=""), want) >= 50  # an empty negative prompt: none
    # another scale: its own image; the bar tells the neighbouring scales apart (the code of guidance_scale - 1)
    assert psnr(_our_image(pipe, guidance_scale=3.0), _diffusers_image(ref, 3.0)) >= 50
    assert psnr(_diffusers_image(ref, 7.5), want) < 50 and psnr(_diffusers_image(ref, 9.5), want) < 50
    monkeypatch.setenv("IMAGINE_PREPACK", "0")  # (the U-Net itself runs, so that its hook sees the calls)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["context"].shape[0]),
                                               with_kwargs=True)
    try:
        _our_image(pipe)
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 1]  # one call a step, on the prompt alone: no classifier-free guidance batch


def test_another_sampler_runs_with_the_code_as_diffusers(lcm):
    """Another sampler steps the U-Net with the guidance code and no CFG pass, as diffusers' StableDiffusionPipeline
    runs a time_cond_proj_dim U-Net with its EulerDiscreteScheduler."""
    ref, _, pipe = lcm
    euler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    sd = diffusers.StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                                           unet=ref.unet, scheduler=euler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = sd(PROMPT, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0].float()
    got = _our_image(pipe, sampler="euler", steps=8, guidance_scale=6.0)
    assert psnr(got, want) >= 50, f"PSNR {psnr(got, want):.1f} dB"


@pytest.mark.parametrize("kw,match", [
    ({"negative_prompt": "blurry"}, "negative_prompt: .* guidance-distilled"),
    ({"sampler": "euler_cfg_pp"}, "CFG\\+\\+"),
    ({"guidance_rescale": 0.7}, "guidance_rescale"),
    ({"prompt": "a AND b", "composable": True}, "AND"),
])
def test_lcm_refuses_what_needs_the_unconditional_pass(lcm, kw, match):
    _, _, pipe = lcm
    kw = {"prompt": PROMPT, **kw}
    with pytest.raises(ValueError, match=match):
        pipe.generate(kw.pop("prompt"), seed=SEED, height=SIZE, width=SIZE, progress=False, output_type="latent", **kw)


def test_lcm_refuses_other_distillation_steps(lcm, tmp_path):
    """The lcm sampler lays out LCM's 50 distillation timesteps; a scheduler config that says otherwise is refused,
    not run at the wrong timesteps."""
    _, _, pipe = lcm
    other = TextToImagePipeline(pipe.c.__class__(**{**pipe.c.__dict__, "scheduler_config": {
        **pipe.c.scheduler_config, "original_inference_steps": 25}}))
    with pytest.raises(ValueError, match="original_inference_steps=25"):
        other.generate(PROMPT, seed=SEED, height=SIZE, width=SIZE, progress=False, output_type="latent")



def test_fast_mode_runs_the_code_in_bf16(lcm, bf16_mode):
    """The fast mode's bf16 U-Net takes the guidance code too (cast with the other cond tensors) and stays near
    diffusers' fp32 image, as the SD fast mode does (test_sd_parity: 30 dB)."""
    from imagine.pipelines.text_to_image import fast_copy

    ref, folder, _ = lcm
    fast = TextToImagePipeline.from_pretrained(folder, precision="fast")
    assert next(fast_copy(fast.unet).parameters()).dtype == torch.bfloat16
    assert psnr(_our_image(fast), _diffusers_image(ref)) >= 30
