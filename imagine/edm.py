"""EDM: "Elucidating the Design Space of Diffusion-Based Generative Models" (Karras et al. 2022), the parts a model
trained in its terms needs, with its symbols (imagen-pytorch's ElucidatedImagen trains and samples this way).

- The noise is VE: x = y + sigma n, n ~ N(0, I), with no scaling of the data y (Table 1, "VE" column's x).
- The network F is wrapped by preconditioning (eq. 7, Table 1) into the denoiser

      D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
      c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
      c_in = 1 / sqrt(sigma^2 + sigma_data^2),           c_noise = ln(sigma) / 4,

  so that F's input and its target, (y - c_skip x) / c_out, have unit variance at every sigma (sigma_data: the data's
  standard deviation, 0.5 for pictures in [-1, 1]).
- Training (eq. 8, Table 1): ln(sigma) ~ N(P_mean, P_std^2), loss lambda(sigma) ||D(y + sigma n; sigma) - y||^2 with
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, the weight that makes F's own
  error unit-weighted.
- Sampling: the levels of eq. 5 (imagine.schedules.karras_sigmas) down to 0, and Algorithm 2, the stochastic Heun
  sampler with churn (imagine.samplers.sample_heun with s_churn, s_tmin, s_tmax, s_noise), or any other sampler over
  the same levels. imagine's samplers step a VP sample x_t = x / sqrt(1 + sigma^2) and read D through a Denoiser;
  `edm_plan` gives them the levels (the model's "timestep" is sigma itself) and `preconditioned_output` is the
  Denoiser's guidance rule: guidance on F's outputs, then D (prediction type "sample").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from imagine.schedules import SamplingPlan, karras_sigmas

SIGMA_FLOOR = 1e-20  # c_noise = ln(max(sigma, 1e-20)) / 4: imagen-pytorch's log's floor


def coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table 1's c_skip, c_out, c_in at noise level(s) sigma (in sigma's dtype)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data * total.rsqrt(), total.rsqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Table 1's c_noise(sigma) = ln(sigma) / 4: the noise level the network is conditioned on."""
    return torch.log(sigma.clamp(min=SIGMA_FLOOR)) * 0.25


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1), which is 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) * (sigma * sigma_data) ** -2


def training_sigmas(z: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """The training noise levels from standard normal draws z: ln(sigma) = P_mean + P_std z, so ln(sigma) ~
    N(P_mean, P_std^2) (Table 1; -1.2, 1.2 in the paper); in float32, as imagen-pytorch draws them."""
    return (p_mean + p_std * z.float()).exp()


def denoise(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
            **cond) -> torch.Tensor:
    """D(x; sigma) of eq. 7 for a network F = model(input, c_noise, **cond); x the VE sample, sigma [B] (float32 as
    imagen-pytorch's: the coefficients in sigma's dtype)."""
    c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in coefficients(sigma, sigma_data))
    return c_skip * x + c_out * model(c_in * x, c_noise(sigma), **cond)


def training_loss(model: Callable[..., torch.Tensor], y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                  sigma_data: float, cond: dict[str, Any] | None = None, reduction: str = "mean",
                  self_condition: bool = False) -> torch.Tensor:
    """Eq. 8's loss at given levels: lambda(sigma) times each sample's mean squared error of D(y + sigma n; sigma)
    against y (imagen-pytorch's ElucidatedImagen.forward). y [B, ...] the clean data, sigma [B], noise like y.
    `self_condition`: D is first evaluated without gradient and its x_0 given to the network as `self_cond`
    (self-conditioning, Chen et al. 2022; as imagen-pytorch's, on the passes its caller draws)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if noise.shape != y.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the data's {tuple(y.shape)}")
    if sigma.shape != (y.shape[0],) or not bool((sigma > 0).all()):
        raise ValueError(f"sigma must be [{y.shape[0]}] positive noise levels (one per sample); got "
                         f"{tuple(sigma.shape)}")
    x = y + sigma.view(-1, *([1] * (y.ndim - 1))) * noise
    cond = dict(cond or {})
    if self_condition:
        with torch.no_grad():
            cond["self_cond"] = denoise(model, x, sigma, sigma_data, **cond)
    denoised = denoise(model, x, sigma, sigma_data, **cond)
    loss = (denoised.float() - y.float()).pow(2).flatten(1).mean(1) * loss_weight(sigma.float(), sigma_data)
    return loss.mean() if reduction == "mean" else loss


def edm_plan(steps: int, sigma_min: float, sigma_max: float, rho: float) -> SamplingPlan:
    """The sampling levels of eq. 5 (`steps` of them, computed in float32 as imagen-pytorch's sample_schedule) and
    sigma = 0 after them, as a SamplingPlan: the model's timestep at step i is sigma_i itself, abar_i = 1 / (1 +
    sigma_i^2) the VP level of the same noise (1 at the end). `initial_noise_scale(plan)` is then
    sigma_max / sqrt(1 + sigma_max^2): the start x = sigma_max n in VE terms."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (eq. 5 spaces sigma_max .. sigma_min over them); got {steps!r}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    sig = torch.from_numpy(karras_sigmas(float(sigma_min), float(sigma_max), steps, float(rho), dtype=torch.float32))
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    return SamplingPlan(timesteps=sig.clone(), sigmas=sigmas, alphas_cumprod=1.0 / (1.0 + sigmas**2), rule="karras",
                        spacing="linspace")


class SigmaTimesteps:
    """The 'training schedule' a Denoiser maps an off-grid level to a timestep with (Denoiser.at_sigma: Algorithm 2's
    churned sigma_hat, DPM2's midpoints): here the timestep is the level itself."""

    @staticmethod
    def sigma_to_t(sigma):
        return sigma


def preconditioned_output(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond, uncond=None,
                          scale: float = 1.0, rescale: float = 0.0, *, sigma_data: float,
                          guidance: Callable[..., torch.Tensor], **kw) -> torch.Tensor:
    """A Denoiser's guidance rule for a network trained in EDM's terms: x the VP sample at level sigma = t ([B], the
    plan's timestep), F guided on its own outputs by `guidance` (imagine.guidance.guided_model_output with its
    combine: imagen-pytorch guides F, and its projection is not linear, so it does not commute with eq. 7), then
    D(x; sigma) of eq. 7 returned: read it as prediction type "sample". The coefficients in float32 from sigma's
    float32 value (imagen-pytorch's), the VP -> VE factor sqrt(1 + sigma^2) in float64 folded into them."""
    if kw.get("parts") is not None:
        raise ValueError("a preconditioned (EDM) model's guidance keeps no unconditional x_0: the CFG++ samplers do not "
                         "run on it")
    sigma, x64 = t.float(), x.double()
    c_skip, c_out, c_in = (c.double().view(-1, 1, 1, 1) for c in coefficients(sigma, sigma_data))
    to_ve = (1.0 + sigma.double() ** 2).sqrt().view(-1, 1, 1, 1)
    f = guidance(model, (x64 * (c_in * to_ve)).to(x.dtype), c_noise(sigma), cond, uncond, scale, rescale=rescale)
    return (x64 * (c_skip * to_ve) + c_out * f.double()).to(x.dtype)
