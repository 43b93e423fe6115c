"""Noise schedules: betas, alphas_cumprod, sigmas, timestep spacing and Karras sigmas.

The forward process of Ho et al. 2020 (DDPM) adds noise with variances beta_1..beta_T, so that
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar_t = prod_{s<=t} (1 - beta_s) (eq. 4).
Everything a sampler needs follows from abar_t. The same process seen as x_t / sqrt(abar_t) is the
variance-exploding (VE) one of Karras et al. 2022 with noise level sigma_t = sqrt((1 - abar_t) / abar_t).

Timesteps are indexed 0..T-1 as in diffusers (the paper's t = 1..T shifted by one), so a diffusers
scheduler_config.json describes the same schedule, and `SamplingPlan` lists exactly the timesteps
diffusers' schedulers hand the model at each step: the same seed gives the same image.

Everything is float64; samplers cast coefficients to the sample's dtype as they use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine", "custom")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# DDPM's posterior variance (Ho et al. 2020, sec. 3.2: beta_tilde or beta), or the model's own interpolation between
# their logs (Nichol & Dhariwal 2021, Improved DDPM eq. 15: "learned_range", a U-Net with twice the channels out), or
# the model's extra channels taken as the variance itself (diffusers' DDPMScheduler "learned": not a log)
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
# the types whose model outputs twice the sample's channels (the second half its variance)
LEARNED_VARIANCE_TYPES = ("learned_range", "learned")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# How a sampler family lays its steps out; see `SamplingPlan`.
TIMESTEP_RULES = ("ddpm", "ddim", "karras", "dpm_solver", "lcm")
# The timesteps a latent consistency model is distilled at (Luo et al. 2023, LCM's skipping-step schedule): every
# T // 50-th, ending at T - 1 (T = 1000: 19, 39, ..., 999); the "lcm" rule samples from them.
LCM_ORIGINAL_STEPS = 50

# diffusers' beta_schedule names <-> ours
_FROM_DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_TO_DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}

# The floor diffusers' sigma-based schedulers put under abar_T = 0 (zero terminal SNR), where sigma
# would be infinite; float32's epsilon, so sigma_max = 4096.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# AUTOMATIC1111's abar_T under its "Zero Terminal SNR" noise schedule (rescale_zero_terminal_snr_abar, 1.8+):
# sigma_max = sqrt((1 - abar_T) / abar_T) = 4518.8 in place of infinity
A1111_ZERO_SNR_ALPHA_CUMPROD = 4.8973451890853435e-08


def floor_zero_snr(abar):
    """abar (a tensor or array) with its zeros, and only them, set to ZERO_SNR_ALPHA_CUMPROD, as diffusers' sigma-based
    schedulers floor abar_T = 0: a positive abar stays as it is, below the floor too (AUTOMATIC1111's zero-terminal-SNR
    abar_T = 4.9e-8, sigma_max 4518.8, is its own first level, not 2^-24's 4096)."""
    if torch.is_tensor(abar):
        return torch.where(abar > 0, abar, torch.full_like(abar, ZERO_SNR_ALPHA_CUMPROD))
    return np.where(abar > 0, abar, ZERO_SNR_ALPHA_CUMPROD)


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, sec. 4: betas rising linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion / Stable Diffusion: linear in sqrt(beta), then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2,
    and beta_t = 1 - abar_t / abar_{t-1} clipped to 0.999 so the last steps stay finite.

    f(0) cancels in the ratio, so it is left out, as in the improved-DDPM code."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def zero_terminal_snr_abar(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0 (zero SNR at the
    last timestep, so the model learns to start from pure noise) while abar_1 stays as it was; in abar's dtype,
    the steps in A1111's order (its rescale_zero_terminal_snr_abar, on float32)."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    return root**2


def betas_of(abar: torch.Tensor) -> torch.Tensor:
    """The betas whose cumulative product of (1 - beta) is abar (Ho et al. eq. 4 inverted)."""
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023's rescale (zero_terminal_snr_abar) of a schedule given by its betas, in float64."""
    return betas_of(zero_terminal_snr_abar(torch.cumprod(1 - betas.double(), 0)))


# -- continuous time (Kingma et al. 2021, VDM; Imagen as imagen-pytorch trains it) -----------------------------------
# t in [0, 1] instead of 0..T-1, the schedule given by its log-SNR lambda(t) = log(alpha_t^2 / sigma_t^2), with
# alpha_t^2 = sigmoid(lambda), sigma_t^2 = sigmoid(-lambda) (variance preserving): abar(t) = sigmoid(lambda(t)).
CONTINUOUS_SCHEDULES = ("cosine", "linear")
COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s, which keeps beta small near t = 0
# the floor under cosine's SNR^-1 = 1 / cos^2 - 1 (imagen-pytorch's log(..., eps=1e-5)): lambda(t) <= log(1e5); never
# reached on [0, 1] (the smallest, at t = 0, is tan^2(s / (1 + s) pi / 2) = 1.55e-4), kept as the peer has it
COSINE_INVERSE_SNR_FLOOR = 1e-5


def cosine_log_snr(t: torch.Tensor, s: float = COSINE_OFFSET) -> torch.Tensor:
    """Nichol & Dhariwal 2021's abar(t) = cos^2((t + s) / (1 + s) pi / 2) (eq. 17, f(0) left out as imagen-pytorch
    leaves it) as a log-SNR: lambda = -log(1 / cos^2(...) - 1), the inverse SNR floored at 1e-5. In t's dtype, as
    imagen-pytorch computes it on its float32 times: at t = 1, float32's pi / 2 gives cos = -4.4e-8 and lambda = -33.9
    (float64's lambda there is -74.7), so the level the model was trained at is float32's."""
    inverse_snr = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1
    return -torch.log(inverse_snr.clamp(min=COSINE_INVERSE_SNR_FLOOR))


def linear_log_snr(t: torch.Tensor) -> torch.Tensor:
    """DDPM's linear betas (1e-4 to 0.02 over T = 1000) in continuous time, as the v-diffusion code's get_ddpm_schedule
    (and imagen-pytorch's beta_linear_log_snr) has it: lambda = -log(expm1(1e-4 + 10 t^2)), i.e. abar(t) =
    exp(-(1e-4 + 10 t^2)), close to the VP SDE's exp(-(0.1 t + 9.95 t^2)) of those betas (Song et al. 2021, eq. 33).
    In t's dtype."""
    return -torch.log(torch.expm1(1e-4 + 10 * t**2))


def log_snr(kind: str, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) of a continuous-time schedule (CONTINUOUS_SCHEDULES), in t's dtype."""
    if kind == "cosine":
        return cosine_log_snr(t)
    if kind == "linear":
        return linear_log_snr(t)
    raise ValueError(f"a continuous-time noise schedule must be one of {CONTINUOUS_SCHEDULES}; got {kind!r}")


def alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of a log-SNR: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 and
    alpha^2 / sigma^2 = exp(lambda)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def continuous_times(steps: int) -> torch.Tensor:
    """The time grid of a continuous-time run of `steps` steps: steps + 1 times from 1 down to 0, even, in float32
    (imagen-pytorch's get_sampling_timesteps: linspace(1, 0, T + 1), the model evaluated at each but the last)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    return torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..n-1: steps crowd towards low noise, where the ODE curves most. dtype: the arithmetic's (float32 is
    k-diffusion's, whose rounding A1111's Brownian noise depends on)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=dtype)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).double().numpy()


# what a schedule type spans: NoiseSchedule.plan's sigma_range ("comfyui": the model's range, ComfyUI's layout)
SIGMA_RANGES = ("spaced", "model", "comfyui")
# The schedule types read off the model's own discrete levels sigma(0..T-1) (`model_levels`); the others span a range
MODEL_SIGMA_SCHEDULES = ("uniform", "normal", "sgm_uniform", "simple", "ddim_uniform", "compvis")
# The discretisations of the DPM-Solver and UniPC code in continuous VP time (`vp_time_levels`): they end at t = 1/T,
# abar_0, not at sigma = 0. "compvis_time_uniform" is AUTOMATIC1111's UniPC: time-uniform over as many steps as its
# CompVis timesteps count ("compvis": 31 for 30)
VP_TIME_SCHEDULES = ("time_uniform", "time_quadratic", "logsnr", "compvis_time_uniform")
# the schedule types of AUTOMATIC1111's CompVis samplers (DDIM, PLMS; UniPC): its own timesteps, which its infotext
# names no schedule type for and its image to image runs its own way (sampling._compvis_img2img)
COMPVIS_SCHEDULES = ("compvis", "compvis_time_uniform")
SIGMA_SCHEDULES = ("karras", "exponential", "polyexponential", "beta", "kl_optimal", "align_your_steps",
                   "align_your_steps_sdxl", "linear_quadratic") + MODEL_SIGMA_SCHEDULES + VP_TIME_SCHEDULES
BETA_SIGMAS = (0.6, 0.6)  # Lee et al. 2024's (and diffusers', A1111's, ComfyUI's) default alpha, beta
# AUTOMATIC1111's labels of the schedule types (its infotexts' "Schedule type: ...", its API's scheduler labels)
SCHEDULE_LABELS = {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential",
                   "beta": "Beta", "kl_optimal": "KL Optimal", "align_your_steps": "Align Your Steps",
                   "linear_quadratic": "Linear Quadratic",
                   "align_your_steps_sdxl": "Align Your Steps", "uniform": "Uniform", "normal": "Normal",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "ddim_uniform": "DDIM", "compvis": "CompVis",
                   "time_uniform": "Time Uniform", "time_quadratic": "Time Quadratic", "logsnr": "LogSNR",
                   "compvis_time_uniform": "CompVis Time Uniform"}
# Align Your Steps (Sabour et al. 2024): the 10-step levels NVIDIA optimised for Stable Diffusion 1.5 and for SDXL
# (its published lists, as A1111 and ComfyUI hold them; diffusers' AysSchedules ends them at 0 instead of 0.029)
AYS_SIGMAS = {"align_your_steps": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
              "align_your_steps_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)}


def spaced_sigmas(kind: str, sigma_min: float, sigma_max: float, n: int, rho: float | None = None,
                  dtype: torch.dtype = torch.float64) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min (A1111's "schedule types", diffusers' use_*_sigmas):
      karras:          Karras et al. 2022, eq. 5 (rho default 7): sigma^(1/rho) evenly spaced;
      exponential:     evenly spaced in log sigma, i.e. in log-SNR (lambda = -log sigma), the spacing the
                       DPM-Solver papers use (Lu et al. 2022, sec. 3.3, "logSNR");
      polyexponential: log sigma = log sigma_min + (1 - i/(n-1))^rho (log sigma_max - log sigma_min)
                       (k-diffusion's get_sigmas_polyexponential; rho default 1 = exponential; rho > 1
                       packs the levels towards sigma_min in log-SNR);
      beta:            sigma = sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min), F the CDF of the Beta(0.6, 0.6)
                       law (Lee et al. 2024, "Beta sampling is all you need"; diffusers' use_beta_sigmas): the
                       levels crowd both ends of the range, where the paper measured the steps to matter most;
      kl_optimal:      sigma = tan((1 - i/(n-1)) arctan sigma_max + i/(n-1) arctan sigma_min): even steps in
                       arctan sigma, the schedule Sabour et al. 2024 (arXiv 2404.14507, "Align Your Steps", sec. 3)
                       derive as KL-optimal when the data is a single point (ComfyUI's "KL Optimal": n levels ending
                       at sigma_min, then 0; A1111's, which NoiseSchedule.plan lays out under sigma_range "model", n + 1
                       over i/n, stopping at sigma_min);
      linear_quadratic: sigma = sigma_max (1 - s_i), s rising linearly from 0 to 0.025 over the first n // 2 levels,
                       then along the parabola that meets it there and reaches 1 at level n, the 0 after the last
                       (Genmo's Mochi schedule, ComfyUI's "linear_quadratic"): most steps at the top of the range, for
                       models whose composition is set by the first, noisiest steps; sigma_min is not used.
      align_your_steps(_sdxl): the levels Sabour et al. 2024 ("Align Your Steps") optimised for SD 1.5 (SDXL) at 10
                       steps, AYS_SIGMAS, for n levels interpolated linearly in log sigma over their index (NVIDIA's
                       recipe, as A1111 and ComfyUI do); absolute levels, for SD's noise schedule: the range is theirs.
    (The schedule types read off a model's own levels are `model_levels`.) dtype: float32 computes and rounds as
    k-diffusion and A1111 do (their float32 tensors), so that a Brownian tree over the levels is theirs."""
    if kind not in SIGMA_SCHEDULES or kind in MODEL_SIGMA_SCHEDULES:
        raise ValueError(f"sigma schedule must be one of "
                         f"{tuple(k for k in SIGMA_SCHEDULES if k not in MODEL_SIGMA_SCHEDULES)}; got {kind!r}")
    if rho is not None and not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number; got {rho}")
    _check_no_rho(kind, rho)
    if dtype == torch.float32 and kind not in ("karras", "exponential", "polyexponential"):
        return float32_levels(spaced_sigmas(kind, sigma_min, sigma_max, n))
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, n, 7.0 if rho is None else rho, dtype)
    if kind in AYS_SIGMAS:
        levels = np.log(np.asarray(AYS_SIGMAS[kind][::-1]))
        return np.exp(np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(levels)), levels))[::-1].copy()
    if kind == "beta":
        from scipy.stats import beta

        return sigma_min + beta.ppf(1.0 - np.linspace(0.0, 1.0, n), *BETA_SIGMAS) * (sigma_max - sigma_min)
    if kind == "linear_quadratic":
        return sigma_max * (1.0 - linear_quadratic_ramp(n))
    if kind == "kl_optimal":
        u = np.linspace(0.0, 1.0, n)
        return np.tan((1.0 - u) * math.atan(sigma_max) + u * math.atan(sigma_min))
    if kind == "exponential" and rho is None:  # (k-diffusion's own form of rho = 1, for its rounding)
        return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp().double().numpy()
    ramp = torch.linspace(1.0, 0.0, n, dtype=dtype) ** (1.0 if rho is None else rho)
    return torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).double().numpy()


def linear_quadratic_ramp(n: int, threshold: float = 0.025) -> np.ndarray:
    """The first n of Mochi's n + 1 ramp values s_0 = 0 .. s_n = 1 (its linear_quadratic_schedule, as ComfyUI holds
    it): s_i = i threshold / m for i < m = n // 2, then the quadratic a i^2 + b i + c through (m, threshold) with the
    linear part's slope there, reaching 1 at i = n. One step: s_0 = 0 alone."""
    if n == 1:
        return np.zeros(1)
    m = n // 2
    excess = m - threshold * n  # (its threshold_noise_step_diff)
    a = excess / (m * (n - m) ** 2)
    b = threshold / m - 2 * excess / (n - m) ** 2
    i = np.arange(n, dtype=np.float64)
    return np.where(i < m, i * threshold / m, a * i**2 + b * i + a * m * m)


def _check_no_rho(kind: str, rho: float | None) -> None:
    if rho is not None and kind not in ("karras", "exponential", "polyexponential"):
        raise ValueError(f"rho is the karras and polyexponential schedules' exponent; {kind} takes none"
                         + (f" (its Beta law is {BETA_SIGMAS})" if kind == "beta" else ""))


def kl_optimal_a1111(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """AUTOMATIC1111's "KL Optimal" (its sd_schedulers.kl_optimal): n + 1 levels tan((i/n) arctan sigma_min + (1 - i/n)
    arctan sigma_max), i = 0..n, down to sigma_min with no 0 after it, computed in float32 as A1111 computes them (a
    Brownian tree over them then spans exactly what its spans)."""
    u = torch.arange(n + 1) / n
    lo, hi = torch.arctan(torch.tensor(float(sigma_min))), torch.arctan(torch.tensor(float(sigma_max)))
    return torch.tan(u * lo + (1.0 - u) * hi).double().numpy()


def check_downcast(rule: str, sigma_schedule: str | None = None, name: str | None = None) -> None:
    """A ValueError unless a run of this timestep rule (samplers.TIMESTEP_RULE) and schedule type is one A1111's
    "Downcast alphas_cumprod" is reproduced for (NoiseSchedule.a1111_downcast): the samplers that step in noise levels.
    `name`: the sampler's, for the message."""
    if rule in ("ddpm", "ddim", "lcm"):
        why = "A1111 then also takes sqrt(1 - abar) in float16 in DDIM's and PLMS's update, and its LCM its own table"
    elif sigma_schedule in VP_TIME_SCHEDULES:
        why = f"the {sigma_schedule} schedule type steps in continuous time over A1111's own table, as its UniPC does"
    else:
        return
    raise ValueError(f"A1111's 'Downcast alphas_cumprod' is reproduced for the samplers that step in noise levels "
                     f"(Euler, Euler a, LMS, Heun, DPM2, the DPM++ family, DPM fast and adaptive, Restart), not for "
                     f"{name or 'the ' + rule + ' rule'}: {why}")


def kdiffusion_levels(kind: str, log_table: torch.Tensor, n: int) -> np.ndarray:
    """The levels of "uniform" / "normal" (n timesteps evenly from T-1 to 0) and "sgm_uniform" (n + 1, the last left
    out) interpolated as k-diffusion's DiscreteSchedule.t_to_sigma does, in float32 (log sigma linear between the
    neighbouring timesteps of its table of log sigma, `NoiseSchedule.kdiffusion_log_sigmas`): the levels AUTOMATIC1111
    runs, to the last bit, so that a Brownian tree over them spans exactly what its spans (`model_levels` gives the
    same in float64)."""
    if kind not in ("uniform", "normal", "sgm_uniform"):
        raise ValueError(f"k-diffusion's interpolated levels are uniform, normal or sgm_uniform; got {kind!r}")
    T = len(log_table)
    t = torch.linspace(T - 1, 0, n) if kind != "sgm_uniform" else torch.linspace(T - 1, 0, n + 1)[:-1]
    return kdiffusion_t_to_sigma(t, log_table).double().numpy()


def kdiffusion_t_to_sigma(t: torch.Tensor, log_table: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.t_to_sigma in float32: sigma at fractional index t of a table of log sigma,
    log-linear between its neighbours."""
    t = t.float()
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_table[lo] + w * log_table[hi]).exp()


def comfyui_percent_sigma(log_table: torch.Tensor, percent: float) -> float:
    """ComfyUI's model_sampling.percent_to_sigma: the noise level `percent` of the way into a run, sigma at timestep
    (1 - percent) 999 of the model's float32 table of log sigma (log-linear between neighbours, k-diffusion's
    t_to_sigma; its 999 written out whatever the table's length); 0 or less gives 999999999.9, 1 or more 0."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(kdiffusion_t_to_sigma(torch.tensor((1.0 - percent) * 999.0), log_table))


def float32_levels(levels: np.ndarray) -> np.ndarray:
    """Levels rounded to float32, as k-diffusion and AUTOMATIC1111 hold them (float64 again, for the plan)."""
    return np.asarray(levels, dtype=np.float64).astype(np.float32).astype(np.float64)


def model_levels(kind: str, table: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas): the levels of a schedule type read off a model's own discrete levels table[t] = sigma(t),
    t = 0..T-1, most noisy first, as k-diffusion, AUTOMATIC1111 and ComfyUI compute them (with sigma at a fractional
    t log-linear between neighbours, k-diffusion's DiscreteSchedule.t_to_sigma):
      uniform, normal: t evenly from T-1 down to 0, n points (k-diffusion's DiscreteSchedule.get_sigmas(n): A1111's
                    "Uniform", its "Normal" and what its "Automatic" gives Euler, Euler a, Heun and LMS; ComfyUI's
                    "normal"); the two names give the same levels;
      sgm_uniform:  t evenly from T-1 towards 0 over n + 1 points, the last left out (the "trailing" spacing of
                    Stability's sgm code; A1111's and ComfyUI's "SGM Uniform");
      simple:       t = T-1 - floor(i T / n), i = 0..n-1 (A1111's and ComfyUI's "Simple");
      ddim_uniform: t = 1, 1 + k, 1 + 2k, ... below T with k = max(T // n, 1), most noisy first: the CompVis DDIM
                    code's "uniform" discretisation (A1111's "DDIM" schedule type, ComfyUI's "ddim_uniform"): ceil((T-1)
                    / k) levels, n only where k divides T - 1 closely (T = 1000: n = 30 gives 31, n = 600 gives 999),
                    as in both apps; `imagine.sampling.sample` warns when a run takes more steps than asked;
      compvis:      t = 1 + k j for k j < T, k = max(T // n, 1), the last held to T - 1 (the CompVis code's "uniform"
                    DDIM discretisation as AUTOMATIC1111 clips it for its DDIM and PLMS: where k divides T - 1 its
                    last is T - 1, twice where k = 1; n = 3 of T = 1000: 999, 667, 334, 1)."""
    T = len(table)
    if kind not in MODEL_SIGMA_SCHEDULES:
        raise ValueError(f"a model-read schedule type must be one of {MODEL_SIGMA_SCHEDULES}; got {kind!r}")
    if kind in ("uniform", "normal"):
        t = np.linspace(T - 1, 0, n)
    elif kind == "sgm_uniform":
        t = np.linspace(T - 1, 0, n + 1)[:-1]
    elif kind == "simple":
        t = (T - 1 - np.floor(np.arange(n) * (T / n))).astype(np.float64)
    elif kind == "ddim_uniform":
        t = np.arange(1, T, max(T // n, 1), dtype=np.float64)[::-1].copy()
    else:
        t = compvis_timesteps(T, n)[::-1].astype(np.float64)
    log_table = np.log(table)
    return t, np.exp(np.interp(t, np.arange(T, dtype=np.float64), log_table))


def compvis_timesteps(T: int, n: int) -> np.ndarray:
    """The CompVis DDIM discretisation as AUTOMATIC1111 clips it for its DDIM, PLMS and UniPC (its CompVisSampler's
    get_timesteps): t = 1 + k j for k j < T, k = max(T // n, 1), the last held to T - 1; least noisy first."""
    return np.minimum(np.arange(0, T, max(T // n, 1)) + 1, T - 1)


def compvis_count(T: int, n: int) -> int:
    """How many timesteps `compvis_timesteps` lays out for n asked: ceil(T / k), n where k divides T (T = 1000: n = 30
    gives 31, n = 15 gives 16)."""
    return len(compvis_timesteps(T, n))


def vp_time_levels(kind: str, alphas_cumprod, n: int, t_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(t, abar): n + 1 points of continuous VP time t from t_max (default 1) down to 1/T, and abar at each, as the
    DPM-Solver and UniPC code discretise a discrete-time model (Lu et al. 2022, "DPM-Solver", sec. 3.4 and appendix
    "discrete-time DPMs"): timestep j of the model is t_j = (j + 1) / T, log alpha_t = log sqrt(abar) is piecewise
    linear in t between them, and the model at time t sees the fractional timestep T t - 1. The run ends at t = 1/T
    (abar_0).
      time_uniform:   t evenly (UniPC's and AUTOMATIC1111's default "skip type");
      time_quadratic: sqrt(t) evenly: steps crowd towards low noise;
      logsnr:         lambda = log alpha - log sigma evenly, t by inverting the piecewise-linear log alpha (the
                      DPM-Solver paper's own; as "exponential" levels, but over [abar_0, abar(t_max)] and with its
                      interpolation).
    (The schedule type "compvis_time_uniform" is time_uniform over another count of steps: NoiseSchedule.plan.)"""
    if kind not in ("time_uniform", "time_quadratic", "logsnr"):
        raise ValueError(f"a continuous-time schedule type must be time_uniform, time_quadratic or logsnr; got {kind!r}")
    abar = floor_zero_snr(np.asarray(alphas_cumprod, dtype=np.float64))
    T = len(abar)  # (zero terminal SNR: abar_T = 0 floored as the sigma-based plans floor it, log abar stays finite)
    if not 1.0 / T < t_max <= 1.0:
        raise ValueError(f"t_max must be in (1/T, 1] = ({1.0 / T:g}, 1]; got {t_max!r}")
    grid, log_alpha = np.arange(1, T + 1, dtype=np.float64) / T, 0.5 * np.log(abar)  # t_j = (j + 1) / T
    if kind == "time_uniform":
        t = np.linspace(t_max, 1.0 / T, n + 1)
    elif kind == "time_quadratic":
        t = np.linspace(math.sqrt(t_max), math.sqrt(1.0 / T), n + 1) ** 2
    else:
        def lam(log_a):  # lambda = log alpha - log sigma, sigma = sqrt(1 - alpha^2)
            return log_a - 0.5 * np.log(-np.expm1(2 * log_a))

        lams = np.linspace(lam(np.interp(t_max, grid, log_alpha)), lam(log_alpha[0]), n + 1)
        log_a = -0.5 * np.logaddexp(0.0, -2 * lams)  # log alpha of lambda
        t = np.interp(log_a, log_alpha[::-1], grid[::-1])  # (log alpha falls with t)
        t[0], t[-1] = t_max, 1.0 / T
    return t, np.exp(2 * np.interp(t, grid, log_alpha))


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0,
                     rule: str = "ddim") -> np.ndarray:
    """The `steps` training timesteps a sampler visits, from most to least noisy (float64).

    Spacings as in Lin et al. 2023, Table 2 (and diffusers' `timestep_spacing`):
      leading:  0, k, 2k, ... with k = T // steps, plus `steps_offset` (Stable Diffusion uses 1);
      trailing: T-1, T-1-T/steps, ... rounded (starts at the last timestep, as zero-SNR needs);
      linspace: evenly from T-1 down to 0.
    `rule` picks the sampler family's variant, so that each family sees diffusers' timesteps:
      "ddpm"/"ddim": integers; "karras" (Euler, Euler a, Heun): linspace is not rounded;
      "dpm_solver": leading and linspace lay out steps+1 points and drop the last (t = 0).
    """
    T, n = num_train_timesteps, steps
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}; got {spacing!r}")
    if rule not in TIMESTEP_RULES:
        raise ValueError(f"rule must be one of {TIMESTEP_RULES}; got {rule!r}")
    if spacing == "trailing":
        # round(T - i*T/n) - 1 for i < n; written per index so that no n gives an extra point
        # (np.arange with a float step yields n+1 points for some n, e.g. 61 of 1000).
        return np.round(T - np.arange(n) * (T / n)) - 1.0
    if rule == "dpm_solver":
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
        return (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        return (t if rule == "karras" else t.round())[::-1].copy()
    return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset


def nearest_timestep(log_sigmas: torch.Tensor, sigma: float) -> float:
    """The training timestep whose level is nearest to `sigma` in log sigma, over a schedule's held table of log sigma
    (NoiseSchedule.kdiffusion_log_sigmas) with sigma in its dtype: k-diffusion's sigma_to_t with quantize=True and
    ComfyUI's model_sampling.timestep, argmin |log sigma - log sigma_t| (the first of two at a tie)."""
    return float(int((torch.tensor(float(sigma), dtype=log_sigmas.dtype).log() - log_sigmas).abs().argmin()))


@dataclass(frozen=True)
class SamplingPlan:
    """The steps of one sampling run: step i evaluates the model at `timesteps[i]` on a sample whose
    noise level is `sigmas[i]` (VE) or, equivalently, `alphas_cumprod[i]` (VP), and moves it to
    level i+1. Index N (= len) is where the run ends: sigma 0 / abar 1 for a clean x_0 (DDIM with
    set_alpha_to_one=False ends at abar_0, as diffusers' DDIMScheduler does).

    `timesteps` are what diffusers would pass to the model (fractional with Karras sigmas), while
    the conversions between prediction types use `alphas_cumprod` / `sigmas`, also as diffusers does.
    At zero terminal SNR, VP plans keep abar = 0 (sigma = inf); sigma-based plans use abar = 2^-24.
    """

    timesteps: torch.Tensor  # [N] float64
    sigmas: torch.Tensor  # [N+1] float64
    alphas_cumprod: torch.Tensor  # [N+1] float64
    rule: str = "ddim"
    spacing: str = "leading"
    # the steps of the same run that follow this plan's end (a head's: the final step run apart); the multistep
    # samplers lower their order towards the run's end, not the plan's
    follow: int = 0
    # the steps of the same run before this plan's start (a tail's: image to image's), which diffusers' multistep
    # schedulers count in the run's length (their lower_order_final under 15 steps)
    lead: int = 0
    # [N] or None: the abar at which a v-prediction model's output is read as eps, where not at the step's own level
    # (AUTOMATIC1111's CompVis wrapper reads it at the timestep truncated to an integer: its UniPC's are fractional)
    v_alphas_cumprod: torch.Tensor | None = None
    # a run that ends at a level above 0 hands on the VE sample x / alpha there, as k-diffusion's samplers do (and
    # AUTOMATIC1111 decodes), not the VP one (`sampling.sample` converts; AUTOMATIC1111's KL Optimal levels)
    end_ve: bool = False

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def head(self, stop: int) -> "SamplingPlan":
        """The first `stop` steps, ending at level `stop` (not at the plan's end)."""
        return replace(self, timesteps=self.timesteps[:stop], sigmas=self.sigmas[: stop + 1],
                       alphas_cumprod=self.alphas_cumprod[: stop + 1], follow=self.follow + len(self) - stop,
                       v_alphas_cumprod=None if self.v_alphas_cumprod is None else self.v_alphas_cumprod[:stop])

    def tail(self, start: int) -> "SamplingPlan":
        """The plan from step `start` on (img2img-style partial runs)."""
        return replace(self, timesteps=self.timesteps[start:], sigmas=self.sigmas[start:],
                       alphas_cumprod=self.alphas_cumprod[start:], lead=self.lead + start,
                       v_alphas_cumprod=None if self.v_alphas_cumprod is None else self.v_alphas_cumprod[start:])


CONTINUOUS_SPACINGS = ("uniform", "karras")  # a continuous-time run's grid: even in t (imagen-pytorch's), or Karras'


def continuous_time_of(kind: str, lam: torch.Tensor) -> torch.Tensor:
    """The time t in [0, 1] at which the continuous schedule `kind` has log-SNR lam (lambda(t) falls with t), by
    bisection in float64: 60 halvings, to 1e-18 of the interval; levels beyond the schedule's ends give its ends."""
    lo = torch.zeros_like(lam, dtype=torch.float64)
    hi = torch.ones_like(lam, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = log_snr(kind, mid) > lam  # (still less noisy than lam: t lies beyond mid)
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def continuous_times_karras(kind: str, steps: int, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """A few-step grid for a continuous-time run: t = 1, then the times of Karras et al. 2022's eq. 5 levels (rho 7) in
    sigma = exp(-lambda / 2) from min(sigma_max, sigma(1)) down to sigma(0), `steps` + 1 times in float32 (as the
    model reads them). The even grid in t spends its first steps where the SNR is below 1e-4 (the cosine schedule's
    lambda runs from -33.9 at t = 1) and little where the picture forms; Karras' spacing puts them at low noise. The
    first step, from t = 1 to sigma_max (SNR 1.6e-4 at 80), takes the sample across levels where nothing is
    decided."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 for Karras spacing; got {steps!r}")
    ends = log_snr(kind, torch.tensor([1.0, 0.0], dtype=torch.float32)).double()
    top, bottom = float(torch.exp(-ends[0] / 2)), float(torch.exp(-ends[1] / 2))
    sig = torch.from_numpy(karras_sigmas(bottom, min(sigma_max, top), steps, rho))
    t = continuous_time_of(kind, -2 * torch.log(sig)).float()
    t[-1] = 0.0
    return torch.cat([torch.ones(1), t])


def continuous_plan(kind: str, steps: int, spacing: str = "uniform") -> SamplingPlan:
    """A SamplingPlan over `continuous_times(steps)` of the continuous-time schedule `kind`: `timesteps` are the times
    t in [0, 1] (float32 values: the model reads lambda(t) from them), `alphas_cumprod` = sigmoid(lambda(t)) at every
    time, t = 0 included, lambda computed in float32 as imagen-pytorch computes it (its level at t = 1 is float32's),
    then held in float64. The run ends at t = 0, whose SNR is finite (VDM's z_0): abar(0) = 0.99984 (cosine), 0.9999
    (linear), not 1. DDPM's step on this plan is VDM's ancestral step (samplers.sample_ddpm). spacing "karras": the
    times of `continuous_times_karras` instead of the even grid (ours, for few steps)."""
    if spacing not in CONTINUOUS_SPACINGS:
        raise ValueError(f"spacing must be one of {CONTINUOUS_SPACINGS}; got {spacing!r}")
    t = continuous_times(steps) if spacing == "uniform" else continuous_times_karras(kind, steps)
    lam = log_snr(kind, t).double()
    return SamplingPlan(timesteps=t[:-1].double(), sigmas=torch.exp(-lam / 2), alphas_cumprod=torch.sigmoid(lam),
                        rule="ddpm", spacing="linspace")


class NoiseSchedule:
    """betas, alphas_cumprod and sigmas for T training timesteps (float64), plus the settings a model
    folder's scheduler/config.json carries (prediction type, spacing, offset...).

    Build with `from_config(kind=...)` or `from_diffusers_config(dict)`; `to_config()` writes a dict
    that diffusers' schedulers and `from_diffusers_config` both read.
    """

    def __init__(self, betas, *, kind: str = "custom", beta_start: float | None = None, beta_end: float | None = None,
                 zero_terminal_snr: bool = False, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 timestep_spacing: str = "leading", prediction_type: str = "epsilon", clip_sample: bool = False,
                 variance_type: str = "fixed_small"):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1]; got min {float(betas.min())}, max {float(betas.max())}")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS}; got {kind!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}; got {timestep_spacing!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {', '.join(map(repr, VARIANCE_TYPES))}; got "
                             f"{variance_type!r}")
        if int(steps_offset) != steps_offset or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer; got {steps_offset!r}")
        self.kind = kind
        self.beta_start, self.beta_end = beta_start, beta_end
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.steps_offset = int(steps_offset)
        self.timestep_spacing = timestep_spacing
        self.prediction_type = prediction_type
        self.clip_sample = bool(clip_sample)
        self.variance_type = variance_type
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # abar_t, Ho et al. eq. 4
        # the precision k-diffusion and AUTOMATIC1111 hold abar in (their noise levels come from it): float32, or
        # float16 under A1111's "Downcast alphas_cumprod" (a1111_downcast)
        self.held_dtype = torch.float32

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, kind: str = "linear", *, num_train_timesteps: int = 1000, beta_start: float | None = None,
                    beta_end: float | None = None, zero_terminal_snr: bool = False,
                    rescale_betas_zero_snr: bool | None = None, trained_betas=None, **settings) -> "NoiseSchedule":
        """kind: "linear" (DDPM, 1e-4..0.02), "scaled_linear" (Stable Diffusion, 0.00085..0.012),
        "cosine" (improved DDPM, s=0.008; diffusers' "squaredcos_cap_v2" is accepted too), or "custom"
        with `trained_betas`. `zero_terminal_snr` (diffusers' `rescale_betas_zero_snr`) applies
        Lin et al. 2023. Other keywords (prediction_type, timestep_spacing, steps_offset,
        set_alpha_to_one, clip_sample, variance_type) are stored settings."""
        kind = _FROM_DIFFUSERS_KIND.get(kind, kind)
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS} (or diffusers' 'squaredcos_cap_v2'); got {kind!r}")
        if rescale_betas_zero_snr is not None:
            zero_terminal_snr = bool(rescale_betas_zero_snr)
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer; got {num_train_timesteps!r}")
        T = int(num_train_timesteps)
        if kind == "custom":
            if trained_betas is None:
                raise ValueError("kind='custom' needs trained_betas (a list of T betas)")
            betas = torch.as_tensor(trained_betas, dtype=torch.float64)
        elif trained_betas is not None:
            raise ValueError(f"trained_betas only goes with kind='custom'; got kind={kind!r}")
        elif kind == "cosine":
            if beta_start is not None or beta_end is not None:
                raise ValueError("the cosine schedule has no beta_start/beta_end (Nichol & Dhariwal 2021, eq. 17)")
            betas = cosine_betas(T)
        else:
            d0, d1 = _DEFAULT_BETAS[kind]
            beta_start = d0 if beta_start is None else float(beta_start)
            beta_end = d1 if beta_end is None else float(beta_end)
            if not (0 < beta_start < 1 and 0 < beta_end < 1):
                raise ValueError(f"beta_start and beta_end must lie in (0, 1); got {beta_start}, {beta_end}")
            betas = (linear_betas if kind == "linear" else scaled_linear_betas)(T, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        unknown = set(settings) - {"prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one",
                                   "clip_sample", "variance_type"}
        if unknown:
            raise TypeError(f"NoiseSchedule.from_config got unknown settings {sorted(unknown)}")
        return cls(betas, kind=kind, beta_start=beta_start, beta_end=beta_end,
                   zero_terminal_snr=zero_terminal_snr, **settings)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """Read a diffusers scheduler_config.json (any of its schedulers) or our own `to_config()`.
        Keys other schedulers add (skip_prk_steps, use_karras_sigmas, solver_order...) are ignored."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict; got {type(config).__name__}")
        c = config
        # an EDM scheduler (Karras et al. 2022's continuous sigma, the model fed c_noise = log(sigma) / 4: Playground
        # v2.5's EDMDPMSolverMultistepScheduler, EDMEulerScheduler) has no betas, and read as DDPM's linear default its
        # model would see the wrong time; nor do our plans feed a model c_noise where a discrete scheduler is told to
        # (timestep_type "continuous", diffusers' EulerDiscreteScheduler for v-prediction EDM models)
        if str(c.get("_class_name", "")).startswith("EDM") or "sigma_data" in c \
                or c.get("timestep_type", "discrete") not in (None, "discrete"):
            raise ValueError(f"{c.get('_class_name') or 'this scheduler config'} describes an EDM (continuous-sigma) "
                             f"model (sigma_data, or timestep_type {c.get('timestep_type')!r}): imagine samples "
                             "discrete-time models whose scheduler has betas (DDPM, DDIM, Euler, DPM-Solver, ...)")
        kind = c.get("beta_schedule", c.get("kind", "linear"))
        if c.get("trained_betas") is not None:
            kind = "custom"
        if kind not in _FROM_DIFFUSERS_KIND and kind not in SCHEDULE_KINDS:
            raise ValueError(f"beta_schedule {kind!r} is not supported; valid: {sorted(_FROM_DIFFUSERS_KIND)}")
        kind = _FROM_DIFFUSERS_KIND.get(kind, kind)
        # (diffusers' "_log" forms draw with the same variances, computed through their logs; "learned" is the model's
        # raw variance output, as diffusers' DDPMScheduler takes it)
        variance_type = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(
            c.get("variance_type") or "fixed_small", c.get("variance_type") or "fixed_small")
        if variance_type not in VARIANCE_TYPES:
            variance_type = "fixed_small"
        return cls.from_config(
            kind, num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
            # absent keys mean diffusers' defaults (1e-4, 0.02), whatever the beta_schedule
            beta_start=None if kind in ("cosine", "custom") else c.get("beta_start", 1e-4),
            beta_end=None if kind in ("cosine", "custom") else c.get("beta_end", 0.02),
            trained_betas=c.get("trained_betas"),
            zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", c.get("zero_terminal_snr", False))),
            prediction_type=c.get("prediction_type", "epsilon"),
            timestep_spacing=c.get("timestep_spacing") or "leading",
            steps_offset=int(c.get("steps_offset", 0) or 0),
            set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
            clip_sample=bool(c.get("clip_sample", False)),
            variance_type=variance_type,
        )

    def _settings(self) -> dict[str, Any]:
        # what a derived schedule keeps of this one (its stored settings, not its betas)
        return dict(set_alpha_to_one=self.set_alpha_to_one, steps_offset=self.steps_offset,
                    timestep_spacing=self.timestep_spacing, prediction_type=self.prediction_type,
                    clip_sample=self.clip_sample, variance_type=self.variance_type)

    def a1111_downcast(self) -> "NoiseSchedule":
        """This schedule as AUTOMATIC1111 samples it under "Downcast alphas_cumprod" (its use_downcasted_alpha_bar
        option, "for reproducing old seeds", and what its infotext reader turns on for pictures from before 1.7.0-225,
        when a float16 model held its alphas_cumprod in float16): abar rounded to float16 (float64 again, exactly), and
        held in float16 (`held_dtype`), so that the levels k-diffusion derives, sigma = sqrt((1 - abar) / abar) and
        their logarithms, are computed in float16 as it computes them from a float16 abar (`_sigma_table(held=True)`,
        `kdiffusion_log_sigmas`), and read so (`sigma_to_t`, `t_to_sigma`). For the k-diffusion samplers (the rules
        that step in noise levels); `plan` refuses the others (A1111's DDIM and PLMS then take sqrt(1 - abar) in
        float16 too, its UniPC and LCM their own tables). A "custom" schedule with this schedule's settings."""
        if self.held_dtype == torch.float16:
            return self
        abar = self.alphas_cumprod.float().half()
        steady = (abar[1:] == abar[:-1]).nonzero()
        if len(steady) or not bool((abar > 0).all()):
            where = (f"abar at timesteps {int(steady[0])} and {int(steady[0]) + 1} round to the same value"
                     if len(steady) else f"abar at timestep {int((abar <= 0).nonzero()[0])} rounds to 0")
            raise ValueError(f"this schedule does not survive float16: {where}; A1111's 'Downcast alphas_cumprod' is "
                             "for Stable Diffusion's scaled-linear schedule (DDPM's linear betas, and zero terminal "
                             "SNR, fall outside it)")
        out = NoiseSchedule(betas_of(abar.double()), kind="custom", **self._settings())
        out.alphas_cumprod = abar.double()  # (the float16 values to the bit, not their betas' float64 cumprod)
        out.held_dtype = torch.float16
        return out

    def a1111_zero_terminal_snr(self) -> "NoiseSchedule":
        """This schedule as AUTOMATIC1111's "Zero Terminal SNR" noise schedule samples it (its sd_noise_schedule
        option, for models trained so): Lin et al. 2023's Algorithm 1 on sqrt(abar) in float32, as A1111 rescales
        its model's float32 alphas_cumprod (shifted so that the last is 0, scaled so that the first keeps its value,
        squared), and the last abar set to A1111's A1111_ZERO_SNR_ALPHA_CUMPROD instead of 0. A "custom" schedule
        (its betas, to_config's trained_betas) with this schedule's settings."""
        if self.held_dtype == torch.float16:  # (A1111 rescales the float16 abar: its last, 4.9e-8, rounds to 6e-8, and
            # sqrt((1 - abar) / abar) overflows float16 to an infinite first noise level)
            raise ValueError("A1111's Zero Terminal SNR noise schedule over its downcast (float16) alphas_cumprod starts "
                             "from an infinite noise level (sigma_max overflows float16): use one of the two options")
        abar = zero_terminal_snr_abar(self.alphas_cumprod.float())
        if len(abar) > 1 and float(abar[-2]) <= A1111_ZERO_SNR_ALPHA_CUMPROD:
            raise ValueError(f"this schedule rescaled to zero terminal SNR has abar {float(abar[-2]):.3g} at its "
                             f"second-last timestep, under A1111's last ({A1111_ZERO_SNR_ALPHA_CUMPROD:.4g}): its noise "
                             "would fall at the end (DDPM's linear 1e-4..0.02 betas do this); the option is for "
                             "scaled-linear and cosine schedules")
        abar[-1] = A1111_ZERO_SNR_ALPHA_CUMPROD
        abar = abar.double()  # (float32 values held exactly; the betas' cumprod gives them back to float32's last bit)
        return NoiseSchedule(betas_of(abar), kind="custom", **self._settings())

    def to_config(self) -> dict[str, Any]:
        """diffusers' scheduler_config keys (DDIMScheduler reads them all), plus `_imagine_version`."""
        from imagine import __version__

        c: dict[str, Any] = {
            "_imagine_version": __version__,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _TO_DIFFUSERS_KIND.get(self.kind, "linear"),
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "variance_type": self.variance_type,
        }
        if self.kind in ("linear", "scaled_linear"):
            c["beta_start"], c["beta_end"] = self.beta_start, self.beta_end
        if self.kind == "custom":
            c["trained_betas"] = self.betas.tolist()
        return c

    # -- derived quantities ------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> torch.Tensor:
        """VE noise levels sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, with
        x_VE = x_t / sqrt(abar_t)); inf where abar_t = 0 (zero terminal SNR)."""
        a = self.alphas_cumprod
        return torch.where(a > 0, ((1 - a) / a.clamp_min(1e-300)).sqrt(), torch.full_like(a, math.inf))

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) = 1 / sigma_t^2 (Kingma et al. 2021)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def final_alpha_cumprod(self) -> float:
        """Where a DDIM run ends: abar = 1 (x_0), or abar_0 with set_alpha_to_one=False (as SD's config)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def __repr__(self) -> str:
        extra = ", zero_terminal_snr" if self.zero_terminal_snr else ""
        return f"NoiseSchedule({self.kind}, T={self.num_train_timesteps}{extra}, {self.prediction_type})"

    # -- per-run step plans ------------------------------------------------------------------
    def _sigma_table(self, held: bool = False) -> np.ndarray:
        # the sigmas the Karras-style samplers interpolate; abar_T = 0 floored as diffusers does. held: as
        # k-diffusion holds them, computed in `held_dtype` (AUTOMATIC1111's CompVis models keep abar in float32, and
        # k-diffusion takes sqrt((1 - abar) / abar) in float32: 1e-5 apart at SD's low end, which moves a Brownian
        # tree's ends; float16 under A1111's downcast)
        a = floor_zero_snr(self.alphas_cumprod.numpy())
        if held:
            a = torch.from_numpy(a).to(self.held_dtype)
            return (((1 - a) / a) ** 0.5).double().numpy()
        return np.sqrt((1 - a) / a)

    def kdiffusion_log_sigmas(self) -> torch.Tensor:
        """log sigma_t, t = 0..T-1, as k-diffusion's DiscreteSchedule holds them (its log_sigmas): the log of the held
        levels, in their dtype."""
        return torch.from_numpy(self._sigma_table(held=True)).to(self.held_dtype).log()

    def held_sigma_max(self) -> float:
        """The largest level of the held table (k-diffusion's and ComfyUI's sigma_max; float32 for a float32
        schedule)."""
        return float(self._sigma_table(held=True).max())

    def _log_sigma_table(self) -> np.ndarray:
        # log sigma_t that levels are read against (sigma_to_t, t_to_sigma): float64, or a downcast schedule's as
        # k-diffusion holds them (float16 logs are up to 1.5e-3 off, a quarter of a timestep at SD's low end)
        if self.held_dtype == torch.float16:
            return self.kdiffusion_log_sigmas().double().numpy()
        return np.log(self._sigma_table())

    def sigma_to_t(self, sigmas) -> np.ndarray:
        """The (fractional) timestep of each noise level: linear interpolation in log sigma between
        neighbouring training timesteps, clamped to [0, T-1]."""
        log_table = self._log_sigma_table()
        return np.interp(np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10)), log_table,
                         np.arange(len(log_table), dtype=np.float64))

    def t_to_sigma(self, t) -> np.ndarray:
        """Inverse of `sigma_to_t`: sigma at a fractional timestep, log-linear between neighbours."""
        log_table = self._log_sigma_table()
        return np.exp(np.interp(np.asarray(t, dtype=np.float64), np.arange(len(log_table)), log_table))

    def plan(self, steps: int, *, rule: str = "ddim", spacing: str | None = None, steps_offset: int | None = None,
             karras: bool = False, sigma_schedule: str | None = None, rho: float | None = None,
             sigma_range: str = "spaced", discard_penultimate_sigma: bool = False) -> SamplingPlan:
        """The timesteps and noise levels of a `steps`-step run, laid out as diffusers' scheduler of
        that family does (so the model sees the same t at each step):

        rule "ddpm"/"ddim" (DDPMScheduler, DDIMScheduler): integer timesteps, abar read at them; DDPM
            ends at abar = 1, DDIM at `final_alpha_cumprod`.
        rule "karras" (Euler, Euler ancestral, Heun): sigmas interpolated linearly at (possibly
            fractional) timesteps; with Karras sigmas, eq. 5 between the first and last of them.
        rule "dpm_solver" (DPMSolverMultistepScheduler): its own leading/linspace; with Karras
            sigmas, eq. 5 over the whole training range and t rounded (not for the cosine schedule).
        rule "lcm" (LCMScheduler): `steps` of the latent consistency model's distillation timesteps
            (LCM_ORIGINAL_STEPS of them, k = T // 50 apart, ending at T - 1), evenly by index from the
            noisiest (4 steps: 999, 759, 499, 259), abar read at them, ending at abar = 1; the spacing,
            offset and noise-level options do not apply (the model was distilled at these timesteps).
        Karras sigmas with the DDPM/DDIM rules span sigma(t_last)..sigma(t_first) (no diffusers peer).
        sigma_schedule ("karras", "exponential", "polyexponential", "beta", "align_your_steps(_sdxl)";
        `spaced_sigmas`, with `rho`) replaces the
        spacing's levels the way Karras sigmas do (karras=True is sigma_schedule="karras"); with the
        dpm_solver rule t is rounded for every such schedule (diffusers truncates exponential ones to int).
        sigma_range: "spaced" (diffusers: such a schedule spans the spaced timesteps' levels, or with the
        dpm_solver rule the whole range) or "model" (k-diffusion's and AUTOMATIC1111's: the model's whole
        trained range, sigma(0) to sigma(T-1), with fractional timesteps for every rule; the model's levels as
        k-diffusion holds them, in float32, so that a Brownian tree spans what A1111's spans) or "comfyui"
        (ComfyUI's calculate_sigmas: the model's range as "model", and KL Optimal as its n levels then 0, not
        A1111's n + 1 down to sigma_min; `sampling.sampler_plan` gives every sampler the "karras" rule under it,
        ComfyUI's one layout, unless a rule is asked: "lcm" for its LCM model sampling, the distillation
        timesteps' table). The schedule types read off the model's own levels ("uniform", "normal",
        "sgm_uniform", "simple", "ddim_uniform", "compvis": `model_levels`) set the timesteps themselves,
        whatever the spacing and range.
        discard_penultimate_sigma: lay out steps + 1 levels and leave out the last before the end, so that the last
        step is a long one (AUTOMATIC1111's "discard_next_to_last_sigma", on for its DPM2, DPM2 a and DPM++ 3M SDE:
        their last step from a small sigma is where they err most).
        """
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps must be an integer; got {steps!r}")
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the {T} training timesteps; got {steps}")
        if rule not in TIMESTEP_RULES:
            raise ValueError(f"rule must be one of {TIMESTEP_RULES}; got {rule!r}")
        if not isinstance(discard_penultimate_sigma, (bool, np.bool_)):
            raise TypeError(f"discard_penultimate_sigma must be True or False; got {discard_penultimate_sigma!r}")
        if discard_penultimate_sigma:
            if rule == "lcm":
                raise ValueError("the lcm sampler runs at the timesteps its model was distilled at; "
                                 "discard_penultimate_sigma does not apply to it")
            if steps == self.num_train_timesteps:
                raise ValueError(f"discard_penultimate_sigma lays out steps + 1 levels; at most "
                                 f"{self.num_train_timesteps - 1} steps with it, got {steps}")
            full = self.plan(steps + 1, rule=rule, spacing=spacing, steps_offset=steps_offset, karras=karras,
                             sigma_schedule=sigma_schedule, rho=rho, sigma_range=sigma_range)
            keep = [i for i in range(len(full) + 1) if i != len(full) - 1]
            return replace(full, timesteps=full.timesteps[keep[:-1]], sigmas=full.sigmas[keep],
                           alphas_cumprod=full.alphas_cumprod[keep],
                           v_alphas_cumprod=None if full.v_alphas_cumprod is None else full.v_alphas_cumprod[keep[:-1]])
        if karras and sigma_schedule not in (None, "karras"):
            raise ValueError(f"Karras sigmas (karras=True, or a '... Karras' sampler name) and "
                             f"sigma_schedule={sigma_schedule!r} contradict each other; give one")
        if sigma_schedule is None and karras:
            sigma_schedule = "karras"
        if sigma_schedule is not None and sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES} or None; got {sigma_schedule!r}")
        if sigma_range not in SIGMA_RANGES:
            raise ValueError(f"sigma_range must be one of {', '.join(map(repr, SIGMA_RANGES))}; got {sigma_range!r}")
        if sigma_range == "comfyui":
            if sigma_schedule is None:
                raise ValueError("sigma_range 'comfyui' lays out a ComfyUI scheduler's levels; give sigma_schedule "
                                 "(normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta, kl_optimal, "
                                 "linear_quadratic)")
        whole = sigma_range != "spaced"
        if sigma_schedule is not None:
            _check_no_rho(sigma_schedule, rho)
        levels_dtype = torch.float32 if whole else torch.float64  # (k-diffusion's precision over the model's range)
        custom = (lambda lo, hi, n: spaced_sigmas(sigma_schedule, lo, hi, n, rho, levels_dtype)) \
            if sigma_schedule and sigma_schedule not in MODEL_SIGMA_SCHEDULES else None
        if sigma_schedule in AYS_SIGMAS:  # (absolute levels: the model must span them as SD does)
            if rule in ("ddpm", "ddim", "lcm"):  # (their last step lands on abar_0 or the model's own timesteps)
                raise ValueError(f"{sigma_schedule} is for the samplers that step in noise levels (Euler, Heun, "
                                 f"DPM++, UniPC, ...); the {rule} rule keeps its timesteps (A1111 gives DDIM and PLMS "
                                 "their own too)")
            table = self._sigma_table()
            if not abs(float(table[-1]) / AYS_SIGMAS[sigma_schedule][0] - 1) < 0.01:
                raise ValueError(f"{sigma_schedule}'s levels (sigma {AYS_SIGMAS[sigma_schedule][-1]} to "
                                 f"{AYS_SIGMAS[sigma_schedule][0]}) are for Stable Diffusion's noise schedule; this "
                                 f"model's reaches sigma {float(table[-1]):.4g}")
            # (as they are, as A1111 and ComfyUI take them: NVIDIA's 14.615 and 0.029 lie just outside SD's 14.6146 and
            # 0.02917, which the model reads as its end timesteps)
        if self.held_dtype == torch.float16:
            check_downcast(rule, sigma_schedule)
        spacing = self.timestep_spacing if spacing is None else spacing
        steps_offset = self.steps_offset if steps_offset is None else int(steps_offset)
        if rule == "lcm":
            # (A1111's KL Optimal under its range; ComfyUI's over the distillation table under "comfyui")
            return self._lcm_plan(int(steps), sigma_schedule, spacing, rho, sigma_range == "model")
        if sigma_schedule in VP_TIME_SCHEDULES:  # (their own end, abar_0, whatever the rule: the code they come from)
            return self.vp_time_plan(sigma_schedule, int(steps), rule=rule, spacing=spacing)
        t = spaced_timesteps(T, int(steps), spacing, steps_offset, rule)
        if t.max() > T - 1 or t.min() < 0:
            raise ValueError(f"steps_offset={steps_offset} puts timesteps outside 0..{T - 1} ({t.max():.0f})")
        table = self._sigma_table(held=whole and sigma_schedule is not None)
        read = model_levels(sigma_schedule, table, int(steps)) if sigma_schedule in MODEL_SIGMA_SCHEDULES else None
        if read is not None and whole:  # (k-diffusion's float32 levels, computed as it computes them)
            read = (read[0], kdiffusion_levels(sigma_schedule, self.kdiffusion_log_sigmas(), int(steps))
                    if sigma_schedule in ("uniform", "normal", "sgm_uniform") else float32_levels(read[1]))
        if rule in ("ddpm", "ddim"):
            if read is not None:
                t, sig = read
                abar = 1.0 / (1.0 + sig**2)
            elif custom:
                sig = custom(*((table[0], table[-1]) if whole else (table[int(t[-1])], table[int(t[0])])), len(t))
                t = self.sigma_to_t(sig)
                abar = 1.0 / (1.0 + sig**2)
            else:
                abar = self.alphas_cumprod.numpy()[t.astype(np.int64)]
            end = 1.0 if rule == "ddpm" else self.final_alpha_cumprod
            abar = np.append(abar, end)
            with np.errstate(divide="ignore"):
                sig = np.where(abar > 0, np.sqrt((1 - abar) / np.maximum(abar, 1e-300)), np.inf)
        else:
            if read is not None:
                t, sig = read
            elif rule == "karras":
                sig = np.interp(t, np.arange(T), table)
                if custom:
                    sig = custom(*((table[0], table[-1]) if whole else (sig[-1], sig[0])), len(t))
                    t = self.sigma_to_t(sig)
            else:  # dpm_solver
                sig = table[t.astype(np.int64)]
                if custom:
                    sig = custom(table[0], table[-1], len(t))
                    t = self.sigma_to_t(sig)
                    # diffusers rounds t here, except for squaredcos_cap_v2 (where it then truncates to
                    # int64, a quirk we do not copy: our models take fractional t)
                    if self.kind != "cosine" and not whole:
                        t = t.round()
            end_ve = sigma_range == "model" and sigma_schedule == "kl_optimal"
            if end_ve:  # (AUTOMATIC1111's KL Optimal: n + 1 levels over i / n, down to sigma_min and no further)
                sig = kl_optimal_a1111(float(table[0]), float(table[-1]), len(t))
                t = self.sigma_to_t(sig[:-1])
            else:
                sig = np.append(sig, 0.0)
            abar = 1.0 / (1.0 + sig**2)
            return SamplingPlan(timesteps=torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64)),
                                sigmas=torch.from_numpy(np.asarray(sig, dtype=np.float64)),
                                alphas_cumprod=torch.from_numpy(np.asarray(abar, dtype=np.float64)),
                                rule=rule, spacing=spacing, end_ve=end_ve)
        return SamplingPlan(timesteps=torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64)),
                            sigmas=torch.from_numpy(np.asarray(sig, dtype=np.float64)),
                            alphas_cumprod=torch.from_numpy(np.asarray(abar, dtype=np.float64)),
                            rule=rule, spacing=spacing)

    def vp_time_plan(self, kind: str, steps: int, *, top: int | None = None, rule: str = "dpm_solver",
                     spacing: str = "leading") -> SamplingPlan:
        """The plan of a continuous-time schedule type (VP_TIME_SCHEDULES; `vp_time_levels`): `steps` steps from t = 1
        (or from the model's timestep `top`, t = (top + 1) / T: AUTOMATIC1111's UniPC image to image) to t = 1/T.
        "compvis_time_uniform" is AUTOMATIC1111's UniPC: time_uniform over compvis_count(T, steps) steps from t = 1 (over
        `steps` from `top`), and a v-prediction model's output read as eps at abar of the timestep its float32
        arithmetic truncates to an integer (its CompVis wrapper's int(t); SamplingPlan.v_alphas_cumprod)."""
        if kind not in VP_TIME_SCHEDULES:
            raise ValueError(f"a continuous-time schedule type must be one of {VP_TIME_SCHEDULES}; got {kind!r}")
        T = self.num_train_timesteps
        a1111 = kind == "compvis_time_uniform"
        if a1111:
            kind, steps = "time_uniform", compvis_count(T, steps) if top is None else steps
        t_max = 1.0 if top is None else (int(top) + 1) / T
        t, abar = vp_time_levels(kind, self.alphas_cumprod.numpy(), steps, t_max)
        v_abar = None
        if a1111:  # (its t in float32: t_start = top / T + 1 / T, linspace to 1 / T, t_in = (t - 1 / T) T; its code
            # writes 1000 for T, which SD's models have)
            t_top = torch.tensor(1.0) if top is None else torch.tensor(float(top)) / T + 1 / T
            t_in = (torch.linspace(float(t_top), 1.0 / T, len(t), dtype=torch.float32)[:-1] - 1.0 / T) * float(T)
            v_abar = floor_zero_snr(self.alphas_cumprod[t_in.long().clamp(0, T - 1)])
        return SamplingPlan(timesteps=torch.from_numpy(T * t[:-1] - 1.0), sigmas=torch.from_numpy(np.sqrt(
            (1 - abar) / abar)), alphas_cumprod=torch.from_numpy(abar), rule=rule, spacing=spacing,
            v_alphas_cumprod=v_abar)

    def _lcm_plan(self, steps: int, sigma_schedule: str | None, spacing: str, rho: float | None = None,
                  whole: bool = True, strength: float = 1.0) -> SamplingPlan:
        # the "lcm" rule (see `plan`): diffusers' LCMScheduler picks floor(j * n0 / steps) of the n0 distillation
        # timesteps, most noisy first; with a schedule type, AUTOMATIC1111's LCM (_lcm_levels). `strength` < 1: an
        # LCM pipeline's image to image (diffusers' LatentConsistencyModelImg2ImgPipeline, LCMScheduler.set_timesteps
        # with strength): the first int(n0 * strength) distillation timesteps only, `steps` of them all run
        T = self.num_train_timesteps
        k = max(T // LCM_ORIGINAL_STEPS, 1)
        origin = (np.arange(1, int(min(LCM_ORIGINAL_STEPS, T) * strength) + 1) * k - 1)[::-1]
        if sigma_schedule is not None:
            return self._lcm_levels(origin, steps, sigma_schedule, spacing, rho, whole)
        if steps > len(origin):
            raise ValueError(f"the lcm sampler takes at most the {len(origin)} timesteps its model was distilled at"
                             + (f" below strength {strength} (int({LCM_ORIGINAL_STEPS} x {strength})); raise the "
                                "strength or lower the steps" if strength < 1 else "") + f"; got steps={steps}")
        t = origin[np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)]
        abar = np.append(self.alphas_cumprod.numpy()[t], 1.0)
        with np.errstate(divide="ignore"):
            sig = np.where(abar > 0, np.sqrt((1 - abar) / np.maximum(abar, 1e-300)), np.inf)
        return SamplingPlan(timesteps=torch.from_numpy(t.astype(np.float64)), sigmas=torch.from_numpy(sig),
                            alphas_cumprod=torch.from_numpy(abar), rule="lcm", spacing=spacing)

    def _lcm_levels(self, origin: np.ndarray, steps: int, kind: str, spacing: str, rho: float | None,
                    whole: bool = True) -> SamplingPlan:
        """AUTOMATIC1111's LCM (its sd_samplers_lcm.LCMCompVisDenoiser): a schedule type's `steps` levels laid over the
        distillation timesteps' own levels, a table of len(origin) held in float32 as A1111 holds it, and computed in
        float32 as it computes them ("uniform" / "normal", A1111's "Automatic" for LCM: evenly in distillation
        timestep, log-sigma between neighbours; "sgm_uniform" so over n + 1 with the last left out; "simple" and
        "ddim_uniform" the table's own; "karras" and the other relative types over the table's ends; "kl_optimal"
        under sigma_range "model" A1111's n + 1 levels down to the table's lowest, `kl_optimal_a1111`), then 0; the
        model at each level sees the distillation timestep nearest it in log sigma (float32, the first on a tie, as
        its argmin). The distillation timesteps are k = T // 50 apart (A1111 writes 20, SD's)."""
        if kind in VP_TIME_SCHEDULES or kind in AYS_SIGMAS:
            raise ValueError(f"the lcm sampler's levels are read off its distillation timesteps; {kind!r} does not "
                             "apply to it (a relative schedule type, or one read off the model's levels, does)")
        k = int(origin[0] - origin[1]) if len(origin) > 1 else 1
        a = floor_zero_snr(torch.from_numpy(self.alphas_cumprod.numpy()[origin[::-1].copy()]).float())
        table = ((1 - a) / a) ** 0.5  # least noisy first, float32, as A1111 holds it
        log_table = table.log()

        def at_timesteps(t: torch.Tensor) -> torch.Tensor:  # (its t_to_sigma: the table's index of distillation t)
            return kdiffusion_t_to_sigma(((t - (k - 1)) / k).float().clamp(0, len(table) - 1), log_table)

        end_ve = False
        top, bottom = float(origin[0]), float(origin[-1])
        if kind in ("uniform", "normal"):
            sig = at_timesteps(torch.linspace(top, bottom, steps))
        elif kind == "sgm_uniform":
            sig = at_timesteps(torch.linspace(top, bottom, steps + 1)[:-1])
        elif kind in MODEL_SIGMA_SCHEDULES:
            sig = torch.from_numpy(model_levels(kind, table.double().numpy(), steps)[1]).float()
        elif kind == "kl_optimal" and whole:
            sig, end_ve = torch.from_numpy(kl_optimal_a1111(float(table[0]), float(table[-1]), steps)).float(), True
        else:
            sig = torch.from_numpy(spaced_sigmas(kind, float(table[0]), float(table[-1]), steps, rho,
                                                 torch.float32)).float()
        run = sig[:-1] if end_ve else sig
        nearest = (run.log()[None, :] - log_table[:, None]).abs().argmin(dim=0)
        t = torch.from_numpy(origin[::-1].copy())[nearest].double()
        sig = sig.double().numpy() if end_ve else np.append(sig.double().numpy(), 0.0)
        return SamplingPlan(timesteps=t, sigmas=torch.from_numpy(sig),
                            alphas_cumprod=torch.from_numpy(1.0 / (1.0 + sig**2)), rule="lcm", spacing=spacing,
                            end_ve=end_ve)
