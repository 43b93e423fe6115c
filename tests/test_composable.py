"""AUTOMATIC1111's AND (composable diffusion, Liu et al. 2022, eq. 10; imagine.composable): e~ = e(x, 0) +
s * sum_k w_k (e(x, c_k) - e(x, 0)). Checked: A1111's splitting and weights; the image against a sampling loop written
here on diffusers' own U-Net and DDIM scheduler with that formula (50 dB); one weighted part is plain guidance at
s * w; a plain row in a batch with a composed one is its run alone; the A1111 API and the CLI read it."""

from __future__ import annotations

import pytest
import torch

from test_loading import save_diffusers_folder  # noqa: E402
from test_sd_parity import CFG, SEED, psnr  # noqa: E402

from imagine.composable import split_and
from imagine.samplers import a1111_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("prompt,want", [
    ("a cat AND a dog :1.5", [("a cat", 1.0), (" a dog", 1.5)]),
    ("a cat:0.5", [("a cat", 0.5)]),  # one part with a weight: it scales the guidance
    ("(emphasis:1.2) AND x", [("(emphasis:1.2)", 1.0), (" x", 1.0)]),  # a bracket's weight is not a part's
    ("ANDROID and robots", [("ANDROID and robots", 1.0)]),  # only the word AND, in capitals
    ("a AND b AND c:-0.5", [("a", 1.0), (" b", 1.0), (" c", -0.5)]),
])
def test_parts_and_weights_as_a1111_splits_them(prompt, want):
    assert split_and(prompt) == want


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    ref = save_diffusers_folder(folder, "sd1", scheduler="ddim")
    return ref, TextToImagePipeline.from_pretrained(folder)


def _diffusers_composed(ref, parts, negative: str, steps: int) -> torch.Tensor:
    """The formula on diffusers' U-Net and DDIM scheduler, started from diffusers' noise for SEED."""
    from diffusers import DDIMScheduler

    with torch.no_grad():
        enc = [ref.encode_prompt(text, "cpu", 1, False)[0] for text, _ in parts]
        none = ref.encode_prompt(negative, "cpu", 1, False)[0]
        sched = DDIMScheduler.from_config(ref.scheduler.config)
        sched.set_timesteps(steps)
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(SEED)) * sched.init_noise_sigma
        for t in sched.timesteps:
            u = ref.unet(x, t, encoder_hidden_states=none).sample
            eps = u + sum(CFG * w * (ref.unet(x, t, encoder_hidden_states=e).sample - u) for e, (_, w) in zip(enc, parts))
            x = sched.step(eps, t, x).prev_sample
        image = ref.vae.decode(x / ref.vae.config.scaling_factor).sample[0]
    return ((image + 1) / 2).clamp(0, 1)


def test_the_image_is_the_formula_on_diffusers_unet(sd):
    ref, pipe = sd
    prompt = "a red circle AND the blue square :0.6"
    want = _diffusers_composed(ref, split_and(prompt), "the square", 10)
    res = pipe.generate(prompt, "the square", composable=True, steps=10, guidance_scale=CFG, sampler="ddim",
                        seed=SEED, height=32, width=32, progress=False, output_type="latent")
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert psnr(got, want) >= 50 and res.parameters["composable"] is True
    first = pipe.generate("a red circle", "the square", steps=10, guidance_scale=CFG, sampler="ddim", seed=SEED,
                          height=32, width=32, progress=False, output_type="latent")
    assert psnr(((pipe.decode(first.latents)[0] + 1) / 2).clamp(0, 1), want) < 50  # the second part matters


def test_one_weighted_part_is_guidance_at_s_w_and_a_plain_row_is_its_run_alone(sd):
    _, pipe = sd
    kw = dict(steps=4, height=16, width=16, progress=False, output_type="latent")
    weighted = pipe.generate("a red circle :0.5", composable=True, guidance_scale=CFG, seed=2, **kw).latents
    plain = pipe.generate("a red circle", guidance_scale=CFG * 0.5, seed=2, **kw).latents
    assert torch.allclose(weighted, plain, atol=1e-6, rtol=0)
    alone = pipe.generate("a blue square", composable=True, guidance_scale=CFG, seed=3, **kw).latents
    assert torch.equal(alone, pipe.generate("a blue square", guidance_scale=CFG, seed=3, **kw).latents)
    both = pipe.generate(["a red circle AND the square", "a blue square"], composable=True, guidance_scale=CFG,
                         seeds=[2, 3], **kw).latents
    assert torch.allclose(both[1:], alone, atol=1e-5, rtol=0)
    # guidance 1 still pulls from the unconditional prediction: e(0) + sum_k w_k (e(c_k) - e(0))
    one = pipe.generate("a red circle AND the square", composable=True, guidance_scale=1.0, seed=2, **kw).latents
    assert torch.isfinite(one).all() and not torch.allclose(one, pipe.generate("a red circle", guidance_scale=1.0,
                                                                                 seed=2, **kw).latents)


def test_a_pooled_controlnet_leaves_the_unconditional_rows_alone_with_and(sd, tmp_path):
    """A shuffle-style ControlNet reads the prompt only (guess mode): with AND's (K + 1) B rows its residuals go to
    the K conditional parts, none to the unconditional rows, so a part of weight 0 changes nothing."""
    from test_controlnet import _edges, tiny_controlnet

    _, pipe = sd
    net = tiny_controlnet(global_pool_conditions=True)
    net.save_pretrained(tmp_path / "shuffle", safe_serialization=True)
    pipe.load_controlnet(tmp_path / "shuffle", "shuffle")
    try:
        kw = dict(control_image=_edges(16), steps=3, guidance_scale=CFG, seed=4, height=16, width=16, progress=False,
                  output_type="latent")
        zero = pipe.generate("a red circle AND a blue square :0", composable=True, **kw).latents
        plain = pipe.generate("a red circle", **kw).latents
        assert torch.allclose(zero, plain, atol=1e-5, rtol=0)
    finally:
        pipe.controlnets.clear()


def test_the_a1111_api_and_the_cli_read_and(sd, tmp_path, capsys):
    from test_prompt_editing import api_and_cli_images

    _, pipe = sd
    prompt = "a red circle AND a [blue:green:2] square :0.7"
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings, --a1111-sampling)
    kw = dict(steps=4, guidance_scale=CFG, height=16, width=16, seed=6, progress=False, **a1111_settings("Euler"))
    want = pipe.generate(prompt, composable=True, prompt_editing=True, emphasis=True, long_prompts=True,
                         **kw).images[0].convert("RGB").tobytes()
    assert api_and_cli_images(pipe, prompt, ["--a1111-prompts"], tmp_path, capsys) == (want, want)


def _stack_conds(tensors):
    """A1111's prompt_parser.stack_conds, restated: every text filled up to the longest with its last vector."""
    n = max(t.shape[0] for t in tensors)
    return torch.stack([torch.cat([t, t[-1:].repeat(n - t.shape[0], 1)]) for t in tensors])


def test_and_parts_of_different_lengths_are_filled_as_a1111_stacks_them(sd):
    """A part past 75 tokens (two chunks) beside a short one: the short one's states filled up with its last state
    (A1111's reconstruct_multicond_batch), in the guidance and under pad_conds (which refused them before)."""
    from imagine.composable import ComposedConditioning
    from imagine.guidance import fill_parts

    _, pipe = sd
    g = torch.Generator().manual_seed(0)
    long_part, short = torch.randn(2, 154, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    mask = torch.ones(2, 154, dtype=torch.bool)
    mask[1, 77:] = False  # (the second image's first part is short too: filled only to its own parts' longest)
    filled = fill_parts(ComposedConditioning([{"context": long_part, "context_mask": mask}, {"context": short}],
                                             torch.ones(2, 2)))
    want0 = _stack_conds([long_part[0], short[0]])
    assert torch.equal(filled.parts[0]["context"][0], want0[0]) and torch.equal(filled.parts[1]["context"][0], want0[1])
    want1 = _stack_conds([long_part[1, :77], short[1]])
    assert torch.equal(filled.parts[1]["context"][1, :77], want1[1]) and not filled.parts[1]["context_mask"][1, 77:].any()
    words = " ".join(["red circle"] * 45)  # (over 75 tokens: two chunks)
    kw = dict(steps=2, height=16, width=16, progress=False, output_type="latent", composable=True, long_prompts=True,
              guidance_scale=CFG, seed=4)
    padded = pipe.generate(f"{words} AND a blue square", "x", pad_conds="empty", **kw)
    assert padded.latents.isfinite().all()
    plain = pipe.generate(f"{words} AND a blue square", "x", **kw)
    assert plain.latents.isfinite().all()
