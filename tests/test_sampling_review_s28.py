"""Session 28's review of the sampling core (imagine/sampling.py) and SDXL's refiner handoff (imagine/refiner.py).

- The refiner's handoff reads a fractional timestep as the run's peer does: under diffusers' rules the refiner takes
  every timestep t < round(T - switch T) (its base's `denoising_end` keeps t >= that cutoff, its refiner's
  `denoising_start` the rest), so Euler on Karras levels at 40 steps gives its t = 199.515 to the refiner, as
  diffusers' ensemble does (it went to the base: t was rounded to 200); under A1111's rules its CompVis samplers
  truncate (UniPC's t = 199.8 at 20 steps is the refiner's) and its k-diffusion samplers take the level nearest in
  sigma (its argmin over the float32 table), not in log sigma. A handoff used again starts on the base.
- A list of ImageNoiseStreams given as generators seeds the SDE samplers' Brownian trees with the streams' seeds, as
  A1111 seeds them (it raised a TypeError from torch.randint).
- Same seed, same image: bit for bit at any batch size, for every sampler that does not couple its batch, at 1 and
  more steps, text to image, image to image and inpainting under both strength rules, both noise sources, an eta
  noise seed delta, and mixed per-image seeds.
- Clear errors: a seed outside the generator's range, a variation strength without variation seeds, an init or start
  noise with NaN (blamed on the model's first output before).
"""

from __future__ import annotations

import math

import pytest
import torch

from imagine.refiner import Handoff, nearest_level, refines
from imagine.samplers import a1111_settings, sampler_names
from imagine.sampling import ImageNoiseStream, make_generators, run_plan, sample, start_noise
from imagine.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

# SDXL's schedule and its scheduler config (leading spacing, steps_offset 1)
SDXL = NoiseSchedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                                 steps_offset=1)


class _Named(torch.nn.Module):
    def __init__(self, name: str, seen: list):
        super().__init__()
        self.name, self.seen = name, seen

    def forward(self, x, t, **cond):
        self.seen.append((self.name, float(t.max())))
        return 0.1 * x


def _handoff_calls(switch=0.8, **kw) -> list[tuple[str, float]]:
    seen: list = []
    h = Handoff(_Named("base", seen), _Named("refiner", seen), switch)
    sample(h, (1, 1, 2, 2), schedule=SDXL, seeds=0, progress=False, **kw)
    return seen


@pytest.mark.parametrize("sigma_schedule, steps", [("karras", 40), ("exponential", 9)])
def test_the_handoff_under_diffusers_rules_is_diffusers_cutoff(sigma_schedule, steps):
    """Euler over Karras (40 steps) or exponential (9 steps) levels has a timestep in [199.5, 200): diffusers' base
    stops above it (t >= 200 only), so its refiner denoises there; ours did not (round(199.515) = 200)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing="leading", steps_offset=1,
                                             **{f"use_{sigma_schedule}_sigmas": True})
    sched.set_timesteps(steps)
    theirs = [float(t) for t in sched.timesteps]
    cutoff = int(round(1000 - 0.8 * 1000))  # (StableDiffusionXLPipeline's discrete_timestep_cutoff)
    assert any(199.5 <= t < 200 for t in theirs)
    seen = _handoff_calls(sampler="euler", sigma_schedule=sigma_schedule, steps=steps)
    assert [t for _, t in seen] == pytest.approx(theirs, abs=1e-3)
    assert [name for name, _ in seen] == ["base" if t >= cutoff else "refiner" for t in theirs]


def test_a1111s_compvis_samplers_truncate_the_timestep():
    """A1111's UniPC hands its fractional timestep to the denoiser, whose model wrapper has no sigma table:
    apply_refiner truncates it (int(199.8) = 199, the refiner's at 0.8)."""
    seen = _handoff_calls(steps=20, **a1111_settings("UniPC"))
    near = [(name, t) for name, t in seen if 195 < t < 205]
    assert near and near[0][1] == pytest.approx(199.8, abs=1e-3) and near[0][0] == "refiner"
    first = next(i for i, (name, _) in enumerate(seen) if name == "refiner")
    assert all(t >= 200 for _, t in seen[:first]) and all(name == "refiner" for name, _ in seen[first:])


def test_a1111s_k_diffusion_samplers_take_the_level_nearest_in_sigma():
    """A1111's apply_refiner: argmin |sigmas - sigma| over its float32 table. Between the geometric and the
    arithmetic mean of sigma_199 and sigma_200 the timestep rounds to 200 (nearest in log sigma) but the level nearest
    in sigma is 199: the refiner's at 0.8."""
    a = SDXL.alphas_cumprod.float()
    table = ((1 - a) / a) ** 0.5
    lo, hi = float(table[199]), float(table[200])
    sigma = (math.sqrt(lo * hi) + (lo + hi) / 2) / 2
    t = torch.tensor([float(SDXL.sigma_to_t(sigma))], dtype=torch.float32)
    assert round(float(t)) == 200 and int(torch.argmin((table - sigma).abs())) == 199
    assert not refines(t, 0.8) and refines(t, 0.8, nearest=nearest_level(SDXL))
    seen: list = []
    h = Handoff(_Named("base", seen), _Named("refiner", seen), 0.8)
    h.at_run("a1111", 1000, SDXL)
    h(torch.zeros(1, 1), t)
    assert seen[-1][0] == "refiner"
    # against A1111's argmin over the levels its samplers run (Karras, exponential, Beta; 5 to 60 steps)
    near = nearest_level(SDXL)
    for scheduler in ("karras", "exponential", "beta"):
        for n in range(5, 61, 5):
            plan = run_plan(SDXL, "dpmpp_2m", n, sigma_schedule=scheduler, sigma_range="model")
            for tt, s in zip(plan.timesteps.tolist(), plan.sigmas.tolist()):
                want = int(torch.argmin((table - torch.tensor(s, dtype=torch.float32)).abs()))
                assert near(float(torch.tensor(tt, dtype=torch.float32))) == want


def test_the_rules_agree_on_whole_timesteps_and_a_bad_rule_is_refused():
    for t in range(0, 1000, 7):
        tt = torch.tensor([float(t)])
        for switch in (0.5, 0.75, 0.8, 0.999, 1.0):
            got = {refines(tt, switch, rule) for rule in ("a1111", "a1111_timesteps", "diffusers")}
            got.add(refines(tt, switch, "a1111", nearest=nearest_level(SDXL)))
            assert len(got) == 1, (t, switch)
    with pytest.raises(ValueError, match="handoff rule must be one of 'a1111', 'a1111_timesteps', 'diffusers'"):
        Handoff(lambda x, t: x, lambda x, t: x, 0.8, rule="nearest")


def test_a_handoff_used_again_starts_on_the_base():
    seen: list = []
    h = Handoff(_Named("base", seen), _Named("refiner", seen), 0.8)
    for _ in range(2):
        seen.clear()
        sample(h, (1, 1, 2, 2), schedule=SDXL, sampler="euler", steps=10, seeds=0, progress=False)
        assert seen[0][0] == "base" and seen[-1][0] == "refiner" and h.used


def test_the_pipeline_hands_over_where_diffusers_ensemble_does():
    """On the tiny SDXL base and refiner of tests/test_refiner.py, Euler Karras at a step count with a timestep in
    [199.5, 200) (40): the pipeline's image is diffusers' base-to-denoising_end + refiner-from-denoising_start, to
    130 dB here (held to 80); with that one step on the base, as before, 62.7 dB (the base alone 46.1)."""
    pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    import test_refiner as tr
    from imagine.pipelines.text_to_image import TextToImagePipeline

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tr.save_sdxl_folder(root / "base", scheduler="euler")
        ref = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
            tokenizer_2=base.tokenizer_2, unet=tr.tiny_refiner_unet(), scheduler=tr.make_scheduler("euler"),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        ref.set_progress_bar_config(disable=True)
        ref.save_pretrained(root / "refiner", safe_serialization=True)
        for p in (base, ref):
            p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
        steps = None
        for n in range(5, 80):
            base.scheduler.set_timesteps(n)
            if bool(((base.scheduler.timesteps >= 199.5) & (base.scheduler.timesteps < 200)).any()):
                steps = n
                break
        assert steps is not None
        want = tr._diffusers_ensemble(base, ref, steps, 0.8)
        pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
        res = pipe.generate(tr.PROMPT, tr.NEGATIVE, refiner_switch=0.8, sigma_schedule="karras", steps=steps,
                            guidance_scale=tr.CFG, seed=tr.SEED, height=tr.SIZE, width=tr.SIZE, progress=False,
                            output_type="latent")
        assert tr.psnr(tr._image(pipe, res), want) >= 80


def _toy(x, t, **cond):
    return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1)


SD = NoiseSchedule.from_config("scaled_linear")


def test_image_noise_streams_as_generators_seed_the_brownian_trees_with_their_seeds():
    kw = dict(schedule=SD, sampler="dpmpp_2m_sde", steps=5, progress=False)
    for rng, delta in (("nv", 0), ("cpu", 31337)):
        want = sample(_toy, (2, 1, 4, 4), seeds=[3, 8], rng=rng, seed_delta=delta, **kw)
        got = sample(_toy, (2, 1, 4, 4), generator=[ImageNoiseStream(3, rng, delta), ImageNoiseStream(8, rng, delta)],
                     **kw)
        assert torch.equal(got, want)


@pytest.mark.parametrize("rule", ["diffusers", "a1111"])
@pytest.mark.parametrize("rng, delta", [("cpu", 0), ("nv", 31337)])
def test_a_seed_gives_its_image_at_any_batch_size(rule, rng, delta):
    init = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    for name in sampler_names():
        if name == "dpm_adaptive":  # (its steps follow the whole batch's error, as k-diffusion's: couples_batch)
            continue
        for steps, strength in ((1, 1.0), (3, 0.7), (4, 1.0)):
            if name == "dpm_fast" and steps == 1:
                continue
            kw = dict(schedule=SD, sampler=name, steps=steps, progress=False, strength_rule=rule, rng=rng,
                      seed_delta=delta)
            runs = [({}, {}), (dict(init=init, strength=strength), dict(init=init[1:2], strength=strength)),
                    (dict(init=init, mask=mask, strength=strength),
                     dict(init=init[1:2], mask=mask[1:2], strength=strength))]
            for many, one in runs:
                a = sample(_toy, (3, 2, 4, 4), seeds=[5, 9, 2], **many, **kw)
                b = sample(_toy, (1, 2, 4, 4), seeds=[9], **one, **kw)
                assert torch.equal(a[1:2], b), (name, steps, strength, many.keys())


def test_clear_errors():
    with pytest.raises(ValueError, match=r"seed 18446744073709551616 is outside the 'cpu' source's range "
                                         r"\[-2\^63, 2\^64 - 1\] \(an int seed counts up"):
        make_generators(2, 2**64 - 1)
    with pytest.raises(ValueError, match=r"seed -1 is outside the 'nv' source's range \[0, 2\^64 - 1\]"):
        make_generators(1, [-1], rng="nv")
    assert len(make_generators(1, -1)) == 1  # (torch takes it as 2^64 - 1, as A1111 would)
    gens = make_generators(1, [7])
    with pytest.raises(ValueError, match="subseed_strength 0.3 needs subseeds"):
        start_noise((1, 4, 4, 4), gens, [7], None, 0.3)
    with pytest.raises(ValueError, match=r"first_size must be \(h, w\) in latent cells"):
        start_noise((1, 4, 4, 4), gens, [7], first_size=(4,))
    kw = dict(schedule=SD, sampler="ddim", steps=4, seeds=0, progress=False)
    with pytest.raises(ValueError, match="init has NaN or inf values"):
        sample(_toy, (1, 1, 4, 4), init=torch.full((1, 1, 4, 4), float("nan")), **kw)
    with pytest.raises(ValueError, match="the start noise has NaN or inf values"):
        sample(_toy, torch.full((1, 1, 4, 4), float("inf")), **kw)
