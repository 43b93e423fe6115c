"""Session 28's review of the cascade / unCLIP / upscaler code against diffusers (tiny random weights):

- Karlo's own prior_scheduler (diffusers' UnCLIPScheduler config saved by 0.12.0.dev0, with no beta_schedule key) is
  read as the squaredcos_cap_v2 schedule that class always has, not as the linear default of the other schedulers;
  the prior loop's samples then follow diffusers' step by step (diffusers' step noise seeded: a wrapped `step` must
  take `generator`, or the pipeline draws it from torch's global generator);
- a prior whose prediction is narrower or wider than its sample (clip_embed_dim != embedding_dim) is refused at load;
- the image_normalizer's full-precision statistics are read where a float16 variant lies beside them;
- a transparent picture's CLIP embedding is CLIP's image processor's (transparency on white), as diffusers'
  StableUnCLIPImg2ImgPipeline reads it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import test_unclip_prior
from test_sd_parity import psnr  # noqa: E402
from test_unclip import _picture, _tiny_unclip  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# diffusers' UnCLIPScheduler config as kakaobrain/karlo-v1-alpha's prior_scheduler/ holds it (diffusers 0.12.0.dev0:
# the class had no beta_schedule argument then; it has one schedule, squaredcos_cap_v2)
KARLO_SCHEDULER = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.12.0.dev0", "clip_sample": True,
                   "clip_sample_range": 5.0, "num_train_timesteps": 1000, "prediction_type": "sample",
                   "variance_type": "fixed_small_log"}


def _with_prior_scheduler(src, folder, config):
    shutil.copytree(src, folder)
    (folder / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["prior_scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def stable_unclip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s28_stable_unclip") / "folder"
    test_unclip_prior._tiny_stable_unclip(folder)
    return folder


def _prior_samples(prior, monkeypatch, prompt, seed, steps):
    """The prior loop's sample after each step (imagine.sampling.sample's callback sees x before each step) and its
    result, un-normalized."""
    import imagine.sampling
    from imagine.pipelines.unclip import prior_embeddings
    from imagine.sampling import make_generators

    before, real = [], imagine.sampling.sample

    def spy(*args, **kw):
        kw["callback"] = lambda info: before.append(info["x"].clone())
        return real(*args, **kw)

    monkeypatch.setattr(imagine.sampling, "sample", spy)
    z = prior_embeddings(prior, [prompt], make_generators(1, [seed]), [seed], steps=steps, guidance_scale=4.0,
                         sampler=prior.sampler, progress=False)
    monkeypatch.setattr(imagine.sampling, "sample", real)
    return before[1:], z


def test_karlos_unclip_scheduler_config_is_the_cosine_schedule(stable_unclip_folder, tmp_path, monkeypatch):
    """A prior_scheduler/ of Karlo's own config (no beta_schedule): our schedule is diffusers' UnCLIPScheduler's
    (abar to 1e-6; read as the linear default, abar_500 was 0.078 for 0.49), and the prior loop's sample after each
    of 5 steps (guidance 4, Karlo's UnCLIPPipeline stepping: each step to the next timestep) is diffusers' to 2e-3
    (diffusers' float32 step loses digits where abar_t / abar_prev is near 0: 3e-4 seen after the first step), where
    the linear reading is off by more than 0.1."""
    from imagine.models.prior import scheduler_config
    from imagine.schedules import NoiseSchedule

    folder = _with_prior_scheduler(stable_unclip_folder, tmp_path / "karlo", KARLO_SCHEDULER)
    ref = diffusers.StableUnCLIPPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = TextToImagePipeline.from_pretrained(folder)
    prior = ours.c.prior
    want_abar = ref.prior_scheduler.alphas_cumprod
    assert torch.allclose(prior.schedule.alphas_cumprod.float(), want_abar, atol=1e-6, rtol=0)
    linear = NoiseSchedule.from_diffusers_config(KARLO_SCHEDULER)  # (the reading before the fix)
    assert abs(float(linear.alphas_cumprod[500]) - float(want_abar[500])) > 0.3
    assert scheduler_config(KARLO_SCHEDULER)["beta_schedule"] == "squaredcos_cap_v2"

    step = ref.prior_scheduler.step

    def karlo_step(model_output, timestep, sample, generator=None, return_dict=True):
        # (UnCLIPPipeline's loop: the next timestep given; `generator` named, so that the pipeline passes it)
        ts = ref.prior_scheduler.timesteps.tolist()
        i = ts.index(int(timestep))
        return step(model_output, timestep, sample, prev_timestep=ts[i + 1] if i + 1 < len(ts) else None,
                    generator=generator, return_dict=return_dict)

    monkeypatch.setattr(ref.prior_scheduler, "step", karlo_step)
    after = []
    ref("a red circle", height=32, width=32, num_inference_steps=1, prior_num_inference_steps=5,
        callback=lambda i, t, latents: after.append(latents.clone()) if latents.ndim == 2 else None,
        generator=torch.Generator().manual_seed(5), output_type="latent")
    assert ref.prior_scheduler.timesteps.tolist() == [999, 749, 500, 250, 0] and len(after) == 5
    got, _ = _prior_samples(prior, monkeypatch, "a red circle", 5, 5)
    for k, (a, b) in enumerate(zip(got, after)):
        assert torch.allclose(a, b, atol=2e-3, rtol=0), (k, float((a - b).abs().max()))
    off, _ = _prior_samples(dataclasses.replace(prior, schedule=linear), monkeypatch, "a red circle", 5, 5)
    assert max(float((a - b).abs().max()) for a, b in zip(off, after)) > 0.1
    # another beta schedule named for UnCLIPScheduler is refused, as diffusers refuses it
    bad = _with_prior_scheduler(stable_unclip_folder, tmp_path / "bad", {**KARLO_SCHEDULER, "beta_schedule": "linear"})
    with pytest.raises(ValueError, match="scheduler_config.json: UnCLIPScheduler has the squaredcos_cap_v2 beta "
                                         "schedule only; got 'linear'"):
        TextToImagePipeline.from_pretrained(bad)


def test_a_prior_predicting_another_width_is_refused_at_load(tmp_path, monkeypatch):
    """clip_embed_dim != embedding_dim: the prediction cannot be the next step's sample (diffusers fails in its loop
    with a shape error); refused when the folder loads, naming both."""
    real = test_unclip_prior._tiny_prior
    E = test_unclip_prior.E
    monkeypatch.setattr(test_unclip_prior, "_tiny_prior", lambda **kw: real(
        clip_embed_dim=E, embedding_dim=24, embedding_proj_dim=E, encoder_hid_proj_type=None))
    folder = tmp_path / "wide"
    test_unclip_prior._tiny_stable_unclip(folder)
    with pytest.raises(ValueError, match=r"predicts 32-wide embeddings \(clip_embed_dim\) from 24-wide samples"):
        TextToImagePipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def unclip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s28_unclip") / "folder"
    _tiny_unclip(folder)
    return folder


def test_the_normalizers_full_precision_statistics_are_read(unclip_folder, tmp_path):
    """A folder with image_normalizer/diffusion_pytorch_model.safetensors and its fp16 variant (a full download of
    SD 2.1 unCLIP): the float32 statistics, not the variant that sorts first; the variant alone: the variant's."""
    from safetensors.torch import load_file, save_file

    from imagine.models.image_encoder import ImageEmbedder

    folder = tmp_path / "both"
    shutil.copytree(unclip_folder, folder)
    full = load_file(str(folder / "image_normalizer" / "diffusion_pytorch_model.safetensors"))
    half = {k: v.half() for k, v in full.items()}
    save_file(half, str(folder / "image_normalizer" / "diffusion_pytorch_model.fp16.safetensors"))
    assert not torch.equal(half["std"].float(), full["std"])  # (the rounding shows)
    embedder = ImageEmbedder.from_folder(folder, encoder=False)
    assert torch.equal(embedder.mean, full["mean"]) and torch.equal(embedder.std, full["std"])
    (folder / "image_normalizer" / "diffusion_pytorch_model.safetensors").unlink()
    embedder = ImageEmbedder.from_folder(folder, encoder=False)
    assert torch.equal(embedder.std, half["std"].float())


def _transparent(seed: int) -> Image.Image:
    rgb = np.asarray(_picture(seed))
    alpha = np.random.default_rng(seed + 10).integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)
    alpha[: rgb.shape[0] // 2] = 0  # (the top half wholly transparent, over colours that are not white)
    return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")


def test_a_transparent_picture_is_read_on_white_as_diffusers(unclip_folder):
    """An RGBA picture: the embedding is diffusers' image encoder's on what its CLIP processor makes of the picture
    (transparency on white: transformers' convert_to_rgb), and the variation diffusers' image at 50 dB or more; the
    alpha dropped (convert("RGB"), the reading before) is another embedding and another image."""
    from transformers.image_transforms import convert_to_rgb

    from imagine.models.image_encoder import flatten_picture

    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(unclip_folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = TextToImagePipeline.from_pretrained(unclip_folder)
    picture = _transparent(1)
    with torch.no_grad():
        want = ref.image_encoder(ref.feature_extractor(images=[picture], return_tensors="pt").pixel_values).image_embeds
    assert torch.allclose(ours.c.image_embedder.embed([picture]), want, atol=1e-6)
    assert not torch.allclose(ours.c.image_embedder.embed([picture.convert("RGB")]), want, atol=1e-2)
    # transformers' rule for each kind of transparency, and none
    palette = picture.convert("RGB").quantize(16)
    palette.info["transparency"] = 3
    for im in (picture, picture.convert("LA"), palette, picture.convert("RGB"), picture.convert("L")):
        assert np.array_equal(np.asarray(flatten_picture(im)), convert_to_rgb(im, return_numpy=True)), im.mode
    kw = dict(height=32, width=32, guidance_scale=7.5)
    image = ref(image=picture, prompt="a red circle", num_inference_steps=4, noise_level=100,
                generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images[0].float()

    def ours_image(pic):
        res = ours.variations(pic, "a red circle", steps=4, noise_level=100, seeds=[3], sampler="ddim",
                              progress=False, output_type="latent", **kw)
        return ((ours.decode(res.latents) + 1) / 2).clamp(0, 1)[0]

    assert psnr(ours_image(picture), image) >= 50
    assert psnr(ours_image([picture]), image) >= 50  # (a list of pictures too)
    assert psnr(ours_image(picture.convert("RGB")), image) < 40
