"""Session 28's review of the noise schedules, the diffusion maths and guidance, against the papers and the peers
(diffusers' schedulers and pipeline helpers, k-diffusion's sampling and external modules, AUTOMATIC1111's code restated
in test_unipc_a1111.py and test_k_diffusion.py), on the same configurations and at the edges: 1 step, steps = T,
steps > T, a small T, strength near 0 and 1, sigma at t = 0 and T - 1 and beyond them.

What the review changed, each pinned here:
- Zero terminal SNR's floor (2^-24, diffusers' for abar_T = 0) was applied to every abar below it by the continuous-time
  schedule types (UniPC's time_uniform, ..., A1111's compvis_time_uniform), their v reading and A1111's LCM table: over
  AUTOMATIC1111's "Zero Terminal SNR" schedule (abar_T = 4.9e-8, sigma_max 4518.8) they started from 2^-24's 4096, and
  A1111's UniPC runs were 1e-2 (CFG 1) to 0.12 (CFG 3) away from A1111's, its LCM runs 0.14 to 1.3. Only abar = 0 is
  floored now, as the sigma tables do.
- An EDM scheduler config (sigma_data; Playground v2.5's EDMDPMSolverMultistepScheduler) or timestep_type
  "continuous" was read as DDPM's linear betas, silently; it is refused by name.
- Dynamic thresholding takes the quantile of a float64 x_0 in float64, as diffusers' _threshold_sample does.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from test_k_diffusion import kd  # noqa: F401 (k-diffusion's modules, a fixture)
from test_samplers_parity import SEEDS, SHAPE, make_model

from imagine.diffusion import convert_prediction, min_snr_weights, predict_eps, predict_x0, q_sample, velocity
from imagine.guidance import (classifier_eps_shift, classifier_free_guidance, dynamic_threshold, rescale_guidance,
                              static_threshold)
from imagine.samplers import a1111_settings
from imagine.sampling import run_plan, sample
from imagine.schedules import (A1111_ZERO_SNR_ALPHA_CUMPROD, ZERO_SNR_ALPHA_CUMPROD, NoiseSchedule, cosine_betas,
                               floor_zero_snr, rescale_zero_terminal_snr, spaced_sigmas, spaced_timesteps,
                               vp_time_levels)

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def diffusers_cfg(kind, T=1000, zsnr=False, spacing="leading", offset=0, **kw):
    b0, b1 = KINDS[kind]
    c = dict(beta_schedule=kind, beta_start=b0, beta_end=b1, num_train_timesteps=T, timestep_spacing=spacing,
             steps_offset=offset, **kw)
    return {**c, "rescale_betas_zero_snr": True} if zsnr else c


# -- zero terminal SNR: only abar = 0 is floored ---------------------------------------------------------------------
def test_the_floor_takes_zeros_only():
    a = np.array([0.9, 1e-3, 4.9e-8, 1e-9, 0.0])
    assert floor_zero_snr(a).tolist() == [0.9, 1e-3, 4.9e-8, 1e-9, ZERO_SNR_ALPHA_CUMPROD]
    t = torch.tensor([0.5, 4.9e-8, 0.0], dtype=torch.float32)
    assert floor_zero_snr(t).tolist() == [0.5, pytest.approx(4.9e-8, rel=1e-6), pytest.approx(2.0**-24)]


def test_continuous_time_and_lcm_levels_keep_a1111s_terminal_level():
    """Over A1111's Zero Terminal SNR schedule (abar_T = 4.897e-8) every plan starts at its own sigma_max 4518.76
    (A1111's UniPC reads log sqrt(abar) off the model's table, its LCM the table's sigmas, unfloored); over diffusers'
    zero terminal SNR (abar_T = 0) at 2^-24's 4096, as diffusers and the sigma-based plans floor it."""
    a1111 = NoiseSchedule.from_config("scaled_linear", prediction_type="v_prediction").a1111_zero_terminal_snr()
    top = float(a1111.sigmas[-1])  # (A1111's abar_T as float32 holds it)
    assert top == pytest.approx(4518.76, abs=0.01)
    for kind in ("time_uniform", "time_quadratic", "logsnr", "compvis_time_uniform"):
        plan = a1111.plan(6, rule="dpm_solver", sigma_schedule=kind)
        assert float(plan.alphas_cumprod[0]) == pytest.approx(float(a1111.alphas_cumprod[-1]), rel=1e-12), kind
        assert float(plan.sigmas[0]) == pytest.approx(top, rel=1e-9)
    plan = a1111.plan(6, rule="dpm_solver", sigma_schedule="compvis_time_uniform")
    assert float(plan.v_alphas_cumprod[0]) == pytest.approx(A1111_ZERO_SNR_ALPHA_CUMPROD, rel=1e-7)
    for kind in ("uniform", "karras", "simple"):
        plan = a1111.plan(6, rule="lcm", sigma_schedule=kind, sigma_range="model")
        assert float(plan.sigmas[0]) == pytest.approx(top, rel=1e-6), kind  # (float32, as A1111 holds the table)
    assert float(a1111.plan(6, rule="karras", sigma_schedule="karras", sigma_range="model").sigmas[0]) \
        == pytest.approx(top, rel=1e-6)
    zero = NoiseSchedule.from_config("scaled_linear", zero_terminal_snr=True, prediction_type="v_prediction")
    for kind in ("time_uniform", "logsnr", "compvis_time_uniform"):
        plan = zero.plan(6, rule="dpm_solver", sigma_schedule=kind)
        assert float(plan.alphas_cumprod[0]) == pytest.approx(2.0**-24) and bool(torch.isfinite(plan.sigmas).all())
    assert float(zero.plan(6, rule="lcm", sigma_schedule="karras", sigma_range="model").sigmas[0]) \
        == pytest.approx(4096.0, rel=1e-6)
    # the levels between a floored end and the rest stay the model's own
    t, abar = vp_time_levels("time_uniform", a1111.alphas_cumprod.numpy(), 4)
    assert abar[1:].tolist() == pytest.approx(np.exp(2 * np.interp(
        t[1:], np.arange(1, 1001) / 1000, 0.5 * np.log(a1111.alphas_cumprod.numpy()))).tolist(), rel=1e-12)


class _A1111ZeroSNR:
    """NoiseSchedule as the restated A1111 code of test_unipc_a1111 reads it, over A1111's Zero Terminal SNR option."""

    @staticmethod
    def from_diffusers_config(cfg):
        return NoiseSchedule.from_diffusers_config(cfg).a1111_zero_terminal_snr()


@pytest.mark.parametrize("steps", [6, 10])
def test_a1111_unipc_over_its_zero_terminal_snr(monkeypatch, steps):
    """A1111's UniPC (its uni_pc code restated, float32 as A1111 computes) over a model holding the rescaled
    alphas_cumprod, v-prediction, CFG 1: before the fix ours started at sigma 4096 and ended 1.1e-2 away (0.12 at CFG 3;
    CFG 1 because the tiny model's guided ODE amplifies float32 rounding, test_unipc_a1111's note)."""
    import test_unipc_a1111 as unipc

    monkeypatch.setattr(unipc, "NoiseSchedule", _A1111ZeroSNR)
    theirs = unipc.a1111_unipc(unipc.V, steps, 1.0, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (compvis_count: 7 steps for 6)
        ours = unipc.ours(unipc.V, steps, 1.0)
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, f"{steps} steps: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("steps, scheduler", [(4, None), (6, None), (6, "karras")])
def test_a1111_lcm_over_its_zero_terminal_snr(kd, monkeypatch, steps, scheduler):  # noqa: F811
    """A1111's LCM (its LCMCompVisDenoiser restated over k-diffusion) over the rescaled alphas_cumprod: its table's top
    level is 4518.76 (before the fix 4096: 0.14 to 1.3 away). An eps model (A1111's LCM reads any output as eps), whose
    x_0 at sigma 4519 carries float32's ulp there, 4.9e-4, so the bound is 1e-3."""
    import test_k_diffusion as kdt
    from test_zero_snr_a1111 import RescaledModel

    monkeypatch.setattr(kdt, "CompVisModel", RescaledModel)
    cfg = kdt.CONFIGS[0]
    theirs = kdt.run_a1111_lcm(kd, cfg, steps, scheduler=scheduler)
    schedule = NoiseSchedule.from_diffusers_config(cfg).a1111_zero_terminal_snr()
    ours = sample(make_model(cfg), SHAPE, schedule=schedule, steps=steps, seeds=SEEDS, progress=False,
                  **a1111_settings("LCM", scheduler))
    err = float((ours.float() - theirs).abs().max())
    assert err < 1e-3, f"LCM {scheduler}, {steps} steps: max |ours - A1111's| = {err:.2e}"


# -- configs that describe no discrete-time schedule ----------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    # Playground v2.5's scheduler/scheduler_config.json
    {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "num_train_timesteps": 1000,
     "prediction_type": "epsilon", "rho": 7.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002,
     "sigma_schedule": "exponential", "solver_order": 2},
    {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5},
    {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
     "timestep_type": "continuous", "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 700.0}])
def test_edm_configs_are_refused(cfg):
    with pytest.raises(ValueError, match="EDM"):
        NoiseSchedule.from_diffusers_config(cfg)


def test_discrete_timestep_type_still_reads():
    cfg = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "timestep_type": "discrete", "interpolation_type": "linear", "use_karras_sigmas": False}
    assert NoiseSchedule.from_diffusers_config(cfg).kind == "scaled_linear"
    assert NoiseSchedule.from_diffusers_config({**cfg, "timestep_type": None}).kind == "scaled_linear"


# -- the betas: the papers' closed forms and diffusers' helpers ------------------------------------------------------
@pytest.mark.parametrize("T", [1000, 37, 8, 1])
def test_betas_equal_diffusers_helpers(T):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs_rescale

    ours = cosine_betas(T)  # Nichol & Dhariwal eq. 17, the 0.999 cap
    assert torch.allclose(ours.float(), betas_for_alpha_bar(T), rtol=0, atol=1e-7)
    assert float(ours.max()) <= 0.999
    if T > 1:  # (one step has abar_0 = abar_T: Algorithm 1 divides by zero, in diffusers too)
        for kind in KINDS:
            betas = NoiseSchedule.from_diffusers_config(diffusers_cfg(kind, T)).betas
            got = rescale_zero_terminal_snr(betas)
            want = theirs_rescale(betas.float()).double()
            assert torch.allclose(got, want, rtol=1e-4, atol=2e-6), kind
            abar = torch.cumprod(1 - got, 0)
            assert float(abar[-1]) == 0.0 and float(abar[0]) == pytest.approx(float(1 - betas[0]), rel=1e-12)
    for kind in KINDS:
        d = diffusers.DDPMScheduler(**diffusers_cfg(kind, T))
        assert torch.allclose(NoiseSchedule.from_diffusers_config(diffusers_cfg(kind, T)).alphas_cumprod,
                              d.alphas_cumprod.double(), rtol=2e-5, atol=1e-6), kind


def test_custom_zero_snr_schedule_round_trips():
    """A custom schedule's to_config carries its (already rescaled) betas and rescale_betas_zero_snr: read back, the
    rescale runs again on a schedule whose abar_T is 0 already, which Algorithm 1 leaves as it is (shift by 0, scale
    by 1); diffusers reads the same config to the same table."""
    s = NoiseSchedule.from_config("custom", trained_betas=np.linspace(1e-3, 0.03, 50).tolist(), zero_terminal_snr=True)
    back = NoiseSchedule.from_diffusers_config(s.to_config())
    assert torch.allclose(back.alphas_cumprod, s.alphas_cumprod, rtol=1e-12, atol=1e-15)
    assert float(back.alphas_cumprod[-1]) == 0.0


# -- timesteps and levels against diffusers' schedulers, edges included ---------------------------------------------
# (documented departures left out: DPM-Solver's cosine + Karras timesteps, which diffusers truncates to int64;
# exponential / beta timesteps of the multistep schedulers, which diffusers truncates and we round; steps > T and a
# steps_offset past T - 1, which we refuse; the cosine schedule's Karras timesteps, within 0.05 of diffusers' float32)
def _diffusers_peers(diffusers):
    return [(diffusers.DDIMScheduler, "ddim", {}, None), (diffusers.DDPMScheduler, "ddpm", {}, None),
            (diffusers.EulerDiscreteScheduler, "karras", {}, None),
            (diffusers.EulerDiscreteScheduler, "karras", {"use_karras_sigmas": True}, "karras"),
            (diffusers.EulerDiscreteScheduler, "karras", {"use_exponential_sigmas": True}, "exponential"),
            (diffusers.EulerDiscreteScheduler, "karras", {"use_beta_sigmas": True}, "beta"),
            (diffusers.EulerAncestralDiscreteScheduler, "karras", {}, None),
            (diffusers.DPMSolverMultistepScheduler, "dpm_solver", {}, None),
            (diffusers.DPMSolverMultistepScheduler, "dpm_solver", {"use_karras_sigmas": True}, "karras"),
            (diffusers.UniPCMultistepScheduler, "dpm_solver", {}, None)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("T", [1000, 37])
def test_plans_equal_diffusers_at_the_edges(kind, T):
    diffusers = pytest.importorskip("diffusers")
    checked = 0
    for zsnr, (spacing, offset), steps in itertools.product(
            (False, True), (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)), (1, 2, 3, 13, T)):
        cfg = diffusers_cfg(kind, T, zsnr, spacing, offset)
        schedule = NoiseSchedule.from_diffusers_config(cfg)
        for cls, rule, extra, sigma_schedule in _diffusers_peers(diffusers):
            if rule == "dpm_solver" and kind == "squaredcos_cap_v2" and sigma_schedule:
                continue
            past_end = spaced_timesteps(T, steps, spacing, offset, rule).max() > T - 1
            try:
                plan = schedule.plan(steps, rule=rule, sigma_schedule=sigma_schedule)
            except ValueError as e:  # (a steps_offset past T - 1, which diffusers indexes: refused)
                assert "outside" in str(e) and past_end, (cls.__name__, steps, e)
                continue
            assert not past_end
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d = cls(**cfg, **extra)
                d.set_timesteps(steps)
            theirs = d.timesteps.double().numpy()
            if spacing == "trailing" and len(theirs) == steps + 1:
                theirs = theirs[:-1]  # (np.arange's extra point: docs/samplers.md)
            assert len(plan) == steps == len(theirs), (cls.__name__, cfg, steps)
            ours = plan.timesteps.numpy()
            if sigma_schedule is None:
                assert np.allclose(ours, theirs, atol=1e-3), (cls.__name__, spacing, offset, steps, ours[:4],
                                                              theirs[:4])
            elif rule == "dpm_solver":  # (rounded, as diffusers rounds them: apart only where the unrounded t is a
                # half within the float32 table's reach, e.g. 364.499 here, 364.5 there)
                apart = np.abs(ours - theirs) > 1e-3
                assert np.all(np.abs(ours - theirs)[apart] == 1.0), (cls.__name__, spacing, offset, steps)
                half = schedule.sigma_to_t(plan.sigmas.numpy()[:-1][apart]) % 1.0
                assert np.all(np.abs(half - 0.5) < 0.01), (cls.__name__, spacing, offset, steps, half)
            else:  # (timesteps read off a table: diffusers' float32 one moves them by up to 0.4 where 1 - abar
                # cancels, cosine at zero SNR; the level our table has at diffusers' timestep is ours to 2e-3)
                assert np.abs(ours - theirs).max() <= 0.5, (cls.__name__, extra, spacing, offset, steps)
                assert np.allclose(schedule.t_to_sigma(theirs), plan.sigmas.numpy()[:-1], rtol=2e-3), \
                    (cls.__name__, extra, spacing, offset, steps)
            if rule in ("karras", "dpm_solver"):
                ts = d.sigmas.double().numpy()[: steps + 1]
                assert np.allclose(plan.sigmas.numpy(), ts, rtol=2e-3, atol=1e-5), (cls.__name__, extra, steps)
            checked += 1
    assert checked > 300


def test_one_step_and_all_steps():
    """1 step: trailing starts at T - 1 (sigma_max) for every rule; leading at its offset and linspace at 0 (sigma_min),
    for all but the DPM-Solver family's own layout, as diffusers' schedulers do (Lin et al. 2023, Table 2's linspace,
    round(flip(linspace(1, T, S))), is t = 1 at S = 1 too): a one-step run there starts where there is no noise. T
    steps: every timestep once, or (leading with steps_offset 1) a refusal naming the timestep past T - 1 that
    diffusers would index; more than T: refused, as diffusers' DDIMScheduler refuses."""
    s = NoiseSchedule.from_config("scaled_linear", steps_offset=1, set_alpha_to_one=False)
    top = float(s.sigmas[-1])
    diffusers = pytest.importorskip("diffusers")
    peers = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
             "karras": diffusers.EulerDiscreteScheduler, "dpm_solver": diffusers.DPMSolverMultistepScheduler}
    for rule in ("ddim", "ddpm", "karras", "dpm_solver"):
        plan = s.plan(1, rule=rule, spacing="trailing")
        assert plan.timesteps.tolist() == [999.0] and float(plan.sigmas[0]) == pytest.approx(top)
        for spacing, offset in (("linspace", 0), ("leading", 0), ("leading", 1)):
            d = peers[rule](beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset)
            d.set_timesteps(1)
            got = s.plan(1, rule=rule, spacing=spacing, steps_offset=offset).timesteps.tolist()
            assert got == d.timesteps.double().tolist() == ([999.0] if (rule, spacing) == ("dpm_solver", "linspace")
                                                            else [500.0 + offset] if rule == "dpm_solver"
                                                            else [float(offset)]), (rule, spacing, offset)
        for spacing in ("trailing", "linspace"):
            t = s.plan(1000, rule=rule, spacing=spacing).timesteps.numpy()
            if (rule, spacing) == ("dpm_solver", "linspace"):  # (its layout: N + 1 points less the last, diffusers')
                assert t.tolist() == np.linspace(0, 999, 1001).round()[::-1][:-1].tolist()
            else:
                assert sorted(t.tolist()) == list(range(1000)), (rule, spacing)
        with pytest.raises(ValueError, match="between 1 and the 1000"):
            s.plan(1001, rule=rule)
    with pytest.raises(ValueError, match="outside 0..999"):
        s.plan(1000, rule="ddim", spacing="leading")
    with pytest.raises(ValueError):
        diffusers.DDIMScheduler().set_timesteps(1001)


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
@pytest.mark.parametrize("strength", [1e-3, 0.1, 0.3, 0.5, 0.7, 0.999, 1.0])
def test_image_to_image_steps_are_diffusers_get_timesteps(steps, strength):
    """diffusers' img2img get_timesteps: the last min(int(N strength), N) of the N steps (0 of them: refused, where
    diffusers' pipeline refuses too); 0.3 x 10 and 0.7 x 10 are 3 and 7 in floating point as in Python."""
    schedule = NoiseSchedule.from_config("scaled_linear", steps_offset=1)
    n = min(int(steps * strength), steps)
    if n == 0:
        with pytest.raises(ValueError, match="leaves no step"):
            run_plan(schedule, "ddim", steps, img2img=True, strength=strength)
        return
    full = run_plan(schedule, "ddim", steps)
    plan = run_plan(schedule, "ddim", steps, img2img=True, strength=strength)
    assert plan.timesteps.tolist() == full.timesteps[steps - n:].tolist()


# -- k-diffusion ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 8, 21])
def test_spaced_levels_equal_k_diffusions(kd, n):  # noqa: F811
    lo, hi = 0.0291675, 14.614642
    for rho in (None, 1.0, 3.0, 7.0):
        assert np.array_equal(spaced_sigmas("karras", lo, hi, n, rho, torch.float32),
                              kd.sampling.get_sigmas_karras(n, lo, hi, rho=rho or 7.0)[:-1].double().numpy())
        assert np.array_equal(spaced_sigmas("polyexponential", lo, hi, n, rho, torch.float32),
                              kd.sampling.get_sigmas_polyexponential(n, lo, hi, rho=rho or 1.0)[:-1].double().numpy())
    assert np.array_equal(spaced_sigmas("exponential", lo, hi, n, None, torch.float32),
                          kd.sampling.get_sigmas_exponential(n, lo, hi)[:-1].double().numpy())
    for kind in ("karras", "exponential", "polyexponential", "beta", "kl_optimal"):  # (1 level: sigma_max, as theirs)
        assert spaced_sigmas(kind, lo, hi, 1)[0] == pytest.approx(hi)


@pytest.mark.parametrize("which", ["scaled_linear", "cosine", "a1111_zero_snr"])
def test_sigma_and_t_maps_equal_discrete_schedules(kd, which):  # noqa: F811
    """k-diffusion's DiscreteSchedule (A1111's CompVisDenoiser) over the float32 abar: sigma_to_t and t_to_sigma, log
    sigma linear between neighbours, at t = 0 and T - 1, between, and for sigmas beyond the ends (clamped to 0 and
    T - 1 in both). A1111's zero-terminal-SNR table is taken as it is (no floor: its abar_T is positive)."""
    base = NoiseSchedule.from_config("scaled_linear" if which == "a1111_zero_snr" else which)
    s = base.a1111_zero_terminal_snr() if which == "a1111_zero_snr" else base

    class Model:
        alphas_cumprod = s.alphas_cumprod.float()

    d = kd.external.CompVisDenoiser(Model(), quantize=False)
    assert np.array_equal(d.sigmas.double().numpy(), s._sigma_table(held=True))
    top, bottom = float(d.sigmas[-1]), float(d.sigmas[0])
    sig = torch.tensor([bottom / 10, bottom, bottom * 1.01, 0.5, 1.0, 5.0, top * 0.99, top, top * 10])
    t_theirs = d.sigma_to_t(sig).double().numpy()
    t_ours = s.sigma_to_t(sig.double().numpy())
    assert t_ours[0] == t_theirs[0] == 0.0 and t_ours[-1] == t_theirs[-1] == 999.0
    assert np.allclose(t_ours, t_theirs, atol=1e-3)  # (float64 logs against float32: cosine's low end is steep)
    ts = torch.tensor([0.0, 0.25, 1.5, 500.5, 998.75, 999.0])
    assert np.allclose(s.t_to_sigma(ts.double().numpy()), d.t_to_sigma(ts).double().numpy(), rtol=3e-4)


# -- prediction types, Ho et al. eq. 4 and 11-12, Salimans & Ho's v -------------------------------------------------
def test_predictions_at_the_ends():
    """At abar_0 (t = 0) and abar near zero terminal SNR the three parameterisations convert into each other
    (v = alpha eps - sigma x_0, x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v), and DDPM's eq. 11 mean
    written with eps equals eq. 7's with x_0."""
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    s = NoiseSchedule.from_config("scaled_linear", zero_terminal_snr=True)
    for t in (0, 500, 998):
        abar = float(s.alphas_cumprod[t])
        xt = q_sample(x0, torch.tensor([t, t]), s, eps)
        v = velocity(x0, eps, abar)
        assert torch.allclose(predict_x0(v, xt, abar, "v_prediction"), x0, atol=1e-9)
        assert torch.allclose(predict_eps(v, xt, abar, "v_prediction"), eps, atol=1e-9)
        for a, b in itertools.permutations(("epsilon", "sample", "v_prediction"), 2):
            out = {"epsilon": eps, "sample": x0, "v_prediction": v}
            tol = 1e-6 if t < 998 else 1e-3  # (eps -> x_0 divides by alpha = 1.4e-3 at t = 998)
            assert torch.allclose(convert_prediction(out[a], xt, abar, a, b), out[b], atol=tol), (t, a, b)
        if t > 0:  # eq. 7 with x_0 against eq. 11 with eps, one DDPM step from t to t - 1
            prev = float(s.alphas_cumprod[t - 1])
            beta = 1 - abar / prev
            mean7 = (math.sqrt(prev) * beta / (1 - abar)) * x0 + (math.sqrt(1 - beta) * (1 - prev) / (1 - abar)) * xt
            mean11 = (xt - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
            assert torch.allclose(mean7, mean11, atol=1e-9)
    # at zero terminal SNR (abar_T = 0) x_t is the noise: v = -x_0, and min-SNR's eps weight is its limit, 1
    xT = q_sample(x0, torch.tensor([999, 999]), s, eps)
    assert torch.equal(xT, eps) and torch.allclose(velocity(x0, eps, 0.0), -x0)
    w = min_snr_weights(torch.tensor([0.0, 1.0, 100.0]), 5.0, "epsilon")
    assert w.tolist() == [1.0, 1.0, 0.05]


# -- guidance --------------------------------------------------------------------------------------------------------
def test_guidance_equals_the_papers_and_diffusers():
    """Classifier-free guidance (Ho & Salimans eq. 6: (1 + w) e(c) - w e(0), w = s - 1), guidance rescale against
    diffusers' rescale_noise_cfg (Lin et al. eq. 15-16), and Dhariwal & Nichol's Algorithm 2 shift."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(7)
    u, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for s in (0.0, 1.0, 7.5):
        cfg = classifier_free_guidance(u, c, s)
        assert torch.allclose(cfg, (1 + (s - 1)) * c - (s - 1) * u, atol=1e-5)
        for phi in (0.0, 0.3, 0.7, 1.0):
            assert torch.allclose(rescale_guidance(cfg, c, phi), rescale_noise_cfg(cfg, c, phi), atol=1e-6)
    assert torch.allclose(classifier_free_guidance(u, c, 1.0), c, atol=1e-6)
    rescaled = rescale_guidance(classifier_free_guidance(u, c, 7.5), c, 1.0)
    assert torch.allclose(rescaled.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-5)
    grad = torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(classifier_eps_shift(u, grad, 0.36, 2.0), u - 0.8 * 2.0 * grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholding_equals_diffusers(dtype):
    """Imagen's dynamic thresholding (Saharia et al. sec. 2.3) against diffusers' _threshold_sample: equal where
    diffusers' sample_max_value does not cap s (its default 1.0 caps it at 1, making its dynamic rule the static clip,
    the paper's s has no cap: a difference kept); the quantile in x_0's own float64, as diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.3, 1.5, 4.0]).view(3, 1, 1, 1)).to(dtype)
    d = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e9)
    theirs = d._threshold_sample(x0.clone())
    ours = dynamic_threshold(x0, 0.995)
    assert ours.dtype == dtype and torch.allclose(ours, theirs, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(ours[0], x0[0])  # (a sample within [-1, 1] at its quantile is only clipped: here untouched)
    capped = diffusers.DDPMScheduler(thresholding=True)._threshold_sample(x0.clone())
    assert torch.allclose(capped, static_threshold(x0), atol=1e-7)
    # R: the paper's rule in units of the data's range
    assert torch.allclose(dynamic_threshold(x0, 0.995, bound=4.0), 4.0 * dynamic_threshold(x0 / 4.0, 0.995),
                          atol=1e-6)
