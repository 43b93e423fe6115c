"""DALL-E 2's variations of a picture (Ramesh et al. 2022, sec. 3.1) with Karlo's image-variation cascade
(`KarloPipeline.variations`, a diffusers UnCLIPImageVariationPipeline folder) against diffusers on the same tiny
random weights: the decoder and super-resolution U-Nets, text projection and CLIP text tower of the tiny Karlo of
`test_karlo_s30`, and a tiny CLIP vision tower with projection; saved by diffusers, loaded by imagine.

The truth: diffusers' UnCLIPImageVariationPipeline at the same seed: its decoder's sample (read off its scheduler's last
step, within the bounds of the text-to-image cascade's test) and its pictures (50 dB or more); its CLIP image embedding
(1e-5); and that another picture gives another decoder sample, by 50 times the distance from diffusers' (the final
picture, after the super-resolution stage's own noise, tells the two apart by less: 41 dB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_karlo_s30 import E, _last_samples, _tiny_karlo  # noqa: E402
from test_sd_parity import psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.karlo import KarloPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)  # (smooth: a CLIP tower reads a picture, not pixel noise)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """test_karlo_s30's bound on samples: 99.9% of the values within 3e-3, the mean difference below 1e-3."""
    diff = (a - b).abs().flatten()
    return float(torch.quantile(diff, 0.999)) < 3e-3 and float(diff.mean()) < 1e-3


def _psnr_8bit(picture: Image.Image, want: np.ndarray) -> float:
    """An 8-bit picture against diffusers' float one in [0, 1]."""
    return psnr(torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255), torch.from_numpy(want))


@pytest.fixture(scope="module")
def variations(tmp_path_factory):
    karlo = _tiny_karlo(tmp_path_factory.mktemp("karlo") / "text")
    torch.manual_seed(2)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, projection_dim=E, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=32, patch_size=4)).eval()
    with torch.no_grad():  # (embeddings of the size of CLIP's: the decoder reads them through text_proj)
        encoder.visual_projection.weight.mul_(8)
    ref = diffusers.UnCLIPImageVariationPipeline(
        decoder=karlo.decoder, text_encoder=karlo.text_encoder, tokenizer=karlo.tokenizer, text_proj=karlo.text_proj,
        feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32), image_encoder=encoder,
        super_res_first=karlo.super_res_first, super_res_last=karlo.super_res_last,
        decoder_scheduler=karlo.decoder_scheduler, super_res_scheduler=karlo.super_res_scheduler)
    ref.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("karlo") / "variations"
    ref.save_pretrained(folder, safe_serialization=True)
    return folder, ref, KarloPipeline.from_pretrained(folder)


def test_the_embedding_is_clips(variations):
    _, ref, ours = variations
    pictures = [_picture(1), _picture(2, (30, 50))]
    with torch.no_grad():
        want = ref.image_encoder(ref.feature_extractor(images=pictures, return_tensors="pt").pixel_values).image_embeds
    got = ours.image_embedder.embed(pictures)
    assert got.shape == (2, E) and float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("steps, scale, per_picture, count", [
    ((3, 5), 8.0, 1, 1),  # diffusers' guidance scale
    ((4, 6), 1.0, 1, 1),  # no guidance
    ((2, 5), 3.0, 2, 2),  # two pictures, two variations each, from one generator
])
def test_variations_match_diffusers(variations, steps, scale, per_picture, count):
    _, ref, ours = variations
    pictures = [_picture(1), _picture(2, (30, 50))][:count]
    seen = _last_samples(ref.decoder_scheduler)
    try:
        want = ref(image=pictures if count > 1 else pictures[0], num_images_per_prompt=per_picture,
                   decoder_num_inference_steps=steps[0], super_res_num_inference_steps=steps[1],
                   decoder_guidance_scale=scale, generator=torch.Generator().manual_seed(5), output_type="np").images
    finally:
        del ref.decoder_scheduler.step
    decoded = []
    got = ours.variations(pictures if count > 1 else pictures[0], num_images_per_prompt=per_picture,
                          decoder_steps=steps[0], super_res_steps=steps[1], decoder_guidance_scale=scale,
                          generator=torch.Generator().manual_seed(5), output_type="pt", progress=False,
                          callback=lambda info: decoded.append(info["denoised"]) if info["stage"] == "decoder" else 0)
    assert got.shape == (count * per_picture, 3, 64, 64)
    diff = (decoded[-1] - seen[-1]).abs().flatten()  # (the bounds of test_karlo_s30, which says why)
    assert float(torch.quantile(diff, 0.999)) < 3e-3 and float(diff.mean()) < 1e-3
    image = (got * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    want = torch.from_numpy(want)
    assert 0.2 < float(((want > 0.01) & (want < 0.99)).float().mean())  # (not a saturated picture)
    assert psnr(image, want) >= 50, psnr(image, want)


def test_the_picture_matters_and_embeddings_may_be_given(variations):
    """Another picture, another variation (the decoder's sample, 4e-4 from diffusers' on average, moves by 0.04 on
    average); image_embeddings given (an interpolation's, sec. 3.2) = the picture's when they are its embedding; 8-bit
    pictures with seed= are diffusers' (50 dB: a value the first step leaves within float32's rounding of the clip
    bound may round the other way, test_karlo_s30 says why, so the bound is not one 8-bit level everywhere)."""
    _, ref, ours = variations
    kw = dict(decoder_steps=3, super_res_steps=5, progress=False)

    def decoder_sample(picture):
        seen = []
        ours.variations(picture, seed=4, output_type="pt", callback=lambda info: seen.append(info["denoised"])
                        if info["stage"] == "decoder" else 0, **kw)
        return seen[-1]
    assert float((decoder_sample(_picture(1)) - decoder_sample(_picture(3))).abs().mean()) > 0.02
    a = ours.variations(_picture(1), seed=4, output_type="pt", **kw)
    z = ours.image_embedder.embed([_picture(1)])
    assert torch.equal(ours.variations(None, image_embeddings=z, seed=4, output_type="pt", **kw), a)
    got = ours.variations(_picture(1), seed=4, **kw)[0]
    want = ref(image=_picture(1), decoder_num_inference_steps=3, super_res_num_inference_steps=5,
               generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.asarray(got).shape == (64, 64, 3) and _psnr_8bit(got, want) >= 50


def test_what_each_folder_does_not_do(variations, tmp_path):
    import shutil

    folder, _, ours = variations
    with pytest.raises(ValueError, match="image-variation cascade .no prior.*variations"):
        ours("a horse", progress=False)
    with pytest.raises(ValueError, match=r"image_embeddings: expected \[B, 32\]"):
        ours.variations(None, image_embeddings=torch.zeros(1, 7), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "image_encoder")
    with pytest.raises(ValueError, match="UnCLIPImageVariationPipeline.*missing image_encoder"):
        KarloPipeline.from_pretrained(broken)


def test_generate_makes_variations_as_diffusers(variations, tmp_path, capsys):
    """`imagine generate --model KARLO_VARIATIONS --init-image PIC`: each variation from its own seed (base + k),
    diffusers' picture for that seed's generator within one 8-bit level; the parameters in the PNG; a prompt or a flag
    it does not read is refused by name."""
    from test_cascade_cli_s29 import _run as _generate

    folder, ref, _ = variations
    source = tmp_path / "source.png"
    _picture(2, (30, 50)).save(source)
    code, _, err = _generate(capsys, "--model", folder, "--init-image", source, "--steps", 3, "--guidance-scale", 5,
                             "--stage-2-steps", 5, "--seed", 3, "--num-images", 2, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000-3.png", "00001-4.png"]
    for f, seed in zip(files, (3, 4)):
        want = ref(image=Image.open(source), decoder_num_inference_steps=3, super_res_num_inference_steps=5,
                   decoder_guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
        picture = Image.open(f)
        assert _psnr_8bit(picture, want) >= 50
        params = json.loads(picture.info["imagine"])
        assert {k: params[k] for k in ("seed", "steps", "guidance_scale", "stage_2_steps", "init_image", "width")} == \
            {"seed": seed, "steps": 3, "guidance_scale": 5.0, "stage_2_steps": 5, "init_image": "source.png",
             "width": 64}
    code, _, err = _generate(capsys, "--model", folder, "a horse", "--init-image", source, "-o", tmp_path / "x.png")
    assert code != 0 and "takes no prompt" in err
    code, _, err = _generate(capsys, "--model", folder, "--init-image", source, "--sampler", "euler",
                             "-o", tmp_path / "x.png")
    assert code != 0 and "--sampler: not for Karlo's image-variation cascade" in err
    code, _, err = _generate(capsys, "--model", folder, "-o", tmp_path / "x.png")
    assert code != 0 and "give the picture to vary with --init-image" in err
    assert not (tmp_path / "x.png").exists()


def test_served_variations_are_the_pipelines(variations):
    """`imagine serve --model KARLO_VARIATIONS`: OpenAI's /v1/images/variations answers with the cascade's
    variations, each image from its own seed: the pipeline's picture to the byte, and diffusers' (50 dB); a prompt, a
    noise level or a text-to-image request is a 422 (400 on OpenAI's paths) naming why."""
    import argparse
    import base64
    import io

    import httpx

    from imagine.server import cli
    from imagine.server.app import BackgroundServer, ServerConfig, create_app
    from imagine.server.cascade import KarloServing

    folder, ref, ours = variations
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    served = cli._cascade(p.parse_args(["--model", str(folder)]), ServerConfig())
    assert isinstance(served, KarloServing) and served.picture_model
    picture = _picture(2, (30, 50))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    form = {"n": "2", "seed": "4", "steps": "3", "guidance_scale": "5", "response_format": "b64_json"}
    with BackgroundServer(create_app(served, ServerConfig(max_batch=2))) as srv:
        r = httpx.post(f"{srv.url}/v1/images/variations", files={"image": ("p.png", buf.getvalue(), "image/png")},
                       data=form, timeout=120)
        assert r.status_code == 200, r.text
        got = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB") for d in r.json()["data"]]
        for image, seed in zip(got, (4, 5)):
            mine = ours.variations(picture, seed=seed, decoder_steps=3, decoder_guidance_scale=5.0, progress=False)
            assert image.tobytes() == mine[0].tobytes()  # (the pipeline's picture, at batch 2 as alone)
            want = ref(image=picture, decoder_num_inference_steps=3, decoder_guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            assert _psnr_8bit(image, want) >= 50
        for extra, said in (({"prompt": "a horse"}, "takes no prompt"), ({"noise_level": "5"}, "unnoised")):
            r = httpx.post(f"{srv.url}/v1/images/variations", files={"image": ("p.png", buf.getvalue(), "image/png")},
                           data={**form, **extra}, timeout=120)
            assert r.status_code == 400 and said in r.text, r.text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2}, timeout=120)
        assert r.status_code == 422 and "use POST /v1/images/variations" in r.text


# -- interpolations and text diffs (sec. 3.2, 3.3) ------------------------------------------------------------------
def test_slerp_closed_forms():
    from imagine.pipelines.karlo import slerp

    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])  # orthogonal, norms 2 and 4
    for t in (0.0, 0.25, 0.5, 1.0):
        want = ((1 - t) * 2 + t * 4) * torch.tensor([[np.cos(t * np.pi / 2), np.sin(t * np.pi / 2), 0.0]],
                                                     dtype=torch.float32)
        assert torch.allclose(slerp(a, b, t), want, atol=1e-6), t
    # the angle moves linearly: a third of the way at t = 1/3, for any angle between them
    c = torch.tensor([[np.cos(2.0), np.sin(2.0), 0.0]], dtype=torch.float32)
    third = slerp(torch.tensor([[1.0, 0.0, 0.0]]), c, 1 / 3)
    assert abs(float(torch.atan2(third[0, 1], third[0, 0])) - 2.0 / 3) < 1e-6
    # parallel rows: linear; opposite rows: no great circle
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * a, atol=1e-6)
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(a, -a, 0.5)


def test_interpolation_frames_are_the_slerped_embeddings_from_one_noise(variations):
    """The frames' decoder samples (where the embedding shows: the final pictures, after the super-resolution stage's
    own noise, move little) are those of the slerped embeddings decoded alone from the same seed; the ends are the
    two pictures' own variations, and the middle frame is neither."""
    from imagine.pipelines.karlo import slerp

    _, _, ours = variations
    kw = dict(decoder_steps=3, super_res_steps=2, progress=False, output_type="pt")

    def decoded(call, *args, **options) -> torch.Tensor:
        seen = []
        call(*args, callback=lambda info: seen.append(info["denoised"]) if info["stage"] == "decoder" else 0,
             **options, **kw)
        return seen[-1]
    start, end = _picture(1), _picture(3)
    frames = decoded(ours.interpolations, start, end, frames=3, seed=6)
    assert frames.shape == (3, 3, 32, 32)
    z = ours.image_embedder.embed([start, end])
    alone = [decoded(ours.variations, None, image_embeddings=slerp(z[:1], z[1:], t), seed=6) for t in (0, 0.5, 1)]
    # (batch 3 against batch 1: float32's kernels differ with the batch, and test_karlo_s30's rare flips at the first
    # step's clip make the bound one on all but the 0.1% largest differences)
    for k in range(3):
        assert _close(frames[k], alone[k][0]), k
    assert _close(alone[0][0], decoded(ours.variations, start, seed=6)[0])  # (frame 0: start's own variation)
    assert float((frames[1] - frames[0]).abs().mean()) > 0.01 and float((frames[1] - frames[2]).abs().mean()) > 0.01
    with pytest.raises(ValueError, match="frames must be"):
        ours.interpolations(start, end, frames=1)


def test_text_diff_turns_the_embedding_towards_the_captions_difference(variations):
    """z_d = norm(z_t - z_t0) from the text tower's projected embeddings; frame k decodes slerp(z_i, |z_i| z_d,
    theta_k): its angle to z_i is theta_k times the angle between z_i and z_d; frame 0 is the picture's variation."""
    _, ref, ours = variations
    kw = dict(decoder_steps=2, super_res_steps=2, progress=False, output_type="pt")
    seen = []
    decode = ours._decode
    ours._decode = lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k)
    try:
        frames = ours.text_diff(_picture(1), "a red cube", "a blue cube", frames=3, max_theta=0.4, seed=2, **kw)
    finally:
        del ours._decode
    z_i = ours.image_embedder.embed([_picture(1)])[0]
    with torch.no_grad():  # (diffusers' text tower: the projected text embeddings)
        ids = ref.tokenizer(["a blue cube", "a red cube"], padding="max_length", return_tensors="pt").input_ids
        z_t = ref.text_encoder(ids).text_embeds
    z_d = (z_t[0] - z_t[1]) / (z_t[0] - z_t[1]).norm()
    path = seen[0]
    omega = torch.arccos(torch.dot(z_i / z_i.norm(), z_d))
    for k, theta in enumerate((0.0, 0.2, 0.4)):
        assert abs(float(path[k].norm() - z_i.norm())) < 1e-4 * float(z_i.norm())
        angle = torch.arccos((torch.dot(path[k], z_i) / (path[k].norm() * z_i.norm())).clamp(-1, 1))
        assert abs(float(angle - theta * omega)) < 1e-3, (k, float(angle), float(theta * omega))
    assert _close(frames[0], ours.variations(_picture(1), seed=2, **kw)[0])
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        ours.text_diff(_picture(1), "a cube", "a cube")


def test_generate_writes_interpolation_and_text_diff_frames(variations, tmp_path, capsys):
    from test_cascade_cli_s29 import _run as _generate

    folder, _, ours = variations
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _picture(1).save(a)
    _picture(3).save(b)
    common = ("--model", folder, "--init-image", a, "--steps", 2, "--stage-2-steps", 2, "--seed", 6, "-q")
    code, _, err = _generate(capsys, *common, "--interpolate-to", b, "--frames", 3, "-o", tmp_path / "walk")
    assert code == 0, err
    files = sorted((tmp_path / "walk").glob("*.png"))
    assert len(files) == 3
    want = ours.interpolations(Image.open(a), Image.open(b), frames=3, seed=6, decoder_steps=2, super_res_steps=2,
                               progress=False)
    for f, w, theta in zip(files, want, (0.0, 0.5, 1.0)):
        picture = Image.open(f)
        assert picture.convert("RGB").tobytes() == w.tobytes()
        params = json.loads(picture.info["imagine"])
        assert params["theta"] == theta and params["interpolate_to"] == "b.png" and params["seed"] == 6
    code, _, err = _generate(capsys, *common, "--text-diff", "a red cube", "a blue cube", "--frames", 2,
                             "--max-theta", 0.3, "-o", tmp_path / "diff")
    assert code == 0, err
    files = sorted((tmp_path / "diff").glob("*.png"))
    assert [json.loads(Image.open(f).info["imagine"])["theta"] for f in files] == [0.0, 0.3]
    for extra, said in ((("--frames", 3), "--frames is for --interpolate-to or --text-diff"),
                        (("--interpolate-to", b, "--text-diff", "x", "y"), "not both"),
                        (("--interpolate-to", b, "--frames", 1), "--frames must be at least 2"),
                        (("--text-diff", "x", "y", "--max-theta", 2), "--max-theta must be in (0, 1]")):
        code, _, err = _generate(capsys, *common, *extra, "-o", tmp_path / "none")
        assert code != 0 and said in err, err
    assert not (tmp_path / "none").exists()
    # (the flags are Karlo's variation folder's: another model refuses them)
    code, _, err = _generate(capsys, "a red circle", "--interpolate-to", b, "-o", tmp_path / "x.png")
    assert code != 0 and "--interpolate-to is for Karlo's image-variation folder" in err


def test_the_page_makes_variations(variations, tmp_path):
    """With a model that makes variations alone, the page says so, opens its picture section, and sends the chosen
    picture to OpenAI's variations endpoint: the cards are the pipeline's variations per seed."""
    import base64
    import io

    from headless import page_at

    from imagine.server.app import BackgroundServer, ServerConfig, create_app
    from imagine.server.cascade import KarloServing

    folder, _, ours = variations
    source = tmp_path / "source.png"
    _picture(2, (30, 50)).save(source)
    app = create_app(KarloServing(ours, source=str(folder)), ServerConfig(max_batch=2))
    with BackgroundServer(app) as srv, page_at(srv.url) as (page, errors):
        assert "makes variations of a picture" in page.inner_text("#notice")
        page.fill("#prompt", "")
        page.click("#generate")  # (no picture yet: said at its field)
        page.wait_for_selector("#error:not([hidden]), .field-error", timeout=10_000)
        page.set_input_files("#init_image", str(source))
        page.fill("#steps", "3")
        page.fill("#seed", "4")
        page.fill("#batch_size", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.gallery .card').length === 2", timeout=120_000)
        cards = page.query_selector_all(".gallery .card")
        seeds = sorted(int(c.get_attribute("data-seed")) for c in cards)
        assert seeds == [4, 5]
        for card in cards:
            seed = int(card.get_attribute("data-seed"))
            href = card.query_selector("a.download").get_attribute("href")
            got = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB")
            want = ours.variations(Image.open(source), seed=seed, decoder_steps=3, progress=False)[0]
            assert got.tobytes() == want.tobytes()
        assert not errors, errors


def test_later_stages_flags_are_refused_for_a_latent_model(tmp_path, capsys):
    """--stage-2-steps / --stage-2-guidance-scale / --stage-3 are a cascade's later stages': a latent model has none,
    and the flags, which it passed over before, are refused by name."""
    from test_cascade_cli_s29 import _run as _generate

    testing = pytest.importorskip("imagine.testing")
    tiny = testing.make_tiny_model(tmp_path / "tiny")
    for flag, value in (("--stage-2-guidance-scale", "3"), ("--stage-2-steps", "4"), ("--stage-3", str(tmp_path))):
        code, _, err = _generate(capsys, "--model", tiny, "a cat", flag, value, "-o", tmp_path / "x.png")
        assert code != 0 and f"{flag}: for a pixel cascade's later stages" in err, err
    assert not (tmp_path / "x.png").exists()
