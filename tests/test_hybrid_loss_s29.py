"""Improved DDPM's hybrid objective (Nichol & Dhariwal 2021 sec. 3.1) for a U-Net that learns its variance: the
variational bound's terms against closed forms and scipy's normal distribution, and the stop-gradient on the mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from imagine.diffusion import (discretized_gaussian_log_likelihood, normal_kl, q_sample, training_loss,
                               vlb_term)
from imagine.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config("linear", num_train_timesteps=1000)


def test_normal_kl_is_torchs():
    g = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), want)


def test_discretized_likelihood_is_the_bins_probability():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (400,), generator=g).double() / 127.5 - 1
    mean, log_scale = torch.randn(400, generator=g, dtype=torch.float64) * 0.5, -1.0 - torch.rand(400, generator=g,
                                                                                                    dtype=torch.float64)
    s, m, v = log_scale.exp().numpy(), mean.numpy(), x.numpy()
    upper = np.where(v > 0.999, 1.0, norm.cdf(v + 1 / 255, m, s))
    lower = np.where(v < -0.999, 0.0, norm.cdf(v - 1 / 255, m, s))
    want = np.log(np.maximum(upper - lower, 1e-12))
    np.testing.assert_allclose(discretized_gaussian_log_likelihood(x, mean, log_scale).numpy(), want, rtol=1e-6,
                               atol=1e-9)


def _setup(t):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor(t)
    return x0, eps, q_sample(x0, t, SCHEDULE, eps), t


def test_vlb_term_closed_forms():
    """t > 0 with the true x_0: KL 0 at p's variance beta_tilde (v = -1), and at beta (v = +1) the closed form
    0.5 (-1 + log(beta / beta_tilde) + beta_tilde / beta) nats a dimension; t = 0: the decoder's bins."""
    x0, eps, x_t, t = _setup([500, 10])
    ones = torch.ones_like(x0)
    assert float(vlb_term(eps, -ones, x0, x_t, t, SCHEDULE, "epsilon").abs().max()) < 1e-5
    abar = SCHEDULE.alphas_cumprod.double()
    want = []
    for k in t.tolist():
        beta = 1 - abar[k] / abar[k - 1]
        beta_tilde = (1 - abar[k - 1]) / (1 - abar[k]) * beta
        want.append(0.5 * (-1 + math.log(beta / beta_tilde) + beta_tilde / beta) / math.log(2))
    torch.testing.assert_close(vlb_term(eps, ones, x0, x_t, t, SCHEDULE, "epsilon").double(),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    x0, eps, x_t, t = _setup([0, 0])
    beta_tilde_1 = float((1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0]))
    mean = (x_t.double() - (1 - abar[0]).sqrt() * eps.double()) / abar[0].sqrt()  # (eq. 7 at t = 0: x_0's estimate)
    s = math.sqrt(beta_tilde_1)
    v, m = x0.double().numpy(), mean.numpy()
    upper = np.where(v > 0.999, 1.0, norm.cdf(v + 1 / 255, m, s))
    lower = np.where(v < -0.999, 0.0, norm.cdf(v - 1 / 255, m, s))
    want = -np.log(np.maximum(upper - lower, 1e-12)).reshape(2, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(vlb_term(eps, -ones, x0, x_t, t, SCHEDULE, "epsilon").numpy(), want, rtol=1e-4)


def test_hybrid_loss_moves_the_variance_by_the_bound_and_the_mean_by_mse_alone():
    x0, eps, _, t = _setup([300, 700])
    out = torch.cat([torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)), torch.zeros_like(x0)], 1)
    out.requires_grad_(True)
    with pytest.raises(ValueError, match="give vlb_weight"):
        training_loss(lambda x, tt: out, x0, None, SCHEDULE, "epsilon", t=t, noise=eps)
    loss = training_loss(lambda x, tt: out, x0, None, SCHEDULE, "epsilon", t=t, noise=eps, vlb_weight=0.001)
    loss.backward()
    mse_grad = 2 * (out[:, :3].detach() - eps) / eps[0].numel() / 2  # d(mean of per-sample MSE)/d(prediction)
    torch.testing.assert_close(out.grad[:, :3], mse_grad)
    assert float(out.grad[:, 3:].abs().max()) > 0  # (the bound reaches the variance)
    x_t = q_sample(x0, t, SCHEDULE, eps)
    want = ((out[:, :3] - eps) ** 2).flatten(1).mean(1) + 0.001 * 1000 * vlb_term(out[:, :3], out[:, 3:], x0, x_t, t,
                                                                                  SCHEDULE, "epsilon")
    torch.testing.assert_close(loss, want.mean())


def test_a_learned_variance_unet_trains_and_samples_with_its_variance(tmp_path):
    """`imagine train diffusion` with out_channels = 2 x in_channels and schedule.variance_type learned_range: the
    hybrid loss falls, and the exported model's DDPM samples draw with the learned variance."""
    import json

    from test_train import diffusion_config, make_folder, run_cli, write_yaml

    data = make_folder(tmp_path / "data", n=16)
    config = diffusion_config(data, max_steps=30, checkpoint_every=30, sample_every=30)
    config["model"] = {**config["model"], "out_channels": 6}
    config["schedule"] = {**config["schedule"], "variance_type": "learned_range"}
    config["sample"] = {**config["sample"], "sampler": "ddpm"}
    run_cli("train", "diffusion", "--config", write_yaml(tmp_path / "d.yaml", config), "--output", tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], log
    from imagine.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(tmp_path / "run" / "model")
    assert pipe.schedule.variance_type == "learned_range" and pipe.unet.config.out_channels == 6
    res = pipe.generate("square 3", steps=4, seed=5, sampler="ddpm", progress=False)
    assert res.images[0].size == (16, 16)
