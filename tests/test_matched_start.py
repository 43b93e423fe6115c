"""The moment-matched start (sample(start="matched")) against closed forms: for Gaussian data the
probability-flow ODE maps x_T's z-score to x_0's, so starting from N(0, I) where q(x_T) has mean
sqrt(abar_T) mu shifts every sample by about -sqrt(v abar_T) mu; the matched start removes that."""

from __future__ import annotations

import math

import pytest
import torch

from imagine.bench.samplers import SD_CONFIG, ExactModel, GaussianMixture
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

MU, VAR, DIM, N = 3.0, 1.0, 4, 4000


def gaussian() -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=torch.float64), torch.full((1, DIM), MU, dtype=torch.float64),
                           torch.full((1, DIM), VAR, dtype=torch.float64), (DIM,), "gaussian")


@pytest.fixture(scope="module")
def sd_schedule():
    return NoiseSchedule.from_diffusers_config(SD_CONFIG)


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("unipc", {"sigma_schedule": "exponential"}),
                                             ("euler", {"karras": True})])
def test_start_error_of_an_ode_sampler_is_removed(sd_schedule, sampler, options):
    model = ExactModel(gaussian(), sd_schedule)
    first_sigma = []

    def mean_error(start):
        x = sample(model, (N, DIM), schedule=sd_schedule, sampler=sampler, steps=50, seeds=0, progress=False,
                   start=start, callback=lambda info: first_sigma.append(float(info["sigma"])), **options)
        return float(x.double().mean() - MU)

    plain, matched = mean_error("noise"), mean_error("matched")
    # q(x_T) at the sampler's first level is N(sqrt(abar) mu, abar v + 1 - abar); N(0, 1) puts each sample at
    # a z-score sqrt(abar) mu / sqrt(abar v + 1 - abar) too low, and the flow keeps z-scores: x_0 = mu + sqrt(v) z
    abar = 1.0 / (1.0 + first_sigma[0] ** 2)
    want_shift = -math.sqrt(VAR * abar) * MU / math.sqrt(abar * VAR + 1 - abar)
    # N * DIM = 16,000 values of unit std: the mean's standard error is 0.008
    assert plain == pytest.approx(want_shift, abs=0.04), (plain, want_shift)
    assert abs(matched) < 0.03, matched
    assert abs(want_shift) > 0.15


def test_matched_start_costs_no_model_call_and_keeps_seeds_per_sample(sd_schedule):
    model = ExactModel(gaussian(), sd_schedule)
    kw = dict(schedule=sd_schedule, sampler="dpmpp_2m", steps=7, progress=False, start="matched")
    batch = sample(model, (3, DIM), seeds=10, **kw)
    assert model.calls == 7
    alone = torch.cat([sample(model, (1, DIM), seeds=10 + i, **kw) for i in range(3)])
    assert torch.allclose(batch, alone, atol=1e-6)
    seen = []
    sample(model, (2, DIM), seeds=0, callback=lambda info: seen.append(info["step"]), **kw)
    assert len(seen) == 7  # every step is reported, the first included


def test_matched_start_is_the_identity_at_zero_terminal_snr():
    sched = NoiseSchedule.from_config(kind="scaled_linear", num_train_timesteps=1000, zero_terminal_snr=True,
                                      prediction_type="v_prediction")
    model = ExactModel(gaussian(), sched, prediction_type="v_prediction")
    kw = dict(schedule=sched, sampler="ddim", steps=10, seeds=3, progress=False, timestep_spacing="trailing")
    assert torch.allclose(sample(model, (4, DIM), start="matched", **kw), sample(model, (4, DIM), **kw), atol=1e-6)


def test_unknown_start_is_refused(sd_schedule):
    model = ExactModel(gaussian(), sd_schedule)
    with pytest.raises(ValueError, match="start must be one of 'noise', 'matched'"):
        sample(model, (1, DIM), schedule=sd_schedule, sampler="ddim", steps=2, progress=False, start="mean")
