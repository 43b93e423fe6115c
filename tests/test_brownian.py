"""The SDE samplers' Brownian-tree noise (imagine.brownian) and the samplers that read it: DPM++ SDE, DPM++ 2M SDE
(midpoint and Heun) and DPM++ 3M SDE.

The independent truths: diffusers' DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde with k-diffusion's
BrownianTreeNoiseSampler, one tree per image seed as AUTOMATIC1111 passes them); diffusers' multistep sde-dpmsolver++
step handed, as its `variance_noise`, the increments of that same noise sampler between the step's levels (what
k-diffusion's sample_dpmpp_2m_sde / 3m_sde add); and Brownian motion's own laws (increments add up; normalized ones
are standard normal), and the property the paths exist for: with more steps the image converges.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchsde")
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler  # noqa: E402
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler  # noqa: E402

from test_samplers_parity import (  # noqa: E402
    SEEDS,
    SHAPE,
    STEPS,
    _SDE3MCorrected,
    check,
    config,
    float64_table,
    make_model,
    run_diffusers,
    run_ours,
)

from imagine.brownian import BrownianTreeNoise, tree_seeds  # noqa: E402
from imagine.sampling import sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              # (diffusers' side reads its levels through float32 log/exp; torchsde warns as it clamps an ulp)
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

CASES = [("scaled_linear", "leading", "epsilon"), ("scaled_linear", "trailing", "v_prediction"),
         ("linear", "linspace", "epsilon"), ("squaredcos_cap_v2", "leading", "v_prediction")]


def run_diffusers_brownian(scheduler, steps=STEPS, seeds=SEEDS, init=None, strength=1.0):
    """diffusers' multistep scheduler driven by hand with k-diffusion's noise for an SDE step from sigma_i to sigma_i+1:
    the noise sampler's increment over the scheduler's positive levels, one tree per seed (as A1111 makes it).
    init/strength: image-to-image as diffusers' pipelines start it (the last int(steps * strength) steps)."""
    model = make_model(dict(scheduler.config))
    float64_table(scheduler)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    scheduler.set_timesteps(steps)
    eps = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    sigmas = scheduler.sigmas
    noise = BrownianTreeNoiseSampler(eps, sigmas[sigmas > 0].min().item(), sigmas.max().item(), seed=list(seeds))
    first = steps - int(steps * strength)
    timesteps = scheduler.timesteps[first:]
    scheduler.set_begin_index(first)
    x = eps * scheduler.init_noise_sigma if init is None else scheduler.add_noise(init, eps, timesteps[:1])
    with torch.no_grad():
        for i, t in enumerate(timesteps, start=first):
            out = model(scheduler.scale_model_input(x, t), t)
            z = noise(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else torch.zeros_like(x)
            x = scheduler.step(out, t, x, variance_noise=z).prev_sample
    return x


# -- against diffusers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,spacing,pred", CASES)
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_matches_diffusers(kind, spacing, pred, karras):
    """DPM++ SDE against DPMSolverSDEScheduler with the images' seeds as its noise_sampler_seed (a list: one tree per
    image, as A1111 seeds them), Karras levels on and off, at 5 and 12 steps."""
    if karras and kind == "squaredcos_cap_v2":
        pytest.skip("diffusers truncates fractional Karras timesteps to int64 for squaredcos_cap_v2; ours stay exact")
    cfg = config(kind, spacing, pred)
    for steps in (5, 12):
        theirs = run_diffusers(DPMSolverSDEScheduler(**cfg, use_karras_sigmas=karras, noise_sampler_seed=list(SEEDS)),
                               steps=steps)
        check(run_ours(cfg, "dpmpp_sde", karras=karras, steps=steps), theirs)


@pytest.mark.parametrize("kind,spacing,pred", CASES)
@pytest.mark.parametrize("sampler,extra", [("dpmpp_2m_sde", {"solver_order": 2}),
                                           ("dpmpp_2m_sde_heun", {"solver_order": 2, "solver_type": "heun"}),
                                           ("dpmpp_3m_sde", {"solver_order": 3})])
def test_multistep_sde_with_brownian_noise_matches_diffusers(kind, spacing, pred, sampler, extra):
    """DPM++ 2M SDE (midpoint, Heun) and 3M SDE with their default Brownian noise against diffusers' sde-dpmsolver++
    step fed k-diffusion's increments (3M: its one mis-signed constant corrected, see test_samplers_parity), and Karras
    levels at 13 steps; and with sde_noise "independent" they differ."""
    cfg = config(kind, spacing, pred)
    cls = _SDE3MCorrected if sampler == "dpmpp_3m_sde" else DPMSolverMultistepScheduler
    for steps, karras in ((STEPS, False), (13, True)):
        if karras and kind == "squaredcos_cap_v2":
            continue
        theirs = run_diffusers_brownian(cls(**cfg, algorithm_type="sde-dpmsolver++", use_karras_sigmas=karras,
                                            **extra), steps=steps)
        ours = run_ours(cfg, sampler, steps=steps, karras=karras)
        check(ours, theirs)
    other = run_ours(cfg, sampler, steps=steps, karras=karras, sampler_options={"sde_noise": "independent"})
    assert float((other - ours).abs().max()) > 0.1


def test_image_to_image_paths_span_the_whole_plan():
    """In an image-to-image run the paths span the levels of all the steps asked for (A1111 and diffusers make the
    tree over the full schedule, then run its tail): against diffusers' pipeline start, at strength 0.6."""
    cfg = config("scaled_linear", "leading", "epsilon")
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.5
    steps, strength = 10, 0.6
    theirs = run_diffusers_brownian(DPMSolverMultistepScheduler(**cfg, algorithm_type="sde-dpmsolver++"), steps=steps,
                                    init=init, strength=strength)
    ours = run_ours(cfg, "dpmpp_2m_sde", steps=steps, init=init, strength=strength)
    check(ours, theirs)


# -- the paths themselves ------------------------------------------------------------------------------------------
def test_increments_add_up_and_are_standard_normal():
    paths = BrownianTreeNoise([5, 6], (4, 32, 32), 0.03, 14.6)
    levels = [14.6, 9.0, 3.3, 1.0, 0.2, 0.03]

    def w(a, b):  # W(b) - W(a)
        return paths(a, b) * math.sqrt(abs(b - a))

    # W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)), and the increment back is the negative
    torch.testing.assert_close(w(14.6, 0.03), sum(w(a, b) for a, b in zip(levels, levels[1:])), atol=2e-5, rtol=0)
    torch.testing.assert_close(paths(1.0, 3.3), -paths(3.3, 1.0))
    # the same query gives the same draw, in any order of queries
    first = paths(3.3, 1.0)
    paths(0.2, 0.03)
    assert torch.equal(paths(3.3, 1.0), first)
    # increments over disjoint intervals: independent standard normals (8192 per interval and sample)
    zs = torch.stack([paths(a, b) for a, b in zip(levels, levels[1:])])  # [5, 2, 4, 32, 32]
    flat = zs.flatten(1)
    assert flat.mean(1).abs().max() < 0.05 and (flat.var(1) - 1).abs().max() < 0.05
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(len(flat))).abs().max() < 0.05
    # overlapping intervals correlate as Brownian motion does: corr = sqrt(overlap^2 / (len_1 len_2))
    a, b = paths(3.3, 1.0).flatten(), paths(3.3, 0.2).flatten()
    want = math.sqrt((3.3 - 1.0) / (3.3 - 0.2))
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1]) - want) < 0.03
    # one tree per seed: a sample's path does not depend on the batch it is in
    torch.testing.assert_close(BrownianTreeNoise([6], (4, 32, 32), 0.03, 14.6)(3.3, 1.0)[0], first[1])


def test_more_steps_converge_on_one_path():
    """The point of the paths: the same seed's image converges as the steps grow (it is the solution of the SDE for
    that path), where independent draws give a new image at every step count. (Karras levels and trailing spacing
    keep the levels' range, hence the path, fixed as the steps change.)"""
    cfg = config("scaled_linear", "trailing", "epsilon")

    fine_runs = {}

    def distance(sampler, noise, n):
        kw = dict(karras=True, sampler_options={"sde_noise": noise})
        if (sampler, noise) not in fine_runs:  # (the 160-step run, once per sampler and noise)
            fine_runs[sampler, noise] = run_ours(cfg, sampler, steps=160, **kw)
        return float((run_ours(cfg, sampler, steps=n, **kw) - fine_runs[sampler, noise]).pow(2).mean().sqrt())

    # (seen: 20 steps 0.25-0.40 from the 160-step image, 80 steps 0.048-0.105; independent draws at 80 steps 1.62)
    for sampler in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        coarse, fine = distance(sampler, "brownian", 20), distance(sampler, "brownian", 80)
        assert fine < 0.15 and fine < coarse / 2, (sampler, coarse, fine)
        if sampler != "dpmpp_sde":  # (its substeps need the paths: no independent draws)
            assert distance(sampler, "independent", 80) > 1.0, sampler


# -- seeds, options and errors -------------------------------------------------------------------------------------
def test_trees_are_seeded_with_the_image_seeds():
    """A1111 seeds image k's tree with its seed; noise_seeds overrides them; without seeds the tree seeds come from
    the generators (reproducibly)."""
    cfg = config("scaled_linear", "leading", "epsilon")
    schedule, model = NoiseSchedule.from_diffusers_config(cfg), make_model(cfg)
    run = dict(schedule=schedule, sampler="dpmpp_sde", steps=STEPS, progress=False)
    base = sample(model, SHAPE, seeds=[7, 8], **run)
    assert torch.equal(sample(model, SHAPE, generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
                              noise_seeds=[7, 8], **run), base)
    other = sample(model, SHAPE, seeds=[7, 8], noise_seeds=[7, 9], **run)
    assert torch.equal(other[0], base[0]) and not torch.allclose(other[1], base[1], atol=1e-3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    assert torch.equal(sample(model, SHAPE, generator=gens(), **run), sample(model, SHAPE, generator=gens(), **run))
    assert tree_seeds(3, 10) == [10, 11, 12]
    with pytest.raises(ValueError, match="2 tree seeds for a batch of 3"):
        tree_seeds(3, [1, 2])
    with pytest.raises(TypeError, match="tree seeds must be ints"):
        sample(model, SHAPE, seeds=[7, 8], noise_seeds=[7, "x"], **run)


def test_eta_0_and_options():
    cfg = config("scaled_linear", "leading", "epsilon")
    # eta = 0: DPM-Solver++(2S) with r = 1/2, which DPM++ 2S a at eta 0 also is
    assert torch.equal(run_ours(cfg, "dpmpp_sde", eta=0.0), run_ours(cfg, "dpmpp_2s_a", eta=0.0))
    # r moves the midpoint; r = 1/2 is the default
    assert torch.equal(run_ours(cfg, "dpmpp_sde", sampler_options={"r": 0.5}), run_ours(cfg, "dpmpp_sde"))
    assert not torch.allclose(run_ours(cfg, "dpmpp_sde", sampler_options={"r": 0.3}), run_ours(cfg, "dpmpp_sde"))
    for bad in (0, 1.5, -1, True):
        with pytest.raises(ValueError, match=r"r \(the midpoint's place in log sigma\) must be in \(0, 1\]"):
            run_ours(cfg, "dpmpp_sde", sampler_options={"r": bad})
    for sampler in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        with pytest.raises(ValueError, match="sde_noise must be one of 'brownian', 'independent'; got 'pink'"):
            run_ours(cfg, sampler, sampler_options={"sde_noise": "pink"})
    with pytest.raises(ValueError, match="takes no option 'sde_noise'"):
        run_ours(cfg, "euler_a", sampler_options={"sde_noise": "brownian"})
    with pytest.raises(ValueError, match="dpmpp_sde's two substeps read one Brownian path"):
        run_ours(cfg, "dpmpp_sde", sampler_options={"sde_noise": "independent"})
    # SD's leading spacing at 1000 steps repeats levels: a clear error, not a division by zero
    for sampler in ("dpmpp_2m_sde", "dpmpp_2m", "dpmpp_3m_sde"):
        with pytest.raises(ValueError, match=f"{sampler}: noise level .* repeats at steps"):
            run_ours(cfg, sampler, steps=1000)
    # the seeds are checked as seeds (before any tree is seeded), for every sampler
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        run_ours(cfg, "euler", seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="levels .* fall outside the Brownian tree's range"):
        BrownianTreeNoise([1], (2,), 0.03, 4096.0)(0.05, 0.0299)
    with pytest.raises(ValueError, match="outside the Brownian tree's range"):
        BrownianTreeNoise([1], (2,), 0.1, 10.0)(20.0, 5.0)
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        BrownianTreeNoise([1], (2,), 1.0, 1.0)
    # one step to sigma = 0 adds no noise and needs no tree
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(run_ours(cfg, "dpmpp_2m_sde", steps=1)).all()


# -- a whole generation ---------------------------------------------------------------------------------------------
def test_generation_with_dpmpp_sde_karras_matches_diffusers(tmp_path):
    """"DPM++ SDE Karras" through the pipeline (guidance, 20 steps, the tiny SD 1.x-shaped model) against diffusers'
    StableDiffusionPipeline with DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=the seed): >= 50 dB,
    the bar of test_sd_parity.py; DPM++ 2M SDE Karras on the same seed stays well under it."""
    from test_loading import SD_SCHEDULE, save_diffusers_folder
    from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE, _our_image, psnr

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    ref.scheduler = DPMSolverSDEScheduler(**SD_SCHEDULE, use_karras_sigmas=True, noise_sampler_seed=SEED)
    with torch.no_grad():
        want = ref(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=20,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
    assert want.std() > 0.02
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert psnr(_our_image(ours, "DPM++ SDE Karras"), want) >= 50
    assert psnr(_our_image(ours, "DPM++ 2M SDE Karras"), want) < 40
