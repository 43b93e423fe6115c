"""Noise schedules: closed forms from the papers, diffusers' tables, timestep spacing, configs."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from imagine.schedules import NoiseSchedule, karras_sigmas, spaced_timesteps

KINDS = [("linear", {}), ("scaled_linear", {}), ("squaredcos_cap_v2", {}), ("scaled_linear", {"rescale_betas_zero_snr": True}),
         ("linear", {"rescale_betas_zero_snr": True}), ("squaredcos_cap_v2", {"rescale_betas_zero_snr": True})]


def diffusers_config(kind, extra):
    b = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}[kind]
    return {"beta_schedule": kind, "beta_start": b[0], "beta_end": b[1], "num_train_timesteps": 1000, **extra}


@pytest.mark.parametrize("kind,extra", KINDS)
def test_alphas_cumprod_match_diffusers(kind, extra):
    diffusers = pytest.importorskip("diffusers")
    cfg = diffusers_config(kind, extra)
    theirs = diffusers.DDPMScheduler(**cfg).alphas_cumprod.double()
    ours = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod
    # diffusers works in float32: ~1e-7 absolute, a few 1e-6 relative after 1000 products
    assert torch.allclose(ours, theirs, rtol=2e-5, atol=1e-6), float((ours - theirs).abs().max())
    assert ours.dtype == torch.float64


def test_linear_closed_form():
    s = NoiseSchedule.from_config("linear")
    assert s.num_train_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # abar_t = prod (1 - beta_s), Ho et al. eq. 4
    assert math.isclose(s.alphas_cumprod[499].item(), float(np.prod(1 - s.betas[:500].numpy())), rel_tol=1e-12)
    s = NoiseSchedule.from_config("linear", num_train_timesteps=10, beta_start=0.1, beta_end=0.5)
    assert torch.allclose(s.betas, torch.linspace(0.1, 0.5, 10, dtype=torch.float64))


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = NoiseSchedule.from_config("scaled_linear")
    r = s.betas.sqrt()
    assert r[0].item() == pytest.approx(0.00085**0.5) and r[-1].item() == pytest.approx(0.012**0.5)
    assert torch.allclose(r.diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64))


def test_cosine_closed_form():
    s = NoiseSchedule.from_config("cosine")
    T, off = 1000, 0.008
    f = lambda u: math.cos((u + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    uncapped = s.betas < 0.999
    # Nichol & Dhariwal eq. 17: abar_t = f(t)/f(0) wherever no beta was capped before t
    first_cap = int(torch.nonzero(~uncapped)[0]) if (~uncapped).any() else T
    for t in (0, 100, 500, 900, first_cap - 1):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # the cap
    assert NoiseSchedule.from_config("squaredcos_cap_v2").betas.equal(s.betas)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind):
    base = NoiseSchedule.from_config(kind)
    z = NoiseSchedule.from_config(kind, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0  # Lin et al. 2023: SNR(T) = 0
    assert z.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    # sqrt(abar) is an affine map of the old one (Algorithm 1: shift then scale)
    x, y = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    slope = (y[0] - y[-1]) / (x[0] - x[-1])
    assert torch.allclose(y, y[-1] + slope * (x - x[-1]), atol=1e-12)
    assert math.isinf(z.sigmas[-1].item())


def test_sigmas_snr():
    s = NoiseSchedule.from_config("scaled_linear")
    a = s.alphas_cumprod
    assert torch.allclose(s.sigmas, ((1 - a) / a).sqrt())
    assert torch.allclose(s.snr, 1 / s.sigmas**2)
    assert s.sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)  # SD's sigma_max, as k-diffusion reports it


def test_karras_sigmas_eq5():
    sig = karras_sigmas(0.03, 14.6, 10)
    assert sig[0] == pytest.approx(14.6) and sig[-1] == pytest.approx(0.03)
    assert np.all(np.diff(sig) < 0)
    i = 3
    expect = (14.6 ** (1 / 7) + i / 9 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert sig[i] == pytest.approx(expect)
    # rho = 1 is linear spacing
    assert np.allclose(karras_sigmas(1.0, 10.0, 10, rho=1.0), np.linspace(10, 1, 10))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 61])
def test_timesteps_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    offset = 1 if spacing == "leading" else 0
    cfg = {"timestep_spacing": spacing, "steps_offset": offset}
    for cls, rule in [(diffusers.DDIMScheduler, "ddim"), (diffusers.EulerDiscreteScheduler, "karras"),
                      (diffusers.DPMSolverMultistepScheduler, "dpm_solver")]:
        d = cls(**cfg)
        d.set_timesteps(steps)
        ours = spaced_timesteps(1000, steps, spacing, offset, rule)
        theirs = d.timesteps.double().numpy()
        if spacing == "trailing" and steps == 61:
            # np.arange(1000, 0, -1000/61) has 62 points: diffusers runs a 62nd step at t = -1; we do not
            assert len(theirs) == 62 and theirs[-1] == -1
            theirs = theirs[:-1]
        assert len(ours) == steps
        assert np.allclose(ours, theirs, atol=1e-3), (cls.__name__, ours[:5], theirs[:5])


def test_plan_ends():
    s = NoiseSchedule.from_config("scaled_linear", set_alpha_to_one=False, steps_offset=1)
    p = s.plan(10, rule="ddim")
    assert p.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert p.alphas_cumprod[-1].item() == pytest.approx(s.alphas_cumprod[0].item())  # DDIM ends at abar_0
    assert s.plan(10, rule="ddpm").alphas_cumprod[-1].item() == 1.0
    for rule in ("karras", "dpm_solver"):
        p = s.plan(10, rule=rule, karras=True)
        assert p.sigmas[-1].item() == 0.0 and len(p) == 10
        assert torch.all(p.sigmas[:-1].diff() < 0)
    # with Karras sigmas the model's (fractional) t sits where the schedule has that sigma
    p = s.plan(10, rule="karras", karras=True)
    assert np.allclose(s.t_to_sigma(p.timesteps.numpy()), p.sigmas[:-1].numpy(), rtol=1e-9)
    assert np.allclose(s.sigma_to_t(s.t_to_sigma([0.0, 3.5, 500.25, 999.0])), [0.0, 3.5, 500.25, 999.0])


def test_config_round_trip_and_diffusers_loads_ours():
    s = NoiseSchedule.from_config("scaled_linear", zero_terminal_snr=True, prediction_type="v_prediction",
                                  timestep_spacing="trailing")
    cfg = s.to_config()
    json.dumps(cfg)  # it goes to scheduler/config.json
    assert "_imagine_version" in cfg
    back = NoiseSchedule.from_diffusers_config(json.loads(json.dumps(cfg)))
    assert torch.equal(back.alphas_cumprod, s.alphas_cumprod)
    assert (back.prediction_type, back.timestep_spacing, back.zero_terminal_snr) == ("v_prediction", "trailing", True)
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = diffusers.DDIMScheduler.from_config(cfg)
    assert torch.allclose(d.alphas_cumprod.double(), s.alphas_cumprod, atol=1e-6)
    assert d.config.prediction_type == "v_prediction" and d.config.timestep_spacing == "trailing"
    custom = NoiseSchedule.from_config("custom", trained_betas=[0.1, 0.2, 0.3])
    assert torch.equal(NoiseSchedule.from_diffusers_config(custom.to_config()).betas, custom.betas)
    cos = NoiseSchedule.from_config("cosine")
    assert torch.equal(NoiseSchedule.from_diffusers_config(cos.to_config()).betas, cos.betas)


def test_stable_diffusion_scheduler_config():
    # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDMScheduler's keys)
    cfg = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
           "clip_sample": False}
    s = NoiseSchedule.from_diffusers_config(cfg)
    assert (s.kind, s.steps_offset, s.set_alpha_to_one, s.timestep_spacing) == ("scaled_linear", 1, False, "leading")
    assert s.final_alpha_cumprod == pytest.approx(s.alphas_cumprod[0].item())


def test_bad_configs():
    with pytest.raises(ValueError, match="sigmoid.*valid"):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule.from_config("quadratic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule.from_config("linear", timestep_spacing="middle")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config("linear", prediction_type="noise")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule.from_config("linear", num_train_timesteps=0)
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule([0.1, 1.5])
    with pytest.raises(TypeError, match="unknown settings"):
        NoiseSchedule.from_config("linear", beta_max=3)
    s = NoiseSchedule.from_config("linear")
    with pytest.raises(ValueError, match="between 1 and the 1000"):
        s.plan(0)
    with pytest.raises(ValueError, match="between 1 and the 1000"):
        s.plan(1001)
