"""DPM fast and DPM adaptive (Lu et al. 2022, DPM-Solver: singlestep, fixed and adaptive steps) against the closed-form
probability-flow ODE of Gaussian data, and their contracts: model calls, the span they integrate, eta, the errors.
(Their parity with k-diffusion's sample_dpm_fast / sample_dpm_adaptive as A1111 runs them: tests/test_k_diffusion.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from test_samplers_a1111 import _gaussian
from test_samplers_parity import SHAPE, config, make_model, run_ours

from imagine.bench.samplers import ExactModel
from imagine.samplers import SAMPLERS
from imagine.sampling import Denoiser, sample
from imagine.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_run(sampler: str, steps: int, **options):
    """(ours at the plan's last level above 0 in VE terms, the exact ODE solution there, model calls) from x_T at the
    plan's first level, for x_0 ~ N(mu, diag(var)): x_VE(sigma) - mu = (x_VE(sigma_max) - mu) sqrt((var + sigma^2) /
    (var + sigma_max^2)). Levels over the model's range, float64."""
    gauss, mu, var = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    plan = schedule.plan(steps, rule="karras", sigma_schedule="karras", sigma_range="model")
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    denoise = Denoiser(ExactModel(gauss, schedule), plan, "epsilon", schedule=schedule)
    out = SAMPLERS[sampler](denoise, x_T, plan, progress=False, **options)
    s_max, s_min = float(plan.sigmas[0]), float(plan.sigmas[-2])
    exact = mu + (x_T * math.sqrt(1 + s_max**2) - mu) * ((var + s_min**2) / (var + s_max**2)).sqrt()
    return out, exact, denoise.calls


def _fast_error(steps: int) -> float:
    out, exact, _ = _exact_run("dpm_fast", steps)
    return float((out - exact).abs().max())


def test_dpm_fast_is_third_order_on_the_exact_ode():
    """K = 3m - 1 model calls make m steps even in lambda, of orders 3, ..., 3, 2: doubling m divides the error by ~8
    (measured 11.4, 10.0, 9.2, 9.0 from m = 5 to 80, falling to 8 from above), while K = 3m (orders 3, ..., 3, 2, 1:
    a DDIM step last) is 2nd order (3.9, 4.0 from m = 20 to 80)."""
    errs = [_fast_error(3 * m - 1) for m in (10, 20, 40)]
    assert errs[-1] < 1e-4, errs
    for a, b in zip(errs, errs[1:]):
        assert 7.0 < a / b < 11.0, (errs, [a / b for a, b in zip(errs, errs[1:])])
    errs = [_fast_error(3 * m) for m in (20, 40)]
    assert 3.0 < errs[0] / errs[1] < 5.0, errs


@pytest.mark.parametrize("steps", [2, 3, 4, 5, 6, 7, 20])
def test_dpm_fast_takes_one_model_call_a_step(steps):
    out, exact, calls = _exact_run("dpm_fast", steps)
    assert calls == steps
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_meets_its_tolerance(order):
    """DPM-Solver-12 / -23: a tighter rtol and atol give a smaller error for more model calls. Measured, max error
    (model calls) at the defaults (rtol 0.05, atol 0.0078), 1e-3 and 1e-4: order 2 0.29 (23), 6.6e-3 (66), 6.3e-4
    (187); order 3 0.13 (28), 1.0e-2 (40), 1.0e-3 (69): the error follows the tolerance."""
    loose = _exact_run("dpm_adaptive", 10, order=order, rtol=0.05, atol=0.0078)
    tight = _exact_run("dpm_adaptive", 10, order=order, rtol=1e-4, atol=1e-4)
    err_loose, err_tight = (float((o - e).abs().max()) for o, e, _ in (loose, tight))
    assert err_tight < 2e-3 and err_tight < err_loose / 50, (err_loose, err_tight)
    assert tight[2] > loose[2] > 2


def test_dpm_adaptive_ignores_the_plans_inner_levels():
    """Only the plan's ends matter: 10 and 30 Karras steps over the same range give the same run."""
    a, _, calls_a = _exact_run("dpm_adaptive", 10)
    b, _, calls_b = _exact_run("dpm_adaptive", 30)
    assert calls_a == calls_b and torch.equal(a, b)


def test_eta_adds_noise_and_stops_at_the_last_level():
    """With eta the result differs from the ODE's, by noise drawn from the samples' own generators (same seeds, same
    result); the last step adds none (the noise fills up to the next level, and the last is the end)."""
    cfg = config("scaled_linear", "leading", "epsilon")
    for sampler in ("dpm_fast", "dpm_adaptive"):
        ode = run_ours(cfg, sampler, sigma_range="model", start="sigma_max")
        sde = run_ours(cfg, sampler, eta=1.0, sigma_range="model", start="sigma_max")
        again = run_ours(cfg, sampler, eta=1.0, sigma_range="model", start="sigma_max")
        assert torch.equal(sde, again) and float((sde - ode).abs().max()) > 1e-2


def test_same_seed_same_sample_at_any_batch_size():
    import test_samplers_parity as parity

    parity.test_same_seed_same_sample_at_any_batch_size("dpm_fast")


def test_errors_name_the_problem():
    cfg = config("scaled_linear", "leading", "epsilon")
    for sampler in ("dpm_fast", "dpm_adaptive"):
        with pytest.raises(ValueError, match="two different levels above 0"):
            run_ours(cfg, sampler, steps=1)
        with pytest.raises(ValueError, match="final_step='heun'"):
            run_ours(cfg, sampler, final_step="heun")
        with pytest.raises(ValueError, match="eta for"):
            run_ours(cfg, sampler, eta=-1.0)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        run_ours(cfg, "dpm_adaptive", sampler_options={"order": 1})
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        run_ours(cfg, "dpm_adaptive", sampler_options={"rtol": 0})


def test_prompt_editing_counts_dpm_fasts_model_calls():
    """As A1111's denoiser counts steps in model calls, the conditioning of call k is step k's (DPM fast makes one
    call a step: N in all)."""
    from imagine.guidance import StepConditioning

    cfg = config("scaled_linear", "leading", "epsilon")
    seen = []
    inner = make_model(cfg)

    def model(x, t, k):
        seen.append(int(k[0]))
        return inner(x, t)

    steps = 7
    cond = StepConditioning(lambda i: {"k": torch.full((SHAPE[0],), i)})
    sample(model, SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), sampler="dpm_fast", steps=steps,
           seeds=[1, 2], cond=cond, progress=False)
    assert seen == list(range(steps))
