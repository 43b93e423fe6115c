"""Samplers, k-diffusion style: one short function per paper algorithm, all with one signature

    sampler(denoise, x, plan, *, noise=None, eta=None, callback=None, progress=True) -> x_0

- `denoise(x_t, i)` is the x_0-denoiser D at step i of `plan`: it takes the sample as the network
  sees it (VP: x_t = alpha_t x_0 + sigma_t eps at noise level plan.alphas_cumprod[i]) and returns
  the (guided, thresholded) prediction of x_0. See `imagine.sampling.Denoiser`. The samplers that
  evaluate between the plan's levels (DPM2, DPM2 a, DPM++ 2S a) call `denoise.at_sigma(x_t, sigma, i)`:
  the same chain at VE noise level sigma, the model at that level's fractional timestep.
- `x` is the start sample x_T in the same VP convention; the result is the sample at the plan's end
  (x_0 for every plan except DDIM with set_alpha_to_one=False, which ends at abar_0 as diffusers does).
- `plan` (`imagine.schedules.SamplingPlan`) holds per step the model timestep, sigma and abar.
- `noise(x)` draws standard normal noise shaped like x (one generator per sample; see
  `imagine.sampling.PerSampleNoise`); defaults to torch.randn_like.
- `eta` scales the fresh noise of the stochastic samplers; deterministic ones reject eta != 0.
- `callback(info)` runs after each model evaluation with a dict: step, total, t, sigma, x (the
  VP sample at that step), denoised. It may raise to stop the run.

The Karras-style samplers (Euler, Euler ancestral, Heun, LMS, DPM2, DPM2 ancestral, DPM++ 2S ancestral)
step in VE space, x / alpha with noise level sigma (Karras et al. 2022, eq. 4 with s(t) = 1, sigma(t) = t);
DDPM, DDIM, PLMS, LCM and DPM-Solver++ step in VP space as their papers do. Every sampler reads its step sizes
from the plan, so the same function serves any schedule, spacing or Karras sigmas.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from imagine.schedules import VARIANCE_TYPES, SamplingPlan, karras_sigmas

Denoise = Callable[[torch.Tensor, int], torch.Tensor]


# -- shared pieces -------------------------------------------------------------------------------------
def _steps(plan: SamplingPlan, progress: bool, desc: str):
    return tqdm(range(len(plan)), desc=desc, disable=not progress, leave=False)


def _report(callback, plan: SamplingPlan, i: int, x: torch.Tensor, denoised: torch.Tensor,
            sigma_hat: float | None = None) -> None:
    if callback is not None:
        info = {"step": i, "total": len(plan), "t": float(plan.timesteps[i]), "sigma": float(plan.sigmas[i]),
                "x": x, "denoised": denoised}
        if sigma_hat is not None:  # (a churned step: x is at sigma_hat, as k-diffusion reports it)
            info["sigma_hat"] = sigma_hat
        callback(info)


def _noise(noise, x: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(x) if noise is None else noise(x)


SDE_NOISES = ("brownian", "independent")


def _increments(noise, x: torch.Tensor, plan: SamplingPlan, sde_noise: str):
    """The SDE samplers' noise z(sigma, sigma_next) for a step from sigma to sigma_next: with sde_noise "brownian" the
    normalized increment of each sample's Brownian path between the two levels (imagine.brownian: the paths of
    `noise.brownian` when `sample` made the noise; with noise None, paths seeded from torch's global generator over
    the plan's levels; a noise callable of the caller's own, without paths, gives its own draws), with "independent" a
    fresh standard normal draw per call (diffusers' multistep SDE schedulers)."""
    if sde_noise not in SDE_NOISES:
        raise ValueError(f"sde_noise must be one of {', '.join(map(repr, SDE_NOISES))}; got {sde_noise!r}")
    if sde_noise == "independent" or (noise is not None and getattr(noise, "brownian", None) is None):
        return lambda s, s_next: _noise(noise, x)
    paths = []  # built at the first increment (a run that never adds noise needs none)

    def z(s: float, s_next: float) -> torch.Tensor:
        if not paths:
            levels = [v for v in plan.sigmas.tolist() if v > 0]
            levels = (min(levels), max(levels))
            if noise is not None:
                paths.append(noise.brownian(x, levels))
            else:
                from imagine.brownian import BrownianTreeNoise, tree_seeds

                paths.append(BrownianTreeNoise(tree_seeds(x.shape[0]), x.shape[1:], *levels))
        return paths[0](s, s_next).to(device=x.device, dtype=x.dtype)

    return z


def _distinct_levels(plan: SamplingPlan, name: str) -> None:
    # The exponential integrators step in lambda = -log sigma; two equal levels make a step of length 0 (which the
    # multistep ratio h_prev / h divides by). diffusers' leading spacing repeats levels at a step count near T.
    sigmas = plan.sigmas.tolist()
    for i, (a, b) in enumerate(zip(sigmas, sigmas[1:])):
        if a == b and b > 0:
            raise ValueError(f"{name}: noise level {a:.6g} repeats at steps {i} and {i + 1} of {len(plan)}; use fewer "
                             "steps, or trailing / linspace spacing, or Karras / exponential levels")


def _ends_at_zero(plan: SamplingPlan, name: str) -> None:
    # (Restart's segments are laid out over a run down to sigma = 0, or A1111's KL Optimal end above it, end_ve)
    if float(plan.sigmas[-1]) != 0 and not plan.end_ve:
        raise ValueError(f"{name} runs down to sigma = 0; this plan stops above it, at {float(plan.sigmas[-1]):.6g}")


# What a sampler's own code refuses in a plan, by canonical name: check_plan runs it on the plan a run takes
# (sampling.run_plan), so that a sampler and schedule type that cannot run are refused before any work (a hires pass's
# before the first pass), not only when the sampler starts.
_PLAN_CHECKS = {"restart": _ends_at_zero,
                **dict.fromkeys(("dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m",
                                 "dpmpp_3m_sde"), _distinct_levels)}


def check_plan(canonical: str, plan: SamplingPlan) -> None:
    """ValueError where the sampler `canonical` (a SAMPLERS name) cannot run on `plan`, as its own code would refuse it
    once started: Restart on a plan ending above sigma = 0, the DPM-Solver++ family on repeated noise levels."""
    check = _PLAN_CHECKS.get(canonical)
    if check is not None:
        check(plan, canonical)


# the samplers with a noise scale eta (see takes_eta)
_ETA_SAMPLERS = ("ddim", "euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                 "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive", "ddim_cfgpp", "euler_a_cfgpp", "res_multistep_a",
                 "res_multistep_a_cfgpp", "dpmpp_2s_a_cfgpp", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece")


def _deterministic(name: str, eta) -> None:
    if eta not in (None, 0, 0.0):
        raise ValueError(f"the {name} sampler is deterministic and takes no eta (got {eta}); eta applies to "
                         f"{', '.join(_ETA_SAMPLERS[:-1])} and {_ETA_SAMPLERS[-1]}")


def _eta(name: str, eta, default: float) -> float:
    eta = default if eta is None else float(eta)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta for {name} must be a finite number >= 0; got {eta}")
    return eta


def _noise_scale(name: str, s_noise) -> float:
    # s_noise: the scale of the fresh noise a stochastic step adds (k-diffusion's s_noise; A1111's "Sigma noise",
    # which it passes to the samplers of its sampler_extra_params); 1 is the sampler's own SDE
    if isinstance(s_noise, bool) or not isinstance(s_noise, (int, float)) or not 0 <= s_noise < math.inf:
        raise ValueError(f"{name}: s_noise (the scale of its fresh noise) must be a number >= 0 and finite; "
                         f"got {s_noise!r}")
    return float(s_noise)


def _check_band(s_tmin, s_tmax) -> None:
    if not 0 <= s_tmin <= s_tmax:
        raise ValueError(f"need 0 <= s_tmin <= s_tmax; got s_tmin={s_tmin}, s_tmax={s_tmax}")


def _run_steps(plan: SamplingPlan) -> int:
    # the steps of the whole run: the plan's and those that follow its end (plan.head's: a final step run apart)
    return len(plan) + plan.follow


def _ancestral_step(s: float, s_next: float, eta: float) -> tuple[float, float]:
    # (sigma_down, sigma_up) of an ancestral step from s to s_next (k-diffusion's get_ancestral_step): noise
    # sigma_up^2 = eta^2 s_next^2 (s^2 - s_next^2) / s^2 (at most s_next^2) after a deterministic step to
    # sigma_down^2 = s_next^2 - sigma_up^2; eta = 0 is the plain step to s_next
    if eta == 0:
        return s_next, 0.0
    s_up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
    return math.sqrt(s_next**2 - s_up**2), s_up


def _check_churn(name: str, s_churn, s_tmin, s_tmax, s_noise) -> tuple[float, float, float, float]:
    for key, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name}: {key} must be a finite number >= 0; got {v!r}")
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
        raise ValueError(f"{name}: need s_tmin <= s_tmax (inf: no upper end); got s_tmin={s_tmin}, s_tmax={s_tmax}")
    return float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)


def _churned(denoise, x: torch.Tensor, plan: SamplingPlan, i: int, churn, noise, dtype, callback):
    """Karras et al. 2022, Algorithm 2, lines 4-7 (k-diffusion's s_churn): where s_tmin <= sigma_i <= s_tmax, raise
    the noise level to sigma_hat = sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1), by adding fresh noise
    of variance sigma_hat^2 - sigma_i^2 (times S_noise^2), then evaluate D there (its fractional timestep); with
    S_churn > 0 a draw is made at every step, as k-diffusion makes it, so the noise at a step is its. Returns
    (x, sigma_hat, D); with S_churn 0 it is the plain step's (x, sigma_i, D(x; sigma_i)). x in VE terms."""
    s = float(plan.sigmas[i])
    s_churn, s_tmin, s_tmax, s_noise = churn
    # (N: the run's steps, a final step run apart included, as k-diffusion's len(sigmas) - 1)
    gamma = min(s_churn / _run_steps(plan), math.sqrt(2.0) - 1.0) if s_churn > 0 and s_tmin <= s <= s_tmax else 0.0
    s_hat = s * (gamma + 1.0)
    x_t = _ve_to_vp(x, s, dtype)
    # (k-diffusion draws the churn's noise at every step once S_churn is on, used or not: the draws stay its)
    z = _noise(noise, x_t).double() if s_churn > 0 else None
    if gamma > 0:
        x = x + (s_noise * math.sqrt(s_hat * s_hat - s * s)) * z
        x_t = _ve_to_vp(x, s_hat, dtype)
        denoised = denoise.at_sigma(x_t, s_hat, i)
    else:
        denoised = denoise(x_t, i)
    _report(callback, plan, i, x_t, denoised, s_hat if gamma > 0 else None)
    return x, s_hat, denoised


def _vp_to_ve(x: torch.Tensor, sigma: float) -> torch.Tensor:
    # x_VE = x_t / alpha_t with alpha_t = 1 / sqrt(1 + sigma^2). Kept in float64: at sigma_max ~ 2e4 (cosine
    # schedule) a float32 ulp is 2e-3, and x_VE - sigma * eps cancels down to O(1).
    return x.double() * math.sqrt(1.0 + sigma * sigma)


def _ve_to_vp(x: torch.Tensor, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    return (x / math.sqrt(1.0 + sigma * sigma)).to(dtype)


# -- DDPM ------------------------------------------------------------------------------------------------
def sample_ddpm(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, variance_type: str = "fixed_small", final_noise: bool = True) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the plan's sub-sequence of timesteps.

    Each step draws from the posterior q(x_prev | x_t, x_0 = D(x_t)) (eq. 6-7), with the strided
    beta_t = 1 - abar_t / abar_prev; variance "fixed_small" = beta_tilde (the posterior's own) or
    "fixed_large" = beta (sec. 3.2: both give similar samples). No noise on the step that lands on
    x_0 (Alg. 2, z = 0 at t = 1). With classifier guidance in its DDPM form, the mean moves by s * Sigma * grad
    log p(y | x_t) (Dhariwal & Nichol 2021, Algorithm 1) through `denoise.mean_shift`.

    "learned_range": the model's own variance (Nichol & Dhariwal 2021, Improved DDPM eq. 15), from a U-Net with
    twice the channels out, whose extra channels give v in [-1, 1] (`Denoiser.variance`; guidance leaves them the
    conditional pass's): Sigma = exp(f log beta + (1 - f) log beta_tilde), f = (v + 1) / 2, beta_tilde floored at
    1e-20 as diffusers' DDPMScheduler floors it (the models of GLIDE, unCLIP's decoder and DeepFloyd IF).
    "learned": diffusers' DDPMScheduler's other learned form, the extra channels taken as Sigma itself (not its log,
    unclamped; negative values refused, where diffusers' square root gives NaN).

    Continuous time (Kingma et al. 2021, VDM, eq. 33; Imagen as imagen-pytorch samples it) is this same step on a plan
    of log-SNR levels (schedules.continuous_plan): with c = -expm1(lambda_t - lambda_s) = beta / (1 - abar_t), VDM's
    q(z_s | z_t, x) has mean alpha_s ((1 - c) z_t / alpha_t + c x) = eq. 7's mean and variance sigma_s^2 c = beta_tilde.
    Its run ends at t = 0, a level of finite SNR (abar_0 < 1), where no noise is added: `final_noise` False (the
    step to the plan's last level then gives the posterior's mean; True, the default, adds noise wherever that
    level is below abar = 1).
    """
    _check_ddpm(eta, final_noise, variance_type)
    for i in _steps(plan, progress, "ddpm"):
        x = _ddpm_step(denoise, x, plan, i, noise, callback, variance_type, final_noise)
    return x


def _check_ddpm(eta, final_noise, variance_type: str) -> None:
    _deterministic("ddpm", eta)  # its noise is fixed by the variance choice
    if not isinstance(final_noise, bool):
        raise TypeError(f"final_noise must be True or False; got {final_noise!r}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {', '.join(map(repr, VARIANCE_TYPES))}; got "
                         f"{variance_type!r}")


def _ddpm_step(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, i: int, noise, callback, variance_type: str,
               final_noise: bool) -> torch.Tensor:
    """sample_ddpm's step i: x_t -> x_prev, a draw from the posterior q(x_prev | x_t, x_0 = D(x_t))."""
    a_t, a_prev = float(plan.alphas_cumprod[i]), float(plan.alphas_cumprod[i + 1])
    x0 = denoise(x, i)
    _report(callback, plan, i, x, x0)
    beta = 1.0 - a_t / a_prev
    # posterior mean, eq. 7: mu = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    variance = beta if variance_type == "fixed_large" else (1 - a_prev) / (1 - a_t) * beta
    if variance_type == "learned_range":
        variance = _learned_variance(getattr(denoise, "variance", None), beta, variance, x)
    elif variance_type == "learned":
        variance = _raw_learned_variance(getattr(denoise, "variance", None), x, a_prev < 1.0)
    mean_shift = getattr(denoise, "mean_shift", None)
    if mean_shift is not None:
        mean = mean + mean_shift(x, i, variance)
    # z = 0 when landing on x_0 (or, final_noise False, on the run's end: not a head's, which the run goes on from)
    if a_prev < 1.0 and (final_noise or i < len(plan) - 1 or plan.follow > 0):
        mean = mean + (variance.sqrt() if torch.is_tensor(variance) else math.sqrt(variance)) * _noise(noise, x)
    return mean


def sample_repaint(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, known: torch.Tensor,
                   keep: torch.Tensor, resample_times: int = 5, step: str = "ddpm", noise=None, eta=None,
                   callback=None, progress: bool = True, **step_options) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1 with jump length 1): inpainting with a model that never saw a mask.

    Before each step (`step`: "ddpm", sample_ddpm's, with its variance_type / final_noise; or "heun", sample_heun's,
    with its churn options, as an ElucidatedImagen stage runs it) the kept part (`keep` 1) of x_t is a fresh draw of
    q(x_t | x_0 = known), sqrt(abar_t) known + sqrt(1 - abar_t) z (eq. 8's x_{t-1}^known, at the level the step
    starts from), the rest x_t's own (eq. 8's x^unknown), and the step is taken; then, `resample_times` - 1 times,
    x_{t-1} goes back to t by the forward process, q(x_t | x_{t-1}) = N(sqrt(abar_t / abar_{t-1}) x_{t-1}, (1 -
    abar_t / abar_{t-1}) I) (sec. 4.2, "resampling"), and the whole is done again: the painted part learns what the
    kept part's noise left out, where one pass (`resample_times` 1: the replacement method with fresh draws) keeps
    only its own guess. The step that lands on the plan's end is not repeated (nothing is sent back from there).
    `keep` broadcasts over x (1 or 0); the result's kept part is `known`. Draws per pass: the kept part's, the
    step's, the way back's. x and the levels are VP (x_t = alpha_t x_0 + sigma_t eps, abar = alpha^2), as every
    sampler here takes them: an EDM plan's abar is 1 / (1 + sigma^2), so the kept part is x_0 + sigma z and the way
    back adds sqrt(sigma_t^2 - sigma_s^2) z in VE terms, the same forward process."""
    take = _repaint_step(step, eta, step_options, x.dtype)
    if isinstance(resample_times, bool) or not isinstance(resample_times, int) or resample_times < 1:
        raise ValueError(f"resample_times must be an integer >= 1 (1: no resampling); got {resample_times!r}")
    keep = keep.to(device=x.device, dtype=x.dtype)
    known = known.to(device=x.device, dtype=x.dtype)
    abar = plan.alphas_cumprod.tolist()
    last = len(plan) - 1
    for i in _steps(plan, progress, "repaint"):
        for r in range(resample_times if i < last else 1):
            x_known = math.sqrt(abar[i]) * known + math.sqrt(1.0 - abar[i]) * _noise(noise, x)
            x = keep * x_known + (1.0 - keep) * x
            x = take(denoise, x, plan, i, noise, callback)
            if r < resample_times - 1:  # back to step i's level (the strided beta of the step just taken)
                ratio = abar[i] / abar[i + 1]
                x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * _noise(noise, x)
    return keep * known + (1.0 - keep) * x


def _repaint_step(name: str, eta, options: dict, dtype) -> Callable:
    """RePaint's step `name` with its options checked: (denoise, x, plan, i, noise, callback) -> x at level i + 1,
    x in VP terms."""
    if name == "ddpm":
        unknown = sorted(set(options) - {"variance_type", "final_noise"})
        variance_type, final_noise = options.get("variance_type", "fixed_small"), options.get("final_noise", True)
        _check_ddpm(eta, final_noise, variance_type)
        step = functools.partial(_ddpm_step, variance_type=variance_type, final_noise=final_noise)
    elif name == "heun":
        unknown = sorted(set(options) - {"s_churn", "s_tmin", "s_tmax", "s_noise"})
        _deterministic("heun", eta)
        churn = _check_churn("heun", options.get("s_churn", 0.0), options.get("s_tmin", 0.0),
                             options.get("s_tmax", math.inf), options.get("s_noise", 1.0))

        def step(denoise, x, plan, i, noise, callback):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            x = _heun_step(denoise, _vp_to_ve(x, s), plan, i, churn, noise, dtype, callback)
            return _ve_to_vp(x, s_next, dtype)
    else:
        raise ValueError(f"RePaint steps 'ddpm' or 'heun' (samplers of one step it can redo); got {name!r}")
    if unknown:
        raise TypeError(f"RePaint's {name} step takes no {', '.join(unknown)}")
    return step


def _no_learned_variance(name: str, x: torch.Tensor) -> ValueError:
    return ValueError(f"variance_type {name!r} needs a model with a learned variance (twice the sample's channels "
                      f"out: {2 * x.shape[1]} for {x.shape[1]}); this one gives none - use 'fixed_small'")


def _learned_variance(v: torch.Tensor | None, beta: float, beta_tilde: float, x: torch.Tensor) -> torch.Tensor:
    """Improved DDPM eq. 15: exp(f log beta + (1 - f) log beta_tilde), f = (v + 1) / 2, per element."""
    if v is None:
        raise _no_learned_variance("learned_range", x)
    f = (v.double() + 1.0) / 2.0
    return torch.exp(f * math.log(beta) + (1.0 - f) * math.log(max(beta_tilde, 1e-20))).to(x.dtype)


def _raw_learned_variance(v: torch.Tensor | None, x: torch.Tensor, noisy: bool) -> torch.Tensor:
    """diffusers' DDPMScheduler "learned": the model's extra channels are the variance itself (no log, no range, no
    clamp), its square root scaling the noise. A negative value, where noise is drawn, is refused (diffusers' step
    takes its square root: NaN)."""
    if v is None:
        raise _no_learned_variance("learned", x)
    if noisy and bool((v < 0).any()):
        raise ValueError(f"variance_type 'learned': the model's variance channels hold negative values (min "
                         f"{float(v.min()):.3g}); a variance must be >= 0 (diffusers' DDPMScheduler gives NaN there)")
    return v.to(x.dtype)


# -- DDIM ------------------------------------------------------------------------------------------------
def _without_last_step(plan: SamplingPlan, last_step: bool, name: str) -> SamplingPlan:
    # last_step False: the CompVis (and AUTOMATIC1111) DDIM and PLMS loops stop at the first timestep's level, a step
    # short of the end
    if not isinstance(last_step, bool):
        raise ValueError(f"{name}: last_step must be True or False; got {last_step!r}")
    if last_step:
        return plan
    if len(plan) < 2:
        raise ValueError(f"{name}: last_step=False (the CompVis and AUTOMATIC1111 loop, which stops a step short of the "
                         f"end) leaves no step of a {len(plan)}-step run; take more steps (or, image to image, a "
                         "higher strength)")
    return plan.head(len(plan) - 1)


def sample_ddim(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, last_step: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on any sub-sequence of timesteps, with stochasticity eta (eq. 16):

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
        s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    eta = 0 is the deterministic DDIM (the probability-flow ODE's Euler step); eta = 1 is DDPM with
    the posterior variance. eps is recomputed from the (guided, thresholded) x0, as guided-diffusion does.
    last_step False: stop at the plan's last timestep's level, one step short of the end, as the CompVis code's DDIM
    loop (and AUTOMATIC1111's) does.
    """
    return _ddim(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, last_step=last_step,
                 name="ddim")


def sample_ddim_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                      progress: bool = True, last_step: bool = True) -> torch.Tensor:
    """DDIM with CFG++ (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance", Algorithm 1;
    A1111's "DDIM CFG++"): the guided x0 = x0_u + lambda (x0_c - x0_u), but the step renoises along the unconditional
    eps_u, x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps_u + s z, which keeps the sample on the data
    manifold where plain CFG's extrapolated eps leaves it. The guidance scale is CFG++'s lambda, in [0, 1] (the
    paper's range; A1111 divides its CFG scale by 12.5): lambda 0 is the unconditional DDIM, lambda 1 steps to the
    conditional x0 and still renoises with eps_u; without an uncond it is DDIM. eta and last_step as for ddim."""
    return _ddim(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, last_step=last_step,
                 name="ddim_cfgpp", cfg_pp=True)


def _unconditional_x0(denoise, cfg_pp: bool, name: str):
    # CFG++ (Chung et al. 2024) renoises along the unconditional prediction: the Denoiser keeps its x_0 beside the
    # guided one (imagine.sampling.Denoiser.keep_uncond)
    if not cfg_pp:
        return None
    if not hasattr(denoise, "keep_uncond"):
        raise ValueError(f"{name} renoises with the unconditional prediction: it needs an imagine.sampling.Denoiser "
                         "(which keeps it), not a plain denoising function")
    denoise.keep_uncond = True
    return lambda: denoise.uncond_x0


def _ddim(denoise, x, plan, *, eta, noise, callback, progress, last_step, name, cfg_pp=False):
    eta = _eta(name, eta, 0.0)
    plan = _without_last_step(plan, last_step, name)
    uncond_x0 = _unconditional_x0(denoise, cfg_pp, name)
    abar = plan.alphas_cumprod.tolist()
    for i in _steps(plan, progress, name):
        a_t, a_prev = abar[i], abar[i + 1]
        x0 = denoise(x, i)
        _report(callback, plan, i, x, x0)
        eps = (x - math.sqrt(a_t) * (uncond_x0() if cfg_pp else x0)) / math.sqrt(1 - a_t)
        s = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s * s, 0.0)) * eps
        if eta > 0:
            x = x + s * _noise(noise, x)
    return x


def invert_ddim(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True) -> torch.Tensor:
    """DDIM inversion: x_0 -> x_T by running the deterministic DDIM ODE backwards (Song et al. 2021,
    sec. 4.3, eq. 14), through the plan's levels from its end to its start.

    Going from level i+1 to the noisier level i, the network is evaluated at timestep t_i on the current,
    less noisy sample (the usual approximation eps(x_{t-1}, t) ~ eps(x_t, t)), and its output read as diffusers'
    DDIMInverseScheduler reads it: an eps as it is, a v or an x_0 at the level the sample is at, abar_{i+1}
    (v: x0' = sqrt(abar) x - sqrt(1 - abar) v, eps = sqrt(abar) v + sqrt(1 - abar) x); then
    x_i = sqrt(abar_i) x0' + sqrt(1 - abar_i) eps with x0' the x_0 at level i+1. Sampling the same plan with ddim
    (eta = 0) maps the result back.
    """
    _deterministic("ddim inversion", eta)
    abar = plan.alphas_cumprod.tolist()
    kind = getattr(denoise, "prediction_type", "epsilon")
    for i in reversed(range(len(plan))):
        a_from, a_to = abar[i + 1], abar[i]
        x0 = denoise(x, i)  # (the model's output turned into x_0 at level i, the timestep it was given)
        _report(callback, plan, i, x, x0)
        if kind == "v_prediction":
            v = (math.sqrt(a_to) * x - x0) / math.sqrt(1 - a_to)
            x0 = math.sqrt(a_from) * x - math.sqrt(1 - a_from) * v
            eps = math.sqrt(a_from) * v + math.sqrt(1 - a_from) * x
        elif kind == "sample" and a_from < 1:
            eps = (x - math.sqrt(a_from) * x0) / math.sqrt(1 - a_from)
        else:
            eps = (x - math.sqrt(a_to) * x0) / math.sqrt(1 - a_to)
            x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
        x = math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps
    return x


# -- Karras et al. 2022 ----------------------------------------------------------------------------------
def sample_euler(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                 progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 4
    and Algorithm 2), in VE space; with s_churn > 0 Algorithm 2's stochastic "churn" before each step whose level is
    in [s_tmin, s_tmax] (`_churned`; k-diffusion's sample_euler, whose options A1111 passes)."""
    _deterministic("euler", eta)
    churn = _check_churn("euler", s_churn, s_tmin, s_tmax, s_noise)
    return _euler(denoise, x, plan, eta=None, noise=noise, callback=callback, progress=progress, name="euler",
                  churn=churn)


def sample_euler_ancestral(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                           callback=None, progress: bool = True) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, A1111's "Euler a"): an Euler step down to
    sigma_down, then fresh noise back up to sigma_next, split so that the step matches the ancestral
    (DDPM-like) transition: sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (times eta^2),
    sigma_down^2 = sigma_next^2 - sigma_up^2. Euler's method as in Karras et al. 2022, eq. 4."""
    eta = _eta("euler_a", eta, 1.0)
    return _euler(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, name="euler_a")


def sample_euler_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                       progress: bool = True) -> torch.Tensor:
    """Euler with CFG++ (Chung et al. 2024, Algorithm 1 in the sigma parametrisation; ComfyUI's euler_cfg_pp): the
    step goes to the guided D but along the unconditional direction, x_next = D + sigma_next (x - D_u) / sigma,
    where Euler's is x_next = D + sigma_next (x - D) / sigma. The guidance scale is CFG++'s lambda (about 0 to 1)."""
    _deterministic("euler_cfgpp", eta)
    return _euler(denoise, x, plan, eta=None, noise=noise, callback=callback, progress=progress, name="euler_cfgpp",
                  cfg_pp=True)


def sample_euler_ancestral_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                                 callback=None, progress: bool = True) -> torch.Tensor:
    """Euler ancestral with CFG++ (ComfyUI's euler_ancestral_cfg_pp): x_down = D + sigma_down (x - D_u) / sigma,
    then Euler ancestral's fresh noise up to sigma_next (eta scales it, default 1)."""
    eta = _eta("euler_a_cfgpp", eta, 1.0)
    return _euler(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, name="euler_a_cfgpp",
                  cfg_pp=True)


def _euler(denoise, x, plan, *, eta, noise, callback, progress, name, cfg_pp=False, churn=(0.0, 0.0, math.inf, 1.0)):
    # eta None: the ODE's Euler; a number: Euler ancestral's split (which draws its noise at eta 0 too, as before)
    ancestral, eta = eta is not None, eta or 0.0
    uncond_x0 = _unconditional_x0(denoise, cfg_pp, name)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, name):
        s_next = sigmas[i + 1]
        x, s, denoised = _churned(denoise, x, plan, i, churn, noise, dtype, callback)  # (s: sigma_hat)
        x_t = _ve_to_vp(x, s, dtype)
        s_down, s_up = _ancestral_step(s, s_next, eta)
        if cfg_pp:
            x = denoised.double() + s_down * (x - uncond_x0().double()) / s
        else:
            x = x + (s_down - s) * (x - denoised) / s
        if ancestral and s_next > 0:
            x = x + s_up * _noise(noise, x_t).double()
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_heun(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler step to sigma_next, then
    the average of the slopes at both ends; the last step (to sigma = 0) stays Euler. 2N-1 model calls. With
    s_churn > 0 Algorithm 2's churn before each step in [s_tmin, s_tmax] (`_churned`, as k-diffusion's sample_heun)."""
    _deterministic("heun", eta)
    churn = _check_churn("heun", s_churn, s_tmin, s_tmax, s_noise)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, "heun"):
        x = _heun_step(denoise, x, plan, i, churn, noise, dtype, callback)
    return _ve_to_vp(x, sigmas[-1], dtype)


def _heun_step(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, i: int, churn, noise, dtype,
               callback) -> torch.Tensor:
    """sample_heun's step i, x in VE terms: the churn (`_churned`), an Euler step to sigma_next and, above sigma = 0,
    the average of the slopes at both ends."""
    s_next = float(plan.sigmas[i + 1])
    x, s, denoised = _churned(denoise, x, plan, i, churn, noise, dtype, callback)  # (s: sigma_hat)
    d = (x - denoised) / s
    x_euler = x + (s_next - s) * d
    if s_next == 0:
        return x_euler
    # (a plan that ends above sigma = 0, e.g. at abar_0, corrects its last step at that level too)
    x_next = _ve_to_vp(x_euler, s_next, dtype)
    d_next = (x_euler - (denoise(x_next, i + 1) if i + 1 < len(plan) else denoise.at_sigma(x_next, s_next, i))
              ) / s_next
    return x + (s_next - s) * (d + d_next) / 2


def restart_segments(sigmas: list[float], restart_list: dict | None = None) -> list[tuple[float, float]]:
    """The (sigma_from, sigma_to) segments of a Restart run over the plan's levels `sigmas` (ending at 0), laid out
    as AUTOMATIC1111's "Restart" sampler lays them out (its sd_samplers_extra.restart_sampler): restart_list maps a
    level to (levels, times, top): at the plan's level nearest `level`, go back up to the level nearest `top` and
    come down again over `levels` - 1 Karras steps (eq. 5 between the two), `times` times. None: A1111's choice,
    nothing under 20 steps (Heun on the plan); from 20 steps the plan's range is laid out again with Karras levels
    for N - k m steps and one restart (k = 9, m = 1) at 0.1 up to 2, from 36 steps two (k = N // 4, m = 2); either
    way N segments in all, as many as the plan has steps. Levels in float32, as A1111's."""
    n = len(sigmas) - 1
    if restart_list is not None:
        if not isinstance(restart_list, dict) or not all(
                isinstance(key, (int, float)) and not isinstance(key, bool) and key > 0
                and isinstance(v, (tuple, list)) and len(v) == 3 and isinstance(v[0], int) and v[0] >= 2
                and isinstance(v[1], int) and v[1] >= 1 and isinstance(v[2], (int, float)) and v[2] > key
                for key, v in restart_list.items()):
            raise ValueError(f"restart_list must map a noise level to (levels >= 2, times >= 1, top > level), as "
                             f"{{0.1: (10, 1, 2.0)}}; got {restart_list!r}")
    if restart_list is None:
        if n >= 20:
            k, m = (n // 4, 2) if n >= 36 else (9, 1)
            sigmas = karras_sigmas(sigmas[-2], sigmas[0], n - k * m, dtype=torch.float32).tolist() + [0.0]
            restart_list = {0.1: (k + 1, m, 2.0)}
        else:
            restart_list = {}
    levels = np.asarray(sigmas)
    nearest = {int(np.argmin(np.abs(levels - key))): value for key, value in restart_list.items()}
    segments = []
    for i in range(len(sigmas) - 1):
        segments.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in nearest:
            count, times, top = nearest[i + 1]
            hi = int(np.argmin(np.abs(levels - top)))
            if hi < i + 1:  # (a restart goes up)
                ladder = karras_sigmas(sigmas[i + 1], sigmas[hi], int(count), dtype=torch.float32).tolist()
                segments += list(zip(ladder[:-1], ladder[1:])) * int(times)
    return segments


def sample_restart(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                   progress: bool = True, restart_list: dict | None = None, s_noise: float = 1.0) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Algorithm 1):
    Heun's ODE steps (Karras et al. 2022, Alg. 1) down the plan, and at a restart interval [t_min, t_max] the sample
    taken back up by the forward process, x += sqrt(t_max^2 - t_min^2) z (fresh noise, s_noise its scale), and
    brought down again by the ODE, several times: the noise contracts the error the ODE steps accumulated, which an
    ODE sampler alone cannot. The segments are AUTOMATIC1111's "Restart" (`restart_segments`; restart_list as
    there); its noise comes from each image's generator, as A1111 draws it. 2N - 1 model calls. Over a plan that
    stops above sigma = 0 (A1111's KL Optimal, SamplingPlan.end_ve) it ends as A1111's does: below 20 steps with
    Heun's step to that last level, from 20 on at 0 (the range laid out again from the level before the last); it
    returns the VE sample."""
    if eta not in (None, 0, 0.0):
        raise ValueError(f"restart takes no eta (got {eta}): its noise is the restart's jump up, scaled by s_noise")
    s_noise = _noise_scale("restart", s_noise)
    _ends_at_zero(plan, "restart")
    dtype = x.dtype
    segments = restart_segments(plan.sigmas.tolist(), restart_list)
    if getattr(denoise, "evaluations", None):  # (two calls a segment, one on the last: as Heun counts them)
        denoise.evaluations = 2 * len(segments) - (segments[-1][1] == 0)
    x = _vp_to_ve(x, float(plan.sigmas[0]))
    last = None
    bar = tqdm(segments, desc="restart", disable=not progress, leave=False)
    for k, (s, s_next) in enumerate(bar):
        i = min(k, len(plan) - 1)  # (the plan's step this segment stands for)
        if last is not None and last < s:  # the restart's jump up: the forward process from last to s
            x = x + (s_noise * math.sqrt(s * s - last * last)) * _noise(noise, _ve_to_vp(x, last, dtype)).double()
        x_t = _ve_to_vp(x, s, dtype)
        # (the first segment starts at the plan's first level: the on-grid call, which a matched start may hold)
        denoised = denoise(x_t, 0) if k == 0 else denoise.at_sigma(x_t, s, i)
        if callback is not None:
            callback({"step": k, "total": len(segments), "t": float(denoise.schedule.sigma_to_t(s)), "sigma": s,
                      "x": x_t, "denoised": denoised})
        d = (x - denoised) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise.at_sigma(_ve_to_vp(x_euler, s_next, dtype), s_next, i)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
        last = s_next
    return _ve_to_vp(x, 0.0, dtype)


def _lms_coefficient(sigmas: list[float], i: int, order: int, k: int) -> float:
    """int_{sigma_i}^{sigma_{i+1}} l_k(tau) dtau, with l_k the Lagrange basis polynomial that is 1 at sigma_{i-k}
    and 0 at the other nodes sigma_i, ..., sigma_{i-order+1}. l_k has degree order - 1 <= 3, which the 2-point
    Gauss-Legendre rule integrates exactly."""
    nodes = [sigmas[i - j] for j in range(order)]

    def basis(tau: float) -> float:
        out = 1.0
        for j, node in enumerate(nodes):
            if j != k:
                out *= (tau - node) / (nodes[k] - node)
        return out

    s, h = sigmas[i], sigmas[i + 1] - sigmas[i]
    c = 0.5 / math.sqrt(3.0)
    return h * 0.5 * (basis(s + (0.5 - c) * h) + basis(s + (0.5 + c) * h))


def sample_lms(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
               progress: bool = True, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (Karras et al. 2022, eq. 4), as k-diffusion's sample_lms (A1111's "LMS"): the slope d is interpolated by the
    Lagrange polynomial through the last `order` steps' slopes (at their sigmas, however unevenly spaced) and
    integrated over [sigma_i, sigma_{i+1}]: x_{i+1} = x_i + sum_k c_k d_{i-k}, c_k = int l_k. The first steps use
    the slopes there are (orders 1, 2, 3). One model call per step."""
    _deterministic("lms", eta)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"LMS order must be an integer from 1 to 4; got {order!r}")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    ds: list[torch.Tensor] = []  # the slopes, oldest first
    for i in _steps(plan, progress, "lms"):
        s = sigmas[i]
        x_t = _ve_to_vp(x, s, dtype)
        denoised = denoise(x_t, i)
        _report(callback, plan, i, x_t, denoised)
        ds = (ds + [(x - denoised) / s])[-order:]
        n = len(ds)
        x = x + sum(_lms_coefficient(sigmas, i, n, k) * d for k, d in enumerate(reversed(ds)))
    return _ve_to_vp(x, sigmas[-1], dtype)


def _dpm2(denoise, x, plan, *, eta, noise, callback, progress, name, churn=(0.0, 0.0, math.inf, 1.0), s_noise=1.0):
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, name):
        s_next = sigmas[i + 1]
        x, s, denoised = _churned(denoise, x, plan, i, churn, noise, dtype, callback)  # (s: sigma_hat)
        x_t = _ve_to_vp(x, s, dtype)
        s_down, s_up = _ancestral_step(s, s_next, eta)
        d = (x - denoised) / s
        if s_down == 0:  # the midpoint of [s, 0] in log sigma does not exist: an Euler step
            x = x + (s_down - s) * d
        else:
            s_mid = math.exp(0.5 * (math.log(s) + math.log(s_down)))  # halfway in log sigma
            x_mid = x + (s_mid - s) * d
            d_mid = (x_mid - denoise.at_sigma(_ve_to_vp(x_mid, s_mid, dtype), s_mid, i)) / s_mid
            x = x + (s_down - s) * d_mid
        if eta > 0 and s_next > 0:
            x = x + (s_up * s_noise) * _noise(noise, x_t).double()
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_dpm2(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 on the probability-flow ODE in sigma, as Karras et al. 2022 use it ("DPM2"; k-diffusion's
    sample_dpm_2, A1111's "DPM2"): Lu et al. 2022 (DPM-Solver), Algorithm 1 with r = 1/2 in the form of a midpoint
    method: an Euler step to sigma_mid = sqrt(sigma sigma_next) (halfway in log sigma), then the whole step with
    the slope there, x_next = x + (sigma_next - sigma) d(x_mid; sigma_mid). The model sees sigma_mid's fractional
    timestep (Denoiser.at_sigma). The last step (to sigma = 0) is Euler. 2N - 1 model calls. With s_churn > 0
    Algorithm 2's churn before each step in [s_tmin, s_tmax] (`_churned`, as k-diffusion's sample_dpm_2)."""
    _deterministic("dpm2", eta)
    churn = _check_churn("dpm2", s_churn, s_tmin, s_tmax, s_noise)
    return _dpm2(denoise, x, plan, eta=0.0, noise=noise, callback=callback, progress=progress, name="dpm2",
                 churn=churn)


def sample_dpm2_ancestral(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                          callback=None, progress: bool = True, s_noise: float = 1.0) -> torch.Tensor:
    """DPM2 ancestral (k-diffusion's sample_dpm_2_ancestral, A1111's "DPM2 a"): the DPM2 midpoint step down to
    sigma_down (midpoint sqrt(sigma sigma_down)), then fresh noise up to sigma_next, split as Euler ancestral's
    (sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), scaled by s_noise; eta = 0 is DPM2."""
    eta = _eta("dpm2_a", eta, 1.0)
    return _dpm2(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, name="dpm2_a",
                 s_noise=_noise_scale("dpm2_a", s_noise))


def sample_dpmpp_2s_ancestral(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                              callback=None, progress: bool = True, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S a"): Lu et al. 2022
    ("DPM-Solver++"), Algorithm 1 (singlestep, 2nd order) with r = 1/2, down to sigma_down of the ancestral split,
    then fresh noise up to sigma_next. In VE space (alpha = 1) with lambda = -log sigma, h = lambda_down - lambda:
        u = (sigma_mid / sigma) x - (e^{-h/2} - 1) D(x; sigma),            sigma_mid = sigma e^{-h/2},
        x_down = (sigma_down / sigma) x - (e^{-h} - 1) D(u; sigma_mid)
    (the data-prediction exponential integrator, eq. 9, with x_0 taken at the midpoint). The last step (to
    sigma = 0) is Euler, i.e. x_0 = D(x). eta = 0 is the deterministic DPM-Solver++(2S); s_noise scales the fresh
    noise. 2N - 1 model calls."""
    eta, s_noise = _eta("dpmpp_2s_a", eta, 1.0), _noise_scale("dpmpp_2s_a", s_noise)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, "dpmpp_2s_a"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t = _ve_to_vp(x, s, dtype)
        denoised = denoise(x_t, i)
        _report(callback, plan, i, x_t, denoised)
        s_down, s_up = _ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = x + (s_down - s) * (x - denoised) / s
        else:
            h = math.log(s / s_down)
            s_mid = s * math.exp(-0.5 * h)
            u = (s_mid / s) * x - math.expm1(-0.5 * h) * denoised
            x = (s_down / s) * x - math.expm1(-h) * denoise.at_sigma(_ve_to_vp(u, s_mid, dtype), s_mid, i)
        if eta > 0 and s_next > 0:
            x = x + (s_up * s_noise) * _noise(noise, x_t).double()
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_dpmpp_sde(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                     progress: bool = True, r: float = 0.5, sde_noise: str = "brownian",
                     s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, A1111's "DPM++ SDE", diffusers' DPMSolverSDEScheduler): Lu
    et al. 2022 ("DPM-Solver++"), Algorithm 1 (singlestep, 2nd order) on the reverse SDE, each of its two substeps
    an ancestral one. In VE space with lambda = -log sigma, h = lambda_next - lambda, sigma_r = sigma e^{-r h}:
        u = (sd_1 / sigma) x + (1 - sd_1 / sigma) D(x; sigma) + su_1 z(sigma, sigma_r),
        x_next = (sd_2 / sigma) x + (1 - sd_2 / sigma) ((1 - 1/(2r)) D(x; sigma) + 1/(2r) D(u; sigma_r))
                 + su_2 z(sigma, sigma_next)
    where (sd_k, su_k) split the substep to sigma_r (k = 1) or sigma_next (k = 2) into a deterministic part and fresh
    noise as Euler ancestral does (eta scales it; eta = 0 is DPM-Solver++(2S) with ratio r), and z(a, b) the
    normalized increment of the sample's noise between the two levels: both substeps start at sigma, so with
    sde_noise "brownian" (A1111's and diffusers') their noises are one Brownian path's, correlated as the SDE
    needs (so sde_noise is "brownian" only here). r in (0, 1]: where in log sigma the midpoint lies (1/2, the default,
    is A1111's and diffusers'). s_noise scales su_1 and su_2's noise. The last step (to sigma = 0) is Euler,
    x_0 = D(x). 2N - 1 model calls."""
    eta, s_noise = _eta("dpmpp_sde", eta, 1.0), _noise_scale("dpmpp_sde", s_noise)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"r (the midpoint's place in log sigma) must be in (0, 1]; got {r!r}")
    if eta > 0 and (sde_noise == "independent" or (noise is not None and getattr(noise, "brownian", None) is None)):
        raise ValueError("dpmpp_sde's two substeps read one Brownian path (their noises overlap); sde_noise "
                         "'independent' (or a noise callable without paths) is for the multistep SDE samplers "
                         "(dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde)")
    _distinct_levels(plan, "dpmpp_sde")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    z = _increments(noise, x, plan, sde_noise) if eta > 0 else None
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, "dpmpp_sde"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t = _ve_to_vp(x, s, dtype)
        denoised = denoise(x_t, i)
        _report(callback, plan, i, x_t, denoised)
        if s_next == 0:
            x = denoised.double()  # Euler to sigma = 0: x + (0 - sigma) (x - D) / sigma
            break
        s_mid = s * math.exp(-r * math.log(s / s_next))
        s_down, s_up = _ancestral_step(s, s_mid, eta)
        u = (s_down / s) * x + (1 - s_down / s) * denoised
        at, at_mid, at_next = _float32_levels(s, s_next, r)
        if s_up > 0:
            u = u + (s_up * s_noise) * z(at, at_mid).double()
        denoised_mid = denoise.at_sigma(_ve_to_vp(u, s_mid, dtype), s_mid, i)
        s_down, s_up = _ancestral_step(s, s_next, eta)
        d = (1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * denoised_mid
        x = (s_down / s) * x + (1 - s_down / s) * d
        if s_up > 0:
            x = x + (s_up * s_noise) * z(at, at_next).double()
    return _ve_to_vp(x, sigmas[-1], dtype)


def _float32_levels(s: float, s_next: float, r: float) -> tuple[float, float, float]:
    # The levels at which k-diffusion's DPM++ SDE (and diffusers' copy) reads its Brownian path: sigma, the midpoint
    # and sigma_next taken through lambda = -log sigma in float32, sigma_fn(t_fn(sigma)), sigma_fn(t + r h) and
    # sigma_fn(t_fn(sigma_next)). The round trip moves a level by an ulp, which can move the path's increment by
    # ~1e-3 (near a point the tree has already been split at); reading it where they do gives their noise, hence
    # their image for a seed.
    t, t_next = -torch.tensor([s, s_next], dtype=torch.float32).log()
    return float((-t).exp()), float((-(t + (t_next - t) * r)).exp()), float((-t_next).exp())


# -- PLMS (Liu et al. 2022) and LCM (Luo et al. 2023) ----------------------------------------------------
def sample_plms(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, last_step: bool = True) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, "PNDM": its pseudo linear multistep method, with the transfer part
    phi of its eq. 9, which is DDIM's step given an eps): each step moves x along DDIM's transfer with eps' the
    4th-order Adams-Bashforth combination of the last four eps, (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24.
    Warm-up as CompVis's
    PLMS (A1111's "PLMS") and diffusers' PNDMScheduler(skip_prk_steps=True): the first step is the pseudo improved
    Euler step (eps' = (e_t + e(x', t_next)) / 2 with x' the DDIM step's result, one extra model call), the second
    and third use (3, -1)/2 and (23, -16, 5)/12. eps is read from the (guided, thresholded) x_0, as DDIM does.
    N + 1 model calls. At abar = 0 (zero terminal SNR), where x_0 cannot be recovered from eps', the step uses the
    model's own x_0. last_step: as for ddim (the CompVis loop stops at the last timestep's level)."""
    _deterministic("plms", eta)
    levels = len(plan)  # (with last_step False the first step's correction still reads the next level, as CompVis's)
    plan = _without_last_step(plan, last_step, "plms")
    abar = plan.alphas_cumprod.tolist()

    def eps_of(x_t, x0, a):
        return (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)

    def transfer(x_t, eps, x0, i):  # DDIM's step from level i to i+1 with eps (PNDM's phi, eq. 9)
        a, a_next = abar[i], abar[i + 1]
        if a > 0:
            x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps

    old: list[torch.Tensor] = []  # eps at the previous steps' samples, oldest first
    for i in _steps(plan, progress, "plms"):
        x0 = denoise(x, i)
        _report(callback, plan, i, x, x0)
        eps = eps_of(x, x0, abar[i])
        if not old:
            e = eps
            if i + 1 < levels:  # pseudo improved Euler
                x_next = transfer(x, eps, x0, i)
                e = (eps + eps_of(x_next, denoise(x_next, i + 1), abar[i + 1])) / 2
        elif len(old) == 1:
            e = (3 * eps - old[-1]) / 2
        elif len(old) == 2:
            e = (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e = (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old = (old + [eps])[-3:]
        x = transfer(x, e, x0, i)
    return x


def sample_lcm(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
               progress: bool = True) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency models", Algorithm 1; Luo et al. 2023, LCM,
    Algorithm 3), as A1111's "LCM" (k-diffusion style: x = D(x; sigma_i), then + sigma_{i+1} z) and diffusers'
    LCMScheduler: each step takes the model's x_0 and noises it afresh to the next level,
        x_{i+1} = sqrt(abar_{i+1}) D(x_i) + sqrt(1 - abar_{i+1}) z,
    the VP form of x_VE = D + sigma_{i+1} z; the last step returns D. For LCM-distilled models and LoRAs, at the
    timesteps they were distilled at (the "lcm" timestep rule; with a schedule type A1111's levels over them, the model
    at the nearest). LCM's boundary scalings c_skip, c_out (sigma_data =
    0.5, timestep scaling 10) are left out: at those timesteps (t >= 19) c_skip <= 7e-6 and 1 - c_out <= 4e-6.
    The noise is fixed by the levels: no eta."""
    if eta not in (None, 0, 0.0):
        raise ValueError(f"the lcm sampler's noise is set by the next level (sqrt(1 - abar_next) z, as LCM's "
                         f"Algorithm 3); it takes no eta (got {eta})")
    abar = plan.alphas_cumprod.tolist()
    for i in _steps(plan, progress, "lcm"):
        x0 = denoise(x, i)
        _report(callback, plan, i, x, x0)
        a_next = abar[i + 1]
        x = x0 if a_next >= 1.0 else math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * _noise(noise, x0)
    return x


# -- DPM-Solver++ (Lu et al. 2022) -----------------------------------------------------------------------
def _dpm_solver_pp_2m(denoise, x, plan, *, eta, noise, callback, progress, name, s_tmin=0.0, s_tmax=math.inf,
                      solver_type="midpoint", sde_noise="brownian", s_noise=1.0):
    # VP quantities: alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma alpha, lambda = log(alpha/sigma_vp) = -log sigma
    _distinct_levels(plan, name)
    sigmas = plan.sigmas.tolist()
    z = _increments(noise, x, plan, sde_noise) if eta > 0 else None
    old_denoised, h_last = None, None
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, i)
        _report(callback, plan, i, x, denoised)
        if s_next == 0:
            # the exact solution at sigma = 0 is x_0 itself ("lower order final", as diffusers with final sigma 0)
            x = denoised
            break
        alpha_next = 1.0 / math.sqrt(1.0 + s_next**2)
        h = math.log(s / s_next)  # lambda_next - lambda
        eta_i = eta if s_tmin <= s <= s_tmax else 0.0  # Karras et al. 2022, Alg. 2: noise only within [S_tmin, S_tmax]
        h_eta = (1 + eta_i) * h
        # x_next = (sigma_next/sigma) e^{-eta h} x + alpha_next (1 - e^{-h_eta}) x0 + alpha_next c D1
        #          + sigma_next sqrt(1 - e^{-2 eta h}) z
        # with D1 = (x0 - x0_prev) / r, r = h_prev / h (Lu et al. 2022, DPM-Solver++ Algorithm 2: multistep 2nd order;
        # none on the first step, DPM-Solver++(1), i.e. DDIM); c = (1 - e^{-h_eta}) / 2 by the midpoint rule, or
        # e^{-h_eta}-weighted exactly, (e^{-h_eta} - 1)/h_eta + 1, by the "heun" rule (k-diffusion's and diffusers'
        # solver_type). eta = 0: the ODE solver, eq. 9; eta = 1: the SDE solver of Lu et al. 2022, sec. 4 / appendix.
        ratio = (s_next * alpha_next) / (s / math.sqrt(1.0 + s**2))
        x = (ratio * math.exp(-eta_i * h)) * x + (alpha_next * -math.expm1(-h_eta)) * denoised
        if old_denoised is not None:
            c = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else math.expm1(-h_eta) / h_eta + 1
            x = x + (alpha_next * c * h / h_last) * (denoised - old_denoised)
        if eta_i > 0:
            x = x + (s_next * alpha_next * math.sqrt(-math.expm1(-2 * eta_i * h)) * s_noise) * z(s, s_next)
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                    progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the exponential-integrator solution
    of the data-prediction ODE in lambda = log(alpha/sigma), with a 2nd-order multistep correction from the
    previous denoised: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1}/h_i. First step 1st order."""
    _deterministic("dpmpp_2m", eta)
    return _dpm_solver_pp_2m(denoise, x, plan, eta=0.0, noise=noise, callback=callback, progress=progress,
                             name="dpmpp_2m")


def sample_dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                        callback=None, progress: bool = True, s_tmin: float = 0.0, s_tmax: float = math.inf,
                        sde_noise: str = "brownian", s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 4 and appendix; k-diffusion's sample_dpmpp_2m_sde, diffusers'
    "sde-dpmsolver++" with the midpoint correction): the same 2nd-order data prediction on the reverse SDE, adding
    noise of variance sigma_next^2 (1 - e^{-2h}) each step; eta in [0, 1] blends to the ODE (eta = 0). s_tmin,
    s_tmax: the band of noise levels that get noise (Karras et al. 2022, Alg. 2's S_tmin/S_tmax); outside it the
    step is the ODE's (A1111 exposes the same two settings). sde_noise: "brownian" (each sample's Brownian path,
    as A1111 draws it; imagine.brownian) or "independent" (a fresh draw per step, as diffusers). s_noise scales
    the noise (k-diffusion's; A1111's "Sigma noise")."""
    eta = _eta("dpmpp_2m_sde", eta, 1.0)
    _check_band(s_tmin, s_tmax)
    return _dpm_solver_pp_2m(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress,
                             name="dpmpp_2m_sde", s_tmin=float(s_tmin), s_tmax=float(s_tmax),
                             s_noise=_noise_scale("dpmpp_2m_sde", s_noise), sde_noise=sde_noise)


def sample_dpmpp_2m_sde_heun(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                             callback=None, progress: bool = True, s_tmin: float = 0.0, s_tmax: float = math.inf,
                             sde_noise: str = "brownian", s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) with the "heun" correction (k-diffusion's solver_type='heun', A1111's "DPM++ 2M SDE
    Heun", diffusers' solver_type="heun"): the previous x_0's difference weighted by its exact integral against
    e^{-h_eta (1 - tau)}, (e^{-h_eta} - 1)/h_eta + 1, instead of the midpoint rule's (1 - e^{-h_eta})/2. One model
    call a step; options as dpmpp_2m_sde."""
    eta = _eta("dpmpp_2m_sde_heun", eta, 1.0)
    _check_band(s_tmin, s_tmax)
    return _dpm_solver_pp_2m(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress,
                             name="dpmpp_2m_sde_heun", s_tmin=float(s_tmin), s_tmax=float(s_tmax),
                             s_noise=_noise_scale("dpmpp_2m_sde_heun", s_noise),
                             solver_type="heun", sde_noise=sde_noise)


WARMUPS = ("diffusers", "k_diffusion")  # the 3M solvers' first steps: see sample_dpmpp_3m


def _dpm_solver_pp_3m(denoise, x, plan, *, eta, noise, callback, progress, name, s_tmin=0.0, s_tmax=math.inf,
                      sde_noise="brownian", warmup="diffusers", s_noise=1.0):
    # The 3rd-order multistep data-prediction solver on the ODE (eta = 0) or the reverse SDE (eta = 1): the
    # Taylor terms of x_0(lambda) integrated exactly against the weight (1 + eta) e^{-(1 + eta)(lambda_next -
    # lambda)}, so every phi below is the ODE's with h replaced by h_eta = (1 + eta) h.
    if warmup not in WARMUPS:
        raise ValueError(f"{name}: warmup must be one of {', '.join(map(repr, WARMUPS))}; got {warmup!r}")
    _distinct_levels(plan, name)
    sigmas, n = plan.sigmas.tolist(), _run_steps(plan)
    z = _increments(noise, x, plan, sde_noise) if eta > 0 else None
    ms, hs = [], []  # the x_0 history (newest last) and the step lengths in lambda between them
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, i)
        _report(callback, plan, i, x, denoised)
        ms = (ms + [denoised])[-3:]
        if s_next == 0:
            return denoised
        alpha_next = 1.0 / math.sqrt(1.0 + s_next**2)
        h = math.log(s / s_next)
        eta_i = eta if s_tmin <= s <= s_tmax else 0.0  # Karras et al. 2022, Alg. 2: noise only within [S_tmin, S_tmax]
        h_eta = (1.0 + eta_i) * h
        # (diffusers' lower_order_final under 15 steps of the whole run, an image-to-image run's skipped ones too:
        # 2nd order on the step before the last; 1st on a last step that ends above sigma = 0, its final_sigmas_type
        # "sigma_min")
        low = plan.lead + n < 15 and warmup == "diffusers"
        order = min(3, len(ms), 1 if (i == n - 1 and low) else 2 if (i == n - 2 and low) else 3)
        em1 = math.expm1(-h_eta)  # e^{-h_eta} - 1
        ratio = (s_next * alpha_next) / (s / math.sqrt(1.0 + s**2))
        x = (ratio * math.exp(-eta_i * h)) * x - (alpha_next * em1) * ms[-1]
        if order >= 2:
            r0 = hs[-1] / h
            d1_0 = (ms[-1] - ms[-2]) / r0
            if order == 2 and warmup == "diffusers":  # DPM-Solver++(2M) (midpoint form): D = m0 + D1_0 / 2
                x = x - (alpha_next * em1 * 0.5) * d1_0
            elif order == 2:  # k-diffusion's: D1_0 weighted by its exact integral phi_2, as at 3rd order with D2 = 0
                x = x + (alpha_next * (em1 / h_eta + 1.0)) * d1_0
            else:
                r1 = hs[-2] / h
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                # phi_2 = (e^{-h_eta} - 1)/h_eta + 1; the D2 weight (1 - e^{-h_eta})/h_eta^2 - 1/h_eta + 1/2 -> 0
                # as h -> 0, as a second-order correction must
                x = x + (alpha_next * (em1 / h_eta + 1.0)) * d1 \
                      - (alpha_next * ((em1 + h_eta) / h_eta**2 - 0.5)) * d2
        if eta_i > 0:
            x = x + (s_next * alpha_next * math.sqrt(-math.expm1(-2 * eta_i * h)) * s_noise) * z(s, s_next)
        hs = (hs + [h])[-2:]
    return x


def sample_dpmpp_3m(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                    progress: bool = True, warmup: str = "diffusers") -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", sec. 4 and appendix B: the multistep 3rd-order data-
    prediction solver): with r0 = h_{i-1}/h, r1 = h_{i-2}/h and divided differences of the last three x_0,
        D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r0+r1),  D1_0 = (m0-m1)/r0, D1_1 = (m1-m2)/r1,
        x_next = (sigma_next/sigma) x - alpha_next (e^{-h} - 1) m0 + alpha_next ((e^{-h} - 1)/h + 1) D1
                 - alpha_next ((e^{-h} - 1 + h)/h^2 - 1/2) D2
    (the Taylor terms of x_0(lambda) integrated exactly against e^{lambda}). Warm-up: 1st then 2nd order; under
    15 steps the second-to-last step is 2nd order and the last (to sigma = 0) returns x_0, as diffusers'
    lower_order_final; a last step to a level above 0 (a plan ending at abar_0) is 1st order, as its final_sigmas_type
    "sigma_min". A plan split off before a final step run apart (plan.head) counts that step (SamplingPlan.follow).
    warmup: "diffusers" (above: its 2nd-order step in the midpoint form D1_0 (1 - e^{-h})/2) or "k_diffusion"
    (k-diffusion's sample_dpmpp_3m_sde, which A1111 runs: that step weighted by phi_2 = (e^{-h} - 1)/h + 1, and
    3rd order up to the last step)."""
    _deterministic("dpmpp_3m", eta)
    return _dpm_solver_pp_3m(denoise, x, plan, eta=0.0, noise=noise, callback=callback, progress=progress,
                             name="dpmpp_3m", warmup=warmup)


def sample_dpmpp_3m_sde(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                        callback=None, progress: bool = True, s_tmin: float = 0.0, s_tmax: float = math.inf,
                        sde_noise: str = "brownian", warmup: str = "diffusers", s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022, sec. 4 and appendix; k-diffusion's sample_dpmpp_3m_sde, A1111's
    "DPM++ 3M SDE", with diffusers' warm-up: see docs/samplers.md): the 3M solver on the reverse SDE, whose
    data-prediction solution weights x_0(lambda) by (1 + eta) e^{-(1 + eta)(lambda_next - lambda)}: with
    h_eta = (1 + eta) h,
        x_next = (sigma_next/sigma) e^{-eta h} x + alpha_next (1 - e^{-h_eta}) m0 + alpha_next phi_2 D1
                 + alpha_next ((1 - e^{-h_eta})/h_eta^2 - 1/h_eta + 1/2) D2 + sigma_next sqrt(1 - e^{-2 eta h}) z,
    phi_2 = (e^{-h_eta} - 1)/h_eta + 1; eta = 0 is DPM-Solver++(3M). Fresh noise forgets the error of the start
    sample (e.g. under a schedule whose terminal SNR is not zero) as an ODE solver cannot. diffusers' third-order
    sde-dpmsolver++ (0.42) has -1/2 where the integral gives +1/2 in the D2 weight (its weight tends to -1, not
    0, as h -> 0); the parity test corrects that one term. s_tmin, s_tmax, sde_noise, s_noise: as for dpmpp_2m_sde;
    warmup: as for dpmpp_3m ("k_diffusion" is A1111's "DPM++ 3M SDE", which also discards the penultimate level)."""
    eta = _eta("dpmpp_3m_sde", eta, 1.0)
    _check_band(s_tmin, s_tmax)
    return _dpm_solver_pp_3m(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress,
                             name="dpmpp_3m_sde", s_tmin=float(s_tmin), s_tmax=float(s_tmax), sde_noise=sde_noise,
                             warmup=warmup, s_noise=_noise_scale("dpmpp_3m_sde", s_noise))


# -- DPM-Solver (Lu et al. 2022), singlestep: fixed steps ("DPM fast") and adaptive ones -------------------
DPM_SOLVER_ENDS = ("auto", "plan", "model")


def _dpm_solver_span(denoise, plan: SamplingPlan, name: str, ends: str) -> tuple[float, float]:
    """(sigma_start, sigma_end) of DPM-Solver's integration (k-diffusion's solvers need sigma_end > 0):
    "plan": the plan's first level to its last above 0 (ComfyUI's sigmas[0] and sigmas[-2], A1111's image to image);
    "model": the model's whole trained range, sigma_max to sigma_min, whatever the plan (A1111's text to image);
    "auto": the plan's first level to the model's sigma_min (or the plan's last level above 0 where that is lower, or
    where the denoiser knows no schedule), so a plan whose last level is high (trailing spacing) still ends clean."""
    if ends not in DPM_SOLVER_ENDS:
        raise ValueError(f"{name}: ends must be one of {', '.join(map(repr, DPM_SOLVER_ENDS))}; got {ends!r}")
    levels = [s for s in plan.sigmas.tolist() if s > 0]
    schedule = getattr(denoise, "schedule", None)
    table = schedule._sigma_table(held=True) if schedule is not None else None  # (k-diffusion's levels)
    if ends == "model":
        if table is None:
            raise ValueError(f"{name}: ends='model' needs the training schedule (Denoiser(..., schedule=...))")
        return float(table[-1]), float(table[0])
    if not levels:
        raise ValueError(f"{name}: the plan has no noise level above 0 to integrate from")
    end = levels[-1] if ends == "plan" or table is None else min(levels[-1], float(table[0]))
    if ends == "plan" and plan.end_ve and len(plan.sigmas) > 2:  # (A1111's sigma_sched[-2]: the level before the end)
        end = float(plan.sigmas[-2])
    if levels[0] <= end:
        raise ValueError(f"{name} integrates from the plan's first noise level to its last above 0 (ends={ends!r}), "
                         f"so it needs two different levels above 0 (at least 2 steps run: an image-to-image "
                         f"strength runs only its share of the steps asked); got {levels}")
    return levels[0], end


def _log_snr(sigma: float) -> torch.Tensor:
    # lambda = -log sigma (the half log-SNR, Lu et al.'s lambda_t) held in float32, as k-diffusion holds it: its
    # step sizes, and the levels the model sees, follow from these values
    return -torch.tensor(sigma, dtype=torch.float32).log()


def _sigma_of(lam: torch.Tensor) -> float:
    return float((-lam).exp())


def _dpm_solver_eps(denoise, dtype: torch.dtype, i_of, first_level: float):
    """eps(x_VE, lambda) = (x - D(x; sigma)) / sigma at sigma = e^{-lambda}, the model at that level's fractional
    timestep (Denoiser.at_sigma), within the plan's step i_of(sigma); the first call, where it is at the plan's first
    level (to float32's rounding), is the plan's step 0 (a matched start's held D, inpainting's first call)."""
    first = []

    def eps(x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = _sigma_of(lam)
        x_t = _ve_to_vp(x, sigma, dtype)
        on_plan = not first and math.isclose(sigma, first_level, rel_tol=1e-6)
        denoised = denoise(x_t, 0) if on_plan else denoise.at_sigma(x_t, sigma, i_of(sigma))
        first.append(True)
        return (x - denoised.double()) / sigma, denoised

    return eps


def _dpm_solver_step(eps_at, x: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor, lam_next: torch.Tensor,
                     order: int, r1: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One singlestep DPM-Solver step from lambda to lambda_next in VE form (alpha = 1, sigma = e^{-lambda}), given
    eps at x; eps_at(u, lambda) evaluates the model at an intermediate level. With h = lambda_next - lambda:
        order 1 (DDIM; Lu et al. eq. 3.7):  x_next = x - sigma_next (e^h - 1) eps
        order 2 (Algorithm 4, ratio r1):    u_1 = x - sigma_{s1} (e^{r1 h} - 1) eps,  s1 = lambda + r1 h,
            x_next = x - sigma_next (e^h - 1) eps - sigma_next / (2 r1) (e^h - 1) (eps(u_1, s1) - eps)
        order 3 (Algorithm 5, r1 = 1/3, r2 = 2/3): u_1 as above, then
            u_2 = x - sigma_{s2} (e^{r2 h} - 1) eps - sigma_{s2} (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps_1 - eps),
            x_next = x - sigma_next (e^h - 1) eps - sigma_next / r2 ((e^h - 1) / h - 1) (eps(u_2, s2) - eps).
    Returns (x_next, and for order 3 the order-2 result with r1 = 1/3 from the same u_1: DPM-Solver-23's pair)."""
    h = lam_next - lam
    s_next, e_h = _sigma_of(lam_next), float(h.expm1())
    x_next = x - (s_next * e_h) * eps
    if order == 1:
        return x_next, None
    r1 = 1 / 3 if order == 3 else r1
    s1 = lam + r1 * h
    u1 = x - (_sigma_of(s1) * float((r1 * h).expm1())) * eps
    d1 = eps_at(u1, s1) - eps
    if order == 2:
        return x_next - (s_next / (2 * r1) * e_h) * d1, None
    r2 = 2 / 3
    s2 = lam + r2 * h
    e_r2h, sigma_s2 = float((r2 * h).expm1()), _sigma_of(s2)
    u2 = x - (sigma_s2 * e_r2h) * eps - (sigma_s2 * (r2 / r1) * (e_r2h / float(r2 * h) - 1)) * d1
    d2 = eps_at(u2, s2) - eps
    return x_next - (s_next / r2 * (e_h / float(h) - 1)) * d2, x_next - (s_next / (2 * r1) * e_h) * d1


def _ancestral_split(lam: torch.Tensor, lam_next: torch.Tensor, lam_end: torch.Tensor, eta: float):
    # (lambda the deterministic part steps to, the noise's sigma_up): Euler ancestral's split of the step from sigma
    # to sigma_next (as _ancestral_step), the deterministic part held to the run's end, the noise filling the rest up
    # to sigma_next (k-diffusion's DPM-Solver with eta). In float32 as there: sigma_down^2 = sigma_next^2 - sigma_up^2
    # cancels (to sigma_next^4 / sigma^2 at eta 1), and its rounding moves the image by ~1e-4
    if eta == 0:
        return lam_next, 0.0
    s, s_next = (-lam).exp(), (-lam_next).exp()
    s_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    lam_down = torch.minimum(lam_end, -((s_next**2 - s_up**2) ** 0.5).log())
    return lam_down, float((s_next**2 - (-lam_down).exp() ** 2) ** 0.5)


def _nearest_step(plan: SamplingPlan):
    # the plan's step whose level is nearest sigma in log sigma: the step an off-grid evaluation belongs to
    logs = [math.log(s) for s in plan.sigmas.tolist()[:len(plan)] if s > 0]
    return lambda sigma: min(range(len(logs)), key=lambda k: abs(logs[k] - math.log(sigma)))


def _report_at(callback, k: int, total: int | None, sigma: float, t: float, x_t, denoised) -> None:
    if callback is not None:
        callback({"step": k, "total": total, "t": t, "sigma": sigma, "x": x_t, "denoised": denoised})


def _timestep_of(denoise, sigma: float) -> float:
    schedule = getattr(denoise, "schedule", None)
    return float(schedule.sigma_to_t(sigma)) if schedule is not None else float("nan")


def sample_dpm_fast(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                    progress: bool = True, s_noise: float = 1.0, ends: str = "auto",
                    calls: int | None = None) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4 and appendix C's fixed step schedule; k-diffusion's sample_dpm_fast,
    A1111's "DPM fast"): singlestep DPM-Solver with K = N model calls over M = floor(K/3) + 1 steps even in
    lambda = -log sigma, of orders 3, ..., 3, then 2, 1 when 3 divides K, else 3, ..., 3, K mod 3 (N = the plan's
    steps). It integrates between the `ends` (_dpm_solver_span: "auto", the plan's first level to the model's
    sigma_min; "plan", to the plan's last level above 0, ComfyUI's and A1111's image to image; "model", the model's
    whole range, A1111's text to image, the start sample read at the plan's first level as A1111 scales it) and returns
    the sample there, x_0 + sigma_min z in VE terms, as k-diffusion does: no last step to sigma = 0. The plan's
    other levels are not used. eta > 0 (A1111 runs eta 1, its eta_ancestral): each step goes down to
    Euler ancestral's sigma_down, then s_noise times fresh noise fills up to the next level. Prompt editing and
    ControlNet windows count model calls, as A1111's denoiser counts its steps. calls: K (default N; A1111's text to
    image passes the steps asked, which `sample` gives with ends "model", where a schedule type may lay out more)."""
    eta, s_noise = _eta("dpm_fast", eta, 0.0), _noise_scale("dpm_fast", s_noise)
    n = len(plan) if calls is None else calls
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"dpm_fast: calls (its model calls) must be a positive int; got {calls!r}")
    s_max, s_min = _dpm_solver_span(denoise, plan, "dpm_fast", ends)
    if hasattr(denoise, "evaluations"):
        denoise.evaluations = n  # (conditioning and ControlNet windows follow the model calls)
    m = n // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    lam_end = _log_snr(s_min)
    lams = torch.linspace(float(_log_snr(s_max)), float(lam_end), m + 1, dtype=torch.float32)
    dtype, step_of = x.dtype, _nearest_step(plan)
    eps_of = _dpm_solver_eps(denoise, dtype, step_of, float(plan.sigmas[0]))
    x = _vp_to_ve(x, float(plan.sigmas[0]))
    for k in tqdm(range(len(orders)), desc="dpm_fast", disable=not progress, leave=False):
        lam, lam_next = lams[k], lams[k + 1]
        lam_to, s_up = _ancestral_split(lam, lam_next, lam_end, eta)
        sigma = _sigma_of(lam)
        eps, denoised = eps_of(x, lam)
        _report_at(callback, k, len(orders), sigma, _timestep_of(denoise, sigma), _ve_to_vp(x, sigma, dtype),
                   denoised)
        x, _ = _dpm_solver_step(lambda u, lam_u: eps_of(u, lam_u)[0], x, eps, lam, lam_to, orders[k])
        if eta > 0:  # (k-diffusion draws at every step, the last one's weight 0)
            x = x + (s_up * s_noise) * _noise(noise, x).double()
    return x.to(dtype)


def sample_dpm_adaptive(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                        callback=None, progress: bool = True, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
                        dcoeff: float = 0.0, accept_safety: float = 0.81, s_noise: float = 1.0,
                        ends: str = "auto") -> torch.Tensor:
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, sec. 3.4 and appendix C, Algorithm 6;
    k-diffusion's sample_dpm_adaptive, A1111's "DPM adaptive"): each step in lambda = -log sigma, of length h,
    computes a lower- and a higher-order solution from the same model calls (order 3: DPM-Solver-2 with r1 = 1/3 and
    DPM-Solver-3; order 2: DPM-Solver-1 and -2), the error E = ||(x_low - x_high) / delta||_2 / sqrt(numel) with
    delta = max(atol, rtol max(|x_low|, |x_prev|)), and a PID controller (Söderlind 2003, as k-diffusion's; pcoeff 0,
    icoeff 1, dcoeff 0 is the paper's h E^{-1/order}) scales h by 1 + atan(f - 1) of its factor f, accepting the
    step when that is at least accept_safety. Between the `ends`, as dpm_fast (the plan's step count does not matter),
    returning the sample there. The step sizes follow the error over the
    whole batch, as in k-diffusion and A1111: a sample's result depends on the batch it runs in (run batch 1 for an
    image that depends on its seed alone). eta > 0: as dpm_fast, noise after each accepted step (the controller then
    takes order 1.5). Off-grid calls count as the plan's step nearest their level (prompt editing, ControlNet
    windows). The callback reports each attempted step, with total the steps so far plus the rest of the range at
    the current step size (an estimate: the count is not known ahead)."""
    eta, s_noise = _eta("dpm_adaptive", eta, 0.0), _noise_scale("dpm_adaptive", s_noise)
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive's order must be 2 or 3 (DPM-Solver-12 or -23); got {order!r}")
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init), ("accept_safety", accept_safety)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"dpm_adaptive's {name} must be a finite number > 0; got {v!r}")
    s_max, s_min = _dpm_solver_span(denoise, plan, "dpm_adaptive", ends)
    dtype, step_of = x.dtype, _nearest_step(plan)
    eps_of = _dpm_solver_eps(denoise, dtype, step_of, float(plan.sigmas[0]))
    controller = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    lam, lam_end = _log_snr(s_max), _log_snr(s_min)
    x = _vp_to_ve(x, float(plan.sigmas[0]))
    x_prev, steps, held = x, 0, None
    bar = tqdm(desc="dpm_adaptive", disable=not progress, leave=False)
    while lam < lam_end - 1e-5:
        lam_next = torch.minimum(lam_end, lam + controller.h)
        lam_to, s_up = _ancestral_split(lam, lam_next, lam_end, eta)
        sigma = _sigma_of(lam)
        # (after a rejected step x and lambda are unchanged: k-diffusion calls the model there again, we keep it)
        eps, denoised = held or eps_of(x, lam)
        cache = {}

        def eps_at(u, lam_u):  # (the low- and high-order solutions share their model calls)
            key = float(lam_u)
            if key not in cache:
                cache[key] = eps_of(u, lam_u)[0]
            return cache[key]

        if order == 2:
            x_low, _ = _dpm_solver_step(eps_at, x, eps, lam, lam_to, 1)
            x_high, _ = _dpm_solver_step(eps_at, x, eps, lam, lam_to, 2)
        else:
            x_high, x_low = _dpm_solver_step(eps_at, x, eps, lam, lam_to, 3)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / math.sqrt(x.numel())
        held = None
        if controller.accept(error):
            x_prev = x_low
            x = x_high
            if eta > 0:
                x = x + (s_up * s_noise) * _noise(noise, x).double()
            lam = lam_next
        else:
            held = eps, denoised
        rest = max(float(lam_end - lam), 0.0)
        total = steps + 1 + (math.ceil(rest / controller.h - 1e-9) if rest > 1e-5 else 0)
        _report_at(callback, steps, total, sigma, _timestep_of(denoise, sigma), _ve_to_vp(x, _sigma_of(lam), dtype),
                   denoised)
        steps += 1
        bar.update()
    bar.close()
    return x.to(dtype)


class _PIDStepSize:
    """PID step-size control (Söderlind 2003, "Digital filters in adaptive time-stepping"; k-diffusion's
    PIDStepSizeController): with e_k = 1 / (error_k + 1e-8) of this and the last two accepted steps, the factor
    f = e_0^{b1} e_1^{b2} e_2^{b3}, b1 = (kP + kI + kD) / k, b2 = -(kP + 2 kD) / k, b3 = kD / k for order k, limited
    to 1 + atan(f - 1); h <- h f in every case, the step accepted when the limited f >= accept_safety."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h, self.accept_safety = h, accept_safety
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.errs: list[float] = []

    def accept(self, error: float) -> bool:
        inv = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = 1 + math.atan(math.prod(e**b for e, b in zip(self.errs, self.b)) - 1)
        accepted = factor >= self.accept_safety
        if accepted:
            self.errs[1:] = self.errs[:2]
        self.h *= factor
        return accepted


def sample_unipc(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                 progress: bool = True, order: int = 2, variant: str = "bh2", floor: float | None = None
                 ) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework", Algorithms 1-3, data
    prediction): a UniP-p predictor to the next level, then, once the model has been evaluated there, the
    UniC corrector redoes the step with that new x_0 included (order p+1) at no extra model call. B(h) is
    e^{-h} - 1 ("bh2") or -h ("bh1"); the rho coefficients solve R rho = b (eq. 9 and appendix), with
    rho = 1/2 for the 2nd-order predictor. Warm-up with lower orders, and the order lowered towards the run's end
    (order min(p, steps left): diffusers' and the UniPC code's lower_order_final); a last step to sigma = 0 returns x_0,
    one to a level above it (the continuous-time schedule types' t = 1/T) the predictor's x, with no corrector.
    floor: a run to sigma = 0 stops at sigma = floor instead and hands on the VE sample x / alpha there (ComfyUI's
    uni_pc and uni_pc_bh2, which run the UniPC code with its end t = 1e-3 read as a sigma: floor 0.001, order 3)."""
    _deterministic("unipc", eta)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"UniPC order must be an integer from 1 to 4; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2'; got {variant!r}")
    sigmas, n = plan.sigmas.tolist(), _run_steps(plan)
    floored = floor is not None and sigmas[-1] == 0
    if floored:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < sigmas[-2]:
            raise ValueError(f"UniPC floor must be a level between 0 and the run's last above 0 ({sigmas[-2]:.4g}); "
                             f"got {floor!r}")
        if len(plan) == 1:  # (ComfyUI's code runs order min(3, steps - 1) = 0 there: no step at all)
            raise ValueError("UniPC with a floor (ComfyUI's uni_pc) takes at least 2 steps; ComfyUI's own hands a "
                             "1-step run back unstepped")
        sigmas[-1] = float(floor)
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]  # lambda = log(alpha/sigma_vp) = -log(sigma_VE)
    ms: list[torch.Tensor] = []
    x_prev, last_order = None, 0
    for i in _steps(plan, progress, "unipc"):
        denoised = denoise(x, i)
        _report(callback, plan, i, x, denoised)
        if x_prev is not None:  # UniC: correct the step that led here, using the x_0 just computed
            x = _unipc_update(x_prev, ms, lam, sigmas, i - 1, last_order, variant, new=denoised)
        ms = (ms + [denoised])[-order:]
        if sigmas[i + 1] == 0:
            return denoised
        last_order = min(order, len(ms), n - i)
        x_prev = x
        x = _unipc_update(x, ms, lam, sigmas, i, last_order, variant)
    return (x.double() * math.sqrt(1.0 + sigmas[-1] ** 2)).to(x.dtype) if floored else x


def _unipc_update(x, ms, lam, sigmas, i, order, variant, new=None):
    """One UniP step (new=None) from level i to i+1 with the x_0 history `ms` (newest = level i's), or the
    UniC correction of that step given `new`, the x_0 at level i+1 (then ms still ends at level i's)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    alpha_next = 1.0 / math.sqrt(1.0 + s_next**2)
    h = lam[i + 1] - lam[i]
    m0 = ms[-1]
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    d1s = [(ms[-1 - k] - m0) / rk for k, rk in zip(range(1, order), rks)]
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    b_h = hh if variant == "bh1" else h_phi_1
    rks, b, h_phi_k, fact = rks + [1.0], [], h_phi_1 / hh - 1.0, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    x_next = ((s_next * alpha_next) / (s / math.sqrt(1.0 + s**2))) * x - (alpha_next * h_phi_1) * m0
    if new is None:  # predictor: rho from the first order-1 equations (rho = 1/2 at order 2)
        if order == 1:
            return x_next
        rho = [0.5] if order == 2 else _solve([[r**k for r in rks[:-1]] for k in range(order - 1)], b[:-1])
        return x_next - (alpha_next * b_h) * sum(r * d for r, d in zip(rho, d1s))
    rho = [0.5] if order == 1 else _solve([[r**k for r in rks] for k in range(order)], b)
    corr = sum((r * d for r, d in zip(rho[:-1], d1s)), torch.zeros_like(m0))
    return x_next - (alpha_next * b_h) * (corr + rho[-1] * (new - m0))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


# -- ComfyUI's further samplers (its comfy/k_diffusion/sampling.py), in VE terms ----------------------------------
def _evaluated(denoise, x: torch.Tensor, plan: SamplingPlan, i: int, dtype, callback):
    """Step i's model call on x (VE): the VP sample the model reads and D there (float64), reported."""
    x_t = _ve_to_vp(x, float(plan.sigmas[i]), dtype)
    denoised = denoise(x_t, i).double()
    _report(callback, plan, i, x_t, denoised)
    return x_t, denoised


def _slope_multistep(denoise, x, plan, *, name, max_order, weights, callback, progress):
    """The linear multistep loop of iPNDM and DEIS on the probability-flow ODE in sigma: the slopes
    d_i = (x_i - D(x_i; sigma_i)) / sigma_i of the last `max_order` steps, x_{i+1} = x_i + sum_k w_k d_{i-k} with
    weights(sigmas, i, order) (newest first) at order min(max_order, i + 1), and a last step to sigma = 0 that returns
    D (the Euler step there lands on it)."""
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise ValueError(f"{name}: max_order must be an integer from 1 to 4; got {max_order!r}")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    ds: list[torch.Tensor] = []  # the slopes, oldest first
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        ds = (ds + [(x - denoised) / s])[-max_order:]
        if s_next == 0:
            x = denoised.double()
        else:
            x = x + sum(w * d for w, d in zip(weights(sigmas, i, len(ds)), reversed(ds)))
    return _ve_to_vp(x, sigmas[-1], dtype)


# Adams-Bashforth's coefficients for equal steps, newest slope first
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_ipndm(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                 progress: bool = True, max_order: int = 4) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator", sec. 5 and
    appendix: PNDM's linear multistep (Liu et al. 2022) started with lower orders instead of Runge-Kutta steps), as
    ComfyUI's ipndm runs it after zju-pi's diff-solvers: Adams-Bashforth on the probability-flow ODE in sigma with the
    equal-step coefficients whatever the levels' spacing, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_k b_k d_{i-k},
    b = (1), (3/2, -1/2), (23/12, -16/12, 5/12), (55/24, -59/24, 37/24, -9/24) at orders 1-4. One model call a step."""
    _deterministic("ipndm", eta)
    return _slope_multistep(denoise, x, plan, name="ipndm", max_order=max_order, callback=callback, progress=progress,
                            weights=lambda sig, i, k: [(sig[i + 1] - sig[i]) * b for b in _ADAMS_BASHFORTH[k]])


def _ipndm_v_weights(sig: list[float], i: int, order: int) -> list[float]:
    # the variable-step Adams-Bashforth coefficients of diff-solvers' iPNDM-v (ComfyUI's ipndm_v), h_k the step sizes
    # in sigma back from level i (h = sigma_{i+1} - sigma_i, h1 = sigma_i - sigma_{i-1}, ...)
    h = sig[i + 1] - sig[i]
    if order == 1:
        return [h]
    h1 = sig[i] - sig[i - 1]
    c1, c2 = (2 + h / h1) / 2, -(h / h1) / 2
    if order == 2:
        return [h * c1, h * c2]
    h2 = sig[i - 1] - sig[i - 2]
    t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [h * (c1 + t1), h * (c2 - (1 + h1 / h2) * t1), h * t1 * h1 / h2]
    h3 = sig[i - 2] - sig[i - 3]
    t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    g = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [h * (c1 + t1 + t2), h * (c2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + g) * t2),
            h * (t1 * h1 / h2 + (h1 / h2 + g * (1 + h2 / h3)) * t2), h * (-t2 * g * h1 / h2)]


def sample_ipndm_v(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                   progress: bool = True, max_order: int = 4) -> torch.Tensor:
    """iPNDM with variable steps (ComfyUI's ipndm_v, after zju-pi's diff-solvers; Zhang & Chen 2023): as ipndm, with
    the Adams-Bashforth coefficients of unequal steps, from the ratios of the last steps' lengths in sigma (on equal
    steps ipndm's up to order 3; its order-4 formula then gives 57/24, -65/24, 43/24, -11/24, not Adams-Bashforth's
    55/24, -59/24, 37/24, -9/24, and is kept as ComfyUI has it). One model call a step."""
    _deterministic("ipndm_v", eta)
    return _slope_multistep(denoise, x, plan, name="ipndm_v", max_order=max_order, weights=_ipndm_v_weights,
                            callback=callback, progress=progress)


# DEIS's time for EDM's levels (diff-solvers' edm2t, as ComfyUI calls it: EDM's range 0.002 to 80 and eps_s = 1e-3,
# whatever the model's): the VP-SDE of linear beta through both ends, sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1
_DEIS_EDM = (1e-3, 0.002, 80.0)
_DEIS_POINTS = 10000  # its quadrature's points


def deis_coefficients(sigmas: list[float], max_order: int = 3) -> list[list[float]]:
    """tAB-DEIS's weights (Zhang & Chen 2023, eq. 14: the exponential integrator with eps extrapolated by the Lagrange
    polynomial through the last steps, in the VP time t): for step i of order k = min(max_order, i + 1), the
    weights of d_i, d_{i-1}, ... are int_{t_i}^{t_{i+1}} l_j(tau) dsigma/dtau dtau, with the level's t from
    diff-solvers' edm2t (`_DEIS_EDM`) and the integral summed as ComfyUI's get_deis_coeff_list (deis_mode "tab")
    sums it: 10000 points from t_i to t_{i+1} inclusive, each times (t_{i+1} - t_i) / 10000. Order 1, and a step
    to sigma = 0, get none (an Euler step)."""
    eps_s, s_min, s_max = _DEIS_EDM
    beta_d = 2 * (math.log(s_min**2 + 1) / eps_s - math.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(s_max**2 + 1) - 0.5 * beta_d
    t = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log(s * s + 1)) - beta_min) / beta_d for s in sigmas]
    out: list[list[float]] = []
    for i in range(len(sigmas) - 1):
        k = min(i + 1, max_order)
        if k == 1 or sigmas[i + 1] == 0:
            out.append([])
            continue
        tau = np.linspace(t[i], t[i + 1], _DEIS_POINTS)
        abar = np.exp(-0.5 * beta_d * tau**2 - beta_min * tau)
        dsigma = 0.5 * (beta_d * tau + beta_min) / np.sqrt(abar * (1 - abar))  # d sigma / d tau
        nodes = [t[i - j] for j in range(k)]
        weights = []
        for j in range(k):
            basis = np.ones_like(tau)
            for m, node in enumerate(nodes):
                if m != j:
                    basis *= (tau - node) / (nodes[j] - node)
            weights.append(float(np.sum(dsigma * basis) * (t[i + 1] - t[i]) / _DEIS_POINTS))
        out.append(weights)
    return out


def sample_deis(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                progress: bool = True, max_order: int = 3) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"), its tAB form on the
    probability-flow ODE in sigma, as ComfyUI's deis runs it: x_{i+1} = x_i + sum_j C_ij d_{i-j} with the weights
    `deis_coefficients` (eps Lagrange-extrapolated in DEIS's VP time), Euler on the first step. One model call a
    step."""
    _deterministic("deis", eta)
    table: list[list[float]] = []

    def weights(sig, i, k):
        if not table:
            table.extend(deis_coefficients(sig, max_order))
        return table[i] if k > 1 else [sig[i + 1] - sig[i]]

    return _slope_multistep(denoise, x, plan, name="deis", max_order=max_order, weights=weights, callback=callback,
                            progress=progress)


def sample_heunpp2(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                   progress: bool = True) -> torch.Tensor:
    """Heun++ (ComfyUI's heunpp2, after Carzit's sd-webui-samplers-scheduler): each step from sigma_i to sigma_{i+1}
    averages the slope at sigma_i with those of Euler predictions at the next two levels, weighted by the levels'
    share of 3 sigma_0: w2 = sigma_{i+1} / (3 sigma_0), w3 = sigma_{i+2} / (3 sigma_0), w1 = 1 - w2 - w3; the step
    before the last uses the next level alone (Heun with w2 = sigma_{i+1} / (2 sigma_0)), the last is Euler. Up to 3
    model calls a step, at the plan's own levels."""
    _deterministic("heunpp2", eta)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    n = len(plan)

    def slope(x_ve, j):  # (x - D) / sigma at the plan's level j
        return (x_ve - denoise(_ve_to_vp(x_ve, sigmas[j], dtype), j)) / sigmas[j]

    for i in _steps(plan, progress, "heunpp2"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        d = (x - denoised) / s
        dt = s_next - s
        if i + 1 == n:
            x = x + dt * d
            continue
        x_2 = x + dt * d
        d_2 = slope(x_2, i + 1)
        if i + 2 == n:
            w2 = s_next / (2 * sigmas[0])
            x = x + dt * ((1 - w2) * d + w2 * d_2)
        else:
            d_3 = slope(x_2 + (sigmas[i + 2] - s_next) * d_2, i + 2)
            w2, w3 = s_next / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + dt * ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3)
    return _ve_to_vp(x, sigmas[-1], dtype)


def _res_multistep(denoise, x, plan, *, eta, noise, callback, progress, name, cfg_pp=False, s_noise=1.0):
    # ComfyUI's res_multistep: RES's 2nd-order multistep exponential integrator (Zhang et al. 2023, "Improved order
    # analysis and design of exponential integrator for diffusion models sampling", arXiv 2308.02157) in lambda =
    # -log sigma, down to Euler ancestral's sigma_down; the previous x_0 enters at the ratio c2 of the previous step,
    # measured (as ComfyUI measures it) from sigma_{i-1} to the previous step's sigma_down
    uncond_x0 = _unconditional_x0(denoise, cfg_pp, name)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    old, old_down = None, None
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        u = uncond_x0().double() if cfg_pp else denoised
        s_down, s_up = _ancestral_step(s, s_next, eta)
        if s_down == 0 or old is None:
            x = denoised + (s_down / s) * (x - u) if cfg_pp else x + (s_down - s) * (x - denoised) / s
        else:
            h = math.log(s / s_down)
            c2 = math.log(old_down / sigmas[i - 1]) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            if cfg_pp:
                x = x + (denoised - u)
            x = math.exp(-h) * x + h * ((phi1 - phi2 / c2) * u + (phi2 / c2) * old)
        if eta > 0 and s_next > 0:
            x = x + (s_up * s_noise) * _noise(noise, x_t).double()
        old, old_down = u, s_down
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_res_multistep(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                         callback=None, progress: bool = True) -> torch.Tensor:
    """RES multistep (Zhang et al. 2023, "Improved order analysis and design of exponential integrator for diffusion
    models sampling", its 2nd-order multistep; ComfyUI's res_multistep): in lambda = -log sigma, h = lambda_{i+1} -
    lambda_i, x_{i+1} = e^{-h} x_i + h ((phi_1(-h) - phi_2(-h) / c2) D_i + (phi_2(-h) / c2) D_{i-1}), with
    phi_1(z) = (e^z - 1) / z, phi_2(z) = (phi_1(z) - 1) / z and c2 = (lambda_{i-1} - lambda_i) / h (negative: the
    previous x_0 lies behind); Euler on the first step. One model call a step."""
    _deterministic("res_multistep", eta)
    return _res_multistep(denoise, x, plan, eta=0.0, noise=noise, callback=callback, progress=progress,
                          name="res_multistep")


def sample_res_multistep_ancestral(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                                   callback=None, progress: bool = True, s_noise: float = 1.0) -> torch.Tensor:
    """RES multistep down to Euler ancestral's sigma_down, then fresh noise up to sigma_next (ComfyUI's
    res_multistep_ancestral; eta default 1, s_noise scales the noise); c2 from sigma_{i-1} to the previous step's
    sigma_down, as ComfyUI measures it."""
    eta = _eta("res_multistep_a", eta, 1.0)
    return _res_multistep(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress,
                          name="res_multistep_a", s_noise=_noise_scale("res_multistep_a", s_noise))


def sample_res_multistep_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                               callback=None, progress: bool = True) -> torch.Tensor:
    """RES multistep with CFG++ (Chung et al. 2024; ComfyUI's res_multistep_cfg_pp): the step integrates the
    unconditional x_0 (the previous one too) from x + (D - D_u), its Euler first step is D + sigma_next (x - D_u) /
    sigma."""
    _deterministic("res_multistep_cfgpp", eta)
    return _res_multistep(denoise, x, plan, eta=0.0, noise=noise, callback=callback, progress=progress,
                          name="res_multistep_cfgpp", cfg_pp=True)


def sample_res_multistep_ancestral_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None,
                                         eta=None, callback=None, progress: bool = True,
                                         s_noise: float = 1.0) -> torch.Tensor:
    """RES multistep ancestral with CFG++ (ComfyUI's res_multistep_ancestral_cfg_pp)."""
    eta = _eta("res_multistep_a_cfgpp", eta, 1.0)
    return _res_multistep(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress,
                          name="res_multistep_a_cfgpp", cfg_pp=True,
                          s_noise=_noise_scale("res_multistep_a_cfgpp", s_noise))


def _gradient_estimation(denoise, x, plan, *, callback, progress, name, ge_gamma, cfg_pp=False):
    if isinstance(ge_gamma, bool) or not isinstance(ge_gamma, (int, float)) or not math.isfinite(ge_gamma):
        raise ValueError(f"{name}: ge_gamma must be a finite number; got {ge_gamma!r}")
    uncond_x0 = _unconditional_x0(denoise, cfg_pp, name)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    old_d = None
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        d = (x - (uncond_x0().double() if cfg_pp else denoised)) / s
        if s_next == 0:
            x = denoised
        else:
            x = denoised + s_next * d if cfg_pp else x + (s_next - s) * d
            if old_d is not None:
                x = x + ((ge_gamma - 1) * (s_next - s)) * (d - old_d)
        old_d = d
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_gradient_estimation(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                               callback=None, progress: bool = True, ge_gamma: float = 2.0) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an optimization
    perspective", Algorithm 2; ComfyUI's gradient_estimation): Euler with the slope d_i + (gamma - 1)(d_i - d_{i-1})
    from the second step on, d = (x - D) / sigma, gamma = 2 (the paper's); a last step to sigma = 0 returns D."""
    _deterministic("gradient_estimation", eta)
    return _gradient_estimation(denoise, x, plan, callback=callback, progress=progress, name="gradient_estimation",
                                ge_gamma=ge_gamma)


def sample_gradient_estimation_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                                     callback=None, progress: bool = True, ge_gamma: float = 2.0) -> torch.Tensor:
    """Gradient estimation with CFG++ (ComfyUI's gradient_estimation_cfg_pp): the slope from the unconditional x_0,
    the step D + sigma_next d, then the same (gamma - 1)(d_i - d_{i-1}) (sigma_next - sigma) correction."""
    _deterministic("gradient_estimation_cfgpp", eta)
    return _gradient_estimation(denoise, x, plan, callback=callback, progress=progress,
                                name="gradient_estimation_cfgpp", ge_gamma=ge_gamma, cfg_pp=True)


def sample_dpmpp_2m_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                          callback=None, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) with CFG++ (ComfyUI's dpmpp_2m_cfg_pp): with h = lambda_{i+1} - lambda_i, lambda = -log sigma,
    and r = h_{i-1} / h, x_{i+1} = D + e^{-h} (x - D_u) - (e^{-h} - 1) (D - D_u,{i-1}) / (2 r), where D_u is the
    unconditional x_0 and D_u,{i-1} the previous one: the guided x_0 plus DPM++ 2M's step from the unconditional ones.
    The first step and a step to sigma = 0 leave out the history term. One model call a step."""
    _deterministic("dpmpp_2m_cfgpp", eta)
    uncond_x0 = _unconditional_x0(denoise, True, "dpmpp_2m_cfgpp")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    old = None
    for i in _steps(plan, progress, "dpmpp_2m_cfgpp"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        u = uncond_x0().double()
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            x = denoised + math.exp(-h) * (x - u)
            if old is not None:
                r = math.log(sigmas[i - 1] / s) / h
                x = x - (math.expm1(-h) / (2 * r)) * (denoised - old)
        old = u
    return _ve_to_vp(x, sigmas[-1], dtype)


def sample_dpmpp_2s_ancestral_cfgpp(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                                    callback=None, progress: bool = True, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI's dpmpp_2s_ancestral_cfg_pp): DPM++ 2S a's step to sigma_down
    taken along the unconditional x_0 (the midpoint's too: the midpoint call's unconditional x_0 finishes the step),
    fresh noise up to sigma_next, then the first call's guidance D - D_u added. 2N - 1 model calls."""
    eta, s_noise = _eta("dpmpp_2s_a_cfgpp", eta, 1.0), _noise_scale("dpmpp_2s_a_cfgpp", s_noise)
    uncond_x0 = _unconditional_x0(denoise, True, "dpmpp_2s_a_cfgpp")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    for i in _steps(plan, progress, "dpmpp_2s_a_cfgpp"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        u = uncond_x0().double()
        s_down, s_up = _ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = u
        else:
            h = math.log(s / s_down)
            s_mid = s * math.exp(-0.5 * h)
            x_mid = (s_mid / s) * x - math.expm1(-0.5 * h) * u
            denoise.at_sigma(_ve_to_vp(x_mid, s_mid, dtype), s_mid, i)  # (its unconditional x_0 is what counts)
            x = (s_down / s) * x - math.expm1(-h) * uncond_x0().double()
        if eta > 0 and s_next > 0:
            x = x + (s_up * s_noise) * _noise(noise, x_t).double()
        x = x + (denoised - u)
    return _ve_to_vp(x, sigmas[-1], dtype)


def _er_sde_scale(v):
    # ER-SDE's default noise scale function (its "ER SDE 5" / ComfyUI's default_er_sde_noise_scaler)
    return v * (np.exp(v**0.3) + 10.0)


def sample_er_sde(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                  progress: bool = True, s_noise: float = 1.0, max_stage: int = 3) -> torch.Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for diffusion
    models", its ER-SDE-Solver-3 in VE terms; ComfyUI's er_sde): with the noise scale function
    f(l) = l (e^{l^0.3} + 10) of lambda_VE = sigma and r = f(sigma_{i+1}) / f(sigma_i), x_{i+1} = r x + (1 - r) D,
    plus the 2nd and 3rd stages' divided differences of D times (dt + S1 f(sigma_{i+1})) and (dt^2 / 2 + S2
    f(sigma_{i+1})), their integrals S summed over 200 points (as ComfyUI), then s_noise times fresh noise of
    variance sigma_{i+1}^2 - r^2 sigma_i^2. A last step to sigma = 0 returns D. One model call a step."""
    _deterministic("er_sde", eta)
    s_noise = _noise_scale("er_sde", s_noise)
    if isinstance(max_stage, bool) or max_stage not in (1, 2, 3):
        raise ValueError(f"er_sde: max_stage must be 1, 2 or 3; got {max_stage!r}")
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    points = np.arange(200, dtype=np.float64)
    old, old_d = None, None
    for i in _steps(plan, progress, "er_sde"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        stage = min(max_stage, i + 1)
        if s_next == 0:
            x = denoised
        else:
            r = float(_er_sde_scale(s_next) / _er_sde_scale(s))
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = s_next - s
                step = -dt / 200
                pos = s_next + points * step
                scaled = _er_sde_scale(pos)
                d = (denoised - old) / (s - sigmas[i - 1])
                x = x + (dt + float(np.sum(1 / scaled) * step) * _er_sde_scale(s_next)) * d
                if stage >= 3:
                    s_u = float(np.sum((pos - s) / scaled) * step)
                    x = x + (dt * dt / 2 + s_u * _er_sde_scale(s_next)) * (d - old_d) / ((s - sigmas[i - 2]) / 2)
                old_d = d
            if s_noise > 0:
                x = x + (s_noise * math.sqrt(max(s_next**2 - s * s * r * r, 0.0))) * _noise(noise, x_t).double()
        old = denoised
    return _ve_to_vp(x, sigmas[-1], dtype)


def _seeds(denoise, x, plan, *, eta, noise, callback, progress, name, rs, s_noise=1.0, solver_type="phi_1"):
    # SEEDS' stages in lambda = -log sigma (VE: alpha = 1), the noise of each stage carried to the next with the
    # factor of the lambda it moves and topped up with fresh noise (ComfyUI's sample_seeds_2 / sample_seeds_3)
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    x = _vp_to_ve(x, sigmas[0])
    inject = eta > 0 and s_noise > 0
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x, plan, i, dtype, callback)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        h_eta = h * (eta + 1)
        ds, z, prev_r = [denoised], None, 0.0
        for k, r in enumerate(rs):  # the stages at lambda_s + r h
            s_k = s * math.exp(-r * h)
            if k == 0:
                x_k = (s_k / s) * math.exp(-r * h * eta) * x - math.expm1(-r * h_eta) * denoised
            else:  # (SEEDS-3's second stage: the phi_2 combination of the first two x_0)
                a2 = rs[1] / rs[0] * _h_phi_2(-rs[1] * h_eta)
                x_k = (s_k / s) * math.exp(-r * h * eta) * x - ((math.expm1(-r * h_eta) - a2) * denoised + a2 * ds[1])
            if inject:
                z = _carried(z, noise, x_t, prev_r, r, h, eta)
                x_k = x_k + (s_k * s_noise) * z
            ds.append(denoise.at_sigma(_ve_to_vp(x_k, s_k, dtype), s_k, i).double())
            prev_r = r
        last = ds[-1]
        if len(rs) == 1 and solver_type == "phi_1":
            x = (s_next / s) * math.exp(-h * eta) * x - math.expm1(-h_eta) * torch.lerp(denoised, last, 1 / (2 * rs[0]))
        else:
            b = _h_phi_2(-h_eta) / rs[-1]
            x = (s_next / s) * math.exp(-h * eta) * x - ((math.expm1(-h_eta) - b) * denoised + b * last)
        if inject:
            x = x + (s_next * s_noise) * _carried(z, noise, x_t, prev_r, 1.0, h, eta)
    return _ve_to_vp(x, sigmas[-1], dtype)


def _h_phi_2(z: float) -> float:
    # h phi_2(h) at h = z: (e^z - 1 - z) / z
    return (math.expm1(z) - z) / z


def _carried(z, noise, x_t, r_from: float, r_to: float, h: float, eta: float) -> torch.Tensor:
    """SEEDS' noise at lambda_s + r_to h: the noise at r_from carried by e^{(r_from - r_to) h eta}, plus fresh noise of
    variance 1 - e^{2 (r_from - r_to) h eta} (at the start, r_from = 0, the fresh noise alone)."""
    seg = (r_from - r_to) * h * eta
    fresh = math.sqrt(-math.expm1(2 * seg)) * _noise(noise, x_t).double()
    return fresh if z is None else z * math.exp(seg) + fresh


def sample_seeds_2(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                   progress: bool = True, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1"
                   ) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE solvers for fast high-quality sampling from diffusion
    models", its 2-stage data-prediction solver; ComfyUI's seeds_2): in lambda = -log sigma, h = lambda_next - lambda,
    a stage at lambda + r h, x_1 = (sigma_1 / sigma) e^{-r h eta} x - (e^{-r h (1 + eta)} - 1) D plus noise, then
    x_next = (sigma_next / sigma) e^{-h eta} x - (e^{-h (1 + eta)} - 1) D~, with D~ = D + (D_1 - D) / (2 r) ("phi_1")
    or the phi_2 combination ("phi_2"), plus noise carried from the stage and fresh noise (eta, default 1, the SDE's;
    0 the ODE; s_noise scales it). 2N - 1 model calls."""
    eta, s_noise = _eta("seeds_2", eta, 1.0), _noise_scale("seeds_2", s_noise)
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"seeds_2: solver_type must be 'phi_1' or 'phi_2'; got {solver_type!r}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"seeds_2: r (the stage's place in the step) must be in (0, 1]; got {r!r}")
    return _seeds(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, name="seeds_2",
                  rs=(float(r),), s_noise=s_noise, solver_type=solver_type)


def sample_seeds_3(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                   progress: bool = True, s_noise: float = 1.0, r_1: float = 1 / 3, r_2: float = 2 / 3
                   ) -> torch.Tensor:
    """SEEDS-3 (Gonzalez et al. 2023; ComfyUI's seeds_3): stages at lambda + r_1 h and lambda + r_2 h (the second
    from the phi_2 combination of D and D_1), then x_next from D and D_2 by phi_2, the noise carried through the
    stages and topped up (eta default 1, s_noise). 3N - 2 model calls."""
    eta, s_noise = _eta("seeds_3", eta, 1.0), _noise_scale("seeds_3", s_noise)
    if not 0 < r_1 < r_2 <= 1:
        raise ValueError(f"seeds_3: need 0 < r_1 < r_2 <= 1; got r_1={r_1}, r_2={r_2}")
    return _seeds(denoise, x, plan, eta=eta, noise=noise, callback=callback, progress=progress, name="seeds_3",
                  rs=(float(r_1), float(r_2)), s_noise=s_noise)


def _sa_weights(lambdas: list[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """SA-Solver's b (Xue et al. 2023, eqs. 15 and 18, data prediction, VE so alpha_t = 1): the integrals over
    [lam_s, lam_t] of (1 + tau^2) e^{(1 + tau^2)(lam - lam_t)} l_k(lam), l_k the Lagrange basis through `lambdas`
    (oldest first), each x^p e^{...} integral by parts (ComfyUI's compute_exponential_coeffs), the basis by solving
    the transposed Vandermonde system, as ComfyUI's compute_stochastic_adams_b_coeffs."""
    n, mul, h = len(lambdas), 1 + tau * tau, lam_t - lam_s
    terms = [lam_t**p - lam_s**p * math.exp(-mul * h) for p in range(n)]
    moments = [sum((-1) ** (i - j) * math.exp(math.lgamma(i + 1) - math.lgamma(j + 1)) / mul ** (i - j) * terms[j]
                   for j in range(i + 1)) for i in range(n)]
    return _solve([[lam**p for lam in lambdas] for p in range(n)], moments)


def _sa_solver(denoise, x, plan, *, tau, levels, noise, callback, progress, name, s_noise, predictor_order,
               corrector_order, pece):
    sigmas, dtype = plan.sigmas.tolist(), x.dtype
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    x = _vp_to_ve(x, sigmas[0])
    x_pred, h, tau_t, z, preds = x, 0.0, 0.0, None, []
    to_end = sigmas[-1] == 0  # (lower orders towards a run that ends at 0)
    n = len(plan)
    for i in _steps(plan, progress, name):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_t, denoised = _evaluated(denoise, x_pred, plan, i, dtype, callback)
        preds = (preds + [denoised])[-max(predictor_order, corrector_order):]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (s_next == 0 and not pece) else min(corrector_order, len(preds))
        if to_end:
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)
        if c_order == 0:
            x = x_pred
        else:  # the corrector: the step from sigma_{i-1} again, with the x_0 at sigma_i among the nodes
            b = _sa_weights(lam[i - c_order + 1:i + 1], lam[i - 1], lam[i], tau_t)
            x = (s / sigmas[i - 1]) * math.exp(-tau_t * tau_t * h) * x + sum(w * d for w, d in zip(b, preds[-c_order:]))
            if tau_t > 0 and s_noise > 0:
                x = x + z
            if pece:  # (its PECE: the model again at the corrected x)
                denoised = denoise(_ve_to_vp(x, s, dtype), i).double()
                preds[-1] = denoised
        if s_next == 0:
            x_pred = denoised
        else:  # the predictor, to sigma_{i+1}
            tau_t = tau if levels[1] <= s_next <= levels[0] else 0.0
            b = _sa_weights(lam[i - p_order + 1:i + 1], lam[i], lam[i + 1], tau_t)
            h = lam[i + 1] - lam[i]
            x_pred = (s_next / s) * math.exp(-tau_t * tau_t * h) * x + sum(w * d for w, d in zip(b, preds[-p_order:]))
            if tau_t > 0 and s_noise > 0:
                z = (s_next * s_noise * math.sqrt(-math.expm1(-2 * tau_t * tau_t * h))) * _noise(noise, x_t).double()
                x_pred = x_pred + z
    return _ve_to_vp(x_pred, sigmas[-1], dtype)


def _sa_options(name, denoise, eta, tau_levels, predictor_order, corrector_order):
    tau = _eta(name, eta, 1.0)
    for what, v in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 6:
            raise ValueError(f"{name}: {what} must be an integer from 1 to 6; got {v!r}")
    if tau_levels is None:  # (ComfyUI's default interval: the levels 20% and 80% into the model's range)
        from imagine.schedules import comfyui_percent_sigma

        schedule = getattr(denoise, "schedule", None)
        if schedule is None:
            raise ValueError(f"{name}: its stochastic interval is read off the model's noise schedule; give "
                             "tau_levels=(high, low) or an imagine.sampling.Denoiser with a schedule")
        table = schedule.kdiffusion_log_sigmas()
        tau_levels = (comfyui_percent_sigma(table, 0.2), comfyui_percent_sigma(table, 0.8))
    return tau, tuple(float(v) for v in tau_levels)


def sample_sa_solver(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None, callback=None,
                     progress: bool = True, s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4,
                     tau_levels: tuple[float, float] | None = None) -> torch.Tensor:
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion models",
    Algorithm 1 in data prediction; ComfyUI's sa_solver): a stochastic Adams predictor (order 3) to the next level and,
    once the model has been evaluated there, a corrector (order 4) that redoes the step with that x_0 among its
    Lagrange nodes; x_next = (sigma_next / sigma) e^{-tau^2 h} x + sum_k b_k D_k (+ noise of variance
    sigma_next^2 (1 - e^{-2 tau^2 h}) within the stochastic interval), h the step in lambda = -log sigma. tau (eta,
    default 1) between the `tau_levels` (high, low; default ComfyUI's, the model's levels 20% and 80% of the way),
    0 elsewhere; orders lowered towards a run that ends at 0, and its last step returns D. One model call a step."""
    tau, levels = _sa_options("sa_solver", denoise, eta, tau_levels, predictor_order, corrector_order)
    return _sa_solver(denoise, x, plan, tau=tau, levels=levels, noise=noise, callback=callback, progress=progress,
                      name="sa_solver", s_noise=_noise_scale("sa_solver", s_noise), predictor_order=predictor_order,
                      corrector_order=corrector_order, pece=False)


def sample_sa_solver_pece(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, noise=None, eta=None,
                          callback=None, progress: bool = True, s_noise: float = 1.0, predictor_order: int = 3,
                          corrector_order: int = 4, tau_levels: tuple[float, float] | None = None) -> torch.Tensor:
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate; ComfyUI's sa_solver_pece): the model is
    evaluated again at each corrected x, which replaces the predicted x's x_0; the last step is corrected too. 2N - 1
    model calls."""
    tau, levels = _sa_options("sa_solver_pece", denoise, eta, tau_levels, predictor_order, corrector_order)
    return _sa_solver(denoise, x, plan, tau=tau, levels=levels, noise=noise, callback=callback, progress=progress,
                      name="sa_solver_pece", s_noise=_noise_scale("sa_solver_pece", s_noise),
                      predictor_order=predictor_order, corrector_order=corrector_order, pece=True)


# -- the last step ---------------------------------------------------------------------------------------
def final_heun_step(denoise: Denoise, x: torch.Tensor, plan: SamplingPlan, *, callback=None) -> torch.Tensor:
    """The step from the plan's last level sigma_{N-1} to sigma = 0 by the trapezoidal rule (Heun, Karras et al.
    2022, Alg. 1) instead of Euler's x_0 = D(x; sigma_{N-1}).

    Alg. 1 skips the correction there because the slope d = (x - D)/sigma is 0/0 at sigma = 0; its limit
    is 0 when the data density is smooth at scales below sigma_{N-1} (Tweedie: d = -sigma grad log p_sigma),
    so the trapezoid gives x_0 = x - sigma d / 2 = (x_VE + D) / 2. For a Gaussian mode of variance v this
    shrinks x - mu by (1 + v/(v + sigma^2)) / 2, which matches the ODE's exact sqrt(v/(v + sigma^2)) to
    second order, where the Euler step's v/(v + sigma^2) visibly narrows every mode (docs/samplers.md).
    Costs the same one model call as the Euler step it replaces.
    """
    i = len(plan) - 1
    if float(plan.sigmas[-1]) != 0:
        raise ValueError("final_step='heun' needs a plan that ends at sigma = 0 (DDIM with set_alpha_to_one=False "
                         "ends at abar_0)")
    s = float(plan.sigmas[i])
    denoised = denoise(x, i)
    _report(callback, plan, i, x, denoised)
    return ((_vp_to_ve(x, s) + denoised.double()) / 2).to(x.dtype)


# -- registry --------------------------------------------------------------------------------------------
# canonical name -> function; and the timestep rule its diffusers peer uses (see SamplingPlan)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_ancestral,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "plms": sample_plms,
    "lcm": sample_lcm,
    "restart": sample_restart,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "ddim_cfgpp": sample_ddim_cfgpp,
    "euler_cfgpp": sample_euler_cfgpp,
    "euler_a_cfgpp": sample_euler_ancestral_cfgpp,
    # ComfyUI's further samplers
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "heunpp2": sample_heunpp2,
    "res_multistep": sample_res_multistep,
    "res_multistep_a": sample_res_multistep_ancestral,
    "res_multistep_cfgpp": sample_res_multistep_cfgpp,
    "res_multistep_a_cfgpp": sample_res_multistep_ancestral_cfgpp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfgpp": sample_gradient_estimation_cfgpp,
    "dpmpp_2m_cfgpp": sample_dpmpp_2m_cfgpp,
    "dpmpp_2s_a_cfgpp": sample_dpmpp_2s_ancestral_cfgpp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}
# the samplers that evaluate the model twice a step (once on the last, to sigma = 0): AUTOMATIC1111 counts their
# prompt-editing steps (and ControlNet windows) in model calls, 2N - 1 of them
TWO_CALL_SAMPLERS = ("heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "restart", "dpmpp_2s_a_cfgpp")
# the samplers whose result at a last level above 0 is already the VE sample x / alpha, as k-diffusion's (the others
# hand on the VP one, which sampling.sample turns into VE for a plan with end_ve)
VE_RESULT_SAMPLERS = ("dpm_fast", "dpm_adaptive", "restart")
# AUTOMATIC1111's CompVis samplers (its sd_samplers_timesteps), over schedules.COMPVIS_SCHEDULES
COMPVIS_SAMPLERS = ("ddim", "plms", "ddim_cfgpp", "unipc")
# the CFG++ samplers (Chung et al. 2024): they renoise with the unconditional prediction, so the unconditional pass runs
# at every guidance scale (the pipelines encode the negative prompt at scale 1 too)
CFG_PP_SAMPLERS = ("ddim_cfgpp", "euler_cfgpp", "euler_a_cfgpp", "res_multistep_cfgpp", "res_multistep_a_cfgpp",
                   "gradient_estimation_cfgpp", "dpmpp_2m_cfgpp", "dpmpp_2s_a_cfgpp")
# the timestep_spacing default of the diffusers schedulers that run each timestep rule (DDIMScheduler, DDPMScheduler
# and LCMScheduler "leading"; EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPC and the other k-diffusion
# ports "linspace"), which a scheduler config without the key takes
DIFFUSERS_DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", "lcm": "leading", "dpm_solver": "linspace",
                             "karras": "linspace"}
TIMESTEP_RULE = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpm_solver", "dpmpp_2m_sde": "dpm_solver",
                 "dpmpp_2m_sde_heun": "dpm_solver", "dpmpp_sde": "karras",
                 "dpmpp_3m": "dpm_solver", "dpmpp_3m_sde": "dpm_solver", "unipc": "dpm_solver",
                 "euler": "karras", "euler_a": "karras", "heun": "karras", "lms": "karras", "dpm2": "karras",
                 "dpm2_a": "karras", "dpmpp_2s_a": "karras", "plms": "ddim", "lcm": "lcm", "restart": "karras",
                 "dpm_fast": "karras", "dpm_adaptive": "karras", "ddim_cfgpp": "ddim", "euler_cfgpp": "karras",
                 "euler_a_cfgpp": "karras", **dict.fromkeys(("ipndm", "ipndm_v", "deis", "heunpp2", "res_multistep",
                 "res_multistep_a", "res_multistep_cfgpp", "res_multistep_a_cfgpp", "gradient_estimation",
                 "gradient_estimation_cfgpp", "dpmpp_2m_cfgpp", "dpmpp_2s_a_cfgpp", "er_sde", "seeds_2", "seeds_3",
                 "sa_solver", "sa_solver_pece"), "karras")}

# What people type (AUTOMATIC1111's labels, k-diffusion's k_ names, diffusers' classes and algorithm
# types) -> (canonical name, Karras sigmas implied?). Lookup ignores case, spaces, '-' and '_'.
_ALIASES: dict[str, tuple[str, bool]] = {}


def _alias(canonical: str, *names: str, karras: bool = False) -> None:
    for n in names:
        _ALIASES[_key(n)] = (canonical, karras)


def _key(name: str) -> str:
    """A name as samplers and schedule types are compared: case, spaces, hyphens and underscores aside."""
    return "".join(ch for ch in str(name).lower() if ch not in " -_")


_alias("ddpm", "ddpm", "DDPMScheduler", "ddpm_fixed_small")
_alias("ddim", "ddim", "DDIMScheduler")
_alias("dpmpp_2m", "dpmpp_2m", "DPM++ 2M", "k_dpmpp_2m", "dpmsolver++", "DPMSolverMultistepScheduler",
       "dpm++2m")
_alias("dpmpp_2m", "DPM++ 2M Karras", "dpmpp_2m_karras", "k_dpmpp_2m_karras", karras=True)
_alias("dpmpp_2m_sde", "dpmpp_2m_sde", "DPM++ 2M SDE", "k_dpmpp_2m_sde", "sde-dpmsolver++")
_alias("dpmpp_2m_sde", "DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras", "k_dpmpp_2m_sde_karras", karras=True)
_alias("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", "k_dpmpp_2m_sde_heun")
_alias("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun_karras", "k_dpmpp_2m_sde_heun_karras",
       karras=True)
_alias("dpmpp_sde", "dpmpp_sde", "DPM++ SDE", "k_dpmpp_sde", "DPMSolverSDEScheduler")
_alias("dpmpp_sde", "DPM++ SDE Karras", "dpmpp_sde_karras", "k_dpmpp_sde_karras", "k_dpmpp_sde_ka", karras=True)
_alias("dpmpp_3m", "dpmpp_3m", "DPM++ 3M", "k_dpmpp_3m", "dpm++3m")
_alias("dpmpp_3m", "DPM++ 3M Karras", "dpmpp_3m_karras", karras=True)
_alias("dpmpp_3m_sde", "dpmpp_3m_sde", "DPM++ 3M SDE", "k_dpmpp_3m_sde")
_alias("dpmpp_3m_sde", "DPM++ 3M SDE Karras", "dpmpp_3m_sde_karras", "k_dpmpp_3m_sde_karras", karras=True)
_alias("unipc", "unipc", "UniPC", "uni_pc", "UniPCMultistepScheduler", "uni_pc_bh2")
_alias("unipc", "UniPC Karras", "unipc_karras", karras=True)
_alias("euler", "euler", "Euler", "k_euler", "EulerDiscreteScheduler")
_alias("euler", "Euler Karras", "k_euler_karras", karras=True)
_alias("euler_a", "euler_a", "Euler a", "euler_ancestral", "k_euler_a", "k_euler_ancestral",
       "EulerAncestralDiscreteScheduler")
_alias("heun", "heun", "Heun", "k_heun", "HeunDiscreteScheduler")
_alias("heun", "Heun Karras", "k_heun_karras", karras=True)
_alias("lms", "lms", "LMS", "k_lms", "LMSDiscreteScheduler")
_alias("lms", "LMS Karras", "lms_karras", "k_lms_karras", karras=True)
_alias("dpm2", "dpm2", "DPM2", "dpm_2", "k_dpm_2", "KDPM2DiscreteScheduler")
_alias("dpm2", "DPM2 Karras", "dpm2_karras", "k_dpm_2_karras", karras=True)
_alias("dpm2_a", "dpm2_a", "DPM2 a", "dpm_2_a", "k_dpm_2_a", "dpm2_ancestral", "dpm_2_ancestral",
       "k_dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler")
_alias("dpm2_a", "DPM2 a Karras", "dpm2_a_karras", "k_dpm_2_a_karras", karras=True)
_alias("dpmpp_2s_a", "dpmpp_2s_a", "DPM++ 2S a", "k_dpmpp_2s_a", "dpmpp_2s_ancestral", "k_dpmpp_2s_ancestral")
_alias("dpmpp_2s_a", "DPM++ 2S a Karras", "dpmpp_2s_a_karras", "k_dpmpp_2s_a_karras", karras=True)
_alias("plms", "plms", "PLMS", "pndm_plms", "PNDMScheduler")
_alias("lcm", "lcm", "LCM", "k_lcm", "LCMScheduler")
_alias("restart", "restart", "Restart")
_alias("dpm_fast", "dpm_fast", "DPM fast", "k_dpm_fast", "dpm_solver_fast")
_alias("dpm_fast", "DPM fast Karras", "dpm_fast_karras", karras=True)
_alias("dpm_adaptive", "dpm_adaptive", "DPM adaptive", "k_dpm_ad", "k_dpm_adaptive", "dpm_solver_adaptive")
_alias("dpm_adaptive", "DPM adaptive Karras", "dpm_adaptive_karras", karras=True)
_alias("ddim_cfgpp", "ddim_cfgpp", "DDIM CFG++", "ddim_cfg_pp")
_alias("euler_cfgpp", "euler_cfgpp", "Euler CFG++", "euler_cfg_pp")
_alias("euler_a_cfgpp", "euler_a_cfgpp", "Euler a CFG++", "euler_ancestral_cfg_pp", "euler_ancestral_cfgpp")
# ComfyUI's further samplers, by its names
_alias("ipndm", "ipndm", "iPNDM")
_alias("ipndm_v", "ipndm_v", "iPNDM v")
_alias("deis", "deis", "DEIS")
_alias("heunpp2", "heunpp2", "Heun++ 2", "heunpp")
_alias("res_multistep", "res_multistep", "RES multistep")
_alias("res_multistep_a", "res_multistep_a", "res_multistep_ancestral", "RES multistep a")
_alias("res_multistep_cfgpp", "res_multistep_cfgpp", "res_multistep_cfg_pp", "RES multistep CFG++")
_alias("res_multistep_a_cfgpp", "res_multistep_a_cfgpp", "res_multistep_ancestral_cfg_pp", "RES multistep a CFG++")
_alias("gradient_estimation", "gradient_estimation", "Gradient Estimation")
_alias("gradient_estimation_cfgpp", "gradient_estimation_cfgpp", "gradient_estimation_cfg_pp",
       "Gradient Estimation CFG++")
_alias("dpmpp_2m_cfgpp", "dpmpp_2m_cfgpp", "dpmpp_2m_cfg_pp", "DPM++ 2M CFG++")
_alias("dpmpp_2s_a_cfgpp", "dpmpp_2s_a_cfgpp", "dpmpp_2s_ancestral_cfg_pp", "DPM++ 2S a CFG++")
_alias("er_sde", "er_sde", "ER SDE", "ER-SDE-Solver-3")
_alias("seeds_2", "seeds_2", "SEEDS-2")
_alias("seeds_3", "seeds_3", "SEEDS-3")
_alias("sa_solver", "sa_solver", "SA-Solver")
_alias("sa_solver_pece", "sa_solver_pece", "SA-Solver PECE")
# AUTOMATIC1111's old names of its Karras variants (k_<sampler>_ka)
for _name, _canonical in (("k_lms_ka", "lms"), ("k_dpm_2_ka", "dpm2"), ("k_dpm_2_a_ka", "dpm2_a"),
                          ("k_dpmpp_2s_a_ka", "dpmpp_2s_a"), ("k_dpmpp_2m_ka", "dpmpp_2m"),
                          ("k_dpmpp_2m_sde_ka", "dpmpp_2m_sde"), ("k_dpmpp_3m_sde_ka", "dpmpp_3m_sde"),
                          ("k_dpmpp_2m_sde_heun_ka", "dpmpp_2m_sde_heun")):
    _alias(_canonical, _name, karras=True)


def takes_eta(canonical: str) -> bool:
    """Whether a sampler has a noise scale eta (the stochastic ones, and DDIM's interpolation to DDPM)."""
    return canonical in _ETA_SAMPLERS


def option_names(canonical: str) -> list[str]:
    """A sampler's own options (sampler_options): its keyword-only parameters beyond the shared signature."""
    import inspect

    return [n for n, p in inspect.signature(SAMPLERS[canonical]).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in ("noise", "eta", "callback", "progress")]


def sampler_names() -> list[str]:
    """The canonical sampler names."""
    return list(SAMPLERS)


# AUTOMATIC1111's sampler labels (its UI, API and infotexts), their old k_ aliases, and the sampler of ours each
# names; the server lists them, and PNG parameters are written with them.
A1111_SAMPLERS = [
    ("DPM++ 2M", ["k_dpmpp_2m"], "dpmpp_2m"),
    ("DPM++ SDE", ["k_dpmpp_sde"], "dpmpp_sde"),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], "dpmpp_2m_sde"),
    ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"], "dpmpp_2m_sde_heun"),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"], "dpmpp_2s_a"),
    ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"], "dpmpp_3m_sde"),
    ("Euler a", ["k_euler_a"], "euler_a"),
    ("Euler", ["k_euler"], "euler"),
    ("LMS", ["k_lms"], "lms"),
    ("Heun", ["k_heun"], "heun"),
    ("DPM2", ["k_dpm_2"], "dpm2"),
    ("DPM2 a", ["k_dpm_2_a"], "dpm2_a"),
    ("DPM fast", ["k_dpm_fast"], "dpm_fast"),
    ("DPM adaptive", ["k_dpm_ad"], "dpm_adaptive"),
    ("Restart", ["restart"], "restart"),
    ("DDIM", [], "ddim"),
    ("DDIM CFG++", ["ddim_cfgpp"], "ddim_cfgpp"),
    ("PLMS", [], "plms"),
    ("UniPC", [], "unipc"),
    ("LCM", ["k_lcm"], "lcm"),
    ("DDPM", [], "ddpm"),
]


# How AUTOMATIC1111 (1.10, modules/sd_samplers_kdiffusion.py) runs its k-diffusion samplers: the schedule type its
# "Automatic" picks for each ("uniform": k-diffusion's own discrete levels), and those that lay out one level more and
# leave out the penultimate (discard_next_to_last_sigma)
A1111_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential",
                   "dpmpp_2m_sde_heun": "exponential", "dpmpp_2s_a": "karras", "dpmpp_3m_sde": "exponential",
                   "euler_a": "uniform", "euler": "uniform", "lms": "uniform", "heun": "uniform", "dpm2": "karras",
                   "dpm2_a": "karras", "restart": "karras", "dpm_fast": "uniform", "dpm_adaptive": "uniform"}
A1111_DISCARD = ("dpm2", "dpm2_a", "dpmpp_3m_sde")
# the samplers whose eta A1111 sets to its eta_ancestral, 1, where k-diffusion's (and our) default is 0
A1111_ETA_ONE = ("dpm_fast", "dpm_adaptive")
# A1111's UniPC (modules/models/diffusion/uni_pc, its settings' defaults): 3rd order, B(h) = -h
A1111_UNIPC = {"order": 3, "variant": "bh1"}
# A1111's "DDIM CFG++" maps its CFG scale to CFG++'s lambda by 1 / 12.5 (CFG 0..12.5 -> lambda 0..1)
A1111_CFGPP_SCALE = 1 / 12.5


# A1111's schedule-type names (and labels, and aliases) where ours differ: ours are ComfyUI's
A1111_SCHEDULE_NAMES = {"ddim_uniform": "ddim"}
_SCHEDULE_ALIASES = {"ddim": "ddim_uniform", "sgmuniform": "sgm_uniform"}


def a1111_schedule(scheduler: str | None) -> str | None:
    """An A1111 schedule type, by name or label ("Karras", "SGM Uniform", "DDIM", "Align Your Steps", ...) -> our
    SIGMA_SCHEDULES name, or None for "Automatic"; ValueError naming the valid ones."""
    from imagine.schedules import SIGMA_SCHEDULES

    if scheduler is None:
        return None
    if not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be a name (str); got {type(scheduler).__name__}")
    key = scheduler.strip().lower().replace(" ", "_")
    key = _SCHEDULE_ALIASES.get(key, key)
    if key in ("automatic", "auto", "default", ""):
        return None
    if key not in SIGMA_SCHEDULES:
        names = [A1111_SCHEDULE_NAMES.get(k, k) for k in SIGMA_SCHEDULES if k != "align_your_steps_sdxl"]
        raise ValueError(f"scheduler {scheduler!r} is not supported; valid: automatic, {', '.join(names)}")
    return key


def a1111_named_pick(name: str) -> str | None:
    """The schedule type A1111's "Automatic" picks for sampler `name` where it names one (its sampler's options'
    "scheduler", which its infotext reader takes back as Automatic); None where Automatic keeps k-diffusion's own
    levels ("uniform") or A1111 runs the sampler otherwise. ValueError for a name that is not a sampler."""
    pick = A1111_AUTOMATIC.get(resolve_sampler(name)[0])
    return pick if pick != "uniform" else None


def a1111_settings(name: str, scheduler: str | None = None) -> dict:
    """The sampling settings (keywords of `imagine.sampling.sample` and TextToImagePipeline.generate) that run
    AUTOMATIC1111's sampler `name` (a label such as "DPM++ 2M", an old "... Karras" name, or one of ours) with its
    schedule type `scheduler` (a SIGMA_SCHEDULES name; None or "automatic": the sampler's own) the way A1111 does.

    For its k-diffusion samplers (A1111_AUTOMATIC): the schedule type "Automatic" picks; levels over the model's whole
    trained range (sigma_range "model"); x_T = z sigma_max (start "sigma_max"); one level more with the penultimate
    left out for DPM2, DPM2 a and DPM++ 3M SDE; k-diffusion's warm-up for DPM++ 3M SDE; A1111's image-to-image step
    count (strength_rule "a1111": int(min(strength, 0.999) * steps) + 1 steps; its hires. fix pass runs its steps in
    full, generate_hires's "a1111_fixed_steps"); eta 1 for DPM fast and DPM adaptive (A1111's eta_ancestral, the
    default of a request without one; the other stochastic samplers default to 1 here too) and their integration over
    the model's whole range (ends "model"; image to image runs the plan's, as A1111's). Checked against k-diffusion's
    own functions in tests/test_k_diffusion.py. DDIM and PLMS run A1111's own timesteps (its CompVis samplers'): t = 1,
    1 + k, ... with k = T // steps, the last held to T - 1 (the "compvis" schedule type), from unit noise at the
    highest, stopping at t = 1's level (last_step False), as does "DDIM CFG++" (whose guidance scale A1111 divides by
    12.5: a1111_guidance_scale), unless a schedule type is named (A1111 passes over one for them; here it
    applies, over the model's range). UniPC runs A1111's own (its modules/models/diffusion/uni_pc): 3rd order, bh1,
    lower order towards the end, in continuous VP time evenly from t = 1 to 1/T over as many steps as the CompVis
    timesteps count (the "compvis_time_uniform" schedule type: 31 for 30), from unit noise, ending at abar_0 (a named
    schedule type applies instead, as for DDIM). Image to image with DDIM, PLMS and UniPC is A1111's CompVis one (the
    "a1111" strength rule over their schedule types: the sampler starts a level below the image's noise,
    sampling._compvis_img2img). LCM runs A1111's (its sd_samplers_lcm): k-diffusion style, the "uniform" schedule type
    over its distillation timesteps' levels (schedules._lcm_levels), x_T = z sigma_max, its image-to-image rule. DDPM
    keeps its own timesteps unless a schedule type is named.
    """
    canonical, _, karras = resolve_sampler(name)
    scheduler = a1111_schedule(scheduler)
    if karras:
        if scheduler not in (None, "karras"):
            raise ValueError(f"{name!r} names Karras levels; scheduler {scheduler!r} contradicts it")
        scheduler = "karras"
    if canonical in ("ddim", "plms", "ddim_cfgpp") and scheduler is None:
        return {"sampler": canonical, "sigma_schedule": "compvis", "sigma_range": "spaced",
                "sampler_options": {"last_step": False}, "strength_rule": "a1111"}
    if canonical == "lcm":  # (A1111's own LCM, k-diffusion style over its distillation levels: schedules._lcm_levels)
        return {"sampler": canonical, "sigma_schedule": scheduler or "uniform", "sigma_range": "model",
                "start": "sigma_max", "strength_rule": "a1111"}
    if canonical == "unipc":  # (A1111's uni_pc settings: order 3, bh1, time-uniform, lower order final)
        return {"sampler": canonical, "sigma_schedule": scheduler or "compvis_time_uniform",
                "sigma_range": "model" if scheduler else "spaced", "sampler_options": dict(A1111_UNIPC),
                **({} if scheduler else {"strength_rule": "a1111"})}
    if canonical not in A1111_AUTOMATIC:
        return {"sampler": canonical, "sigma_schedule": scheduler, "sigma_range": "model" if scheduler else "spaced"}
    return {"sampler": canonical, "sigma_schedule": scheduler or A1111_AUTOMATIC[canonical], "sigma_range": "model",
            "discard_penultimate_sigma": canonical in A1111_DISCARD, "start": "sigma_max", "strength_rule": "a1111",
            "sampler_options": ({"warmup": "k_diffusion"} if canonical == "dpmpp_3m_sde"
                                else {"ends": "model"} if canonical in A1111_ETA_ONE else {}),
            **({"eta": 1.0} if canonical in A1111_ETA_ONE else {})}


def sampler_in(name, names) -> bool:
    """Whether sampler `name` (any alias) is one of the canonical `names`; False for a name that is not a sampler."""
    try:
        return resolve_sampler(str(name))[0] in names if name else False
    except ValueError:
        return False


def couples_batch(sampler) -> bool:
    """Whether a sampler's images depend on the rest of their batch: DPM adaptive picks its steps from the error over
    the whole batch (as k-diffusion and A1111 do), so the server runs its requests alone and the CLI one image a
    batch."""
    return sampler_in(sampler, ("dpm_adaptive",))


def is_cfg_pp(name) -> bool:
    """Whether `name` is a CFG++ sampler (CFG_PP_SAMPLERS), whose guidance scale is lambda."""
    return sampler_in(name, CFG_PP_SAMPLERS)


def default_guidance_scale(cfg_default: float, sampler) -> float:
    """The guidance scale a run takes when none is given: the model's default CFG scale, for a CFG++ sampler mapped
    to its lambda as A1111 maps it (/ 12.5: 7.5 -> 0.6)."""
    return float(cfg_default) * (A1111_CFGPP_SCALE if is_cfg_pp(sampler) else 1.0)


def a1111_guidance_scale(name: str, cfg_scale: float) -> float:
    """The guidance scale that runs sampler `name` at AUTOMATIC1111's CFG scale `cfg_scale`: for its "DDIM CFG++" (and
    our other CFG++ samplers, the same way), CFG++'s lambda = cfg_scale / 12.5 (A1111 maps CFG 0..12.5 to lambda
    0..1); for every other sampler the scale itself."""
    return float(cfg_scale) * (A1111_CFGPP_SCALE if resolve_sampler(name)[0] in CFG_PP_SAMPLERS else 1.0)


def a1111_label(name: str) -> tuple[str, bool]:
    """(AUTOMATIC1111's label for a sampler name of ours or any alias, Karras sigmas implied by the name): "Euler a"
    for euler_a, ("DPM++ 2M", True) for "DPM++ 2M Karras"; a name with no A1111 label is given back as it is."""
    try:
        canonical, _, karras = resolve_sampler(str(name))
    except (ValueError, TypeError):
        return str(name), False
    return next((label for label, _, ours in A1111_SAMPLERS if ours == canonical), canonical), bool(karras)


def same_sampler(a: str, b: str) -> bool:
    """Whether two sampler names (canonical, AUTOMATIC1111's, diffusers' scheduler classes) are one sampler."""
    try:
        return resolve_sampler(a)[0] == resolve_sampler(b)[0]
    except (TypeError, ValueError):
        return a == b


def resolve_sampler(name: str) -> tuple[str, Callable[..., torch.Tensor], bool]:
    """(canonical name, function, Karras sigmas implied by the name) for a sampler name or alias."""
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a name (str); got {type(name).__name__}")
    hit = _ALIASES.get(_key(name))
    if hit is None:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} "
                         f"(also AUTOMATIC1111's: DDIM, DDIM CFG++, DDPM, PLMS, Euler, Euler a, Heun, LMS, DPM2, "
                         f"DPM2 a, DPM++ 2S a, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M, DPM++ 3M SDE, UniPC, LCM, Restart, "
                         f"DPM fast, DPM adaptive, the '... Karras' "
                         f"forms of the k-diffusion ones and of UniPC, and k_euler-style names)")
    canonical, karras = hit
    return canonical, SAMPLERS[canonical], karras


def stored_scheduler_keys(scheduler_config: dict | None) -> dict:
    """A diffusers scheduler config without the keys it lists in `_use_default_values` (those diffusers filled in with
    its class's defaults when it loaded a file that lacked them): what `OtherScheduler.from_config` carries over."""
    sc = dict(scheduler_config or {})
    for key in sc.get("_use_default_values") or ():
        sc.pop(key, None)
    return sc


def diffusers_plan_layout(scheduler_config: dict | None, sampler: str) -> dict:
    """The plan's layout (`sample`'s timestep_spacing and steps_offset keywords) that a diffusers scheduler config
    gives `sampler`, as diffusers' `OtherScheduler.from_config(config)` builds the scheduler that runs it: a key the
    config has is carried over; a key it lacks (or lists in `_use_default_values`, the keys diffusers records as
    absent from the file a scheduler was loaded from) takes the new scheduler's own default, so a config without a
    timestep_spacing (SD 1.5's and 2.1's, DeepFloyd IF's, written before diffusers had the key) gives "linspace" to
    Euler, DPM++, UniPC and the like and "leading" to DDIM and DDPM (DIFFUSERS_DEFAULT_SPACING). A config of
    imagine's own (no _class_name, or "NoiseSchedule") lacking the key: the schedule's setting (no keyword). Every
    diffusers scheduler's steps_offset default is 0, the schedule's own."""
    sc = stored_scheduler_keys(scheduler_config)
    layout = {}
    if sc.get("timestep_spacing"):
        layout["timestep_spacing"] = sc["timestep_spacing"]
    elif sc.get("_class_name", "NoiseSchedule") != "NoiseSchedule":
        layout["timestep_spacing"] = DIFFUSERS_DEFAULT_SPACING[TIMESTEP_RULE[resolve_sampler(sampler)[0]]]
    if sc.get("steps_offset") is not None:
        layout["steps_offset"] = int(sc["steps_offset"])
    return layout
