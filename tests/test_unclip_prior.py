"""unCLIP's text to image through a diffusion prior (`imagine/models/prior.py`, `imagine.pipelines.unclip.text_to_image`):
diffusers' PriorTransformer and StableUnCLIPPipeline on tiny random weights are the truth. The prior's output equals
diffusers' (configurations with and without its optional norms and widths); the image embedding the pipeline's prior
loop makes equals diffusers' to float rounding; whole generations are 50 dB or more from diffusers' images."""

from __future__ import annotations

import json

import pytest
import torch

from test_loading import VOCAB, write_clip_tokenizer  # noqa: E402
from test_sd_parity import psnr  # noqa: E402
from test_unclip import E, tiny_decoder_parts  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.models.prior import PriorTransformer  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.pipelines.unclip import text_to_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


def _tiny_prior(**extra):
    torch.manual_seed(1)
    prior = diffusers.PriorTransformer(**{"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
                                          "embedding_dim": E, "num_embeddings": 77, "additional_embeddings": 4,
                                          **extra}).eval()
    with torch.no_grad():  # (diffusers starts these at zero: random values make each of them count)
        prior.positional_embedding.normal_()
        prior.prd_embedding.normal_() if prior.prd_embedding is not None else None
        prior.clip_mean.normal_(0, 0.5)
        prior.clip_std.uniform_(0.5, 1.5)
    return prior


def _tiny_stable_unclip(folder):
    parts = tiny_decoder_parts(folder)
    prior_text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=E, intermediate_size=64, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=E, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0, num_hidden_layers=2,
        hidden_act="gelu")).eval()
    prior_tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "_tok_prior", "!"),
                                                           local_files_only=True)
    # Karlo's prior scheduler: DDPM predicting x_0, clipped to [-5, 5]
    prior_scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                              clip_sample=True, clip_sample_range=5.0, variance_type="fixed_small_log")
    pipe = diffusers.StableUnCLIPPipeline(prior_tokenizer=prior_tok, prior_text_encoder=prior_text,
                                          prior=_tiny_prior(), prior_scheduler=prior_scheduler, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def stable_unclip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stable_unclip") / "folder"
    _tiny_stable_unclip(folder)
    ref = diffusers.StableUnCLIPPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, ref, TextToImagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("extra", [{}, {"norm_in_type": "layer", "embedding_proj_norm_type": "layer",
                                        "time_embed_dim": 48, "embedding_proj_dim": 20, "clip_embed_dim": 24},
                                   {"added_emb_type": None, "additional_embeddings": 3, "time_embed_act_fn": "gelu"}])
def test_prior_transformer_matches_diffusers(tmp_path, extra):
    ref = _tiny_prior(**extra)
    ref.save_pretrained(tmp_path / "prior", safe_serialization=True)
    ours = PriorTransformer.from_pretrained(tmp_path / "prior")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, E, generator=g)
    proj = torch.randn(3, extra.get("embedding_proj_dim", E), generator=g)
    context = torch.randn(3, 77, E, generator=g)
    mask = torch.ones(3, 77, dtype=torch.bool)
    mask[0, 9:] = mask[1, 3:] = False  # padded captions of 9 and 3 tokens
    t = torch.tensor([0.0, 417.0, 999.0])
    with torch.no_grad():
        want = ref(x, t, proj_embedding=proj, encoder_hidden_states=context, attention_mask=mask).predicted_image_embedding
        got = ours(x, t, proj, context, mask)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)
        # the mask is read: other values under a padded token change nothing, under a real one they do
        moved = context.clone()
        moved[0, 20] += 1
        assert torch.allclose(ours(x, t, proj, moved, mask)[0], got[0], atol=1e-6)
        moved[0, 5] += 1
        assert not torch.allclose(ours(x, t, proj, moved, mask)[0], got[0], atol=1e-3)
        z = torch.randn(2, ours.proj_to_clip_embeddings.out_features, generator=g)
        assert torch.allclose(ours.unnormalize(z), ref.post_process_latents(z))
        # without a caption mask diffusers applies no mask at all (its causal mask comes with the caption's)
        want = ref(x, t, proj_embedding=proj, encoder_hidden_states=context).predicted_image_embedding
        assert torch.allclose(ours(x, t, proj, context), want, atol=1e-5, rtol=0)
        # bfloat16 weights take float32 samples and give float32 back, near the float32 model's
        half = PriorTransformer.from_pretrained(tmp_path / "prior", dtype=torch.bfloat16)
        out = half(x, t, proj, context, mask)
        assert out.dtype == torch.float32 and (out - got).norm() / got.norm() < 0.05


def test_the_prior_loop_gives_diffusers_embedding(stable_unclip, monkeypatch):
    """The image embeddings of the prior's loop (DDPM on x_0 with guidance 4 against the empty caption, clipped to
    [-5, 5], un-normalized) for two prompts with their own seeds equal what diffusers' pipeline hands to
    noise_image_embeddings, each run alone."""
    from imagine.pipelines.unclip import prior_embeddings
    from imagine.sampling import make_generators

    folder, ref, ours = stable_unclip
    seen = []
    real = ref.noise_image_embeddings
    monkeypatch.setattr(ref, "noise_image_embeddings",
                        lambda image_embeds, **kw: (seen.append(image_embeds.clone()), real(image_embeds, **kw))[1])
    prompts, seeds = ["a red circle", "two blue squares on the left"], [5, 9]
    for p, s in zip(prompts, seeds):
        ref(p, height=SIZE, width=SIZE, num_inference_steps=2, prior_num_inference_steps=10,
            generator=torch.Generator().manual_seed(s), output_type="latent")
    prior = ours.c.prior
    got = prior_embeddings(prior, prompts, make_generators(2, seeds), seeds, steps=10, guidance_scale=4.0,
                           sampler=prior.sampler, progress=False)
    want = torch.cat(seen)
    assert want.std() > 0.1 and torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_an_unclip_scheduler_prior_steps_over_its_own_timesteps(stable_unclip, tmp_path, monkeypatch):
    """A prior_scheduler of diffusers' UnCLIPScheduler class (Karlo's) lays out round(i (T - 1) / (n - 1)), and each
    step goes to the next of them, as diffusers' UnCLIPPipeline hands it prev_timestep (its StableUnCLIPPipeline hands
    none, so that each of its steps goes down one timestep: not followed)."""
    import shutil

    from imagine.pipelines.unclip import prior_embeddings
    from imagine.sampling import make_generators

    folder = tmp_path / "karlo_scheduler"
    shutil.copytree(stable_unclip[0], folder)
    diffusers.UnCLIPScheduler(clip_sample_range=5.0, prediction_type="sample").save_pretrained(folder / "prior_scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "prior_scheduler": ["diffusers", "UnCLIPScheduler"]}))
    ref = diffusers.StableUnCLIPPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = TextToImagePipeline.from_pretrained(folder)
    step, seen = ref.prior_scheduler.step, []

    # (UnCLIPPipeline's loop: the next timestep given; `generator` named, as diffusers passes the seeded generator
    # only to a step whose signature has it, else its noise comes from torch's global generator)
    def karlo_step(model_output, timestep, sample, generator=None, **kw):
        ts = ref.prior_scheduler.timesteps.tolist()
        i = ts.index(int(timestep))
        return step(model_output, timestep, sample, prev_timestep=ts[i + 1] if i + 1 < len(ts) else None,
                    generator=generator, **kw)

    monkeypatch.setattr(ref.prior_scheduler, "step", karlo_step)
    real = ref.noise_image_embeddings
    monkeypatch.setattr(ref, "noise_image_embeddings",
                        lambda image_embeds, **kw: (seen.append(image_embeds.clone()), real(image_embeds, **kw))[1])
    ref("a red circle", height=SIZE, width=SIZE, num_inference_steps=1, prior_num_inference_steps=5,
        generator=torch.Generator().manual_seed(5), output_type="latent")
    assert ref.prior_scheduler.timesteps.tolist() == [999, 749, 500, 250, 0]
    prior = ours.c.prior
    steps = []
    got = prior_embeddings(prior, ["a red circle"], make_generators(1, [5]), [5], steps=5, guidance_scale=4.0,
                           sampler=prior.sampler, progress=False, callback=lambda d: steps.append(int(d["t"])))
    assert steps == [999, 749, 500, 250, 0]
    # (to 3e-3: diffusers' UnCLIPScheduler and DDPMScheduler themselves differ by 1e-3 in float32 over these steps)
    assert torch.allclose(got, seen[0], rtol=0, atol=3e-3), float((got - seen[0]).abs().max())
    assert prior.sampler == "ddpm" and prior.timestep_spacing == "linspace"


@pytest.mark.parametrize("noise_level,sampler,scheduler", [(0, "ddim", "DDIMScheduler"),
                                                           (200, "euler", "EulerDiscreteScheduler")])
def test_text_to_image_matches_diffusers(stable_unclip, noise_level, sampler, scheduler):
    """generate() on a StableUnCLIPPipeline folder: prior (25 steps at guidance 4), embedding noised to the level,
    decoder (10 steps at guidance 7.5): diffusers' image at 50 dB or more; another prior guidance is another image."""
    folder, ref, ours = stable_unclip
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    kw = dict(height=SIZE, width=SIZE, guidance_scale=7.5)
    want = ref("a red circle", negative_prompt="a square", num_inference_steps=10, noise_level=noise_level,
               generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images[0].float()
    run = dict(steps=10, seed=3, sampler=sampler, progress=False, output_type="latent", **kw)
    # (generate() runs it with the prior's defaults and level 0; text_to_image takes the level)
    res = ours.generate("a red circle", "a square", **run) if noise_level == 0 else \
        text_to_image(ours, "a red circle", "a square", noise_level=noise_level, **run)
    got = ((ours.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert psnr(got, want) >= 50, psnr(got, want)
    assert res.parameters["prior_steps"] == 25 and res.parameters["noise_level"] == noise_level
    other = text_to_image(ours, "a red circle", "a square", steps=10, seed=3, sampler=sampler, noise_level=noise_level,
                          prior_guidance_scale=1.0, progress=False, output_type="latent", **kw)
    assert psnr(((ours.decode(other.latents)[0] + 1) / 2).clamp(0, 1), want) < 40


def test_the_callback_hears_the_prior_then_the_decoder(stable_unclip):
    """The prior's steps reach the callback first, marked stage "prior" and without x / denoised (embeddings, not
    latents: a preview would decode them); a callback that raises stops the run there (the server's interrupt)."""
    folder, ref, ours = stable_unclip
    heard = []
    ours.generate("a red circle", seed=1, steps=3, prior_steps=4, height=SIZE, width=SIZE, progress=False,
                  output_type="latent", callback=heard.append)
    assert [h.get("stage") for h in heard] == ["prior"] * 4 + [None] * 3
    assert all("denoised" not in h for h in heard[:4]) and all(h["denoised"].shape[1] == 4 for h in heard[4:])

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ours.generate("a red circle", seed=1, steps=3, height=SIZE, width=SIZE, progress=False, callback=stop)


def test_a1111s_prompt_options_count_only_where_a_prompt_uses_them(stable_unclip):
    """The old prompt-editing timelines (A1111's use_old_scheduling, on in an old infotext) do nothing without an
    edit: an unCLIP text-to-image model takes them then, and refuses them only where a prompt edits."""
    _, _, ours = stable_unclip
    kw = dict(height=SIZE, width=SIZE, steps=2, progress=False, output_type="latent", prompt_editing=True)
    plain = ours.generate("a red circle", seed=4, **kw).latents
    assert torch.equal(ours.generate("a red circle", seed=4, old_prompt_editing=True, **kw).latents, plain)
    with pytest.raises(ValueError, match=r"old_prompt_editing, prompt_editing \(.*\): not for"):
        ours.generate("a [red:blue:1] circle", seed=4, old_prompt_editing=True, **kw)


def test_a_batch_is_its_images_alone(stable_unclip):
    folder, ref, ours = stable_unclip
    kw = dict(height=SIZE, width=SIZE, steps=4, progress=False, output_type="latent")
    both = ours.generate(["a red circle", "a blue square"], seeds=[4, 8], **kw).latents
    alone = ours.generate("a blue square", seeds=[8], **kw).latents
    # (up to the float rounding of batch-2 vs batch-1 matrix products, through the prior and the decoder: 1.1e-5 seen)
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(both[0], alone[0], atol=1e-2)


def test_the_prior_reads_plain_text(stable_unclip):
    """A1111's syntax is the decoder's text encoder's: the prior gets the caption without LoRA tags, brackets,
    weights or BREAK, so a prompt whose weights are all 1 gives the plain prompt's image."""
    from imagine.pipelines.unclip import prior_text

    folder, ref, ours = stable_unclip
    assert prior_text(ours, "a (red:1.4) circle BREAK [square]", True, True) == "a red circle square"
    assert prior_text(ours, "a (red:1.4) circle BREAK square", False, True) == "a (red:1.4) circle square"
    kw = dict(seed=2, steps=3, height=SIZE, width=SIZE, progress=False, output_type="latent")
    plain = ours.generate("a red circle", **kw).latents
    assert torch.equal(ours.generate("a (red:1.0) circle", emphasis=True, **kw).latents, plain)
    assert not torch.equal(ours.generate("a (red:1.0) circle", **kw).latents, plain)


def test_errors_name_the_problem(stable_unclip):
    folder, ref, ours = stable_unclip
    assert ours.picture_model is None  # text to image: generate() runs it
    with pytest.raises(ValueError, match="init_image, strength: not for .* an unCLIP text-to-image model"):
        ours.generate("a red circle", init_image=object(), strength=0.5)
    with pytest.raises(ValueError, match="init_latents: not for"):
        ours.generate("a red circle", init_latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="control_guidance_start: not for"):
        ours.generate("a red circle", control_guidance_start=0.2)
    with pytest.raises(ValueError, match="prompt_editing .* prompts.: not for"):  # (an edit at step 25 of 30)
        ours.generate("a [cat:dog:25]", steps=30, prompt_editing=True)
    with pytest.raises(ValueError, match="composable .AND / :weight prompts.: not for"):  # (a weighted one too)
        ours.generate("a cat :1.5", composable=True)
    kw = dict(steps=2, seed=1, height=SIZE, width=SIZE, progress=False, output_type="latent")
    for plain in ("a red circle, ", "a cat :1", "a cat\n"):  # (no AND, no weight but 1: read as it is)
        ours.generate(plain, composable=True, prompt_editing=True, **kw)
    ours.generate("a red circle", subseed=5, **kw)  # (a variation seed at strength 0 does nothing)
    # a prior guidance at or below 1 runs the caption alone, as diffusers
    assert torch.equal(text_to_image(ours, "a red circle", prior_guidance_scale=0.5, **kw).latents,
                       text_to_image(ours, "a red circle", prior_guidance_scale=1.0, **kw).latents)
    with pytest.raises(ValueError, match="hires. fix is not for .* an unCLIP text-to-image model"):
        ours.generate_hires("a red circle", hires_scale=2)
    for bad in (0, 2.7, True):
        with pytest.raises(ValueError, match="prior_steps must be a whole number of at least 1"):
            text_to_image(ours, "a red circle", prior_steps=bad)
    with pytest.raises(ValueError, match="prior_guidance_scale must be a finite number; got nan"):
        text_to_image(ours, "a red circle", prior_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="no CLIP image encoder"):
        ours.variations(__import__("PIL.Image", fromlist=["x"]).new("RGB", (32, 32)), "a red circle")


def test_cli_runs_the_prior(stable_unclip, tmp_path, capsys):
    """`imagine generate --model FOLDER "prompt"` with --prior-steps, --prior-guidance-scale and --noise-level: the
    image text_to_image gives, its parameters in the PNG; --init-image is not for it, and the prior's flags are not
    for a model without a prior."""
    import json

    from PIL import Image

    from test_loading import save_diffusers_folder

    from imagine.cli import main

    folder, ref, ours = stable_unclip
    out = tmp_path / "t.png"
    assert main(["generate", "--model", str(folder), "a red circle", "--steps", "4", "--seed", "2", "--noise-level",
                 "50", "--prior-steps", "6", "--prior-guidance-scale", "3", "--height", "32", "--width", "32",
                 "-o", str(out)]) == 0
    want = text_to_image(ours, "a red circle", steps=4, seed=2, noise_level=50, prior_steps=6, prior_guidance_scale=3,
                         height=32, width=32, progress=False).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    meta = json.loads(Image.open(out).info["imagine"])
    assert (meta["noise_level"], meta["prior_steps"], meta["prior_guidance_scale"]) == (50, 6, 3.0)
    Image.new("RGB", (32, 32)).save(tmp_path / "p.png")
    assert main(["generate", "--model", str(folder), "a", "--init-image", str(tmp_path / "p.png"), "-o",
                 str(tmp_path / "x.png")]) != 0
    assert "--init-image: not for an unCLIP text-to-image model" in capsys.readouterr().err
    save_diffusers_folder(tmp_path / "sd", "sd1")
    assert main(["generate", "--model", str(tmp_path / "sd"), "a", "--prior-steps", "5", "-o",
                 str(tmp_path / "y.png")]) != 0
    assert "--prior-steps / --prior-guidance-scale are for unCLIP models with a diffusion prior" in capsys.readouterr().err
    with pytest.raises(ValueError, match="noise_level is for unCLIP text-to-image models"):
        TextToImagePipeline.from_pretrained(tmp_path / "sd").generate("a", noise_level=5)
    # A1111's prompt syntax switched on, a prompt without it: the image of the plain run
    assert main(["generate", "--model", str(folder), "a red circle", "--steps", "4", "--seed", "2", "--noise-level",
                 "50", "--prior-steps", "6", "--prior-guidance-scale", "3", "--height", "32", "--width", "32",
                 "--a1111-prompts", "-o", str(tmp_path / "a.png")]) == 0


def test_served_prior_model_makes_images_from_text(stable_unclip):
    """Behind the server a prior model is a text-to-image model: A1111's txt2img gives generate()'s image."""
    import base64
    import io

    import httpx
    from PIL import Image

    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    folder, ref, ours = stable_unclip
    picture = io.BytesIO()
    Image.new("RGB", (32, 32)).save(picture, format="PNG")
    with BackgroundServer(create_app(ours, ServerConfig(max_width=64, max_height=64))) as srv:
        refused = [httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "enable_hr": True},
                              timeout=120),
                   httpx.post(f"{srv.url}/sdapi/v1/img2img", json={"prompt": "a", "steps": 2, "init_images": [
                       base64.b64encode(picture.getvalue()).decode()]}, timeout=120),
                   httpx.post(f"{srv.url}/v1/images/variations",
                              files={"image": ("p.png", picture.getvalue(), "image/png")}, timeout=120),
                   httpx.post(f"{srv.url}/v1/images/edits", files={"image": ("p.png", picture.getvalue(), "image/png")},
                              data={"prompt": "a hat"}, timeout=120),
                   httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "subseed_strength": 0.3},
                              timeout=120)]
        for r in refused:
            assert r.status_code == (400 if r.url.path.startswith("/v1/") else 422) and "makes images from text" in r.text, r.text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 5,
                                                             "width": 32, "height": 32, "sampler_name": "DDIM",
                                                             "cfg_scale": 5.0},
                       timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        # a k-diffusion sampler too: the prior and decoder run it diffusers' way (their pipeline takes no A1111 start
        # or range), with a schedule type when one is named
        e = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 5,
                                                             "width": 32, "height": 32, "sampler_name": "Euler",
                                                             "scheduler": "Karras", "cfg_scale": 5.0}, timeout=120)
        assert e.status_code == 200, e.text
        got_euler = Image.open(io.BytesIO(base64.b64decode(e.json()["images"][0]))).convert("RGB")
    want = ours.generate("a red circle", steps=3, seed=5, height=32, width=32, sampler="ddim", guidance_scale=5.0,
                         long_prompts=True, progress=False).images[0]
    assert got.tobytes() == want.tobytes()
    want = ours.generate("a red circle", steps=3, seed=5, height=32, width=32, sampler="euler", guidance_scale=5.0,
                         sigma_schedule="karras", long_prompts=True, progress=False).images[0]
    assert got_euler.tobytes() == want.tobytes()


def test_karlo_sized_prior_has_diffusers_keys_and_shapes():
    """Karlo's prior at full size (diffusers' PriorTransformer defaults: 20 layers, 32 heads of 64, 768-d; 1.0e9
    parameters, built on the meta device): our parameters are diffusers', name for name and shape for shape."""
    with torch.device("meta"):
        ref = diffusers.PriorTransformer()
        ours = PriorTransformer(dict(ref.config))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert sum(v.numel() for v in ours.parameters()) > 9e8
