"""Stable Diffusion loading, reviewed against the files people have on disk (session 29).

- SD 2.1 Turbo (stabilityai/sd-turbo's sd_turbo.safetensors) is saved by Stability's sgm code: its OpenCLIP ViT-H
  tower under conditioner.embedders.0.model.* and sgm's denoiser.sigmas. AUTOMATIC1111 renames the prefix to
  cond_stage_model. (sd_models.get_state_dict_from_checkpoint, is_sd2_turbo) and diffusers reads the tower from
  there (is_open_clip_sdxl_refiner_model); it was taken for an SDXL refiner and refused.
- an SD 2.x inpainting file (9 input channels) is epsilon without the U-Net probe, as AUTOMATIC1111 picks
  v2-inpainting-inference.yaml for it and diffusers stabilityai/stable-diffusion-2-inpainting; the probe used to
  fail on it and warn to pass v_prediction.
- SD 2 depth (a MiDaS depth_model.* beside a 5-channel U-Net) is refused by name, file and folder.
- an sgm inference .yaml beside an SDXL checkpoint (no `parameterization`: the denoiser's scaling_config says it)
  gives the prediction type AUTOMATIC1111 reads from it (sd_models_xl.extend_sdxl: v when VScaling); it was
  taken for epsilon, over the file's own v_pred marker too.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from test_sdxl_single_file import no_tokenizer_env, write_sdxl_single_file  # noqa: E402,F401
from test_loading import (_inputs, compvis_checkpoint, rel_err, save_diffusers_folder,  # noqa: E402
                          tiny_diffusers_parts, write_clip_tokenizer)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.loading import load_folder  # noqa: E402
from imagine.loading.single_file import components_from_state, load_single_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd2():
    return tiny_diffusers_parts("sd2")


def _turbo_layout(state: dict) -> dict:
    """An LDM-layout SD 2.x state dict as sgm saves SD 2.1 Turbo: the text tower as conditioner.embedders.0."""
    return {("conditioner.embedders.0." + k[len("cond_stage_model."):] if k.startswith("cond_stage_model.") else k): v
            for k, v in state.items()}


def _sd_sigmas() -> torch.Tensor:
    """sgm's DiscreteDenoiser.sigmas for SD's schedule, from diffusers' scheduler: sqrt((1 - abar) / abar)."""
    s = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear")
    abar = s.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt().float()


def test_sd_turbo_sgm_layout_loads_as_the_models_it_was_written_from(sd2, tmp_path):
    unet, vae, text = sd2
    state = _turbo_layout(compvis_checkpoint(unet, vae, text, openclip=True, extras=False))
    state["denoiser.sigmas"] = _sd_sigmas()
    tok = write_clip_tokenizer(tmp_path / "tok", "!")
    c = components_from_state(state, "sd_turbo.safetensors", tokenizer=tok, prediction_type="epsilon")
    assert not hasattr(c.text_encoder, "towers")  # one OpenCLIP tower, not an SDXL pair
    assert c.unet.config.addition_embed_type is None
    x, t, ctx = _inputs(dict(unet.config))
    with torch.no_grad():
        assert rel_err(c.unet(x, t, context=ctx), unet(x, t, ctx).sample) < 1e-4
        ids = c.text_encoder.tokenize(["a red circle"])["input_ids"]
        assert rel_err(c.text_encoder.encode(["a red circle"]).states, text(ids).last_hidden_state) < 1e-4
    # the stored sigmas are SD's: SD's scaled_linear betas, as diffusers' scheduler has them
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    assert "trained_betas" not in c.scheduler_config
    assert torch.allclose(c.schedule.alphas_cumprod.double().cpu(), ref.alphas_cumprod.double(), rtol=1e-5)


def test_sd_turbo_with_other_sigmas_uses_them(sd2, tmp_path, caplog):
    unet, vae, text = sd2
    state = _turbo_layout(compvis_checkpoint(unet, vae, text, openclip=True, extras=False))
    other = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                    beta_schedule="linear")
    abar = other.alphas_cumprod.double()
    state["denoiser.sigmas"] = ((1 - abar) / abar).sqrt().float()
    tok = write_clip_tokenizer(tmp_path / "tok", "!")
    with caplog.at_level(logging.WARNING):
        c = components_from_state(state, "sd_turbo.safetensors", tokenizer=tok, prediction_type="epsilon")
    assert torch.allclose(c.schedule.alphas_cumprod.double().cpu(), abar, rtol=1e-3)


def test_sd2_inpainting_file_is_epsilon_without_a_failed_probe(tmp_path, caplog):
    unet, vae, text = tiny_diffusers_parts("sd2", in_channels=9)
    state = compvis_checkpoint(unet, vae, text, openclip=True)
    tok = write_clip_tokenizer(tmp_path / "tok", "!")
    with caplog.at_level(logging.WARNING, logger="imagine"):
        c = components_from_state(state, "512-inpainting-ema.safetensors", tokenizer=tok)
    # AUTOMATIC1111: v2-inpainting-inference.yaml; diffusers: stabilityai/stable-diffusion-2-inpainting
    assert c.prediction_type == "epsilon"
    assert c.unet.config.in_channels == 9
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_sd2_depth_file_is_refused_by_name(sd2, tmp_path):
    unet, vae, text = sd2
    state = compvis_checkpoint(unet, vae, text, openclip=True)
    # AUTOMATIC1111 tells the depth model by this key of its MiDaS estimator (sd_models_config.py)
    state["depth_model.model.pretrained.act_postprocess3.0.project.0.bias"] = torch.zeros(4)
    tok = write_clip_tokenizer(tmp_path / "tok", "!")
    with pytest.raises(ValueError, match=r"512-depth-ema\.ckpt looks like SD 2 depth.*depth_model"):
        components_from_state(state, "512-depth-ema.ckpt", tokenizer=tok)


def test_sd2_depth_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "sd2-depth"
    save_diffusers_folder(folder, "sd1")
    index = json.loads((folder / "model_index.json").read_text())
    # diffusers' StableDiffusionDepth2ImgPipeline folder: a DPT depth estimator beside the SD components
    index.update(_class_name="StableDiffusionDepth2ImgPipeline",
                 depth_estimator=["transformers", "DPTForDepthEstimation"])
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"sd2-depth is SD 2 depth.*StableDiffusionDepth2ImgPipeline"):
        load_folder(folder)


# Stability's generative-models configs/inference/sd_xl_base.yaml, as a v-prediction fine-tune ships it (the
# denoiser's scaling is the only place an sgm config names the parameterization)
SGM_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
"""


@pytest.mark.parametrize("scaling,marker,expected", [("VScaling", False, "v_prediction"),
                                                     ("EpsScaling", False, "epsilon"),
                                                     ("VScaling", True, "v_prediction")])
def test_sgm_yaml_beside_an_sdxl_file_gives_its_parameterization(tmp_path, no_tokenizer_env, scaling, marker,
                                                                 expected):
    path = tmp_path / "model.safetensors"
    write_sdxl_single_file(path)
    if marker:  # ComfyUI's v_pred marker as well: the yaml must not contradict it
        from safetensors.torch import load_file, save_file

        save_file(dict(load_file(str(path)), v_pred=torch.tensor([])), str(path))
    (tmp_path / "model.yaml").write_text(SGM_YAML.format(scaling=scaling))
    assert load_single_file(path).prediction_type == expected


def test_sgm_yaml_of_an_edm_model_is_refused_naming_the_scaling(tmp_path, no_tokenizer_env):
    path = tmp_path / "model.safetensors"
    write_sdxl_single_file(path)
    (tmp_path / "model.yaml").write_text(SGM_YAML.format(scaling="VScalingWithEDMcNoise"))
    with pytest.raises(ValueError, match=r"model\.yaml.*VScalingWithEDMcNoise.*EpsScaling, VScaling"):
        load_single_file(path)


def test_folder_with_lcm_scheduler_samples_as_diffusers_runs_it_by_default(tmp_path):
    """A folder whose model_index.json names LCMScheduler (an LCM-LoRA fused and saved, its U-Net without a guidance
    code): diffusers runs LCMScheduler on it, so the default sampler is ours that follows it, lcm."""
    from test_loading import SD_SCHEDULE
    from test_sd_parity import NEGATIVE, PROMPT, SEED, SIZE, psnr

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    ref.scheduler = diffusers.LCMScheduler(**SD_SCHEDULE)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "LCMScheduler"
    with torch.no_grad():
        want = ref(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    res = ours.generate(PROMPT, NEGATIVE, steps=4, guidance_scale=7.5, seed=SEED, height=SIZE, width=SIZE,
                        progress=False, output_type="latent")
    got = ((ours.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()
    assert psnr(got, want.float()) >= 50, f"PSNR {psnr(got, want.float()):.1f} dB"
