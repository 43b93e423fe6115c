"""Imagen's cascade trained and sampled in the terms of Karras et al. 2022 (EDM), as imagen-pytorch's (2.1.0)
ElucidatedImagen has it: the same Efficient U-Nets, text conditioning, guidance, dynamic thresholding and noise
conditioning augmentation as imagine.pipelines.imagen, with each stage a VE diffusion in sigma instead of a
continuous-time VP one.

- A stage's U-Net F is preconditioned into the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4)
  (EDM eq. 7, Table 1; imagine.edm), its per-stage `sigma_data`; guidance (imagen-pytorch's projected guidance) acts
  on F's two outputs, then D is formed and thresholded (dynamic or clipped, as Imagen's).
- Sampling (per stage `num_sample_steps`, `sigma_min`, `sigma_max`, `rho`): the levels of eq. 5 down to 0 and
  Algorithm 2, the stochastic Heun sampler whose churn (`S_churn`, `S_tmin`, `S_tmax`, `S_noise`) adds noise
  before each step inside [S_tmin, S_tmax] (imagine.samplers.sample_heun): imagen-pytorch's sampler. Other samplers
  over the same levels: Euler and DPM2 (which take the churn too), Euler a, DPM++ 2M, DPM++ 2S a.
- Draws, per stage in imagen-pytorch's order: the low-resolution picture's noise (super-resolution stages), the start
  noise (times sigma_max), then one draw at every step (the churn's, made by imagen-pytorch even where a step's
  gamma is 0): with the same seeds the pictures of ElucidatedImagen.sample at batch 1 (module imagen's doc).
- Super-resolution stages: the previous picture noised to `lowres_sample_noise_level` of the `lowres_noise_schedule`,
  as Imagen's; the U-Net is told that level's log-SNR, what imagen-pytorch's ElucidatedImagen trains it on
  (`lowres_noise_cond="log_snr"`, the default). imagen-pytorch 2.1.0's ElucidatedImagen.sample tells it the time t
  itself (0.2, not lambda(0.2) = 0.71 on the linear schedule), unlike its Imagen.sample and its own training:
  `lowres_noise_cond="time"` reproduces its pictures.
- `P_mean`, `P_std`: the training noise distribution (ln sigma ~ N(P_mean, P_std^2)), kept with the cascade; sampling
  does not read them.
- Image to image and enlarging a given picture: ImagenPipeline.sample's init_image / strength (SDEdit over these
  levels) and start_at_unet_number / start_image, as for Imagen.
- Not built: sample-time sigma_min / sigma_max / skip_steps overrides, imagen-pytorch's own init_images (the picture
  added to noise at sigma_max), inpainting (its RePaint resampling), video.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch

from imagine.pipelines.imagen import ImagenPipeline, StageSampling, per_stage

# what a stage samples with over EDM's levels (the churn goes to those that take it: heun, euler, dpm2)
SAMPLERS = ("heun", "euler", "euler_a", "dpm2", "dpmpp_2m", "dpmpp_2s_a")
CHURNED = ("heun", "euler", "dpm2")
LOWRES_NOISE_CONDS = ("log_snr", "time")
# ElucidatedImagen's own keywords, with its defaults (imagen-pytorch 2.1.0), one value or one per unet
EDM_DEFAULTS = {"num_sample_steps": 32, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0,
                "P_mean": -1.2, "P_std": 1.2, "S_churn": 80.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
# the ElucidatedImagen keywords sampling reads besides unets, image_sizes and text_embed_dim
ELUCIDATED_SETTINGS = (*EDM_DEFAULTS, "lowres_noise_schedule", "lowres_sample_noise_level", "dynamic_thresholding",
                       "dynamic_thresholding_percentile", "resize_mode", "auto_normalize_img", "channels",
                       "condition_on_text", "cond_drop_prob", "lowres_noise_cond")


def _numbers(value, n: int, name: str, ok: Callable[[float], bool], valid: str) -> tuple[float, ...]:
    values = per_stage(value, n, name)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
            raise ValueError(f"{name} must be {valid} (one, or one per unet); got {values}")
    return tuple(float(v) for v in values)


def check_edm_settings(n: int, **settings) -> dict[str, tuple]:
    """ElucidatedImagen's keywords (EDM_DEFAULTS' names; those not given take their defaults), each one value or one
    per stage, checked: a dict of per-stage tuples for n stages. A ValueError names what is wrong and what is valid."""
    unknown = sorted(set(settings) - set(EDM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ElucidatedImagen settings {unknown}; known: {list(EDM_DEFAULTS)}")
    v = {**EDM_DEFAULTS, **settings}
    steps = per_stage(v["num_sample_steps"], n, "num_sample_steps")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 2 for s in steps):
        raise ValueError(f"num_sample_steps must be ints >= 2 (one, or one per unet); got {steps}")
    positive = (lambda x: x > 0 and math.isfinite(x)), "finite numbers > 0"
    at_least_0 = (lambda x: x >= 0 and math.isfinite(x)), "finite numbers >= 0"
    rules = {"sigma_min": positive, "sigma_max": positive, "sigma_data": positive, "rho": positive,
             "P_mean": (math.isfinite, "finite numbers"), "P_std": at_least_0, "S_churn": at_least_0,
             "S_tmin": at_least_0, "S_tmax": ((lambda x: x >= 0), "numbers >= 0 (inf: no upper end)"),
             "S_noise": at_least_0}
    out = {"num_sample_steps": steps, **{k: _numbers(v[k], n, k, *rule) for k, rule in rules.items()}}
    if any(lo >= hi for lo, hi in zip(out["sigma_min"], out["sigma_max"])):
        raise ValueError(f"sigma_min must be below sigma_max at every stage; got {out['sigma_min']} and "
                         f"{out['sigma_max']}")
    if any(lo > hi for lo, hi in zip(out["S_tmin"], out["S_tmax"])):
        raise ValueError(f"S_tmin must not exceed S_tmax at any stage; got {out['S_tmin']} and {out['S_tmax']}")
    return out


class ElucidatedImagenPipeline(ImagenPipeline):
    """imagen-pytorch's ElucidatedImagen cascade (module doc). The keywords are its own: EDM_DEFAULTS' (num_sample_steps,
    sigma_min, sigma_max, sigma_data, rho, P_mean, P_std, S_churn, S_tmin, S_tmax, S_noise; one value, or one per
    unet) besides ImagenPipeline's common ones (image_sizes, lowres noise, thresholding, resize_mode, text);
    `lowres_noise_cond`: what a super-resolution U-Net is told of its input's noise ("log_snr", as trained;
    "time", imagen-pytorch 2.1.0's ElucidatedImagen.sample)."""

    imagen_type = "elucidated"
    default_sampler = "heun"  # Karras et al.'s Algorithm 2, imagen-pytorch's
    samplers = SAMPLERS
    sampler_levels = "an ElucidatedImagen stage's noise levels"
    schedule_types = ("karras",)  # (EDM's eq. 5 levels)
    settings_keys = ELUCIDATED_SETTINGS

    def __init__(self, unets: Sequence[Callable[..., torch.Tensor]], *, image_sizes: Sequence[int],
                 lowres_noise_cond: str = "log_snr", **settings):
        for key in ("timesteps", "noise_schedules", "pred_objectives"):
            if key in settings:
                raise ValueError(f"{key} is an Imagen (continuous-time DDPM) keyword; an ElucidatedImagen samples over "
                                 f"sigma: {', '.join(EDM_DEFAULTS)}")
        super().__init__(unets, image_sizes=image_sizes, **{k: v for k, v in settings.items() if k not in EDM_DEFAULTS})
        self.timesteps = self.noise_schedules = self.pred_objectives = None  # (Imagen's; not used here)
        edm = check_edm_settings(len(self.unets), **{k: v for k, v in settings.items() if k in EDM_DEFAULTS})
        for key, values in edm.items():
            setattr(self, key, values)
        if lowres_noise_cond not in LOWRES_NOISE_CONDS:
            raise ValueError(f"lowres_noise_cond must be one of {LOWRES_NOISE_CONDS}; got {lowres_noise_cond!r}")
        self.lowres_noise_cond = lowres_noise_cond

    def settings(self) -> dict[str, Any]:
        return {**self.common_settings(), **{k: list(getattr(self, k)) for k in EDM_DEFAULTS},
                "lowres_noise_cond": self.lowres_noise_cond}

    def default_steps(self, k: int) -> int:
        return self.num_sample_steps[k]

    def lowres_condition(self, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return lam if self.lowres_noise_cond == "log_snr" else t

    def stage_sampling(self, k: int, steps: int, sampler: str, guidance: Callable[..., torch.Tensor],
                       spacing: str = "karras") -> StageSampling:
        """Stage k's run over eq. 5's levels (imagine.edm.edm_plan; the model's timestep is sigma), D of eq. 7 read
        as an x_0 prediction, the start x = sigma_max n; Algorithm 2's churn for the samplers that take it. With
        S_churn 0 imagen-pytorch still draws at every step: those draws are made after the run."""
        from imagine.edm import SigmaTimesteps, edm_plan, preconditioned_output
        from imagine.sampling import initial_noise_scale

        plan = edm_plan(steps, self.sigma_min[k], self.sigma_max[k], self.rho[k])
        churn = {"s_churn": self.S_churn[k], "s_tmin": self.S_tmin[k], "s_tmax": self.S_tmax[k],
                 "s_noise": self.S_noise[k]} if sampler in CHURNED else {}
        return StageSampling(plan=plan, condition=lambda c_noise: c_noise, prediction_type="sample",
                             guidance=functools.partial(preconditioned_output, sigma_data=self.sigma_data[k],
                                                        guidance=guidance),
                             options=churn, trailing_draws=steps if churn and not self.S_churn[k] else 0,
                             start_scale=initial_noise_scale(plan), schedule=SigmaTimesteps())
