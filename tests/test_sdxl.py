"""SDXL (Podell et al. 2023) from a diffusers folder: two CLIP text towers whose penultimate states are read side
by side, the bigG tower's projected pooled vector and the size micro-conditioning (`time_ids`) added to the time
embedding (`addition_embed_type="text_time"`), zeros for a negative prompt not given. Checked against diffusers on
the same tiny random weights: the U-Net to 1e-6 relative, the text states exactly, and the whole
StableDiffusionXLPipeline image to 50 dB (the parity bar of the SD tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_loading import make_scheduler, write_clip_tokenizer  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, psnr  # noqa: E402
from test_sdxl_single_file import PROJ, TIME_DIM, WIDTHS, tiny_sdxl_parts, write_sdxl_single_file  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.models.unet import UNet2DConditionModel  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def save_sdxl_folder(folder: Path, scheduler: str = "euler", seed: int = 0):
    """A diffusers StableDiffusionXLPipeline folder; returns the pipeline."""
    unet, vae, te1, te2 = tiny_sdxl_parts(seed)
    tok1 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "_tok1"), local_files_only=True)
    tok2 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "_tok2", "!"),
                                                      local_files_only=True)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=unet, scheduler=make_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def test_the_text_time_unet_matches_diffusers():
    unet = tiny_sdxl_parts()[0]
    ours = UNet2DConditionModel(dict(unet.config)).eval()
    ours.load_state_dict(unet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, sum(WIDTHS), generator=g)
    pooled = torch.randn(2, PROJ, generator=g)
    t = torch.tensor([10.0, 500.0])
    sizes = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 512, 768]])
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        got = ours(x, t, context=ctx, text_embeds=pooled, time_ids=sizes)
        assert float((got - want).norm() / want.norm()) < 1e-6
        # the size codes matter: another size, another output
        other = ours(x, t, context=ctx, text_embeds=pooled, time_ids=sizes.flip(0))
        assert float((other - got).norm() / got.norm()) > 1e-3
        # a guidance batch (x once, two rows of conditioning each) is the call on the doubled x
        shared = ours(x[:1], t[:1], context=ctx, text_embeds=pooled, time_ids=sizes)
        doubled = ours(x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), context=ctx, text_embeds=pooled, time_ids=sizes)
        assert float((shared - doubled).norm() / doubled.norm()) < 1e-5
    with pytest.raises(ValueError, match=rf"needs text_embeds \[B, {PROJ}\].*time_ids"):
        ours(x, t, context=ctx)
    with pytest.raises(ValueError, match=rf"W \+ N x {TIME_DIM} = {PROJ + 6 * TIME_DIM}.*got \(2, {PROJ}\) and \(2, 4\)"):
        ours(x, t, context=ctx, text_embeds=pooled, time_ids=sizes[:, :4])


def test_the_text_states_are_both_towers_penultimate_states(tmp_path):
    ref = save_sdxl_folder(tmp_path / "folder")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with torch.no_grad():
        want, _, pooled, _ = ref.encode_prompt([PROMPT, "a"], do_classifier_free_guidance=False)
    cond = pipe.encode_prompts([PROMPT, "a"])
    # (the pooled vector is projected row by row, so that an image does not depend on its batch: diffusers projects
    # the batch at once, which rounds differently in the last bits)
    assert torch.equal(cond["context"], want) and torch.allclose(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    pipe.text_encoder.clip_skip = 1
    with torch.no_grad():
        want_skip = ref.encode_prompt(PROMPT, do_classifier_free_guidance=False, clip_skip=1)[0]
    assert torch.equal(pipe.encode_prompts([PROMPT])["context"], want_skip)


@pytest.mark.parametrize("sampler,negative,steps,width", [("euler", NEGATIVE, 12, SIZE), ("dpmpp_2m", None, 10, 40),
                                                          ("ddim", "", 10, 24)])
def test_generation_matches_diffusers(tmp_path, sampler, negative, steps, width):
    """A negative prompt not given is all zeros (force_zeros_for_empty_prompt); an empty one is encoded. Sizes that
    are not square tell the size codes' order."""
    ref = save_sdxl_folder(tmp_path / "folder", scheduler=sampler)
    with torch.no_grad():
        want = ref(PROMPT, negative_prompt=negative, height=SIZE, width=width, num_inference_steps=steps,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert pipe.defaults["sampler"] == sampler
    res = pipe.generate(PROMPT, negative, steps=steps, guidance_scale=CFG, seed=SEED, height=SIZE, width=width,
                        progress=False, output_type="latent")
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert psnr(got, want.float()) >= 50


def test_the_default_size_and_the_size_conditioning(tmp_path):
    """The size is the U-Net's sample size times the VAE's factor, and the size codes follow the size asked."""
    save_sdxl_folder(tmp_path / "folder")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    res = pipe.generate("a", steps=2, seed=1, progress=False)
    assert res.images[0].size == (SIZE, SIZE)
    assert pipe.size_conditioning(2, 48, 40)["time_ids"].tolist() == [[48, 40, 0, 0, 48, 40]] * 2


def test_the_real_sdxl_base_unet_builds_with_diffusers_layout():
    """UNetConfig.sdxl() (SDXL base 1.0's unet/config.json) has diffusers' parameters, name for name and shape for
    shape: 2.57 B of them (built on the meta device: no memory)."""
    from imagine.models.unet import UNetConfig

    cfg = UNetConfig.sdxl()
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if k != "num_attention_heads"})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert round(sum(p.numel() for p in ours.parameters()) / 1e9, 2) == 2.57


def _picture(size: int = SIZE):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x > 0.5) * 0.8 + 0.1], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _mask(size: int = SIZE):
    from PIL import Image

    m = Image.new("L", (size, size), 0)
    m.paste(255, (size // 8, size // 4, size // 2, 3 * size // 4))
    return m


@pytest.mark.parametrize("kind,strength", [("img2img", 0.7), ("inpaint", 0.7), ("img2img", None), ("inpaint", None)])
def test_image_to_image_and_inpainting_match_diffusers(tmp_path, kind, strength):
    """SDXL base's img2img and inpainting pipelines (no aesthetic score: the base model's size codes are the text
    to image ones) on the same weights and seed: 50 dB; with no strength given, each pipeline's own default (SDXL's
    img2img 0.3, inpainting 0.9999: not SD's 0.8 and 1.0)."""
    ref = save_sdxl_folder(tmp_path / "folder", scheduler="dpmpp_2m")
    parts = dict(ref.components)
    if kind == "img2img":
        other = diffusers.StableDiffusionXLImg2ImgPipeline(**parts)
        extra, ours_extra = {}, {}
    else:
        other = diffusers.StableDiffusionXLInpaintPipeline(**parts)
        extra = ours_extra = {"mask_image": _mask()}
    other.set_progress_bar_config(disable=True)
    with torch.no_grad():
        given = {} if strength is None else {"strength": strength}
        want = other(PROMPT, image=_picture(), negative_prompt=NEGATIVE, num_inference_steps=10,
                     guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt",
                     **given, **extra).images[0].float()
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    res = pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), steps=10, guidance_scale=CFG,
                        seed=SEED, progress=False, output_type="latent", **given, **ours_extra)
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert psnr(got, want) >= 50


def test_an_sdxl_single_file_gives_diffusers_image(tmp_path, monkeypatch):
    """The original-layout file (imagine.loading.sdxl) through the whole pipeline: StableDiffusionXLPipeline's image
    on the weights it was written from, with and without a negative prompt."""
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER", raising=False)
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER_2", raising=False)
    path = tmp_path / "single" / "sdxl.safetensors"
    unet, vae, te1, te2 = write_sdxl_single_file(path)
    tok1, tok2 = (transformers.CLIPTokenizer.from_pretrained(path.parent / n, local_files_only=True)
                  for n in ("tokenizer", "tokenizer_2"))
    ref = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                              tokenizer_2=tok2, unet=unet, scheduler=make_scheduler("euler"))
    ref.set_progress_bar_config(disable=True)
    pipe = TextToImagePipeline.from_pretrained(path)
    assert pipe.defaults["sampler"] == "euler" and pipe.vae.config.scaling_factor == 0.13025
    for negative in (NEGATIVE, None):
        with torch.no_grad():
            want = ref(PROMPT, negative_prompt=negative, height=SIZE, width=40, num_inference_steps=8,
                       guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
        res = pipe.generate(PROMPT, negative, steps=8, guidance_scale=CFG, seed=SEED, height=SIZE, width=40,
                            progress=False, output_type="latent")
        got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
        assert psnr(got, want.float()) >= 50


def test_negatives_not_given_are_zeros_row_by_row_and_the_a1111_api_zeros_an_empty_one(tmp_path):
    """In a batch, rows whose negative prompt is None get zeros, the others their encoding: each row equals its run
    alone. The A1111 and OpenAI APIs take an empty negative prompt as none given (AUTOMATIC1111 zeros it on SDXL)."""
    save_sdxl_folder(tmp_path / "folder")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    kw = dict(steps=3, guidance_scale=CFG, height=SIZE, width=SIZE, progress=False, output_type="latent")
    mixed = pipe.generate(["a", "b"], [None, NEGATIVE], seeds=[1, 2], **kw).latents
    assert torch.equal(mixed[:1], pipe.generate("a", None, seed=1, **kw).latents)
    assert torch.equal(mixed[1:], pipe.generate("b", NEGATIVE, seed=2, **kw).latents)
    assert float((pipe.generate("a", "", seed=1, **kw).latents - mixed[:1]).abs().max()) > 0.1  # "" is encoded

    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.samplers import a1111_settings
    from imagine.server.app import create_app

    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings)
    want = pipe.generate("a", None, seed=1, steps=3, guidance_scale=CFG, height=SIZE, width=SIZE, progress=False,
                         **a1111_settings("Euler")).images[0]
    with TestClient(create_app(pipe)) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "negative_prompt": "", "seed": 1, "steps": 3,
                                                   "cfg_scale": CFG, "width": SIZE, "height": SIZE,
                                                   "sampler_name": "Euler"})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_an_sdxl_unet_without_its_second_text_tower_is_refused_at_load(tmp_path):
    import json
    import shutil

    save_sdxl_folder(tmp_path / "folder")
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    for part in ("text_encoder_2", "tokenizer_2"):
        index.pop(part)
        shutil.rmtree(tmp_path / "folder" / part)
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="its U-Net is SDXL's .* needs text_encoder_2/ and tokenizer_2/"):
        TextToImagePipeline.from_pretrained(tmp_path / "folder")


def test_the_servers_size_limit_is_twice_the_models_own_size(tmp_path):
    """SDXL's usual sizes (1344 x 768) pass the server's default limit, which is twice the model's own size."""
    from fastapi.testclient import TestClient

    from imagine.server.app import ServerConfig, create_app

    save_sdxl_folder(tmp_path / "folder")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with TestClient(create_app(pipe)) as client:
        limits = client.get("/imagine/v1/config").json()["limits"]
    assert (limits["max_width"], limits["max_height"]) == (2 * SIZE, 2 * SIZE)  # the tiny model's own is 32
    with TestClient(create_app(pipe, ServerConfig(max_width=100))) as client:
        limits = client.get("/imagine/v1/config").json()["limits"]
    assert (limits["max_width"], limits["max_height"]) == (100, 2 * SIZE)


def test_the_cli_takes_sdxls_second_tokenizer(tmp_path, monkeypatch, capsys):
    from imagine.cli import main

    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER", raising=False)
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER_2", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    path = tmp_path / "single" / "sdxl.safetensors"
    write_sdxl_single_file(path, tokenizers=("tokenizer",))
    second = write_clip_tokenizer(tmp_path / "elsewhere" / "tok2", "!")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(path), "a red circle", "--steps", "2", "--height", "32", "--width", "32",
            "--seed", "3", "-o", str(out), "-q"]
    assert main(args) != 0 and "tokenizer_2" in capsys.readouterr().err
    assert main(args + ["--tokenizer-2", str(second)]) == 0 and out.is_file()


def test_align_your_steps_takes_the_models_own_list(tmp_path):
    """A1111's "Align Your Steps" picks NVIDIA's SDXL levels for an SDXL model and SD 1.5's for the others; the
    infotext names it as A1111 does."""
    from test_loading import save_diffusers_folder

    from imagine.images import a1111_parameters

    save_sdxl_folder(tmp_path / "xl")
    save_diffusers_folder(tmp_path / "sd", "sd1")
    kw = dict(steps=4, seed=1, sampler="euler", progress=False, output_type="latent")
    for folder, own, other in (("xl", "align_your_steps_sdxl", "align_your_steps"),
                               ("sd", "align_your_steps", "align_your_steps_sdxl")):
        pipe = TextToImagePipeline.from_pretrained(tmp_path / folder)
        asked = pipe.generate("a", sigma_schedule="align_your_steps", **kw)
        assert torch.equal(asked.latents, pipe.generate("a", sigma_schedule=own, **kw).latents), folder
        if folder == "sd":  # (an SDXL model's "align_your_steps" always becomes its own list)
            assert not torch.equal(asked.latents, pipe.generate("a", sigma_schedule=other, **kw).latents)
        assert "Schedule type: Align Your Steps" in a1111_parameters({**asked.parameters, "prompt": "a", "seed": 1})
