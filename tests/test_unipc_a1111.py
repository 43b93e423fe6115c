"""AUTOMATIC1111's UniPC: our unipc sampler over the continuous-time schedule types, against A1111's own code restated.

A1111's "UniPC" is not diffusers' UniPCMultistepScheduler but the UniPC authors' code in
modules/models/diffusion/uni_pc/uni_pc.py, driven by modules/sd_samplers_timesteps_impl.py's unipc(). Restated here
from that source, in its own terms (continuous VP time t, its NoiseScheduleVP, its R rho = b systems):
- the model's float32 abar as a discrete-time schedule: timestep j sits at t_j = (j + 1) / N, log alpha_t =
  log sqrt(abar) piecewise linear in t between those, sigma_t = sqrt(1 - alpha_t^2), lambda_t = log alpha_t - log sigma_t;
- as many steps as its CompVis timesteps clip(range(0, 1000, 1000 // steps) + 1, 0, 999) count, laid out by the skip
  type ("time_uniform": t evenly from 1 to 1/N; "time_quadratic"; "logSNR": lambda evenly, t by inverse interpolation);
- the model called at the fractional timestep (t - 1/N) * 1000 with A1111's classifier-free guidance on eps (a
  v-prediction model's v made eps with abar at the timestep truncated to an integer), x_0 = (x - sigma_t eps) / alpha_t;
- the multistep UniPC with B(h) = -h (bh1) or e^-h - 1 (bh2): warm-up at orders 1..p-1 with the corrector, then order
  min(p, steps + 1 - step) (lower_order_final), no corrector on the last step, the result at t = 1/N (not denoised).
"""

from __future__ import annotations

import math

import pytest
import torch

from test_cfg_pp import COND, UNCOND, conditioned
from test_k_diffusion import a1111_img2img_steps, kd  # noqa: F401 (kd: k-diffusion's modules, a fixture)
from test_samplers_parity import SEEDS, SHAPE, config

from imagine.samplers import a1111_settings
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule, compvis_count

pytestmark = pytest.mark.usefixtures("one_thread")
# ours against A1111's UniPC: the largest difference relative to the largest value. The test model's samples reach
# |x| ~ 13.5, where float32's rounding through the two implementations' different operation orders left up to 1.07e-4
# absolute (8e-6 relative; the old bar was 1e-4 absolute) on session 30's AVX2 CPU
REL_TOL = 1.5e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


EPS = config("scaled_linear", "leading", "epsilon")
V = config("scaled_linear", "leading", "v_prediction")


class A1111Schedule:
    """uni_pc.NoiseScheduleVP('discrete', alphas_cumprod=...) restated, in float32 as A1111 holds the model's abar."""

    def __init__(self, abar: torch.Tensor, dtype=torch.float32):
        self.abar, self.dtype = abar.to(dtype), dtype
        self.N = len(abar)
        self.t_grid = torch.linspace(0.0, 1.0, self.N + 1, dtype=dtype)[1:]
        self.log_alpha_grid = 0.5 * torch.log(self.abar)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        # piecewise linear through (t_j, log alpha_j), extended linearly beyond the ends (interpolate_fn)
        j = torch.clamp(torch.searchsorted(self.t_grid, t) - 1, 0, self.N - 2)
        t0, t1 = self.t_grid[j], self.t_grid[j + 1]
        y0, y1 = self.log_alpha_grid[j], self.log_alpha_grid[j + 1]
        return y0 + (t - t0) * (y1 - y0) / (t1 - t0)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def t_of_lambda(self, lam):
        la = -0.5 * torch.logaddexp(torch.zeros((), dtype=self.dtype), -2.0 * lam)
        # interpolate t over log alpha (flipped so that it rises)
        xs, ys = torch.flip(self.log_alpha_grid, [0]), torch.flip(self.t_grid, [0])
        j = torch.clamp(torch.searchsorted(xs, la) - 1, 0, self.N - 2)
        return ys[j] + (la - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])

    def times(self, skip: str, n: int, t_T=1.0) -> torch.Tensor:
        t_0 = 1.0 / self.N
        if skip == "time_uniform":
            return torch.linspace(t_T, t_0, n + 1, dtype=self.dtype)
        if skip == "time_quadratic":
            return torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1, dtype=self.dtype) ** 2
        lams = torch.linspace(float(self.lam(torch.as_tensor(t_T, dtype=self.dtype))),
                              float(self.lam(torch.as_tensor(t_0, dtype=self.dtype))), n + 1, dtype=self.dtype)
        return self.t_of_lambda(lams)


@torch.no_grad()
def a1111_unipc(cfg, steps, cfg_scale, order=3, variant="bh1", skip="time_uniform", seeds=SEEDS, dtype=torch.float64,
                init=None, strength=1.0, fixed=False, paint=None):
    """A1111's UniPC restated (module doc), computing in `dtype`: float64 by default, A1111's algorithm in exact
    arithmetic (float32, A1111's own, is itself 6e-6 away at 20 steps of CFG 1 on the tiny model and 3e-3 at CFG 7.5,
    where that model's guided ODE amplifies rounding: the scales below stay where it does not). Image to image (its
    CompVisSampler.sample_img2img and unipc(is_img2img=True)): the init taken to the abar of timesteps[t_enc] with the
    unit noise, then t_enc steps from t_start = timesteps[t_enc - 1] / 1000 + 1 / 1000 (float32), a level below.
    With `paint` (1 where painted anew) its inpainting: the model sees the clean init where paint is 0 (the blend before
    denoising of its CFGDenoiserTimesteps), x_0 from that eps at the sampler's own x, the result blended at the end."""
    model = conditioned(cfg)
    ns = A1111Schedule(NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod, dtype)
    if init is not None:
        steps, t_enc = a1111_img2img_steps(steps, strength, fixed)
    timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)  # its CompVis timesteps
    n, t_top = len(timesteps), torch.tensor(1.0)
    if init is not None:
        n, t_top = t_enc, timesteps[:t_enc][-1] / 1000 + 1 / 1000
    assert n >= order, "UniPC order must be < sampling steps"
    ts = ns.times(skip, n, t_top.to(dtype))
    # (its float32 t as well: the integer timestep a v model's output is read at is truncated from it)
    t_ints = ((A1111Schedule(ns.abar, torch.float32).times(skip, n, t_top) - 1.0 / ns.N) * 1000.0).long()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).to(dtype)
    if init is not None:
        a = ns.abar[timesteps[t_enc]].to(dtype)
        x = a.sqrt() * init.to(dtype) + (1 - a).sqrt() * x

    def eps(x, t_in, c, t_int):
        out = model(x.float(), torch.full((x.shape[0],), float(t_in)), c["c"]).to(x.dtype)
        if cfg["prediction_type"] == "v_prediction":  # (CompVisTimestepsVDenoiser: abar at int(t))
            a = ns.abar[t_int]
            out = a.sqrt() * out + (1 - a).sqrt() * x
        return out

    def x0_of(x, k):
        t, t_in = ts[k], float((ts[k] - 1.0 / ns.N) * 1000.0)
        x_in = x if paint is None else x * paint + init.to(dtype) * (1 - paint)
        e = eps(x_in, t_in, COND, t_ints[k])
        if cfg_scale != 1.0:
            e_u = eps(x_in, t_in, UNCOND, t_ints[k])
            e = e_u + (e - e_u) * cfg_scale
        return (x - ns.sigma(t) * e) / ns.alpha(t)

    def update(x, ms, t_prevs, k_t, p, use_corrector):
        t = ts[k_t]
        lam_prev, lam_t = ns.lam(t_prevs[-1]), ns.lam(t)
        h = lam_t - lam_prev
        m0 = ms[-1]
        rks, d1s = [], []
        for k in range(1, p):
            rk = float((ns.lam(t_prevs[-(k + 1)]) - lam_prev) / h)
            rks.append(rk)
            d1s.append((ms[-(k + 1)] - m0) / rk)
        rks = torch.tensor(rks + [1.0], dtype=ns.dtype)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b, h_phi_k, fact = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, p + 1):
            rows.append(rks ** (k - 1))
            b.append(float(h_phi_k * fact / b_h))
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        r_mat, b = torch.stack(rows), torch.tensor(b, dtype=ns.dtype)
        x_lin = ns.sigma(t) / ns.sigma(t_prevs[-1]) * x - ns.alpha(t) * h_phi_1 * m0
        pred = 0
        if d1s:
            rho_p = torch.tensor([0.5], dtype=ns.dtype) if p == 2 else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
            pred = sum(r * d for r, d in zip(rho_p, d1s))
        x_t = x_lin - ns.alpha(t) * b_h * pred
        if not use_corrector:
            return x_t, None
        m_t = x0_of(x_t, k_t)
        rho_c = torch.tensor([0.5], dtype=ns.dtype) if p == 1 else torch.linalg.solve(r_mat, b)
        corr = sum((r * d for r, d in zip(rho_c[:-1], d1s)), torch.zeros_like(m0))
        return x_lin - ns.alpha(t) * b_h * (corr + rho_c[-1] * (m_t - m0)), m_t

    ms, t_prevs = [x0_of(x, 0)], [ts[0]]
    for k in range(1, order):  # warm-up
        x, m = update(x, ms, t_prevs, k, k, True)
        ms.append(m)
        t_prevs.append(ts[k])
    for step in range(order, n + 1):
        p = min(order, n + 1 - step)
        x, m = update(x, ms, t_prevs, step, p, step != n)
        ms, t_prevs = (ms + [m])[-order:], (t_prevs + [ts[step]])[-order:]
    if paint is not None:
        x = x * paint + init.to(dtype) * (1 - paint)
    return x.double()


def ours(cfg, steps, cfg_scale, scheduler=None, strength_rule=None, init=None, strength=1.0, mask=None, **options):
    settings = a1111_settings("UniPC", scheduler)
    settings["sampler_options"] = {**settings["sampler_options"], **options}
    if strength_rule:
        settings["strength_rule"] = strength_rule
    return sample(conditioned(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg),
                  sampler=settings.pop("sampler"), steps=steps, seeds=SEEDS, progress=False, cond=COND,
                  uncond=UNCOND if cfg_scale != 1 else None, guidance_scale=cfg_scale, init=init, strength=strength,
                  mask=mask, **settings).double()


@pytest.mark.parametrize("cfg", [EPS, V], ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("steps, cfg_scale", [(5, 5.0), (8, 1.0), (20, 4.0), (10, 3.5), (50, 3.0)])
def test_unipc_equals_a1111s(cfg, steps, cfg_scale):
    theirs = a1111_unipc(cfg, steps, cfg_scale)
    err = rel_err(ours(cfg, steps, cfg_scale), theirs)
    assert err < REL_TOL, f"{steps} steps, CFG {cfg_scale}: max |ours - A1111's| / max |A1111's| = {err:.2e}"


@pytest.mark.parametrize("steps, asked_more", [(30, 31), (7, 8)])
def test_unipc_takes_a1111s_step_count(steps, asked_more):
    """Where 1000 // steps leaves a remainder A1111's UniPC runs as many steps as its CompVis timesteps count."""
    assert compvis_count(1000, steps) == asked_more
    theirs = a1111_unipc(EPS, steps, 4.0)
    with pytest.warns(UserWarning, match=f"the run takes {asked_more} steps"):
        got = ours(EPS, steps, 4.0)
    err = rel_err(got, theirs)
    assert err < REL_TOL, f"{steps} steps: max |ours - A1111's| / max |A1111's| = {err:.2e}"


@pytest.mark.parametrize("order, variant", [(1, "bh1"), (2, "bh1"), (2, "bh2"), (3, "bh2"), (4, "bh1")])
def test_unipc_orders_and_variants_equal_a1111s(order, variant):
    theirs = a1111_unipc(EPS, 10, 5.0, order=order, variant=variant)
    err = rel_err(ours(EPS, 10, 5.0, order=order, variant=variant), theirs)
    assert err < REL_TOL, f"order {order}, {variant}: max |ours - A1111's| / max |A1111's| = {err:.2e}"


@pytest.mark.parametrize("ours_name, skip", [("time_quadratic", "time_quadratic"), ("logsnr", "logSNR")])
def test_unipc_skip_types_equal_a1111s(ours_name, skip):
    """A1111's other skip types (its uni_pc_skip_type setting) are our schedule types of those names (at a step count
    where its CompVis count is the same)."""
    theirs = a1111_unipc(EPS, 8, 4.0, skip=skip)
    err = rel_err(ours(EPS, 8, 4.0, scheduler=ours_name), theirs)
    assert err < REL_TOL, f"{skip}: max |ours - A1111's| / max |A1111's| = {err:.2e}"


def test_time_uniform_levels_follow_the_papers_interpolation():
    """The plan's levels: t evenly in [1/T, 1], abar from log sqrt(abar) linear in t between the timesteps (exactly the
    model's abar where t falls on one), the model at timestep T t - 1, the end at abar_0."""
    schedule = NoiseSchedule.from_diffusers_config(EPS)
    plan = schedule.plan(10, rule="dpm_solver", sigma_schedule="time_uniform")
    abar = schedule.alphas_cumprod
    t = torch.linspace(1.0, 1e-3, 11, dtype=torch.float64)
    torch.testing.assert_close(plan.timesteps, 1000 * t[:-1] - 1)
    assert float(plan.alphas_cumprod[0]) == pytest.approx(float(abar[999]), rel=1e-12)
    assert float(plan.alphas_cumprod[-1]) == pytest.approx(float(abar[0]), rel=1e-12)
    for i in range(1, 10):  # between timesteps j and j + 1, log abar is the weighted mean of theirs
        tau = float(plan.timesteps[i])
        j, w = int(math.floor(tau)), tau - math.floor(tau)
        want = math.exp((1 - w) * math.log(float(abar[j])) + w * math.log(float(abar[j + 1])))
        assert float(plan.alphas_cumprod[i]) == pytest.approx(want, rel=1e-12)
    assert float(plan.sigmas[-1]) > 0  # (ends at abar_0, as the DPM-Solver and UniPC code end at t = 1/T)


@pytest.mark.parametrize("cfg", [EPS, V], ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("steps, strength, fixed", [(20, 0.75, False), (30, 0.5, False), (10, 1.0, False),
                                                    (10, 0.6, True)])
def test_unipc_img2img_equals_a1111s(cfg, steps, strength, fixed):
    """Image to image: A1111's CompVis img2img (the "a1111" strength rule; "a1111_fixed_steps", its hires. fix pass)
    runs UniPC over t_enc steps from the level below the one the image is noised to."""
    init = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    theirs = a1111_unipc(cfg, steps, 3.0, init=init, strength=strength, fixed=fixed)
    got = ours(cfg, steps, 3.0, init=init, strength=strength,
               strength_rule="a1111_fixed_steps" if fixed else None)
    err = rel_err(got, theirs)
    assert err < REL_TOL, f"{steps} steps at {strength}: max |ours - A1111's| / max |A1111's| = {err:.2e}"


# -- plans that end above sigma = 0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, order", [("dpmpp_3m", 3), ("unipc", 2), ("unipc", 3)])
@pytest.mark.parametrize("steps", [5, 8, 12, 20])
def test_multistep_orders_on_a_plan_that_ends_at_abar_0(sampler, order, steps):
    """A multistep run whose last level is abar_0 (sigma 0.029), not 0, lowers its order towards its own end as
    diffusers does with final_sigmas_type "sigma_min" (DPMSolverMultistepScheduler under 15 steps: 2nd order on the step
    before the last and 1st on the last; UniPCMultistepScheduler: min(order, steps left)): the plan's `follow` is 0."""
    from dataclasses import replace

    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from test_samplers_parity import make_model, run_diffusers

    from imagine.samplers import SAMPLERS
    from imagine.sampling import Denoiser

    cfg = EPS
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    plan = schedule.plan(steps, rule="dpm_solver")
    abar0 = schedule.alphas_cumprod[:1]
    plan = replace(plan, sigmas=torch.cat([plan.sigmas[:-1], ((1 - abar0) / abar0).sqrt()]),
                   alphas_cumprod=torch.cat([plan.alphas_cumprod[:-1], abar0]))
    assert plan.follow == 0
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    options = {"order": order} if sampler == "unipc" else {}
    ours = SAMPLERS[sampler](Denoiser(make_model(cfg), plan, "epsilon"), x, plan, progress=False, **options)
    scheduler = (DPMSolverMultistepScheduler.from_config(cfg, solver_order=3, final_sigmas_type="sigma_min")
                 if sampler == "dpmpp_3m" else
                 UniPCMultistepScheduler.from_config(cfg, solver_order=order, final_sigmas_type="sigma_min"))
    theirs = run_diffusers(scheduler, steps)
    err = rel_err(ours, theirs)
    assert err < REL_TOL, f"{sampler} order {order}, {steps} steps: max |ours - diffusers'| = {err:.2e}"


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpm2", "lms"])
def test_karras_samplers_on_a_plan_that_ends_at_abar_0(kd, sampler):
    """The Karras-style samplers over a continuous-time plan (ending at abar_0, not 0) step to that last level as
    k-diffusion's do over the same levels (Heun corrects its last step there too, with a model call at sigma 0.029),
    and return the sample there: ours in VP terms, theirs in VE (x / alpha)."""
    from test_k_diffusion import CompVisModel

    schedule = NoiseSchedule.from_diffusers_config(EPS)
    plan = schedule.plan(8, rule="karras", sigma_schedule="time_uniform")
    denoiser = kd.external.CompVisDenoiser(CompVisModel(EPS), quantize=False)
    sigmas = plan.sigmas.float()
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]) * sigmas[0]
    fn = getattr(kd.sampling, {"heun": "sample_heun", "euler": "sample_euler", "dpm2": "sample_dpm_2",
                               "lms": "sample_lms"}[sampler])
    theirs = fn(denoiser, x, sigmas, disable=True).double()
    ours = sample(CompVisModel(EPS).model, SHAPE, schedule=schedule, sampler=sampler, steps=8, seeds=SEEDS,
                  progress=False, sigma_schedule="time_uniform", start="sigma_max").double()
    ours = ours * math.sqrt(1 + float(plan.sigmas[-1]) ** 2)
    err = rel_err(ours, theirs)
    assert err < REL_TOL, f"{sampler}: max |ours - k-diffusion's| = {err:.2e}"


def test_continuous_time_types_floor_zero_terminal_snr():
    """At zero terminal SNR (abar_T = 0, log abar = -inf) the continuous-time types floor abar_T at 2^-24, as the
    sigma-based plans do, and a v model runs to a finite result."""
    cfg = config("scaled_linear", "trailing", "v_prediction", zero_snr=True)
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    for kind in ("time_uniform", "time_quadratic", "logsnr", "compvis_time_uniform"):
        plan = schedule.plan(6, rule="dpm_solver", sigma_schedule=kind)
        assert float(plan.alphas_cumprod[0]) == pytest.approx(2.0**-24) and bool(torch.isfinite(plan.sigmas).all())
    settings = a1111_settings("UniPC")
    out = sample(conditioned(cfg), SHAPE, schedule=schedule, sampler=settings.pop("sampler"), steps=10, seeds=SEEDS,
                 progress=False, cond=COND, uncond=UNCOND, guidance_scale=3.0, **settings)
    assert bool(torch.isfinite(out).all())


def test_v_reading_follows_the_models_timesteps():
    """A1111's integer timestep for reading v is its float32 (t - 1/T) T truncated: for a model of T = 500 timesteps
    too (A1111's code writes 1000 for T), the floor of the plan's fractional timestep wherever that is not within
    float32 rounding of an integer."""
    for T in (1000, 500):
        schedule = NoiseSchedule.from_diffusers_config(config("scaled_linear", "leading", "v_prediction",
                                                              num_train_timesteps=T))
        plan = schedule.plan(7, rule="dpm_solver", sigma_schedule="compvis_time_uniform")
        for tau, v_abar in zip(plan.timesteps.tolist(), plan.v_alphas_cumprod.tolist()):
            if abs(tau - round(tau)) > 1e-3:
                assert v_abar == float(schedule.alphas_cumprod[math.floor(tau)]), (T, tau)


def test_compvis_image_to_image_errors_and_scope():
    """Too little strength for A1111's CompVis image to image is an error naming its t_enc rule; the rule belongs to
    its CompVis samplers: Euler over the compvis schedule type with the a1111 strength rule runs the k-diffusion way."""
    from test_samplers_parity import make_model

    schedule = NoiseSchedule.from_diffusers_config(EPS)
    init = torch.zeros(SHAPE)
    kw = dict(schedule=schedule, seeds=SEEDS, progress=False, init=init)
    with pytest.raises(ValueError, match=r"t_enc = int\(min\(strength, 0.999\) \* steps\) = 1, and its DDIM and PLMS"):
        sample(make_model(EPS), SHAPE, steps=10, strength=0.15, **kw, **a1111_settings("DDIM"))
    with pytest.raises(ValueError, match=r"t_enc = steps - 1 = 0, and its UniPC runs t_enc steps"):
        sample(make_model(EPS), SHAPE, steps=1, strength=0.5, **kw,
               **{**a1111_settings("UniPC"), "strength_rule": "a1111_fixed_steps"})
    calls = []
    sample(make_model(EPS), SHAPE, steps=10, strength=0.5, sampler="euler", sigma_schedule="compvis",
           strength_rule="a1111", callback=lambda d: calls.append(d["step"]), **kw)
    assert len(calls) == int(0.5 * 10) + 1  # (A1111's k-diffusion count: t_enc + 1 steps from timestep t_enc's level)


@pytest.mark.parametrize("cfg", [EPS, V], ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_unipc_inpainting_equals_a1111s(cfg, strength):
    """Inpainting with A1111's UniPC: the model sees the clean init where the mask keeps it, its eps (v read at that
    input) used at the sampler's own x."""
    from test_k_diffusion import paint_mask

    init = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    paint = paint_mask()
    theirs = a1111_unipc(cfg, 20, 3.0, init=init, strength=strength, paint=paint)
    err = rel_err(ours(cfg, 20, 3.0, init=init, strength=strength, mask=paint), theirs)
    assert err < REL_TOL, f"strength {strength}: max |ours - A1111's| / max |A1111's| = {err:.2e}"
