"""The forward process and the training objectives.

Forward process (Ho et al. 2020, eq. 4): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), i.e.
x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), eps ~ N(0, I).

A network can predict any of three quantities, equivalent given x_t and t (names as in diffusers):
  "epsilon"      eps                                  (Ho et al. 2020, eq. 11)
  "sample"       x_0
  "v_prediction" v = alpha_t eps - sigma_t x_0        (Salimans & Ho 2022, sec. 4 / appendix D)
Since alpha^2 + sigma^2 = 1: x_0 = alpha x_t - sigma v and eps = sigma x_t + alpha v.

The loss is the simplified objective of Ho et al. (eq. 14), ||target - prediction||^2 at a uniform
random t, optionally with the min-SNR-gamma weights of Hang et al. 2023. A network that also learns its
variance (twice the channels out) is trained with Nichol & Dhariwal 2021's hybrid objective (Improved DDPM
sec. 3.1), L_simple + lambda L_vlb, the variational bound's term at t (`vlb_term`) reaching the variance only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from imagine.schedules import PREDICTION_TYPES, alpha_sigma


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return prediction_type


def _per_sample(coef, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] coefficient shaped to broadcast over x = [B, ...], in x's dtype."""
    c = torch.as_tensor(coef, dtype=torch.float64, device=x.device)
    if c.ndim == 1:
        c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return c.to(x.dtype)


def _alpha_sigma(alphas_cumprod_t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    abar = torch.as_tensor(alphas_cumprod_t, dtype=torch.float64)
    return _per_sample(abar.sqrt(), x), _per_sample((1 - abar).sqrt(), x)


def _abar_at(schedule, t: torch.Tensor) -> torch.Tensor:
    """abar at integer timesteps t [B] (float64)."""
    t = torch.as_tensor(t)
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError("the forward process is defined at integer timesteps; got fractional t")
    t = t.long().cpu()
    T = schedule.num_train_timesteps
    if bool((t < 0).any()) or bool((t >= T).any()):
        raise ValueError(f"timesteps must lie in 0..{T - 1}; got {t.min().item()}..{t.max().item()}")
    return schedule.alphas_cumprod[t]


# -- forward process ---------------------------------------------------------------------------
def q_mean_variance(x0: torch.Tensor, t: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_t | x_0) (Ho et al. 2020, eq. 4): sqrt(abar_t) x_0, (1 - abar_t)."""
    abar = _abar_at(schedule, t).to(x0.device)
    alpha, _ = _alpha_sigma(abar, x0)
    return alpha * x0, _per_sample(1 - abar, x0).expand_as(x0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
    alpha, sigma = _alpha_sigma(_abar_at(schedule, t).to(x0.device), x0)
    return alpha * x0 + sigma * noise


def augment(x: torch.Tensor, level: int, schedule, noise: torch.Tensor) -> torch.Tensor:
    """Conditioning augmentation (Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1; unCLIP's noised image
    embedding): a conditioning input, every row taken to the same level of its own schedule by the forward process,
    x_s = sqrt(abar_s) x + sqrt(1 - abar_s) eps; the model is told s, so one model serves clean and degraded inputs."""
    return q_sample(x, torch.full((x.shape[0],), int(level)), schedule, noise)


def check_level(level, top: int, hint: str = "") -> int:
    """An augmentation's noise level must be a whole number from 0 to `top` (a Python or NumPy integer): else a
    ValueError saying so; the level as an int."""
    import numbers

    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= level <= top:
        raise ValueError(f"noise_level must be a whole number from 0 to {top}{hint}; got {level!r}")
    return int(level)


# -- prediction types ----------------------------------------------------------------------------
def velocity(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, the velocity of x_t on the alpha-sigma circle)."""
    alpha, sigma = _alpha_sigma(alphas_cumprod_t, x0)
    return alpha * eps - sigma * x0


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t, prediction_type: str) -> torch.Tensor:
    """x_0 from a network output (Ho et al. eq. 15 for eps; Salimans & Ho for v).
    `alphas_cumprod_t`: a number or one per sample [B]."""
    check_prediction_type(prediction_type)
    alpha, sigma = _alpha_sigma(alphas_cumprod_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    return alpha * x_t - sigma * output


def predict_eps(output: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t, prediction_type: str) -> torch.Tensor:
    """eps from a network output: x_t = alpha x_0 + sigma eps solved for eps."""
    check_prediction_type(prediction_type)
    alpha, sigma = _alpha_sigma(alphas_cumprod_t, x_t)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (x_t - alpha * output) / sigma
    return sigma * x_t + alpha * output


def convert_prediction(output: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t, from_type: str,
                       to_type: str) -> torch.Tensor:
    """Re-express a prediction of one type as another, given x_t and abar_t."""
    check_prediction_type(from_type)
    check_prediction_type(to_type)
    if from_type == to_type:
        return output
    if to_type == "sample":
        return predict_x0(output, x_t, alphas_cumprod_t, from_type)
    if to_type == "epsilon":
        return predict_eps(output, x_t, alphas_cumprod_t, from_type)
    x0 = predict_x0(output, x_t, alphas_cumprod_t, from_type)
    eps = predict_eps(output, x_t, alphas_cumprod_t, from_type)
    return velocity(x0, eps, alphas_cumprod_t)


def training_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t, prediction_type: str) -> torch.Tensor:
    """What a network of the given prediction type should output for x_t = alpha x0 + sigma noise."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return velocity(x0, noise, alphas_cumprod_t)


# -- the variational bound (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 sec. 3.1, eq. 15) --------
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data scaled to [-1, 1] under N(mean, exp(log_scale)^2) integrated over each value's bin of
    width 2/255, the edge bins open to -inf / +inf (Ho et al. 2020 eq. 13, the decoder p(x_0 | x_1)), elementwise."""
    normal = torch.distributions.Normal(mean, torch.exp(log_scale))
    upper, lower = normal.cdf(x + 1.0 / 255), normal.cdf(x - 1.0 / 255)
    return torch.where(x < -0.999, upper.clamp_min(1e-12).log(),
                       torch.where(x > 0.999, (1 - lower).clamp_min(1e-12).log(),
                                   (upper - lower).clamp_min(1e-12).log()))


def vlb_term(mean_prediction: torch.Tensor, variance_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor, schedule, prediction_type: str) -> torch.Tensor:
    """The variational bound's term at t per sample, in bits per dimension: KL(q(x_{t-1} | x_t, x_0) ||
    p(x_{t-1} | x_t)) for t > 0 and the decoder's -log p(x_0 | x_1) at t = 0 (Ho et al. 2020 eq. 5), with p's mean
    from `mean_prediction` and its log variance v log beta_t + (1 - v) log beta_tilde_t, v = (variance_output + 1) /
    2 (Improved DDPM eq. 15; beta_tilde_0 = 0 read as beta_tilde_1, as its code clips it). The model's input x_t is
    made from x_0 at t."""
    abar = schedule.alphas_cumprod.double()
    t = t.long().cpu()
    abar_t = abar[t]
    abar_prev = torch.where(t > 0, abar[(t - 1).clamp_min(0)], torch.ones_like(abar_t))
    beta = 1 - abar_t / abar_prev
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])
    log_small = torch.where(t > 0, beta_tilde, beta_tilde_1.expand_as(beta_tilde)).log()

    def per(c):  # [B] -> broadcast over x, float32
        return _per_sample(c.to(x0.device), x0).float()

    def posterior_mean(x_start):  # eq. 7
        return per(abar_prev.sqrt() * beta / (1 - abar_t)) * x_start + per((1 - beta).sqrt() * (1 - abar_prev) /
                                                                          (1 - abar_t)) * x_t.float()

    f = (variance_output.float() + 1) / 2
    logvar_p = f * per(beta.log()) + (1 - f) * per(log_small)
    mean_p = posterior_mean(predict_x0(mean_prediction.float(), x_t.float(), abar_t, prediction_type))
    kl = normal_kl(posterior_mean(x0.float()), per(log_small), mean_p, logvar_p).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0.float(), mean_p, 0.5 * logvar_p).flatten(1).mean(1)
    return torch.where(t.to(x0.device) == 0, nll, kl) / math.log(2.0)


# -- loss ------------------------------------------------------------------------------------------
def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 8 and its conversions, sec. 3.4).

    The x_0 loss weighted by min(SNR, gamma) is the target. The eps loss equals SNR times the x_0
    loss, the v loss (SNR + 1) times it, so their weights are min(SNR, gamma) / SNR and
    min(SNR, gamma) / (SNR + 1). At SNR = 0 (zero terminal SNR) the eps weight is its limit, 1.
    """
    check_prediction_type(prediction_type)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive; got {gamma}")
    snr = snr.double()
    clipped = snr.clamp(max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-300), torch.ones_like(snr))


def training_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: dict[str, Any] | None, schedule,
                  prediction_type: str, generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                  t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  reduction: str = "mean", input_noise: torch.Tensor | None = None,
                  vlb_weight: float | None = None) -> torch.Tensor:
    """The simplified DDPM objective (Ho et al. 2020, eq. 14 / Algorithm 1), for any prediction type.

    t ~ Uniform{0..T-1} and eps ~ N(0, I) are drawn from `generator` unless given; the model sees
    x_t = q_sample(x0, t, eps) as `model(x_t, t.float(), **cond)`. Returns the mean over the batch
    (reduction="mean") or one loss per sample ("none"), each the mean squared error over the
    sample's elements, times the min-SNR-gamma weight if `min_snr_gamma` is set. `input_noise`: the noise x_t is
    made with where it is not the target's eps (input perturbation, Ning et al. 2023: eps + gamma xi in x_t, eps in
    the target). A model with twice x0's channels out learns its variance: with `vlb_weight` lambda the loss is
    Improved DDPM's hybrid L_simple + lambda T L_vlb(t) (sec. 3.1: lambda = 0.001; T L_vlb(t) estimates the whole
    bound, `vlb_term`), the bound's gradient reaching the variance only (the mean is held, as the paper stops it).
    """
    check_prediction_type(prediction_type)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond must be a dict of keyword arguments for the model; got {type(cond).__name__}")
    B = x0.shape[0]
    T = schedule.num_train_timesteps
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if t is None:
        t = torch.randint(0, T, (B,), generator=generator, device=gen_device).to(x0.device)
    t = torch.as_tensor(t, device=x0.device)
    if t.shape != (B,):
        raise ValueError(f"t must have shape [{B}] (one timestep per sample); got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    abar = _abar_at(schedule, t).to(x0.device)
    x_t = q_sample(x0, t, schedule, noise if input_noise is None else input_noise)
    prediction = model(x_t, t.to(torch.float32), **(cond or {}))
    variance = None
    if prediction.ndim == x0.ndim and prediction.shape[1] == 2 * x0.shape[1]:
        if vlb_weight is None:
            raise ValueError(f"the model outputs twice x0's {x0.shape[1]} channels: a learned variance (Improved "
                             "DDPM's out_channels = 2 x in_channels), trained by the hybrid loss: give vlb_weight "
                             "(the paper's lambda, 0.001)")
        prediction, variance = prediction[:, : x0.shape[1]], prediction[:, x0.shape[1]:]
    if prediction.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(prediction.shape)} differs from x0 shape {tuple(x0.shape)}")
    target = training_target(x0, noise, abar, prediction_type)
    loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        snr = abar / (1 - abar)
        loss = loss * min_snr_weights(snr, float(min_snr_gamma), prediction_type).to(loss)
    if variance is not None:  # (the bound's term through the variance alone: the mean prediction held)
        loss = loss + float(vlb_weight) * T * vlb_term(prediction.detach(), variance, x0, x_t, t, schedule,
                                                       prediction_type)
    return loss.mean() if reduction == "mean" else loss


# -- continuous time (Kingma et al. 2021, VDM; Imagen's training) ---------------------------------
def continuous_training_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, log_snr: torch.Tensor,
                             noise: torch.Tensor, prediction_type: str, cond: dict[str, Any] | None = None,
                             min_snr_gamma: float | None = None, reduction: str = "mean",
                             self_condition: bool = False) -> torch.Tensor:
    """The simplified objective at a continuous noise level (VDM, Kingma et al. 2021; Imagen's base and
    super-resolution models, trained at t ~ U[0, 1] with lambda(t) the log-SNR of a continuous schedule).

    x_lambda = alpha x_0 + sigma eps with alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); the model sees
    `model(x_lambda, lambda, **cond)` (the noise level as its condition, imagen-pytorch's `get_condition`); the target
    is eps, x_0 or v = alpha eps - sigma x_0 (Salimans & Ho 2022) as in `training_target`, the loss each sample's mean
    squared error, times the min-SNR-gamma weight (Hang et al. 2023; SNR = e^lambda) if `min_snr_gamma` is set.
    `log_snr` [B], `noise` like x0. `self_condition`: the model first estimates x_0 without gradient and is then called
    with it as `self_cond` (self-conditioning, Chen et al. 2022, "Analog Bits", sec. 3.3: at sampling it sees the
    previous step's estimate; the caller takes this pass half the time, so the model also learns to do without)."""
    check_prediction_type(prediction_type)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond must be a dict of keyword arguments for the model; got {type(cond).__name__}")
    log_snr = torch.as_tensor(log_snr, device=x0.device)
    if log_snr.shape != (x0.shape[0],):
        raise ValueError(f"log_snr must have shape [{x0.shape[0]}] (one noise level per sample); got "
                         f"{tuple(log_snr.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    lam = log_snr.double()
    alpha, sigma = (_per_sample(v, x0) for v in alpha_sigma(lam))
    x_t = alpha * x0 + sigma * noise
    cond = dict(cond or {})
    if self_condition:  # (x_0 from the first estimate as its prediction type says: alpha^2 = sigmoid(lambda))
        with torch.no_grad():
            first = model(x_t, log_snr.to(torch.float32), **cond)
            cond["self_cond"] = predict_x0(first.double(), x_t, torch.sigmoid(lam), prediction_type).to(first.dtype)
    prediction = model(x_t, log_snr.to(torch.float32), **cond)
    if prediction.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(prediction.shape)} differs from x0 shape {tuple(x0.shape)}")
    target = {"epsilon": noise, "sample": x0, "v_prediction": alpha * noise - sigma * x0}[prediction_type]
    loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weights(lam.exp(), float(min_snr_gamma), prediction_type).to(loss)
    return loss.mean() if reduction == "mean" else loss
