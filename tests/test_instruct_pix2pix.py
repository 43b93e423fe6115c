"""instruct-pix2pix (Brooks et al. 2023): an 8-channel U-Net that reads the picture to edit beside the noisy latents,
guided on the picture and on the instruction (eq. 3; imagine.guidance.instruct_pix2pix_guidance). Against diffusers'
StableDiffusionInstructPix2PixPipeline on the same tiny random weights: the edited image to 50 dB (Euler and DDIM,
with a negative prompt and without), from a diffusers folder and from an original single file; the CLI and the A1111
API's img2img (image_cfg_scale) give the pipeline's image; misuse is a clear error."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from test_loading import make_scheduler, tiny_diffusers_parts, write_clip_tokenizer, write_single_file  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, psnr  # noqa: E402
from test_sdxl import _picture  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(root, scheduler: str):
    """A diffusers instruct-pix2pix pipeline of tiny random weights, saved as a folder at root/scheduler."""
    unet, vae, text = tiny_diffusers_parts("sd1", 0, in_channels=8)
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "_tok"), local_files_only=True)
    ref = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=make_scheduler(scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / scheduler, safe_serialization=True)
    return ref


def _want(ref, negative, image_scale=1.7, scale=CFG, steps=10):
    with torch.no_grad():
        return ref(PROMPT, image=_picture(32), negative_prompt=negative, num_inference_steps=steps,
                   guidance_scale=scale, image_guidance_scale=image_scale,
                   generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0].float()


def _ours(pipe, negative, image_scale=1.7, scale=CFG, steps=10, **kw):
    res = pipe.generate(PROMPT, negative, init_image=_picture(32), steps=steps, guidance_scale=scale,
                        image_guidance_scale=image_scale, seed=SEED, progress=False, output_type="latent", **kw)
    return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), res.parameters


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_edits_match_diffusers_instruct_pix2pix(tmp_path, scheduler):
    ref = _reference(tmp_path, scheduler)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / scheduler)
    assert pipe.edits and not pipe.image_conditioned
    for negative in (NEGATIVE, None):
        got, params = _ours(pipe, negative)
        assert psnr(got, _want(ref, negative)) >= 50
        assert params["image_guidance_scale"] == 1.7 and "strength" not in params
    # both scales matter, and below diffusers' thresholds (s_T <= 1 or s_I < 1) the conditional pass runs alone
    base = _want(ref, NEGATIVE)
    assert psnr(_ours(pipe, NEGATIVE, image_scale=1.2)[0], base) < 50
    assert psnr(_ours(pipe, NEGATIVE, image_scale=0.5)[0], _want(ref, NEGATIVE, image_scale=0.5)) >= 50
    assert psnr(_ours(pipe, NEGATIVE, scale=1.0)[0], _want(ref, NEGATIVE, scale=1.0)) >= 50


def test_the_picture_matters_and_a_single_file_loads(tmp_path):
    """The original-layout file of the same weights (8-channel input_blocks.0.0) gives the folder's image; another
    picture gives another image."""
    ref = _reference(tmp_path, "euler")
    path = tmp_path / "single" / "ip2p.safetensors"
    write_single_file(path, "sd1", in_channels=8)  # (the same seed: the same weights)
    single = TextToImagePipeline.from_pretrained(path)
    assert single.edits
    want = _want(ref, NEGATIVE, steps=6)
    assert psnr(_ours(single, NEGATIVE, steps=6, sampler="euler")[0], want) >= 50
    other = single.generate(PROMPT, NEGATIVE, init_image=_picture(32).rotate(90), steps=6, guidance_scale=CFG,
                            image_guidance_scale=1.7, seed=SEED, sampler="euler", progress=False, output_type="latent")
    assert psnr(((single.decode(other.latents)[0] + 1) / 2).clamp(0, 1), want) < 40


def test_a1111s_rule_runs_the_formula_at_any_scale():
    """Without diffusers' gate (AUTOMATIC1111's combine_denoised_for_edit_model) the three-pass formula runs at any
    scales: e(0,0) + s_T (e(I,T) - e(I,0)) + s_I (e(I,0) - e(0,0)), written out here on a model whose output tells
    the passes apart."""
    from imagine.guidance import instruct_pix2pix_guidance

    def model(x, t, context, concat):  # a different output per (text, picture)
        return x * 0 + context.mean((1, 2)).view(-1, 1, 1, 1) * 3 + concat.mean((1, 2, 3)).view(-1, 1, 1, 1) * 5

    x, t = torch.zeros(1, 4, 2, 2), torch.tensor([500.0])
    pic = torch.full((1, 4, 2, 2), 0.7)
    cond = {"context": torch.full((1, 3, 8), 0.4), "concat": pic}
    uncond = {"context": torch.full((1, 3, 8), -0.2), "concat": pic}
    text, image, nothing = model(x, t, **cond), model(x, t, **uncond), model(x, t, uncond["context"], pic * 0)
    for s_t, s_i in ((1.0, 1.5), (0.5, 1.5), (7.5, 0.5), (7.5, 0.0)):
        want = nothing + s_t * (text - image) + s_i * (image - nothing)
        got = instruct_pix2pix_guidance(model, x, t, cond, uncond, s_t, s_i, gate=False)
        assert torch.allclose(got, want, atol=1e-6), (s_t, s_i)
        gated = instruct_pix2pix_guidance(model, x, t, cond, uncond, s_t, s_i)
        assert torch.allclose(gated, text)  # (diffusers: below its thresholds, the conditional pass alone)


def test_misuse_is_a_clear_error(tmp_path):
    _reference(tmp_path, "euler")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "euler")
    with pytest.raises(ValueError, match="instruct-pix2pix model: it edits a picture .*give init_image"):
        pipe.generate(PROMPT, steps=2, progress=False)
    with pytest.raises(ValueError, match="mask_image is for inpainting"):
        pipe.generate(PROMPT, init_image=_picture(32), mask_image=Image.new("L", (32, 32), 255), steps=2,
                      progress=False)
    from test_controlnet import tiny_controlnet
    from test_loading import save_diffusers_folder

    tiny_controlnet().save_pretrained(tmp_path / "cn", safe_serialization=True)
    pipe.load_controlnet(tmp_path / "cn")
    with pytest.raises(ValueError, match="conditional half only .* is not combined with instruct-pix2pix"):
        pipe.generate(PROMPT, init_image=_picture(32), control_image=_picture(32), guess_mode=True, steps=2,
                      progress=False)
    save_diffusers_folder(tmp_path / "plain", "sd1")
    plain = TextToImagePipeline.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="image_guidance_scale is for instruct-pix2pix models"):
        plain.generate(PROMPT, init_image=_picture(32), image_guidance_scale=1.5, steps=2, progress=False)


def test_the_cli_and_the_a1111_img2img_edit(tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    _reference(tmp_path, "euler")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "euler")
    _picture(32).save(tmp_path / "in.png")
    kw = dict(steps=4, guidance_scale=CFG, sampler="euler", seed=3, progress=False)
    # the CLI: from noise (no --strength), as diffusers
    want = pipe.generate(PROMPT, init_image=_picture(32), image_guidance_scale=1.3, **kw).images[0]
    out = tmp_path / "edit.png"
    code = main(["generate", "--model", str(tmp_path / "euler"), PROMPT, "--init-image", str(tmp_path / "in.png"),
                 "--image-guidance-scale", "1.3", "--steps", "4", "--guidance-scale", str(CFG), "--sampler", "euler",
                 "--seed", "3", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes()
    assert "Image CFG scale: 1.3" in img.text["parameters"]
    # the A1111 API: img2img with its denoising strength (A1111 starts such models from the picture too), Euler run
    # as AUTOMATIC1111 runs it (samplers.a1111_settings)
    kw = dict(steps=4, guidance_scale=CFG, seed=3, progress=False, **a1111_settings("Euler"))
    want = pipe.generate(PROMPT, init_image=_picture(32), image_guidance_scale=1.4, strength=0.75, emphasis=True,
                         **kw).images[0]
    buf = io.BytesIO()
    _picture(32).save(buf, format="PNG")
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": PROMPT, "init_images": [base64.b64encode(buf.getvalue()).decode()], "steps": 4,
                "cfg_scale": CFG, "sampler_name": "Euler", "seed": 3, "image_cfg_scale": 1.4}
        r = httpx.post(f"{srv.url}/sdapi/v1/img2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.convert("RGB").tobytes()
        assert "Image CFG scale: 1.4" in json.loads(r.json()["info"])["infotexts"][0]
        # A1111's rule: image CFG below 1 still guides; not given, 1 (plain guidance, the picture in both passes), and
        # no "Image CFG scale" in the infotext
        for extra, scale in (({"image_cfg_scale": 0.5}, 0.5), ({}, 1.0)):
            r = httpx.post(f"{srv.url}/sdapi/v1/img2img", json={**{k: v for k, v in body.items()
                                                                      if k != "image_cfg_scale"}, **extra}, timeout=120)
            assert r.status_code == 200, r.text
            want = pipe.generate(PROMPT, init_image=_picture(32), image_guidance_scale=scale, strength=0.75,
                                 image_guidance_gate=False, emphasis=True, **kw).images[0]
            got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
            assert got.tobytes() == want.convert("RGB").tobytes()
            assert ("Image CFG scale" in json.loads(r.json()["info"])["infotexts"][0]) == (scale != 1.0)
        # AND at image guidance 1 (plain guidance: the parts each with the picture); at another scale refused
        r = httpx.post(f"{srv.url}/sdapi/v1/img2img", json={**body, "prompt": "red AND blue", "image_cfg_scale": 1},
                       timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2}, timeout=60)
        assert r.status_code == 422 and "instruct-pix2pix" in r.text
    with pytest.raises(ValueError, match="AND \\(composed prompts\\) combines with instruct-pix2pix only at"):
        pipe.generate("red AND blue", init_image=_picture(32), composable=True, steps=2, progress=False)
