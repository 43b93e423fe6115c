"""AUTOMATIC1111's samplers added after the first set: LMS, DPM2, DPM2 a, PLMS and LCM against diffusers' schedulers
(LMSDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, PNDMScheduler(skip_prk_steps=True),
LCMScheduler) on the harness of test_samplers_parity.py (its tiny model, seeds, configs and hand-driven diffusers
loop), and DPM++ 2S a, which diffusers lacks, against exact Gaussian denoisers (imagine.bench.samplers): the
probability-flow ODE of Gaussian data has a closed-form solution, so its error must fall at 2nd order.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

import test_samplers_parity as parity  # noqa: E402
from test_samplers_parity import SEEDS, SHAPE, check, config, make_model, run_diffusers, run_ours  # noqa: E402

from imagine.bench.samplers import ExactModel, GaussianMixture  # noqa: E402
from imagine.samplers import SAMPLERS, resolve_sampler, takes_eta  # noqa: E402
from imagine.sampling import Denoiser, sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

# (diffusers' KDPM2 schedulers map their 1000 training levels one numpy call each, and numpy 2 warns on every one)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# SD's schedule over every spacing and both prediction types, and DDPM's linear one (sigma_max 157 with trailing
# spacing: diffusers' float32 VE sample is still good to 1e-4 there at 5 steps)
CASES = [("scaled_linear", "leading", "epsilon"), ("scaled_linear", "leading", "v_prediction"),
         ("scaled_linear", "trailing", "v_prediction"), ("scaled_linear", "linspace", "epsilon"),
         ("linear", "leading", "v_prediction"), ("linear", "trailing", "epsilon")]


def generators_after_start(seeds=SEEDS):
    """The per-sample generators as run_diffusers' own stand once they have drawn the start noise: for a stochastic
    step that run_diffusers does not hand its generators to (KDPM2 ancestral, LCM)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for g in gens:
        torch.randn((1, *SHAPE[1:]), generator=g)
    return gens


def karras_timesteps_unrounded(cfg, steps):
    """diffusers' KDPM2 schedulers round the timesteps of their Karras levels (not of the midpoints; its Euler, Heun
    and LMS do not round); ours, k-diffusion's and A1111's keep them fractional. This hands diffusers ours, which the
    maths does not otherwise read (its sigmas are its own)."""
    plan = NoiseSchedule.from_diffusers_config(cfg).plan(steps, rule="karras", karras=True)

    def patch(scheduler):
        ts = scheduler.timesteps.clone().double()
        assert (ts[0::2] - plan.timesteps).abs().max() <= 0.5  # the same levels, rounded
        ts[0::2] = plan.timesteps
        scheduler.timesteps = ts

    return patch


# -- LMS, DPM2, DPM2 a against diffusers ---------------------------------------------------------------------
# (ours, theirs) for one case; the tests check them, and `python tests/test_samplers_a1111.py` prints the figures
def lms_pair(cfg, karras=False, steps=parity.STEPS):
    return (run_ours(cfg, "lms", karras=karras, steps=steps),
            run_diffusers(LMSDiscreteScheduler(**cfg, use_karras_sigmas=karras), steps=steps))


def dpm2_pair(cfg, karras=False, steps=parity.STEPS):
    patch = karras_timesteps_unrounded(cfg, steps) if karras else None
    return (run_ours(cfg, "dpm2", karras=karras, steps=steps),
            run_diffusers(KDPM2DiscreteScheduler(**cfg, use_karras_sigmas=karras), steps=steps,
                          after_set_timesteps=patch))


def dpm2_a_pair(cfg, karras=False, steps=parity.STEPS):
    """With the same per-sample noise: diffusers draws one randn per sample after each step's second evaluation,
    as ours does (none on the last step, to sigma = 0)."""
    patch = karras_timesteps_unrounded(cfg, steps) if karras else None
    theirs = run_diffusers(KDPM2AncestralDiscreteScheduler(**cfg, use_karras_sigmas=karras), steps=steps,
                           after_set_timesteps=patch, generator=generators_after_start())
    return run_ours(cfg, "dpm2_a", karras=karras, steps=steps), theirs


@pytest.mark.parametrize("kind,spacing,pred", CASES)
@pytest.mark.parametrize("karras", [False, True])
def test_lms(kind, spacing, pred, karras):
    check(*lms_pair(config(kind, spacing, pred), karras))


@pytest.mark.parametrize("steps", [1, 2, 13])
def test_lms_step_counts(steps):
    check(*lms_pair(config("scaled_linear", "trailing", "epsilon"), steps=steps))


@pytest.mark.parametrize("kind,spacing,pred", CASES)
@pytest.mark.parametrize("karras", [False, True])
def test_dpm2(kind, spacing, pred, karras):
    check(*dpm2_pair(config(kind, spacing, pred), karras))


@pytest.mark.parametrize("kind,spacing,pred", CASES)
@pytest.mark.parametrize("karras", [False, True])
def test_dpm2_ancestral(kind, spacing, pred, karras):
    check(*dpm2_a_pair(config(kind, spacing, pred), karras))


def test_dpm2_ancestral_at_eta_0_is_dpm2():
    cfg = config("scaled_linear", "leading", "epsilon")
    ode = run_ours(cfg, "dpm2", steps=8)
    assert torch.equal(run_ours(cfg, "dpm2_a", steps=8, eta=0.0), ode)
    check(ode, run_diffusers(KDPM2DiscreteScheduler(**cfg), steps=8))
    assert float((run_ours(cfg, "dpm2_a", steps=8) - ode).abs().max()) > 0.1


@pytest.mark.parametrize("sampler,cls", [("lms", LMSDiscreteScheduler), ("dpm2", KDPM2DiscreteScheduler)])
def test_exponential_sigmas(sampler, cls):
    cfg = config("scaled_linear", "leading", "v_prediction")
    check(run_ours(cfg, sampler, steps=8, sigma_schedule="exponential"),
          run_diffusers(cls(**cfg, use_exponential_sigmas=True), steps=8))


# -- PLMS against diffusers' PNDMScheduler(skip_prk_steps=True) -----------------------------------------------
class _PNDMEps(PNDMScheduler):
    """diffusers' PLMS with a v-model, combining eps (each output turned into eps at its own sample and level, as
    the PNDM paper's pseudo linear multistep and A1111's PLMS do). diffusers 0.42 combines the raw v outputs and
    turns the mix into eps at the current sample; this converts each v on the way in and the combination back to
    v on the way out, so that diffusers' own step sees the eps mix. Everything else is diffusers' step."""

    def step(self, model_output, timestep, sample, **kw):
        if self.config.prediction_type == "v_prediction":
            a = self.alphas_cumprod[timestep]
            model_output = a.sqrt() * model_output + (1 - a).sqrt() * sample
        return super().step(model_output, timestep, sample, **kw)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        if self.config.prediction_type == "v_prediction":
            a = self.alphas_cumprod[timestep]
            model_output = (model_output - (1 - a).sqrt() * sample) / a.sqrt()
        return super()._get_prev_sample(sample, timestep, prev_timestep, model_output)


def plms_pair(cfg, steps=parity.STEPS):
    return run_ours(cfg, "plms", steps=steps), run_diffusers(_PNDMEps(**cfg, skip_prk_steps=True), steps=steps)


PLMS_CASES = [c for c in CASES if c[1] != "linspace"]


@pytest.mark.parametrize("kind,spacing,pred", PLMS_CASES)
@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_plms(kind, spacing, pred, steps, set_alpha_to_one):
    """diffusers steps from t to t - T//N, the next listed timestep for leading spacing and for trailing when N
    divides T (as here); linspace is not compared (DDIM's quirk, docs/samplers.md). With v-prediction diffusers
    mixes v where PLMS mixes eps: compared with that corrected (_PNDMEps), and differing from it as shipped."""
    cfg = config(kind, spacing, pred, set_alpha_to_one=set_alpha_to_one)
    ours, theirs = plms_pair(cfg, steps)
    check(ours, theirs)
    if pred == "v_prediction":
        assert float((ours - run_diffusers(PNDMScheduler(**cfg, skip_prk_steps=True), steps=steps)).abs().max()) > 0.1


def test_plms_evaluates_the_first_step_twice():
    """N + 1 model calls: the pseudo improved Euler step evaluates at t_0 and at t_1 on the Euler result; then
    t_1 again on the corrected sample, and each later timestep once (diffusers' plms_timesteps)."""
    cfg = config("scaled_linear", "leading", "epsilon")
    seen = []
    inner = make_model(cfg)
    sample(lambda x, t: (seen.append(float(t[0])), inner(x, t))[1], SHAPE,
           schedule=NoiseSchedule.from_diffusers_config(cfg), sampler="plms", steps=5, seeds=SEEDS, progress=False)
    assert seen == [801, 601, 601, 401, 201, 1]


# -- LCM --------------------------------------------------------------------------------------------------
def lcm_pair(cfg, steps=4):
    """diffusers' LCMScheduler (its boundary scalings c_skip <= 7e-6 included, which ours leaves out) with the same
    per-sample noise, at the LCM timesteps."""
    return run_ours(cfg, "lcm", steps=steps), run_diffusers(LCMScheduler(**cfg), steps=steps,
                                                             generator=generators_after_start())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm(pred, steps):
    check(*lcm_pair(config("scaled_linear", "leading", pred), steps))


def test_lcm_zero_terminal_snr():
    cfg = config("scaled_linear", "trailing", "v_prediction", zero_snr=True)

    def exact_table(scheduler):  # run_diffusers floors abar_T at 2^-24 for the sigma-based schedulers; LCM is VP
        scheduler.alphas_cumprod[-1] = 0.0

    theirs = run_diffusers(LCMScheduler(**cfg), steps=4, generator=generators_after_start(),
                           after_set_timesteps=exact_table)
    check(run_ours(cfg, "lcm", steps=4), theirs)


def test_lcm_timesteps():
    schedule = NoiseSchedule.from_config("scaled_linear")
    assert schedule.plan(4, rule="lcm").timesteps.tolist() == [999, 759, 499, 259]
    assert schedule.plan(1, rule="lcm").timesteps.tolist() == [999]
    plan = schedule.plan(50, rule="lcm")
    assert plan.timesteps.tolist() == list(range(999, 0, -20)) and float(plan.sigmas[-1]) == 0
    with pytest.raises(ValueError, match="at most the 50 timesteps"):
        schedule.plan(51, rule="lcm")
    # a schedule type lays its levels over the distillation timesteps' own (AUTOMATIC1111's LCM): Karras from
    # sigma(999) to sigma(19), the model at the nearest distillation timestep; the ones with levels of their own
    # do not apply
    plan = schedule.plan(6, rule="lcm", karras=True)
    sig = schedule.sigmas.numpy()
    assert float(plan.sigmas[0]) == pytest.approx(sig[999], rel=1e-6)
    assert float(plan.sigmas[-2]) == pytest.approx(sig[19], rel=1e-6) and float(plan.sigmas[-1]) == 0
    assert plan.timesteps[0] == 999 and plan.timesteps[-1] == 19
    assert all(int(t) % 20 == 19 for t in plan.timesteps.tolist())
    for kind, says in (("align_your_steps", "lcm rule keeps its timesteps"), ("time_uniform", "distillation")):
        with pytest.raises(ValueError, match=says):
            schedule.plan(4, rule="lcm", sigma_schedule=kind)


def _gaussian(dim=4):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, dim, generator=g, dtype=torch.float64) * 0.5
    var = torch.logspace(math.log10(0.02), 0, dim, dtype=torch.float64)[None]
    return GaussianMixture(torch.ones(1, dtype=torch.float64), mu, var, (dim,), "gauss"), mu, var


def _posterior_mean(x, abar, mu, var):
    """E[x_0 | x_t] for x_0 ~ N(mu, diag(var)), x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
    return mu + math.sqrt(abar) * var / (abar * var + 1 - abar) * (x - math.sqrt(abar) * mu)


class _Draws:
    """An injected noise function: fixed standard normal draws, in order."""

    def __init__(self, shape, n):
        g = torch.Generator().manual_seed(9)
        self.z = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
        self.used = 0

    def __call__(self, like):
        self.used += 1
        return self.z[self.used - 1].to(like.dtype)


def test_lcm_closed_form():
    """With the exact denoiser of Gaussian data and injected noise, LCM's output is the recursion
    x <- sqrt(abar') E[x_0 | x] + sqrt(1 - abar') z, ending with E[x_0 | x] (one step: the posterior mean of x_T)."""
    gauss, mu, var = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    model = ExactModel(gauss, schedule)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps in (1, 4):
        plan = schedule.plan(steps, rule="lcm")
        draws = _Draws(x_T.shape, steps)
        out = SAMPLERS["lcm"](Denoiser(model, plan, "epsilon"), x_T, plan, noise=draws, progress=False)
        abar, x = plan.alphas_cumprod.tolist(), x_T
        for i in range(steps):
            x0 = _posterior_mean(x, abar[i], mu, var)
            x = x0 if i == steps - 1 else math.sqrt(abar[i + 1]) * x0 + math.sqrt(1 - abar[i + 1]) * draws.z[i]
        assert draws.used == steps - 1
        torch.testing.assert_close(out, x, rtol=0, atol=1e-9)


# -- DPM++ 2S a (and DPM2, LMS) against the closed-form ODE of Gaussian data --------------------------------------
def _ode_error(sampler, steps, **kw):
    """Max error of the sample at the plan's last level above 0 (after N - 1 steps) against the exact solution of
    the probability-flow ODE for x_0 ~ N(mu, diag(var)): x_VE(sigma) - mu = (x_VE(sigma_0) - mu) sqrt((var +
    sigma^2) / (var + sigma_0^2)). Levels evenly spaced in log sigma, float64."""
    gauss, mu, var = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    sample(ExactModel(gauss, schedule), z, schedule=schedule, sampler=sampler, steps=steps, progress=False,
           dtype=torch.float64, sigma_schedule="exponential",
           callback=lambda info: seen.append((info["x"], info["sigma"])), **kw)
    (x_first, s0), (x_last, s1) = seen[0], seen[-1]
    exact = mu + (x_first * math.sqrt(1 + s0**2) - mu) * ((var + s1**2) / (var + s0**2)).sqrt()
    return float((x_last * math.sqrt(1 + s1**2) - exact).abs().max())


@pytest.mark.parametrize("sampler,kw,ratio", [("dpmpp_2s_a", {"eta": 0.0}, (3.4, 4.8)), ("dpm2", {}, (3.4, 4.8)),
                                              ("lms", {}, (7.0, 20.0))])
def test_order_of_convergence_on_exact_gaussian(sampler, kw, ratio):
    """DPM++ 2S a at eta = 0 (DPM-Solver++(2S)) and DPM2 are 2nd order: doubling the steps divides the error by ~4
    (measured 3.9-4.2 and 4.2-4.3); LMS's 4th order shows as a ratio rising towards 16 (8.9, then 10.7)."""
    errs = [_ode_error(sampler, n, **kw) for n in (16, 32, 64)]
    assert errs[-1] < 0.01, errs
    for a, b in zip(errs, errs[1:]):
        assert ratio[0] < a / b < ratio[1], (errs, [a / b for a, b in zip(errs, errs[1:])])


def test_dpmpp_2s_ancestral_against_the_papers_vp_form():
    """DPM++ 2S a with injected noise against DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, r = 1/2) written in VP
    coordinates (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) with the exact Gaussian denoiser, followed by
    the ancestral noise sigma_up z of k-diffusion's split (the split itself is checked against diffusers through
    DPM2 a)."""
    gauss, mu, var = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    plan = schedule.plan(6, rule="karras", karras=True)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for eta in (1.0, 0.5):
        draws = _Draws(x_T.shape, 6)
        denoise = Denoiser(ExactModel(gauss, schedule), plan, "epsilon", schedule=schedule)
        out = SAMPLERS["dpmpp_2s_a"](denoise, x_T, plan, noise=draws, eta=eta, progress=False)
        assert draws.used == 5 and denoise.calls == 11

        def alpha(s):
            return 1 / math.sqrt(1 + s * s)

        x = x_T
        sig = plan.sigmas.tolist()
        for i in range(6):
            s, s_next = sig[i], sig[i + 1]
            x0 = _posterior_mean(x, alpha(s) ** 2, mu, var)
            if s_next == 0:
                x = x0
                break
            s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            s_down = math.sqrt(s_next**2 - s_up**2)
            lam, lam_down = math.log(alpha(s) / (s * alpha(s))), math.log(alpha(s_down) / (s_down * alpha(s_down)))
            h = lam_down - lam
            s_mid = math.exp(-(lam + h / 2))
            u = (s_mid * alpha(s_mid)) / (s * alpha(s)) * x - alpha(s_mid) * math.expm1(-h / 2) * x0
            x0_mid = _posterior_mean(u, alpha(s_mid) ** 2, mu, var)
            x = (s_down * alpha(s_down)) / (s * alpha(s)) * x - alpha(s_down) * math.expm1(-h) * x0_mid
            x = (x / alpha(s_down) + s_up * draws.z[i]) * alpha(s_next)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)  # (the model sees t in float32: ~2e-8 here)


@pytest.mark.parametrize("sampler", ["dpm2_a", "dpmpp_2s_a", "lcm"])
def test_same_seed_same_sample_at_any_batch_size(sampler):
    parity.test_same_seed_same_sample_at_any_batch_size(sampler)


# -- the denoiser between the plan's levels ----------------------------------------------------------------------
def test_at_sigma_on_a_level_is_the_step_denoiser():
    """Denoiser.at_sigma at a plan level with an integer timestep gives exactly that step's D: the same model call
    (t = sigma_to_t(sigma)), guidance, rescale and thresholding; between levels the model sees the log-sigma
    interpolated timestep."""
    cfg = config("scaled_linear", "leading", "epsilon")
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    plan = schedule.plan(5, rule="karras")
    inner = make_model(cfg)
    seen = []

    def model(x, t, scale):
        seen.append(float(t[0]))
        return inner(x, t) * scale.view(-1, 1, 1, 1)

    kw = dict(cond={"scale": torch.full((2,), 1.0)}, uncond={"scale": torch.full((2,), 0.5)}, guidance_scale=3.0,
              guidance_rescale=0.5, thresholding="dynamic", threshold_percentile=0.9)
    denoise = Denoiser(model, plan, "epsilon", schedule=schedule, **kw)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i in (1, 3):
        assert torch.equal(denoise.at_sigma(x, float(plan.sigmas[i]), i), denoise(x, i))
    s_mid = math.sqrt(float(plan.sigmas[1] * plan.sigmas[2]))
    denoise.at_sigma(x, s_mid, 1)
    assert seen[-1] == pytest.approx(float(schedule.sigma_to_t(s_mid)), abs=1e-4)
    assert float(plan.timesteps[2]) < seen[-1] < float(plan.timesteps[1])
    with pytest.raises(ValueError, match="needs the training schedule"):
        Denoiser(model, plan, "epsilon").at_sigma(x, s_mid, 1)


# -- names, options, the A1111 API's list ------------------------------------------------------------------------
def test_names_and_options():
    for alias, (name, karras) in {
            "LMS": ("lms", False), "LMS Karras": ("lms", True), "k_lms": ("lms", False),
            "LMSDiscreteScheduler": ("lms", False), "DPM2": ("dpm2", False), "DPM2 Karras": ("dpm2", True),
            "k_dpm_2": ("dpm2", False), "KDPM2DiscreteScheduler": ("dpm2", False), "DPM2 a": ("dpm2_a", False),
            "DPM2 a Karras": ("dpm2_a", True), "k_dpm_2_a": ("dpm2_a", False),
            "KDPM2AncestralDiscreteScheduler": ("dpm2_a", False), "DPM++ 2S a": ("dpmpp_2s_a", False),
            "DPM++ 2S a Karras": ("dpmpp_2s_a", True), "k_dpmpp_2s_a": ("dpmpp_2s_a", False),
            "PLMS": ("plms", False), "PNDMScheduler": ("plms", False), "LCM": ("lcm", False),
            "k_lcm": ("lcm", False), "LCMScheduler": ("lcm", False), "DPM fast": ("dpm_fast", False),
            "k_dpm_fast": ("dpm_fast", False), "DPM adaptive": ("dpm_adaptive", False),
            "k_dpm_ad": ("dpm_adaptive", False)}.items():
        canonical, fn, implied = resolve_sampler(alias)
        assert (canonical, implied) == (name, karras), alias
        assert fn is SAMPLERS[name]
    assert {s for s in SAMPLERS if takes_eta(s)} == {"ddim", "euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde",
                                                     "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast",
                                                     "dpm_adaptive", "ddim_cfgpp", "euler_a_cfgpp", "res_multistep_a",
                                                     "res_multistep_a_cfgpp", "dpmpp_2s_a_cfgpp", "seeds_2", "seeds_3",
                                                     "sa_solver", "sa_solver_pece"}
    cfg = config("scaled_linear", "leading", "epsilon")
    for sampler in ("lms", "dpm2", "plms"):
        with pytest.raises(ValueError, match="deterministic and takes no eta"):
            run_ours(cfg, sampler, eta=0.5)
    with pytest.raises(ValueError, match="takes no eta"):
        run_ours(cfg, "lcm", eta=0.5)
    with pytest.raises(ValueError, match="LMS order must be"):
        run_ours(cfg, "lms", sampler_options={"order": 5})
    assert torch.equal(run_ours(cfg, "lms", sampler_options={"order": 1}), run_ours(cfg, "euler"))


def test_a1111_api_lists_the_new_samplers():
    app = pytest.importorskip("imagine.server.app")
    table = app.SamplerTable(app.our_sampler_names())
    names = table.names()
    for label in ("LMS", "DPM2", "DPM2 a", "DPM++ 2S a", "PLMS", "LCM", "DPM++ SDE", "DPM++ 2M SDE Heun", "Restart",
                  "DPM fast", "DPM adaptive"):
        assert label in names
    assert table.resolve("k_dpm_ad") == ("dpm_adaptive", None) and table.a1111_name("dpm_fast") == "DPM fast"
    assert table.resolve("DPM++ SDE Karras") == ("dpmpp_sde", True)
    assert table.resolve("DPM2 a") == ("dpm2_a", None)
    assert table.resolve("LMS Karras") == ("lms", True)
    assert table.resolve("k_dpmpp_2s_a") == ("dpmpp_2s_a", None)
    assert table.a1111_name("plms") == "PLMS"


if __name__ == "__main__":  # the parity figures of docs/samplers.md: max |ours - diffusers| over the cases tested
    torch.set_num_threads(1)
    grids = {
        "lms": [(lms_pair, config(*c), {"karras": k}) for c in CASES for k in (False, True)],
        "dpm2": [(dpm2_pair, config(*c), {"karras": k}) for c in CASES for k in (False, True)],
        "dpm2_a": [(dpm2_a_pair, config(*c), {"karras": k}) for c in CASES for k in (False, True)],
        "plms": [(plms_pair, config(*c, set_alpha_to_one=a), {"steps": n}) for c in PLMS_CASES for a in (False, True)
                 for n in (5, 20)],
        "lcm": [(lcm_pair, config("scaled_linear", "leading", p), {"steps": n}) for p in ("epsilon", "v_prediction")
                for n in (1, 2, 4, 8)],
    }
    for name, cases in grids.items():
        worst_abs = worst_rel = 0.0
        for pair, cfg, kw in cases:
            ours, theirs = pair(cfg, **kw)
            err = float((ours - theirs).abs().max())
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / float(theirs.abs().max()))
        print(f"{name:7s} {len(cases):3d} cases: max abs {worst_abs:.1e}, max abs / max |output| {worst_rel:.1e}")


@pytest.mark.parametrize("sampler", ["dpm2", "dpm2_a", "dpmpp_2s_a"])
def test_midpoint_calls_see_inpaintings_known_part(sampler):
    """With inpainting's replacement method (mask 0: keep init), every model call, the off-grid midpoints too, sees
    the known part as the forward process puts it at that call's level: x = a x_0 + b eps with a^2 + b^2 = 1 and one
    eps for the whole run, though the model's guess of x_0 is neither."""
    from imagine.sampling import sample
    from imagine.schedules import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 4, 4, generator=g)
    seen = []

    def model(x, t):
        seen.append(x.double().clone())
        return torch.tanh(x.flip(-1) * 3 + t[:, None, None, None] / 500)

    sample(model, (1, 2, 4, 4), schedule=NoiseSchedule.from_config("scaled_linear"), prediction_type="epsilon",
           sampler=sampler, steps=4, seeds=0, init=x0, strength=1.0, mask=torch.zeros(1, 1, 4, 4), progress=False)
    assert len(seen) == 7  # 4 steps, 2N - 1 calls: the midpoints are among them
    first = seen[0]
    basis = torch.stack([x0.double().flatten(), first.flatten()], 1)  # span{x_0, eps} = span{x_0, x_T}
    for x in seen:
        coef = torch.linalg.lstsq(basis, x.flatten()[:, None]).solution
        assert float((basis @ coef - x.flatten()[:, None]).abs().max()) < 1e-5  # (float32) nothing of the guess
