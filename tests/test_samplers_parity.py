"""Our samplers against diffusers' schedulers on the same model, seeds and settings, and (at the end) against
exact Gaussian-mixture denoisers.

The model is a small fixed random conv net of (x, t) whose output moves by ~1e-3 when t moves by 1
(its x_0 guess, expressed in the prediction type under test), so a wrong timestep fails the 1e-4 bound as surely as a wrong coefficient. diffusers' loop is
driven by hand (set_timesteps, init_noise_sigma, scale_model_input, step with per-sample generators),
as its pipelines do.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from imagine.sampling import sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

TOL = 1e-4
# diffusers' multistep SDE schedulers draw each step's noise fresh from the generators; ours draw it from Brownian
# paths unless told (A1111's way, compared with diffusers' Brownian tree in test_brownian.py)
PER_STEP = {s: {"sampler_options": {"sde_noise": "independent"}} for s in ("dpmpp_2m_sde", "dpmpp_3m_sde")}
SHAPE = (2, 2, 6, 6)
SEEDS = [11, 12]
STEPS = 5  # divides T, where diffusers' DDIM steps to the next listed timestep (see test_ddim_as_ddpm)


class TinyNet(torch.nn.Module):
    """A fixed random conv net of (x, t) giving a bounded guess of x_0: g = tanh(conv(tanh(conv(x) + emb(t))))."""

    def __init__(self, channels: int = 2, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("freqs", torch.linspace(0.002, 0.03, hidden))
        self.register_buffer("phase", torch.rand(hidden, generator=g) * 6.28)

    def forward(self, x, t):
        emb = torch.sin(t[:, None] * self.freqs + self.phase)[:, :, None, None]
        return torch.tanh(self.conv2(torch.tanh(self.conv1(x) + emb)))


NET = TinyNet().eval()


def make_model(cfg):
    """A denoiser-like model: x_0 guess g = sqrt(abar) x + sqrt(1 - abar) h(x, t) with h the net (so g ~ x_t at
    low noise and eps, v stay O(1), as for a trained model), expressed as the config's prediction type with
    abar(t) of its schedule (linear interpolation at fractional t)."""
    abar_table = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod
    pred = cfg["prediction_type"]

    def model(x, t, **cond):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        abar = torch.from_numpy(np.interp(t.double().numpy(), np.arange(len(abar_table)), abar_table.numpy()))
        a = abar.sqrt().float().view(-1, 1, 1, 1)
        s = (1 - abar).sqrt().float().view(-1, 1, 1, 1)
        g = a * x + s * NET(x, t)
        if pred == "sample":
            return g
        eps = (x - a * g) / s
        return eps if pred == "epsilon" else a * eps - s * g

    return model


BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def config(kind, spacing, prediction_type, zero_snr=False, **extra):
    b0, b1 = BETAS[kind]
    c = dict(num_train_timesteps=1000, beta_schedule=kind, beta_start=b0, beta_end=b1, prediction_type=prediction_type,
             timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    if zero_snr:
        c["rescale_betas_zero_snr"] = True
    return {**c, **extra}


def run_diffusers(scheduler, steps=STEPS, seeds=SEEDS, stop=None, after_set_timesteps=None, **step_kwargs):
    """Drive `scheduler` by hand over `steps` steps (or only the first `stop` of them)."""
    model = make_model(dict(scheduler.config))
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        float64_table(scheduler)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    scheduler.set_timesteps(steps)
    if after_set_timesteps is not None:
        after_set_timesteps(scheduler)
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]) * scheduler.init_noise_sigma
    stochastic = not isinstance(scheduler, (HeunDiscreteScheduler, UniPCMultistepScheduler)) and isinstance(scheduler, (DDPMScheduler, DDIMScheduler, EulerAncestralDiscreteScheduler,
                                        DPMSolverMultistepScheduler, EulerDiscreteScheduler))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps[:stop]:
            out = model(scheduler.scale_model_input(x, t), t)
            kw = dict(step_kwargs, generator=gens) if stochastic else dict(step_kwargs)
            x = scheduler.step(out, t, x, **kw).prev_sample
    return x


def run_ours(cfg, sampler, steps=STEPS, seeds=SEEDS, **kw):
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    return sample(make_model(cfg), SHAPE, schedule=schedule, sampler=sampler, steps=steps, seeds=list(seeds), progress=False,
                  **kw)


def float64_table(scheduler):
    """Give a sigma-based diffusers scheduler our float64 alphas_cumprod (compared with its own float32 table
    in test_schedules). Its float32 table is off by up to ~1e-4 relative where 1 - abar cancels (t ~ 0) and at
    abar_T of the cosine schedule, which moves Karras timesteps by up to 0.06 and sigma_max by 1e-4: the
    algorithm, not the table's rounding, is what this file tests. set_timesteps recomputes from the table."""
    cfg = dict(scheduler.config)
    scheduler.alphas_cumprod = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.clone()
    if cfg.get("rescale_betas_zero_snr"):
        scheduler.alphas_cumprod[-1] = 2.0**-24  # as diffusers floors abar_T = 0
    return scheduler


def check(ours, theirs, tol=TOL):
    assert torch.isfinite(ours).all()
    assert 0.2 < float(theirs.std()) < 5, f"degenerate test output (std {float(theirs.std()):.3g})"
    err = float((ours - theirs).abs().max())
    assert err < tol, f"max abs diff {err:.3g} (bound {tol:.3g})"


def float32_budget(cfg, sampler, steps=STEPS, **kw):
    """diffusers' Euler-family schedulers keep the VE sample x / alpha in float32; where sigma_max is large
    (cosine: 20291 at t = 999, zero SNR: 4096) its ulp is 1e-3..2e-3 and x_VE - sigma eps cancels to O(1),
    so diffusers' own result carries errors of a few ulps (ours steps in float64). The bound there is
    8 float32 ulps at sigma_max; the 1e-4 check is against our VP twin instead (see check_karras)."""
    plan = NoiseSchedule.from_diffusers_config(cfg).plan(steps, rule="karras", karras=kw.get("karras", False))
    return max(TOL, 8 * float(plan.sigmas[0]) * 2.0**-23)


def check_karras(cfg, sampler, theirs, steps=STEPS, **kw):
    """Euler / Euler a / Heun against diffusers; where float32 cannot reach 1e-4 (float32_budget), also
    Euler against DDIM (eta 0) and Euler a against DDPM: the same maths on the same plan when the spacing
    visits integer timesteps, computed in VP, where float32 is well conditioned."""
    ours = run_ours(cfg, sampler, steps=steps, **kw)
    tol = float32_budget(cfg, sampler, steps, **kw)
    check(ours, theirs, tol)
    twin = {"euler": ("ddim", {"eta": 0.0}), "euler_a": ("ddpm", {})}.get(sampler)
    # (not at zero SNR: there DDIM/DDPM keep abar_T = 0 while the sigma plans floor it at 2^-24)
    if tol > TOL and twin and not kw.get("karras") and not kw.get("sigma_schedule") \
            and cfg["timestep_spacing"] == "trailing" \
            and not cfg.get("rescale_betas_zero_snr"):
        check(ours, run_ours(cfg, twin[0], steps=steps, **twin[1]))
    return tol


SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]
GRID = list(itertools.product(SCHEDULES, SPACINGS, PREDICTIONS))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
def test_ddpm(kind, spacing, pred):
    cfg = config(kind, spacing, pred)
    check(run_ours(cfg, "ddpm"), run_diffusers(DDPMScheduler(**cfg, clip_sample=False)))


@pytest.mark.parametrize("kind,spacing", [(k, s) for k in SCHEDULES for s in ("leading", "linspace")])
def test_ddpm_fixed_large(kind, spacing):
    # offset 0: the run ends at t = 0, where Ho et al. add no noise; diffusers adds beta_t noise when its last
    # timestep is > 0 (leading with offset 1, trailing), which we do not copy
    cfg = config(kind, spacing, "epsilon", steps_offset=0, variance_type="fixed_large")
    check(run_ours(cfg, "ddpm"), run_diffusers(DDPMScheduler(**cfg, clip_sample=False)))


@pytest.mark.parametrize("kind,spacing,pred", [g for g in GRID if g[1] != "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim(kind, spacing, pred, eta):
    cfg = config(kind, spacing, pred)
    check(run_ours(cfg, "ddim", eta=eta), run_diffusers(DDIMScheduler(**cfg, clip_sample=False), eta=eta))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
def test_ddim_as_ddpm(kind, spacing, pred):
    """DDIM with eta = 1 is DDPM with the posterior variance (Song et al. 2021, sec. 4.1). diffusers' DDPMScheduler
    steps to the next listed timestep for every spacing; its DDIMScheduler steps to t - T//N, which is another
    level for linspace (and trailing with N not dividing T), so this is how linspace DDIM is checked."""
    cfg = config(kind, spacing, pred)
    for steps in (STEPS, 7):
        check(run_ours(cfg, "ddim", eta=1.0, steps=steps),
              run_diffusers(DDPMScheduler(**cfg, clip_sample=False), steps=steps))


def test_ddim_stable_diffusion_config():
    # SD 1.x: set_alpha_to_one False (the run ends at abar_0), steps_offset 1, leading
    cfg = config("scaled_linear", "leading", "epsilon", set_alpha_to_one=False)
    for eta in (0.0, 0.5):
        check(run_ours(cfg, "ddim", eta=eta, steps=10),
              run_diffusers(DDIMScheduler(**cfg, clip_sample=False), steps=10, eta=eta))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_heun(kind, spacing, pred, karras, sampler):
    cfg = config(kind, spacing, pred)
    cls = EulerDiscreteScheduler if sampler == "euler" else HeunDiscreteScheduler
    steps = STEPS
    if sampler == "heun" and kind == "squaredcos_cap_v2" and spacing != "leading":
        if not karras:
            pytest.skip("from cosine's sigma_max = 20291, Heun's corrector multiplies the slope at sigma_1 ~ 3 by "
                        "sigma_1 - sigma_max ~ -2e4: the run diverges (output std ~600 in diffusers and ours) and "
                        "diffusers' float32 rounding of that slope (~1e-3) becomes O(1)")
        steps = 10  # at 5 Karras steps the output std is ~20 (still a coarse jump); 10 gives std ~3
    check_karras(cfg, sampler, run_diffusers(cls(**cfg, use_karras_sigmas=karras), steps=steps), steps=steps,
                 karras=karras)


@pytest.mark.parametrize("kind,spacing,pred", GRID)
def test_euler_ancestral(kind, spacing, pred):
    cfg = config(kind, spacing, pred)
    check_karras(cfg, "euler_a", run_diffusers(EulerAncestralDiscreteScheduler(**cfg)))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpm_solver(kind, spacing, pred, karras, sampler):
    if karras and kind == "squaredcos_cap_v2":
        pytest.skip("diffusers truncates fractional Karras timesteps to int64 for squaredcos_cap_v2; ours stay exact")
    cfg = config(kind, spacing, pred)
    algorithm = "dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++"
    sched = DPMSolverMultistepScheduler(**cfg, algorithm_type=algorithm, solver_order=2, use_karras_sigmas=karras)
    check(run_ours(cfg, sampler, karras=karras, **PER_STEP.get(sampler, {})), run_diffusers(sched))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [5, 13, 20])
def test_dpmpp_3m(kind, spacing, pred, karras, steps):
    if karras and kind == "squaredcos_cap_v2":
        pytest.skip("diffusers truncates fractional Karras timesteps to int64 for squaredcos_cap_v2; ours stay exact")
    cfg = config(kind, spacing, pred)
    sched = DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=karras)
    # 5 and 13 steps: 2nd order on the step before the last (lower_order_final under 15 steps); 20: 3rd order
    check(run_ours(cfg, "dpmpp_3m", karras=karras, steps=steps), run_diffusers(sched, steps=steps))


@pytest.mark.parametrize("kind,spacing,pred", GRID)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("order,variant", [(2, "bh2"), (3, "bh2"), (2, "bh1"), (3, "bh1")])
def test_unipc(kind, spacing, pred, karras, order, variant):
    if karras and kind == "squaredcos_cap_v2":
        pytest.skip("diffusers truncates fractional Karras timesteps to int64 for squaredcos_cap_v2; ours stay exact")
    cfg = config(kind, spacing, pred)
    sched = UniPCMultistepScheduler(**cfg, solver_order=order, solver_type=variant, use_karras_sigmas=karras)
    options = {"order": order, "variant": variant}
    if variant == "bh2":
        check(run_ours(cfg, "unipc", karras=karras, steps=8, sampler_options=options), run_diffusers(sched, steps=8))
        return
    # bh1's B(h) = -h is infinite on the step to sigma = 0, where diffusers computes inf * 0 = NaN; compare the
    # sample at the last level before it (after 7 predictor and 6 corrector steps): ours' callback sees it there
    seen = []
    run_ours(cfg, "unipc", karras=karras, steps=8, sampler_options=options, callback=lambda info: seen.append(info["x"]))
    check(seen[-1], run_diffusers(sched, steps=8, stop=7))


@pytest.mark.parametrize("kind,spacing,pred", [g for g in GRID if g[0] != "squaredcos_cap_v2"])
@pytest.mark.parametrize("sampler,cls,extra", [
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}), ("dpmpp_3m", DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("unipc", UniPCMultistepScheduler, {}), ("euler", EulerDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, {})])
@pytest.mark.parametrize("levels", ["exponential", "beta"])
def test_exponential_sigmas(kind, spacing, pred, sampler, cls, extra, levels):
    """sigma_schedule="exponential" / "beta" against diffusers' use_exponential_sigmas / use_beta_sigmas (Lee et al.
    2024's Beta(0.6, 0.6) levels). The multistep schedulers cast those fractional timesteps to int64 (truncation)
    where their Karras branch rounds; ours round for both, so there diffusers is handed our rounded timesteps (its
    sigmas, which the maths uses, are its own)."""
    if levels == "beta" and sampler == "heun" and kind == "linear" and spacing != "leading":
        pytest.skip("from sigma_max = 157, 8 Beta(0.6, 0.6) levels make Heun's corrector overshoot: both sides give "
                    "output std 5.6-7.5 (they agree to 1e-4), past this harness's bound for a sane output")
    cfg = config(kind, spacing, pred)
    sched = cls(**cfg, **extra, **{f"use_{levels}_sigmas": True})
    ours = run_ours(cfg, sampler, steps=8, sigma_schedule=levels)
    patch = None
    if sampler in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        plan = NoiseSchedule.from_diffusers_config(cfg).plan(8, rule="dpm_solver", sigma_schedule=levels)

        def patch(sch):
            assert np.allclose(sch.sigmas[:-1].numpy(), plan.sigmas[:-1].numpy(), rtol=1e-5)
            assert (sch.timesteps - plan.timesteps.to(torch.int64)).abs().max() <= 1
            sch.timesteps = plan.timesteps.to(torch.int64)
    theirs = run_diffusers(sched, steps=8, after_set_timesteps=patch)
    if sampler in ("euler", "heun"):
        check_karras(cfg, sampler, theirs, steps=8, sigma_schedule=levels)
    else:
        check(ours, theirs)


def test_sigma_schedules_closed_form():
    from imagine.schedules import spaced_sigmas

    # exponential: evenly spaced in log sigma; polyexponential with rho = 1 is the same; karras is eq. 5
    e = spaced_sigmas("exponential", 0.03, 14.6, 6)
    assert np.allclose(np.diff(np.log(e)), np.log(0.03 / 14.6) / 5)
    assert np.allclose(spaced_sigmas("polyexponential", 0.03, 14.6, 6, 1.0), e)
    p2 = spaced_sigmas("polyexponential", 0.03, 14.6, 6, 2.0)
    assert np.allclose(np.log(p2 / 0.03), (np.linspace(1, 0, 6) ** 2) * np.log(14.6 / 0.03))
    k = spaced_sigmas("karras", 0.03, 14.6, 6)
    assert np.allclose(np.diff(k ** (1 / 7)), (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 5)
    with pytest.raises(ValueError, match="sigma schedule must be one of"):
        spaced_sigmas("cosine", 0.03, 14.6, 6)
    # beta: from sigma_max to sigma_min, and symmetric (Beta(0.6, 0.6) is): level i and level n-1-i sum to the ends'
    # sum; crowded at both ends (its density is U-shaped)
    b = spaced_sigmas("beta", 0.03, 14.6, 9)
    assert np.isclose(b[0], 14.6) and np.isclose(b[-1], 0.03)
    assert np.allclose(b + b[::-1], 14.63) and np.all(np.diff(b) < 0)
    gaps = -np.diff(b)
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]
    with pytest.raises(ValueError, match="beta takes none"):
        spaced_sigmas("beta", 0.03, 14.6, 9, rho=2.0)
    # kl_optimal: even steps in arctan sigma between the ends (Sabour et al. 2024)
    kl = spaced_sigmas("kl_optimal", 0.03, 14.6, 7)
    assert np.isclose(kl[0], 14.6) and np.isclose(kl[-1], 0.03)
    assert np.allclose(np.diff(np.arctan(kl)), (np.arctan(0.03) - np.arctan(14.6)) / 6)
    with pytest.raises(ValueError, match="kl_optimal takes none"):
        spaced_sigmas("kl_optimal", 0.03, 14.6, 7, rho=2.0)
    # exponential with rho is the polyexponential (as before k-diffusion's float32 form of exponential came in)
    assert np.allclose(spaced_sigmas("exponential", 0.03, 14.6, 6, 2.0), p2)
    cfg = config("scaled_linear", "leading", "epsilon")
    with pytest.raises(ValueError, match="contradict"):
        run_ours(cfg, "DPM++ 2M Karras", sigma_schedule="exponential")


@pytest.mark.parametrize("sampler,cls,kwargs", [
    ("ddpm", DDPMScheduler, {}), ("ddim", DDIMScheduler, {"eta": 0.0}), ("euler", EulerDiscreteScheduler, {}),
    ("euler_a", EulerAncestralDiscreteScheduler, {}), ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {})])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_zero_terminal_snr(sampler, cls, kwargs, spacing):
    if sampler == "ddim" and spacing == "linspace":
        pytest.skip("diffusers' DDIM linspace steps to t - T//N (see test_ddim_as_ddpm)")
    cfg = config("scaled_linear", spacing, "v_prediction", zero_snr=True)
    extra = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmpp_2m_sde" else {}
    if cls in (DDPMScheduler, DDIMScheduler):
        extra["clip_sample"] = False
    theirs = run_diffusers(cls(**cfg, **extra), **kwargs)
    if sampler in ("euler", "euler_a"):
        check_karras(cfg, sampler, theirs)
    else:
        check(run_ours(cfg, sampler, **kwargs, **PER_STEP.get(sampler, {})), theirs)


@pytest.mark.parametrize("steps", [1, 2, 3, 13])
@pytest.mark.parametrize("sampler,cls", [("ddpm", DDPMScheduler), ("euler", EulerDiscreteScheduler),
                                         ("euler_a", EulerAncestralDiscreteScheduler), ("heun", HeunDiscreteScheduler),
                                         ("dpmpp_2m", DPMSolverMultistepScheduler)])
def test_step_counts(sampler, cls, steps):
    cfg = config("scaled_linear", "trailing", "epsilon")  # trailing starts at t = 999 for any count
    extra = {"clip_sample": False} if cls is DDPMScheduler else {}
    check(run_ours(cfg, sampler, steps=steps), run_diffusers(cls(**cfg, **extra), steps=steps))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "heun", "dpmpp_sde",
                                     "dpmpp_2m_sde_heun"])
def test_same_seed_same_sample_at_any_batch_size(sampler):
    cfg = config("scaled_linear", "leading", "epsilon")
    eta = 0.5 if sampler == "ddim" else None
    both = run_ours(cfg, sampler, seeds=[7, 8], eta=eta)
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    model = make_model(cfg)
    alone = sample(model, (1, *SHAPE[1:]), schedule=schedule, sampler=sampler, steps=STEPS, seeds=8, eta=eta,
                   progress=False)
    # (up to the float rounding of a batch-2 vs batch-1 convolution)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)
    # an int seed s with batch B means s, s+1, ...
    as_int = sample(model, SHAPE, schedule=schedule, sampler=sampler, steps=STEPS, seeds=7, eta=eta, progress=False)
    assert torch.equal(as_int, both)
    # and the start noise for seed s is torch.randn((1, *shape), generator=manual_seed(s)) at batch 1
    z = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(8))
    seen = []
    sample(lambda x, t: (seen.append(x.clone()), model(x, t))[1], (1, *SHAPE[1:]), schedule=schedule,
           sampler="ddim", steps=STEPS, seeds=8, progress=False)
    assert torch.equal(seen[0], z)


@pytest.mark.parametrize("sde,ode_twin", [("dpmpp_2m_sde", "dpmpp_2m"), ("dpmpp_3m_sde", "dpmpp_3m")])
def test_sde_noise_band(sde, ode_twin):
    """The SDE samplers' s_tmin/s_tmax (Karras et al. 2022, Alg. 2: noise only for sigma in the band): a band above
    every level is the ODE sampler exactly; the full band is the plain SDE sampler; a band in between differs
    from both."""
    cfg = config("scaled_linear", "leading", "epsilon")
    ode = run_ours(cfg, ode_twin, steps=8)
    full = run_ours(cfg, sde, steps=8)
    assert torch.equal(run_ours(cfg, sde, steps=8, sampler_options={"s_tmin": 1e9}), ode)
    assert torch.equal(run_ours(cfg, sde, steps=8, sampler_options={"s_tmin": 0.0, "s_tmax": 1e9}), full)
    mid = run_ours(cfg, sde, steps=8, sampler_options={"s_tmin": 1.0})
    assert not torch.allclose(mid, ode, atol=1e-3) and not torch.allclose(mid, full, atol=1e-3)
    with pytest.raises(ValueError, match="s_tmin <= s_tmax"):
        run_ours(cfg, sde, steps=8, sampler_options={"s_tmin": 2.0, "s_tmax": 1.0})


def test_sampler_aliases_match():
    cfg = config("scaled_linear", "leading", "epsilon")
    base = run_ours(cfg, "dpmpp_2m", karras=True)
    assert torch.equal(run_ours(cfg, "DPM++ 2M Karras"), base)
    assert torch.equal(run_ours(cfg, "Euler a"), run_ours(cfg, "euler_a"))
    assert torch.equal(run_ours(cfg, "k_euler"), run_ours(cfg, "euler"))


# -- against the truth: exact denoisers of Gaussian mixtures (imagine.bench.samplers) ------------------------
def test_exact_model_ddim_reaches_the_noise_floor_on_the_ring():
    """On the 8-mode ring with its exact epsilon-model, DDIM at 50 steps lands near the noise floor of true samples;
    the bound is loose, yet a wrong sampler (here: the model's output read as the wrong type, or eps off by 5%)
    fails it."""
    from imagine.bench.samplers import ExactModel, Scorer, ring2d

    schedule = NoiseSchedule.from_config("scaled_linear")
    ring = ring2d()
    n = 4000
    scorer = Scorer(ring, n, seed=0, floor_sets=8, entropy_samples=50_000)
    model = ExactModel(ring, schedule)

    def score(m, **kw):
        x = sample(m, (n, 2), schedule=schedule, sampler="ddim", steps=50, generator=torch.Generator().manual_seed(1),
                   progress=False, **kw)
        return scorer.score(x)

    def within(r):
        # swd within 30% of the floor; |gap| < 0.2 nats (the Euler-type last step alone costs ~0.1, see
        # docs/samplers.md)
        return r["swd"] < 1.3 * scorer.floor["swd"] and abs(r["gap"]) < 0.2

    assert within(score(model)), (score(model), scorer.floor)
    assert not within(score(model, prediction_type="v_prediction"))
    assert not within(score(lambda x, t: model(x, t) * 1.05))


def test_scorer_sliced_w1_closed_form():
    """The swd is W1 to the exact projected law: for one Gaussian, samples shifted by delta along a unit vector u
    score E|d . u| delta over random directions d (2/pi for d uniform on the circle in 2-D), plus the floor."""
    from imagine.bench.samplers import GaussianMixture, Scorer

    g = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                        torch.ones(1, 2, dtype=torch.float64), (2,), "gauss")
    scorer = Scorer(g, 50_000, seed=0, directions=256, entropy_samples=50_000)
    x = g.sample(50_000, torch.Generator().manual_seed(3))
    shifted = scorer.score(x + torch.tensor([0.3, 0.0], dtype=torch.float64))["swd"]
    expect = float((scorer.directions[0]).abs().mean()) * 0.3
    assert abs(expect - 0.3 * 2 / math.pi) < 0.02
    assert abs(shifted - expect) < 3 * scorer.floor["swd"], (shifted, expect, scorer.floor)
    assert scorer.floor["swd"] < 0.01


def test_ddim_inversion_reconstructs():
    """x_0 -> DDIM inversion -> DDIM sampling -> x_0 with the exact model, 50 steps. Measured rms error ~0.04 on
    the ring and the 3x8x8 mixture (data std 0.71, 0.30); at 10 steps ~0.05-0.08 (docs/samplers.md)."""
    from imagine.bench.samplers import ExactModel, image3x8x8, ring2d
    from imagine.sampling import invert

    schedule = NoiseSchedule.from_config("scaled_linear")
    for mixture, n in ((ring2d(), 400), (image3x8x8(), 100)):
        model = ExactModel(mixture, schedule)
        x0 = mixture.sample(n, torch.Generator().manual_seed(5)).float()
        x_T = invert(model, x0, schedule=schedule, steps=50, progress=False)
        assert 0.6 < float(x_T.std()) < 1.2  # noise-like
        back = sample(model, x_T, schedule=schedule, sampler="ddim", steps=50, progress=False)
        rms = float((back - x0).pow(2).mean().sqrt())
        assert rms < 0.06, (mixture.name, rms)
        # while sampling from fresh noise lands nowhere near the originals
        other = sample(model, x0.shape, schedule=schedule, sampler="ddim", steps=50, seeds=0, progress=False)
        assert float((other - x0).pow(2).mean().sqrt()) > 5 * rms


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_inversion_is_diffusers_inverse_scheduler(prediction_type):
    """invert() against diffusers' DDIMInverseScheduler on the same model and schedule, for each prediction type: the
    model's output at t_i on the less noisy sample, a v or an x_0 read at that sample's level (before session 28 a v
    or x_0 was read at t_i's: 0.89 and 120 away)."""
    from diffusers import DDIMInverseScheduler

    from imagine.sampling import invert

    cfg = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
           "timestep_spacing": "leading", "clip_sample": False, "prediction_type": prediction_type}
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def model(x, t, **cond):
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.reshape(-1, 1, 1, 1) if t.ndim else t
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x.double()) + t / 1000.0).to(x.dtype)

    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    inverse = DDIMInverseScheduler.from_config(cfg)
    inverse.set_timesteps(10)
    want = x0.clone()
    for t in inverse.timesteps:
        want = inverse.step(model(want, t), t, want).prev_sample
    got = invert(model, x0.clone(), schedule=NoiseSchedule.from_diffusers_config(cfg), prediction_type=prediction_type,
                 steps=10, progress=False)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_bench_samplers_runs_both_sides_and_reports_the_goal(tmp_path):
    """`imagine bench samplers` end to end on a small ring run: both sides, equal numbers for the shared
    algorithm, the goal line, JSON and the markdown tables."""
    import json

    from imagine.bench.samplers import main

    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(["--problems", "ring2d", "--steps", "10", "20", "--samples", "2000", "--only", "ours: ddim",
                 "diffusers: DDIMScheduler", "--json", str(js), "--markdown", str(md)]) == 0
    res = json.loads(js.read_text())["problems"]["ring2d"]
    ours, theirs = res["results"]["ours: ddim"], res["results"]["diffusers: DDIMScheduler"]
    for steps in ("10", "20"):
        assert abs(ours[steps]["swd"] - theirs[steps]["swd"]) < 1e-4
        assert ours[steps]["swd"] > res["floor"]["swd"]  # 10 and 20 DDIM steps are visibly off the ring
    assert ours["20"]["swd"] < ours["10"]["swd"]
    assert res["goal"]["ours"] == "ours: ddim" and res["goal"]["met"] is False  # DDIM@10 is worse than DDIM@20
    text = md.read_text()
    assert "| ours: ddim |" in text and "Goal (ours at 10 model calls" in text and "10 calls) vs" in text
    assert main(["--from-json", str(js), "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text


class _SDE3MCorrected(DPMSolverMultistepScheduler):
    """diffusers' third-order sde-dpmsolver++ with the D2 weight's constant taken as +1/2, as the integral
    int_0^h 2 e^{-2(h-tau)} tau^2/2 dtau / h^2 gives (and as its own ODE branch has); diffusers 0.42 has -1/2,
    a weight that tends to -1 instead of 0 as h -> 0. Everything else is diffusers' own step."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        x = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise, **kw)
        sig = [self.sigmas[self.step_index + k] for k in (1, 0, -1, -2)]
        lam = [torch.log(a) - torch.log(s) for a, s in map(self._sigma_to_alpha_sigma_t, sig)]
        h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (m0 - m1) / (h0 / h), (m1 - m2) / (h1 / h)
        alpha_t = self._sigma_to_alpha_sigma_t(sig[0])[0]
        return x + alpha_t * (d1_0 - d1_1) / (h0 / h + h1 / h)  # + (1/2 - (-1/2)) alpha_t D2


@pytest.mark.parametrize("kind,spacing,pred", [("scaled_linear", "leading", "epsilon"),
                                               ("scaled_linear", "trailing", "v_prediction"),
                                               ("squaredcos_cap_v2", "linspace", "epsilon")])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [5, 13, 20])
def test_dpmpp_3m_sde(kind, spacing, pred, karras, steps):
    """DPM++ 3M SDE against diffusers' sde-dpmsolver++ of order 3 (its one mis-signed constant corrected:
    _SDE3MCorrected), with the same per-sample noise; and against diffusers' uncorrected step, from which it
    must differ (every run here has 3rd-order steps: from the third step on, all but the last two under 15)."""
    if karras and kind == "squaredcos_cap_v2":
        pytest.skip("diffusers truncates fractional Karras timesteps to int64 for squaredcos_cap_v2; ours stay exact")
    cfg = config(kind, spacing, pred)
    kw = dict(**cfg, algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=karras)
    ours = run_ours(cfg, "dpmpp_3m_sde", karras=karras, steps=steps, **PER_STEP["dpmpp_3m_sde"])
    check(ours, run_diffusers(_SDE3MCorrected(**kw), steps=steps))
    as_shipped = run_diffusers(DPMSolverMultistepScheduler(**kw), steps=steps)
    assert float((ours - as_shipped).abs().max()) > 1e-2


def test_dpmpp_3m_sde_at_eta_0_is_dpmpp_3m():
    cfg = config("scaled_linear", "leading", "epsilon")
    assert torch.equal(run_ours(cfg, "dpmpp_3m_sde", steps=20, eta=0.0), run_ours(cfg, "dpmpp_3m", steps=20))


def test_align_your_steps_levels():
    """Sabour et al. 2024's levels (AYS_SIGMAS): at 11 steps NVIDIA's 11 levels themselves; for n steps, n levels linear
    in log sigma over the list's index (21: the list's levels with their geometric means between; 10: spread over all
    eleven, A1111's way); absolute levels, refused for a schedule that does not reach SD's sigma_max and for the rules
    that keep their own timesteps; `sample()` runs the model at the levels' fractional timesteps."""
    from imagine.schedules import AYS_SIGMAS, spaced_sigmas

    for kind, levels in AYS_SIGMAS.items():
        assert np.allclose(spaced_sigmas(kind, 0.0, 0.0, 11), levels, rtol=1e-12)
        fine = spaced_sigmas(kind, 0.0, 0.0, 21)
        assert np.allclose(fine[::2], levels, rtol=1e-12)
        assert np.allclose(fine[1::2], np.sqrt(np.asarray(levels[:-1]) * np.asarray(levels[1:])), rtol=1e-12)
        assert np.all(np.diff(spaced_sigmas(kind, 0.0, 0.0, 7)) < 0)
    cfg = config("scaled_linear", "leading", "epsilon")
    sched, model, seen = NoiseSchedule.from_diffusers_config(cfg), make_model(cfg), []
    # (as they are, as A1111 takes them: NVIDIA's 14.615 and 0.029 lie just outside SD's 14.6146 and 0.02917)
    want = spaced_sigmas("align_your_steps", 0, 0, 10)
    assert np.allclose((want[0], want[-1]), (14.615, 0.029), rtol=1e-12)
    plan = sched.plan(10, rule="karras", sigma_schedule="align_your_steps")
    assert np.allclose(plan.sigmas.numpy()[:-1], want) and plan.sigmas[-1] == 0
    sample(lambda x, t: (seen.append(float(t[0])), model(x, t))[1], SHAPE, schedule=sched, sampler="euler", steps=10,
           sigma_schedule="align_your_steps", seeds=1, progress=False)
    assert np.allclose(seen, sched.sigma_to_t(want))
    with pytest.raises(ValueError, match="are for Stable Diffusion's noise schedule; this model's reaches sigma 157"):
        run_ours(config("linear", "leading", "epsilon"), "euler", sigma_schedule="align_your_steps")
    with pytest.raises(ValueError, match="align_your_steps takes none"):
        spaced_sigmas("align_your_steps", 0, 0, 10, rho=2.0)
    for sampler in ("ddim", "ddpm", "plms"):
        with pytest.raises(ValueError, match="align_your_steps is for the samplers that step in noise levels"):
            run_ours(cfg, sampler, sigma_schedule="align_your_steps")


def test_sigma_range_model_spans_the_whole_trained_range():
    """sigma_range="model" (k-diffusion's and A1111's): a schedule type spans sigma(0)..sigma(T-1) for every rule, with
    fractional timesteps; Karras levels are then eq. 5 between those ends (A1111's get_sigmas_karras with the model's
    sigma_min and sigma_max), whatever the spacing; "spaced" (diffusers') spans the spaced timesteps' levels."""
    from imagine.schedules import karras_sigmas, spaced_sigmas

    cfg = config("scaled_linear", "leading", "epsilon")
    sched = NoiseSchedule.from_diffusers_config(cfg)
    a = sched.alphas_cumprod.numpy()
    lo, hi = np.sqrt((1 - a[0]) / a[0]), np.sqrt((1 - a[-1]) / a[-1])
    # (k-diffusion holds the model's levels, and computes the schedule types, in float32: 1e-5 apart at the low end)
    a32 = torch.from_numpy(a[[0, -1]]).float()
    lo32, hi32 = (((1 - a32) / a32) ** 0.5).tolist()
    for rule in ("karras", "dpm_solver", "ddim"):
        for kind in ("karras", "exponential", "beta"):
            plan = sched.plan(20, rule=rule, sigma_schedule=kind, sigma_range="model")
            levels = plan.sigmas.numpy()[:20]
            assert np.allclose(levels, spaced_sigmas(kind, lo, hi, 20), rtol=2e-5), (rule, kind)
            assert np.allclose(levels, spaced_sigmas(kind, lo32, hi32, 20, dtype=torch.float32), rtol=1e-12, atol=0), \
                (rule, kind)
            assert np.allclose(plan.timesteps.numpy(), sched.sigma_to_t(levels)), (rule, kind)
    assert np.allclose(sched.plan(20, rule="karras", karras=True, sigma_range="model").sigmas.numpy()[:20],
                       karras_sigmas(lo, hi, 20, 7.0), rtol=2e-5)
    spaced = sched.plan(20, rule="karras", karras=True).sigmas.numpy()
    assert spaced[0] < 0.8 * hi  # (leading spacing at 20 steps: sigma(951) = 11.03 < 14.61)
    with pytest.raises(ValueError, match="sigma_range must be one of 'spaced', 'model'"):
        sched.plan(20, rule="karras", karras=True, sigma_range="full")


def _diffusers_img2img(scheduler, steps, strength, init, stochastic=False):
    """diffusers' StableDiffusionImg2ImgPipeline loop restated (get_timesteps, set_begin_index, add_noise, step)."""
    model = make_model(dict(scheduler.config))
    float64_table(scheduler)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    scheduler.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    ts = scheduler.timesteps[t_start * scheduler.order:]
    scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(init, torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]),
                            ts[:1].repeat(SHAPE[0]))
    with torch.no_grad():
        for t in ts:
            out = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x, **({"generator": gens} if stochastic else {})).prev_sample
    return x


@pytest.mark.parametrize("sampler, steps, strength", [("dpmpp_3m", 20, 0.5), ("dpmpp_3m", 30, 0.4),
                                                      ("dpmpp_3m", 14, 0.5), ("dpmpp_3m_sde", 20, 0.5)])
def test_dpmpp_3m_image_to_image_counts_the_whole_run_as_diffusers(sampler, steps, strength):
    """diffusers lowers the 3M solvers' order on the last steps only where the whole schedule has under 15 steps
    (len(scheduler.timesteps)): an image-to-image run of 10 of 20 steps stays 3rd order (it went 2nd order, 0.12 and
    0.39 away); of 7 of 14 it lowers."""
    cfg = config("scaled_linear", "leading", "epsilon")
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    sde = sampler == "dpmpp_3m_sde"
    cls = _SDE3MCorrected if sde else DPMSolverMultistepScheduler
    theirs = _diffusers_img2img(cls(**cfg, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=3),
                                steps, strength, init, stochastic=sde)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), sampler=sampler,
                  steps=steps, seeds=list(SEEDS), progress=False, init=init, strength=strength,
                  **PER_STEP.get(sampler, {}))
    assert float((ours.double() - theirs.double()).abs().max()) < 1e-4


def test_a_soft_mask_under_diffusers_rules_is_refused():
    """(diffusers' replacement is the same run as its pipelines' only for a 0/1 mask)"""
    cfg = config("scaled_linear", "leading", "epsilon")
    mask = torch.full((1, 1, *SHAPE[2:]), 0.5)
    kw = dict(schedule=NoiseSchedule.from_diffusers_config(cfg), sampler="euler", steps=4, seeds=list(SEEDS),
              progress=False, init=torch.zeros(SHAPE), strength=1.0)
    with pytest.raises(ValueError, match="values between 0 and 1 under diffusers' rules"):
        sample(make_model(cfg), SHAPE, mask=mask, **kw)
    sample(make_model(cfg), SHAPE, mask=mask, strength_rule="a1111", **kw)  # (A1111's blends it)
    sample(make_model(cfg), SHAPE, mask=(mask > 0.4).double(), **kw)
