"""unCLIP's image-embedding condition with SD 2.1 unCLIP's layout (`imagine/pipelines/unclip.py`,
`imagine/models/image_encoder.py`): a tiny random model (a CLIP vision tower with projection, the embedding
statistics, a U-Net whose class embedding reads [noised embedding; noise-level code]) saved by diffusers loads
offline and gives diffusers' StableUnCLIPImg2ImgPipeline's images at 50 dB or more."""

from __future__ import annotations

import json
import shutil

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
E = 32  # the image embedding's width


def tiny_decoder_parts(folder) -> dict:
    """SD 2.1 unCLIP's decoder side, tiny and random, as StableUnCLIP(Img2Img)Pipeline keywords: U-Net with the
    [noised embedding; level code] class embedding, VAE, CLIP text tower and tokenizer, embedding statistics, the
    embedding's noise schedule, a v-prediction DDIM scheduler."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * E, use_linear_projection=True).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=96, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=TEXT_WIDTH, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
        pad_token_id=0, num_hidden_layers=2, hidden_act="gelu")).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "_tok_unclip", "!"),
                                                     local_files_only=True)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=E)
    with torch.no_grad():  # statistics that move the embedding, and a class embedding that shows it
        normalizer.mean.copy_(torch.randn(1, E) * 0.1)
        normalizer.std.copy_(torch.rand(1, E) + 0.5)
        unet.class_embedding.linear_1.weight.mul_(20)
    return dict(image_normalizer=normalizer, image_noising_scheduler=diffusers.DDPMScheduler(
                    beta_schedule="squaredcos_cap_v2"), tokenizer=tok, text_encoder=text, unet=unet, vae=vae,
                scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  prediction_type="v_prediction", set_alpha_to_one=False,
                                                  steps_offset=1, clip_sample=False))


def _tiny_unclip(folder):
    parts = tiny_decoder_parts(folder)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, projection_dim=E, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=32, patch_size=4)).eval()
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32), image_encoder=encoder, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)


def _picture(seed: int, size=(50, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unclip") / "folder"
    _tiny_unclip(folder)
    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, ref, TextToImagePipeline.from_pretrained(folder)


def _ours(pipe, res):
    return ((pipe.decode(res.latents) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_variations_match_diffusers(unclip, sampler, scheduler):
    """A picture's variation with a prompt, at noise levels 0 and 300, 10 steps at guidance 7.5: diffusers' image at
    50 dB or more; another noise level or another picture is visibly another image."""
    folder, ref, ours = unclip
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    kw = dict(height=32, width=32, guidance_scale=7.5)
    got = {}
    for level in (0, 300):
        want = ref(image=_picture(1), prompt="a red circle", num_inference_steps=10, noise_level=level,
                   generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images[0].float()
        got[level] = _ours(ours, ours.variations(_picture(1), "a red circle", steps=10, noise_level=level, seeds=[3],
                                                 sampler=sampler, progress=False, output_type="latent", **kw))[0]
        assert psnr(got[level], want) >= 50, (level, psnr(got[level], want))
    other = _ours(ours, ours.variations(_picture(2), "a red circle", steps=10, seeds=[3], sampler=sampler,
                                        progress=False, output_type="latent", **kw))[0]
    assert psnr(got[0], got[300]) < 40 and psnr(got[0], other) < 40


def test_the_condition_is_diffusers_noised_embedding(unclip):
    """The CLIP image embedding (preprocessing and tower) and [noised, un-normalized embedding; level code] equal
    diffusers' image_encoder output and noise_image_embeddings with the same noise, at levels 0, 250 and 999."""
    from imagine.pipelines.unclip import image_condition

    folder, ref, ours = unclip
    pictures = [_picture(1), _picture(4, (20, 64))]
    embeds = ours.c.image_embedder.embed(pictures)
    with torch.no_grad():
        pixels = ref.feature_extractor(images=pictures, return_tensors="pt").pixel_values
        want = ref.image_encoder(pixels).image_embeds
    assert torch.allclose(embeds, want, atol=1e-6)
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
    for level in (0, 250, 999):
        expected = ref.noise_image_embeddings(want, level, noise=noise)
        got = image_condition(ours.c.image_embedder, embeds, noise, level, ours.c.image_noise_schedule)
        assert torch.allclose(got, expected, atol=1e-5), level


def test_a_batch_is_its_images_alone(unclip):
    """Two prompts with their own seeds give the images each gives alone (each image draws its own embedding
    noise; diffusers draws one for the batch)."""
    folder, ref, ours = unclip
    kw = dict(height=32, width=32, steps=4, noise_level=100, progress=False, output_type="latent")
    both = ours.variations(_picture(1), ["a red circle", "a blue square"], seeds=[5, 6], **kw)
    for k, (prompt, seed) in enumerate((("a red circle", 5), ("a blue square", 6))):
        alone = ours.variations(_picture(1), prompt, seeds=[seed], **kw).latents[0]
        assert torch.allclose(both.latents[k], alone, atol=1e-4)  # (to the rounding of a batch's matrix products)


def test_unclip_errors_and_cli(unclip, tmp_path, capsys):
    from imagine.cli import main

    folder, ref, ours = unclip
    with pytest.raises(ValueError, match="unCLIP decoder.*use variations"):
        ours.generate("a red circle", steps=2, progress=False)
    with pytest.raises(ValueError, match="noise_level must be a whole number from 0 to 999"):
        ours.variations(_picture(1), noise_level=1000)
    prior = tmp_path / "prior"
    prior.mkdir()  # DALL-E 2's own cascade (diffusers' UnCLIPPipeline): a prior with no SD 2.1 unCLIP decoder
    (prior / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline",
                                                        "prior": ["diffusers", "PriorTransformer"],
                                                        "decoder": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="has a diffusion prior but no image_normalizer.*StableUnCLIPPipeline"):
        TextToImagePipeline.from_pretrained(prior)
    half = tmp_path / "half"  # (an unCLIP decoder's folder without its image_normalizer: named, not plain SD)
    shutil.copytree(folder, half)
    index = json.loads((half / "model_index.json").read_text())
    (half / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "image_normalizer"}))
    with pytest.raises(ValueError, match="has an image_encoder but no image_normalizer/ entry"):
        TextToImagePipeline.from_pretrained(half)
    # an SD folder whose image_encoder is an IP-Adapter's (diffusers' load_ip_adapter names it) still loads as SD
    save_diffusers_folder(tmp_path / "sd_ip", "sd1")
    index = json.loads((tmp_path / "sd_ip" / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    (tmp_path / "sd_ip" / "model_index.json").write_text(json.dumps(index))
    assert TextToImagePipeline.from_pretrained(tmp_path / "sd_ip").c.image_embedder is None
    save_diffusers_folder(tmp_path / "sd", "sd1")
    with pytest.raises(ValueError, match="takes no image embedding"):
        TextToImagePipeline.from_pretrained(tmp_path / "sd").variations(_picture(1))
    src, out = tmp_path / "pic.png", tmp_path / "var.png"
    _picture(7).save(src)
    assert main(["generate", "--model", str(folder), "--init-image", str(src), "a red circle", "--steps", "4",
                 "--seed", "2", "--noise-level", "50", "--height", "32", "--width", "32", "-o", str(out)]) == 0
    want = ours.variations(Image.open(src).convert("RGB"), "a red circle", steps=4, seed=2, noise_level=50, height=32,
                           width=32, progress=False).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert json.loads(Image.open(out).info["imagine"])["noise_level"] == 50
    # a transparent PNG: its variations are the picture's on white, as CLIP's image processor reads it (the CLI read
    # it as RGB, keeping the colours under the transparent pixels)
    rgba = _picture(7).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(50, dtype=np.uint8) * 5, (40, 1))))
    rgba.save(src)
    assert main(["generate", "--model", str(folder), "--init-image", str(src), "a red circle", "--steps", "4",
                 "--seed", "2", "--noise-level", "50", "--height", "32", "--width", "32", "-o", str(out)]) == 0
    kw = dict(steps=4, seed=2, noise_level=50, height=32, width=32, progress=False)
    want = ours.variations(Image.open(src), "a red circle", **kw).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert want.tobytes() != ours.variations(Image.open(src).convert("RGB"), "a red circle", **kw).images[0].tobytes()
    assert main(["generate", "--model", str(folder), "a", "--steps", "2", "-o", str(tmp_path / "x.png")]) != 0
    assert "unCLIP decoder (SD 2.1 unCLIP): give the picture with --init-image" in capsys.readouterr().err


def test_served_unclip_makes_openai_variations(unclip, tmp_path):
    """An unCLIP decoder behind the server answers OpenAI's /v1/images/variations with unCLIP's own variations (the
    picture's CLIP embedding, noise_level from the form), the pipeline's image bit for bit; other endpoints are 422
    saying to use the variations endpoint."""
    import base64
    import io

    import httpx

    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    folder, ref, ours = unclip
    picture = _picture(8, (40, 40))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    with BackgroundServer(create_app(ours, ServerConfig(max_width=64, max_height=64))) as srv:
        r = httpx.post(f"{srv.url}/v1/images/variations", files={"image": ("p.png", buf.getvalue(), "image/png")},
                       data={"n": "2", "size": "32x32", "seed": "4", "steps": "4", "noise_level": "100",
                             "response_format": "b64_json"}, timeout=120)
        assert r.status_code == 200, r.text
        got = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB") for d in r.json()["data"]]
        want = ours.variations(picture, ["", ""], height=32, width=32, seeds=[4, 5], steps=4, noise_level=100,
                               long_prompts=True, progress=False).images
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2}, timeout=120)
        assert r.status_code == 422 and "use POST /v1/images/variations" in r.text
        r = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "a"}, timeout=120)
        assert r.status_code == 400 and "use POST /v1/images/variations" in r.text
        r = httpx.post(f"{srv.url}/v1/images/edits", files={"image": ("p.png", buf.getvalue(), "image/png")},
                       data={"prompt": "a hat"}, timeout=120)
        assert r.status_code == 400 and "use POST /v1/images/variations" in r.text


def test_defaults_a_low_scale_and_pictures_without_prompts_are_diffusers(unclip):
    """No guidance given: diffusers' default for the model (10); a scale at or below 1 runs the prompt's side alone
    (diffusers' gate); two pictures and no prompt: one empty prompt each, as diffusers' pipeline."""
    folder, ref, ours = unclip
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    kw = dict(height=32, width=32)
    assert ours.defaults["guidance_scale"] == 10.0
    for scale in (None, 0.5):
        given = {} if scale is None else {"guidance_scale": scale}
        want = ref(image=_picture(1), num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                   output_type="pt", **kw, **given).images[0].float()
        got = _ours(ours, ours.variations(_picture(1), steps=4, seeds=[3], sampler="ddim", progress=False,
                                          output_type="latent", **kw, **given))[0]
        assert psnr(got, want) >= 50, (scale, psnr(got, want))
    pictures = [_picture(1), _picture(2)]
    want = ref(image=pictures, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
               output_type="pt", **kw).images
    got = _ours(ours, ours.variations(pictures, steps=2, seeds=[3, 4], sampler="ddim", progress=False,
                                      output_type="latent", **kw))
    assert all(psnr(a, b.float()) >= 50 for a, b in zip(got, want))
    with pytest.raises(ValueError, match="2 pictures for 3 prompts; give one, or one per prompt"):
        ours.variations(pictures, ["a", "b", "c"], steps=1, progress=False)
