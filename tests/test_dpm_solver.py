"""DPM fast and DPM adaptive (Lu et al. 2022, DPM-Solver: singlestep, fixed and adaptive steps) against the closed-form
probability-flow ODE of Gaussian data, and their contracts: model calls, the span they integrate, eta, the errors.
(Their parity with k-diffusion's sample_dpm_fast / sample_dpm_adaptive as A1111 runs them: tests/test_k_diffusion.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from test_samplers_a1111 import _gaussian
from test_samplers_parity import SHAPE, STEPS, config, make_model, run_ours

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


def test_eta_adds_noise_from_the_samples_generators():
    """With eta the result differs from the ODE's, by noise drawn from the samples' own generators (same seeds, same
    result)."""
    cfg = config("scaled_linear", "leading", "epsilon")
    for sampler in ("dpm_fast", "dpm_adaptive"):
        ode = run_ours(cfg, sampler, sigma_range="model", start="sigma_max")
        sde = run_ours(cfg, sampler, eta=1.0, sigma_range="model", start="sigma_max")
        again = run_ours(cfg, sampler, eta=1.0, sigma_range="model", start="sigma_max")
        assert torch.equal(sde, again) and float((sde - ode).abs().max()) > 1e-2


class _Draws:
    """Injected noise: fixed draws in order, the last one replaced by `last` (to see whether it is used)."""

    def __init__(self, n: int, last: float):
        g = torch.Generator().manual_seed(5)
        self.z = [torch.randn(64, 4, generator=g, dtype=torch.float64) for _ in range(n - 1)]
        self.last, self.used = last, 0

    def __call__(self, like):
        self.used += 1
        return self.z[self.used - 1] if self.used <= len(self.z) else torch.full_like(like, self.last)


def test_dpm_fasts_last_step_adds_no_noise():
    """Each step's noise fills up to the next level; the last level is the end, so the last step's draw (made, as
    k-diffusion makes it) has weight 0: a huge last draw changes nothing."""
    gauss, _, _ = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    plan = schedule.plan(8, rule="karras", sigma_schedule="karras", sigma_range="model")
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for last in (0.0, 1e6):
        draws = _Draws(3, last)  # (8 calls: steps of orders 3, 3, 2)
        denoise = Denoiser(ExactModel(gauss, schedule), plan, "epsilon", schedule=schedule)
        outs.append(SAMPLERS["dpm_fast"](denoise, x_T, plan, noise=draws, eta=1.0, progress=False))
        assert draws.used == 3
    assert torch.equal(outs[0], outs[1])


def test_same_seed_same_sample_at_any_batch_size():
    """DPM fast with its ancestral noise (eta 1): a seed's image is the same alone or in a batch (DPM adaptive's is
    not, by design: its steps follow the batch's error)."""
    cfg = config("scaled_linear", "leading", "epsilon")
    kw = dict(eta=1.0, sigma_range="model", start="sigma_max")
    both = run_ours(cfg, "dpm_fast", seeds=[7, 8], **kw)
    alone = sample(make_model(cfg), (1, *SHAPE[1:]), schedule=NoiseSchedule.from_diffusers_config(cfg),
                   sampler="dpm_fast", steps=STEPS, seeds=8, progress=False, **kw)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


def test_ends():
    """"auto" ends at the model's sigma_min whatever the plan's last level (trailing spacing's is high: 0.22 at 20
    steps), "plan" at the plan's last level above 0, "model" spans the model's range; "auto" and "model" run a
    1-step plan (one interval), "plan" needs two levels above 0."""
    gauss, mu, var = _gaussian()
    schedule = NoiseSchedule.from_config("scaled_linear")
    table = schedule._sigma_table(held=True)
    plan = schedule.plan(20, rule="karras", spacing="trailing", steps_offset=0)
    plan = plan.tail(1)  # (from sigma 10.9, below sigma_max, as an image-to-image run starts: "model" starts higher)
    assert float(plan.sigmas[-2]) > 0.2 and float(plan.sigmas[0]) < 0.9 * float(table[-1])
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs, exact = {}, {}
    for ends in ("auto", "plan", "model"):
        denoise = Denoiser(ExactModel(gauss, schedule), plan, "epsilon", schedule=schedule)
        outs[ends] = SAMPLERS["dpm_fast"](denoise, x_T, plan, ends=ends, progress=False)
        s0 = float(table[-1]) if ends == "model" else float(plan.sigmas[0])
        s1 = float(plan.sigmas[-2]) if ends == "plan" else float(table[0])
        exact[ends] = mu + (x_T * math.sqrt(1 + float(plan.sigmas[0]) ** 2) - mu) * ((var + s1**2) / (var + s0**2)).sqrt()
    # each run is the ODE's solution between its own ends (19 calls, the last a DDIM step: measured 0.011, 0.048
    # and 0.009 from its own, 0.30 and more from the others')
    for ends, out in outs.items():
        own = float((out - exact[ends]).abs().max())
        assert own < 0.06, (ends, own)
        for other in exact:
            if other != ends:
                assert float((out - exact[other]).abs().max()) > 0.25, (ends, other)
    one = schedule.plan(1, rule="karras", sigma_schedule="karras", sigma_range="model")
    for ends in ("auto", "model"):
        denoise = Denoiser(ExactModel(gauss, schedule), one, "epsilon", schedule=schedule)
        assert torch.isfinite(SAMPLERS["dpm_fast"](denoise, x_T, one, ends=ends, progress=False)).all()
    with pytest.raises(ValueError, match="two different levels above 0"):
        SAMPLERS["dpm_fast"](Denoiser(ExactModel(gauss, schedule), one, "epsilon", schedule=schedule), x_T, one,
                             ends="plan", progress=False)


def test_errors_name_the_problem():
    cfg = config("scaled_linear", "leading", "epsilon")
    for sampler in ("dpm_fast", "dpm_adaptive"):
        with pytest.raises(ValueError, match="two different levels above 0"):
            run_ours(cfg, sampler, steps=1, sampler_options={"ends": "plan"})
        with pytest.raises(ValueError, match="ends must be one of"):
            run_ours(cfg, sampler, sampler_options={"ends": "zero"})
        with pytest.raises(ValueError, match="final_step='heun'"):
            run_ours(cfg, sampler, final_step="heun")
        with pytest.raises(ValueError, match="eta for"):
            run_ours(cfg, sampler, eta=-1.0)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        run_ours(cfg, "dpm_adaptive", sampler_options={"order": 1})
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        run_ours(cfg, "dpm_adaptive", sampler_options={"rtol": 0})
    with pytest.raises(ValueError, match="calls .* must be a positive int"):
        run_ours(cfg, "dpm_fast", sampler_options={"calls": 0})


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


def test_the_server_does_not_merge_dpm_adaptive_requests():
    """The worker batches queued requests with equal settings; DPM adaptive's steps follow the batch's error, so its
    requests run alone (an image would otherwise depend on whoever else was queued)."""
    from imagine.server.worker import Job, ModelWorker, Settings

    worker = ModelWorker(pipe=None, max_batch=8)
    for sampler, together in (("euler", 2), ("DPM adaptive", 1), ("dpm_fast", 2)):
        settings = Settings(height=16, width=16, steps=4, sampler=sampler, guidance_scale=3.0)
        worker._pending.extend(Job(prompts=["a"], negative_prompts=[None], seeds=[i], settings=settings)
                               for i in range(2))
        assert len(worker._take_batch()) == together, sampler
        worker._pending.clear()


def test_the_server_runs_dpm_adaptive_in_a1111s_batches():
    """A1111 runs each n_iter round as its own batch of batch_size; DPM adaptive's images depend on their batch, so
    the worker samples a DPM adaptive request in chunks of its batch_size (others in chunks of max_batch)."""
    from imagine.server.worker import Job, ModelWorker, Settings

    class Pipe:
        sizes = []

        def generate(self, prompts, negatives, **kw):
            Pipe.sizes.append(len(prompts))
            raise RuntimeError("stop")  # (the chunk sizes are what this test reads)

    for sampler, want in (("DPM adaptive", 2), ("euler", 6)):
        Pipe.sizes.clear()
        worker = ModelWorker(pipe=Pipe(), max_batch=8)
        settings = Settings(height=16, width=16, steps=4, sampler=sampler, guidance_scale=3.0)
        job = Job(prompts=["a"] * 6, negative_prompts=[None] * 6, seeds=list(range(6)), settings=settings,
                  batch_size=2)
        try:
            worker._run_batch([job])
        except RuntimeError:
            pass
        assert Pipe.sizes[:1] == [want], (sampler, Pipe.sizes)
