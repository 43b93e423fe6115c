"""Learned variances (Nichol & Dhariwal 2021, Improved DDPM eq. 15; the models of GLIDE, unCLIP's decoder and
DeepFloyd IF): a U-Net with twice the channels out whose extra channels interpolate the log variance between beta_tilde
and beta. DDPM with variance_type "learned_range" against diffusers' DDPMScheduler stepping the same model under
classifier-free guidance as diffusers' IF and unCLIP pipelines run it (the prediction guided, the variance the
conditional pass's)."""

from __future__ import annotations

import warnings

import pytest
import torch

from test_samplers_parity import NET, SEEDS, SHAPE, check, config, make_model

diffusers = pytest.importorskip("diffusers")

from imagine.guidance import guided_model_output  # noqa: E402
from imagine.sampling import sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_variance(cfg):
    """make_model's eps (or v) prediction, moved by the condition y, beside a variance channel v in [-1, 1] that
    depends on x, t and y."""
    base = make_model(cfg)

    def model(x, t, y):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        y = y.view(-1, 1, 1, 1)
        pred = base(x, t) + 0.2 * y
        v = torch.tanh(0.8 * NET(x * 0.5, t + 7.0) + 0.5 * y - 0.1)
        return torch.cat([pred, v], dim=1)

    return model


Y_COND, Y_UNCOND = torch.tensor([0.7, -0.4]), torch.tensor([0.0, 0.0])


def run_diffusers_learned(cfg, steps, scale):
    scheduler = diffusers.DDPMScheduler(**cfg, clip_sample=False)
    assert scheduler.config.variance_type == "learned_range"
    model = model_with_variance(cfg)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    scheduler.set_timesteps(steps)
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    c = SHAPE[1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            uncond, cond = model(x, t, Y_UNCOND), model(x, t, Y_COND)
            guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])  # (diffusers' IFPipeline's rule)
            x = scheduler.step(torch.cat([guided, cond[:, c:]], dim=1), t, x, generator=gens).prev_sample
    return x


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])  # (cosine: abar_T 2e-9 blows the toy eps up)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,scale", [(5, 1.0), (10, 4.0)])
def test_ddpm_learned_range_is_diffusers(kind, spacing, pred, steps, scale):
    # (offset 0: the run ends at t = 0, where Ho et al. add no noise; see test_ddpm_fixed_large)
    cfg = config(kind, spacing, pred, steps_offset=0, variance_type="learned_range")
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    assert schedule.variance_type == "learned_range"
    ours = sample(model_with_variance(cfg), SHAPE, schedule=schedule, sampler="ddpm", steps=steps, seeds=SEEDS,
                  cond={"y": Y_COND}, uncond={"y": Y_UNCOND}, guidance_scale=scale, progress=False)
    theirs = run_diffusers_learned(cfg, steps, scale)
    check(ours, theirs)
    # the learned variance matters here: the fixed posterior variance gives another sample
    fixed = NoiseSchedule.from_diffusers_config({**cfg, "variance_type": "fixed_small"})
    other = sample(model_with_variance(cfg), SHAPE, schedule=fixed, sampler="ddpm", steps=steps, seeds=SEEDS,
                   cond={"y": Y_COND}, uncond={"y": Y_UNCOND}, guidance_scale=scale, progress=False)
    assert float((other - theirs).abs().max()) > 1e-2


def test_guidance_keeps_the_conditional_variance():
    cfg = config("linear", "leading", "epsilon")
    model = model_with_variance(cfg)
    x, t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), torch.full((2,), 500.0)
    cond, uncond = model(x, t, Y_COND), model(x, t, Y_UNCOND)
    out = guided_model_output(model, x, t, {"y": Y_COND}, {"y": Y_UNCOND}, 3.0)
    c = SHAPE[1]
    torch.testing.assert_close(out[:, :c], uncond[:, :c] + 3.0 * (cond[:, :c] - uncond[:, :c]))
    torch.testing.assert_close(out[:, c:], cond[:, c:])


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_a_learned_variance_without_a_variance_output_is_refused(variance_type):
    cfg = config("linear", "leading", "epsilon", variance_type=variance_type)
    with pytest.raises(ValueError, match=f"'{variance_type}' needs a model with a learned variance"):
        sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), sampler="ddpm", steps=3,
               seeds=SEEDS, progress=False)


def test_training_a_learned_variance_model_without_vlb_weight_is_named():
    from imagine.diffusion import training_loss

    cfg = config("linear", "leading", "epsilon")
    model = model_with_variance(cfg)
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    with pytest.raises(ValueError, match=r"outputs twice x0's 2 channels: a learned variance .* hybrid loss: give "
                                         r"vlb_weight"):
        training_loss(lambda x, t: model(x, t, Y_COND), torch.zeros(SHAPE), None, schedule, "epsilon",
                      generator=torch.Generator().manual_seed(0))


def test_diffusers_log_variance_types_draw_their_variances():
    """DDPMScheduler's "fixed_small_log" draws with beta_tilde through its log (as fixed_small: against diffusers);
    "fixed_large_log" names GLIDE's max_log, log beta, which diffusers' step takes the square root of (NaN): read as
    fixed_large, the variance it names (it was read as fixed_small before)."""
    from test_samplers_parity import run_diffusers, run_ours

    cfg = config("linear", "leading", "epsilon", steps_offset=0, variance_type="fixed_small_log")
    assert NoiseSchedule.from_diffusers_config(cfg).variance_type == "fixed_small"
    check(run_ours(cfg, "ddpm"), run_diffusers(diffusers.DDPMScheduler(**cfg, clip_sample=False)))
    large = config("linear", "leading", "epsilon", steps_offset=0, variance_type="fixed_large_log")
    assert NoiseSchedule.from_diffusers_config(large).variance_type == "fixed_large"
    assert not bool(torch.isfinite(run_diffusers(diffusers.DDPMScheduler(**large, clip_sample=False))).all())
    check(run_ours(large, "ddpm"), run_diffusers(diffusers.DDPMScheduler(**{**large, "variance_type": "fixed_large"},
                                                                        clip_sample=False)))
