"""Forward process and objectives against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from imagine.diffusion import (
    convert_prediction,
    min_snr_weights,
    predict_eps,
    predict_x0,
    q_mean_variance,
    q_sample,
    training_loss,
    training_target,
    velocity,
)
from imagine.schedules import NoiseSchedule

TYPES = ["epsilon", "sample", "v_prediction"]


def test_q_sample_marginals_match_the_chain():
    """q(x_t | x_0) in closed form (Ho et al. eq. 4) against running q(x_s | x_{s-1}) = N(sqrt(1-b_s) x, b_s) t times."""
    s = NoiseSchedule.from_config("linear", num_train_timesteps=200, beta_start=1e-3, beta_end=0.05)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    m = 40000
    x = x0.expand(m, 4).clone()
    check_at = {20, 120, 199}
    for t in range(200):
        b = s.betas[t].item()
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(m, 4, generator=g, dtype=torch.float64)
        if t in check_at:
            tt = torch.full((1,), t)
            mean, var = q_mean_variance(x0[None], tt, s)
            # exactly: prod sqrt(1 - b), 1 - prod (1 - b)
            assert torch.allclose(mean[0], x0 * torch.prod(1 - s.betas[: t + 1]).sqrt())
            assert torch.allclose(var[0], (1 - torch.prod(1 - s.betas[: t + 1])).expand(4))
            # the chain's empirical moments (standard errors ~ sqrt(var/m) ~ 0.005)
            assert torch.allclose(x.mean(0), mean[0], atol=0.02)
            assert torch.allclose(x.var(0), var[0], atol=0.02)
            # and one-shot draws from q_sample agree with both
            z = torch.randn(m, 4, generator=g, dtype=torch.float64)
            xs = q_sample(x0.expand(m, 4), tt.expand(m), s, z)
            assert torch.allclose(xs.mean(0), mean[0], atol=0.02)
            assert torch.allclose(xs.var(0), var[0], atol=0.02)


def _batch(abar=(1e-4, 0.02, 0.5, 0.98, 0.9999)):
    g = torch.Generator().manual_seed(1)
    B = len(abar)
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    abar = torch.tensor(abar, dtype=torch.float64)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    return x0, eps, abar, a * x0 + s * eps, a, s


def test_velocity_against_its_definition():
    x0, eps, abar, x_t, a, s = _batch()
    assert torch.allclose(velocity(x0, eps, abar), a * eps - s * x0)  # Salimans & Ho 2022
    v = velocity(x0, eps, abar)
    # and x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
    assert torch.allclose(a * x_t - s * v, x0)
    assert torch.allclose(s * x_t + a * v, eps)


@pytest.mark.parametrize("src", TYPES)
def test_prediction_conversions_round_trip(src):
    x0, eps, abar, x_t, _, _ = _batch()
    out = training_target(x0, eps, abar, src)
    assert torch.allclose(predict_x0(out, x_t, abar, src), x0, atol=1e-9)
    assert torch.allclose(predict_eps(out, x_t, abar, src), eps, atol=1e-6 if src == "sample" else 1e-9)
    for dst in TYPES:
        conv = convert_prediction(out, x_t, abar, src, dst)
        assert torch.allclose(conv, training_target(x0, eps, abar, dst), atol=1e-6 if src == "sample" else 1e-9)
        assert torch.allclose(convert_prediction(conv, x_t, abar, dst, src), out, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        predict_x0(out, x_t, abar, "noise")


def test_min_snr_weights_equalise_the_three_losses():
    """Hang et al. 2023: with their weights, the eps, x_0 and v losses of the same x_0 error all equal
    min(SNR, gamma) * ||x0_hat - x0||^2."""
    x0, eps, abar, x_t, _, _ = _batch()
    g = torch.Generator().manual_seed(2)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    snr = abar / (1 - abar)
    gamma = 5.0
    want = snr.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).sum(1)
    for p in TYPES:
        hat = convert_prediction(x0_hat, x_t, abar, "sample", p)
        err = (hat - training_target(x0, eps, abar, p)).pow(2).flatten(1).sum(1)
        assert torch.allclose(min_snr_weights(snr, gamma, p) * err, want, rtol=1e-6), p
    # zero terminal SNR: the eps weight tends to 1, the v weight to 0 ... min(0, g)/(0+1) = 0
    zero = torch.tensor([0.0], dtype=torch.float64)
    assert min_snr_weights(zero, gamma, "epsilon").item() == 1.0
    assert min_snr_weights(zero, gamma, "v_prediction").item() == 0.0
    with pytest.raises(ValueError, match="positive"):
        min_snr_weights(snr, 0.0, "epsilon")


def test_training_loss_is_eq14():
    s = NoiseSchedule.from_config("scaled_linear")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    noise = torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    seen = {}

    def zero_model(x_t, tt, **cond):
        seen.update(x_t=x_t, t=tt, cond=cond)
        return torch.zeros_like(x_t)

    for p in TYPES:
        per = training_loss(zero_model, x0, {"context": torch.ones(4, 3)}, s, p, t=t, noise=noise, reduction="none")
        target = training_target(x0.double(), noise.double(), s.alphas_cumprod[t], p)
        assert per.shape == (4,)
        assert torch.allclose(per.double(), target.pow(2).flatten(1).mean(1), rtol=1e-5)
        assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [0.0, 10.0, 500.0, 999.0]
        assert torch.allclose(seen["x_t"], q_sample(x0, t, s, noise), atol=1e-6)
        assert set(seen["cond"]) == {"context"}
        mean = training_loss(zero_model, x0, None, s, p, t=t, noise=noise)
        assert mean.ndim == 0 and torch.allclose(mean, per.mean())
        w = min_snr_weights(s.snr[t], 5.0, p)
        weighted = training_loss(zero_model, x0, None, s, p, t=t, noise=noise, min_snr_gamma=5.0, reduction="none")
        assert torch.allclose(weighted.double(), per.double() * w, rtol=1e-5)

    # an oracle that outputs the exact target has zero loss
    def oracle(x_t, tt, **cond):
        return training_target(x0, noise, s.alphas_cumprod[tt.long()], "v_prediction").float()

    assert training_loss(oracle, x0, None, s, "v_prediction", t=t, noise=noise).item() < 1e-10


def test_training_loss_draws_from_the_generator():
    s = NoiseSchedule.from_config("linear")
    x0 = torch.randn(8, 1, 2, 2)
    model = lambda x, t: torch.tanh(x) * (t[:, None, None, None] / 1000)  # noqa: E731
    a = training_loss(model, x0, None, s, "epsilon", generator=torch.Generator().manual_seed(5))
    b = training_loss(model, x0, None, s, "epsilon", generator=torch.Generator().manual_seed(5))
    c = training_loss(model, x0, None, s, "epsilon", generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def test_training_loss_bad_input():
    s = NoiseSchedule.from_config("linear")
    x0 = torch.zeros(2, 1, 2, 2)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        training_loss(model, x0, None, s, "epsilon", t=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="0..999"):
        training_loss(model, x0, None, s, "epsilon", t=torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="integer timesteps"):
        training_loss(model, x0, None, s, "epsilon", t=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="model output shape"):
        training_loss(lambda x, t: x[:, :, :1], x0, None, s, "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        training_loss(model, x0, None, s, "x0")
    with pytest.raises(TypeError, match="cond must be a dict"):
        training_loss(model, x0, [1], s, "epsilon")
