"""Session 30 fixes, each against diffusers on the same tiny random weights.

1. An LCM U-Net (time_cond_proj_dim) called without timestep_cond leaves cond_proj out, as diffusers'
   TimestepEmbedding does (`if condition is not None`), instead of refusing.
2. A DDPM schedule with variance_type "learned" (the model's extra channels are the variance itself) steps as
   diffusers' DDPMScheduler(variance_type="learned") does.
"""
from __future__ import annotations

import pytest
import torch

from test_loading import TEXT_WIDTH, TINY, rel_err  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.models.unet import UNet2DConditionModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

COND_DIM = 32


@pytest.fixture(scope="module")
def lcm_unets(tmp_path_factory):
    torch.manual_seed(3)
    ref = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32,
                                         cross_attention_dim=TEXT_WIDTH, time_cond_proj_dim=COND_DIM,
                                         **TINY["sd1"]["unet"]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        ref.time_embedding.cond_proj.weight.mul_(4)  # make the code matter
    folder = tmp_path_factory.mktemp("lcm_unet")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, UNet2DConditionModel.from_pretrained(folder)


def test_lcm_unet_without_timestep_cond_is_diffusers(lcm_unets):
    """No timestep_cond: no cond_proj term (diffusers' UNet2DConditionModel runs so, e.g. a ControlNet-style or
    plain call of an LCM U-Net); with it, unchanged. Both to 1e-4 relative."""
    ref, ours = lcm_unets
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 259.0])
    ctx = torch.randn(2, 77, TEXT_WIDTH, generator=g)
    code = torch.randn(2, COND_DIM, generator=g)
    with torch.no_grad():
        want_plain = ref(x, t, ctx).sample
        want_code = ref(x, t, ctx, timestep_cond=code).sample
        got_plain = ours(x, t, context=ctx)
        got_code = ours(x, t, context=ctx, timestep_cond=code)
    assert rel_err(got_plain, want_plain) < 1e-4
    assert rel_err(got_code, want_code) < 1e-4
    assert rel_err(want_plain, want_code) > 1e-2  # the code matters, so the two checks differ


def test_lcm_unet_without_timestep_cond_guidance_batch(lcm_unets):
    """A guidance batch (x shared by two contexts) without a code is the call on x twice, as elsewhere."""
    _, ours = lcm_unets
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TEXT_WIDTH, generator=g)
    with torch.no_grad():
        shared = ours(x, torch.tensor([500.0]), context=ctx)
        twice = ours(torch.cat([x, x]), torch.tensor([500.0, 500.0]), context=ctx)
    assert rel_err(shared, twice) < 1e-5


# -- 2. DDPM with variance_type "learned" ------------------------------------------------------------------------
import warnings  # noqa: E402

from test_samplers_parity import check, config  # noqa: E402

from imagine.sampling import sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

SHAPE3, SEEDS3 = (2, 3, 6, 6), [21, 22]


def model_with_raw_variance(cfg, offset: float = 0.0):
    """A 3-channel eps / v prediction beside 3 channels of raw variance (diffusers' "learned": the variance itself,
    here in (offset, offset + 0.06), about the size of the strided betas), both depending on x and t: 6 channels.
    The prediction is that of an x_0 guess g = sqrt(abar) x + sqrt(1 - abar) h(x, t), h bounded (as
    test_samplers_parity.make_model), so that the samples stay O(1)."""
    abar_table = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float()
    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    conv.eval()

    def model(x, t, **_):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        abar = abar_table[t.round().long()].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        with torch.no_grad():
            h = conv(x) + torch.sin(t / 300.0).view(-1, 1, 1, 1)
        x0 = a * x + s * torch.tanh(h[:, :3])
        eps = (x - a * x0) / s
        pred = eps if cfg["prediction_type"] == "epsilon" else a * eps - s * x0
        var = offset + 0.03 * (1 + torch.tanh(h[:, 3:]))
        return torch.cat([pred, var], dim=1)

    return model


def run_diffusers_raw(cfg, steps, offset=0.0):
    scheduler = diffusers.DDPMScheduler(**cfg, clip_sample=False)
    assert scheduler.config.variance_type == "learned"
    model = model_with_raw_variance(cfg, offset)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS3]
    scheduler.set_timesteps(steps)
    x = torch.cat([torch.randn((1, *SHAPE3[1:]), generator=g) for g in gens])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, generator=gens).prev_sample
    return x


def run_ours_raw(cfg, steps, offset=0.0, schedule=None):
    schedule = schedule or NoiseSchedule.from_diffusers_config(cfg)
    return sample(model_with_raw_variance(cfg, offset), SHAPE3, schedule=schedule, sampler="ddpm", steps=steps,
                  seeds=SEEDS3, progress=False)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
# (offset 0 / linspace: the run ends at t = 0, where Ho et al. add no noise; diffusers adds noise of the model's
# variance on the step to x_0 when its last timestep is > 0 (trailing, leading with offset 1), which imagine does not
# copy, as for the other variance types: test_samplers_parity.test_ddpm_fixed_large)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 10])
def test_ddpm_learned_raw_variance_is_diffusers(kind, spacing, pred, steps):
    """DDPMScheduler's "learned": the second half of the channels is the variance itself (not its log), its square
    root times the noise; the first half the prediction."""
    cfg = config(kind, spacing, pred, steps_offset=0, variance_type="learned")
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    assert schedule.variance_type == "learned"
    theirs = run_diffusers_raw(cfg, steps)
    check(run_ours_raw(cfg, steps), theirs)
    # the learned variance matters: the fixed posterior variance (how "learned" was read before) gives another sample
    fixed = NoiseSchedule.from_diffusers_config({**cfg, "variance_type": "fixed_small"})
    assert float((run_ours_raw(cfg, steps, schedule=fixed) - theirs).abs().max()) > 1e-2


def test_ddpm_learned_round_trips_and_is_named():
    cfg = config("linear", "leading", "epsilon", variance_type="learned")
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    assert schedule.to_config()["variance_type"] == "learned"
    assert NoiseSchedule.from_diffusers_config(schedule.to_config()).variance_type == "learned"


def test_ddpm_learned_negative_variance_is_refused_where_diffusers_gives_nan():
    """diffusers takes the square root of a negative variance (NaN); imagine names it instead."""
    cfg = config("linear", "leading", "epsilon", steps_offset=0, variance_type="learned")
    assert not bool(torch.isfinite(run_diffusers_raw(cfg, 5, offset=-0.05)).all())
    with pytest.raises(ValueError, match="negative"):
        run_ours_raw(cfg, 5, offset=-0.05)


def test_training_refuses_the_raw_learned_variance():
    """The hybrid loss (Improved DDPM) trains "learned_range"; a "learned" schedule is named and refused."""
    from imagine.train.diffusion_task import check_diffusion_config

    with pytest.raises(ValueError, match="variance_type 'learned'.*sampled, not trained"):
        check_diffusion_config({"schedule": {"kind": "linear", "variance_type": "learned"},
                                "model": {"in_channels": 3, "out_channels": 6}})
    check_diffusion_config({"schedule": {"kind": "linear", "variance_type": "learned_range"},
                            "model": {"in_channels": 3, "out_channels": 6}})
