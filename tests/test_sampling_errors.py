"""The sampling entry point: bad input gets a clear error; callbacks and progress behave."""

from __future__ import annotations

import pytest
import torch

from imagine.samplers import resolve_sampler, sampler_names
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config("scaled_linear")
SHAPE = (2, 1, 4, 4)


def model(x, t, **cond):
    return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1)


def run(**kw):
    args = dict(schedule=SCHEDULE, sampler="ddim", steps=4, seeds=0, progress=False)
    args.update(kw)
    return sample(kw.pop("model", model), SHAPE, **{k: v for k, v in args.items() if k != "model"})


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+ 9M'") as e:
        run(sampler="dpm++ 9M")
    for name in sampler_names():
        assert name in str(e.value)
    with pytest.raises(TypeError, match="sampler must be a name"):
        run(sampler=3)


def test_registry_names_and_aliases():
    assert sampler_names() == ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_sde", "dpmpp_3m",
                               "dpmpp_3m_sde", "unipc", "euler", "euler_a", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2s_a",
                               "plms", "lcm", "restart", "dpm_fast", "dpm_adaptive", "ddim_cfgpp", "euler_cfgpp",
                               "euler_a_cfgpp", "ipndm", "ipndm_v", "deis", "heunpp2", "res_multistep",
                               "res_multistep_a", "res_multistep_cfgpp", "res_multistep_a_cfgpp", "gradient_estimation",
                               "gradient_estimation_cfgpp", "dpmpp_2m_cfgpp", "dpmpp_2s_a_cfgpp", "er_sde",
                               "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]
    for alias, (name, karras) in {"DPM++ 2M": ("dpmpp_2m", False), "DPM++ 2M Karras": ("dpmpp_2m", True),
                                  "Euler a": ("euler_a", False), "Euler": ("euler", False), "Heun": ("heun", False),
                                  "DDIM": ("ddim", False), "DDPM": ("ddpm", False), "k_euler": ("euler", False),
                                  "k_euler_a": ("euler_a", False), "DPM++ 2M SDE": ("dpmpp_2m_sde", False),
                                  "EulerDiscreteScheduler": ("euler", False), "sde-dpmsolver++": ("dpmpp_2m_sde", False),
                                  "UniPC": ("unipc", False), "DPM++ 3M Karras": ("dpmpp_3m", True),
                                  "UniPCMultistepScheduler": ("unipc", False), "DPM++ 3M SDE": ("dpmpp_3m_sde", False),
                                  "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", True)}.items():
        got = resolve_sampler(alias)
        assert (got[0], got[2]) == (name, karras), alias


def test_sampler_options_checked():
    expected = "sampler 'unipc' takes no option 'solver_order'; its options: order, variant, floor"
    with pytest.raises(ValueError, match=expected):
        run(sampler="unipc", sampler_options={"solver_order": 3})
    with pytest.raises(ValueError, match="UniPC order must be an integer from 1 to 4"):
        run(sampler="unipc", sampler_options={"order": 7})
    with pytest.raises(ValueError, match="sigma_schedule must be one of"):
        run(sampler="euler", sigma_schedule="cosine")


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and the 1000 training timesteps"):
        run(steps=steps)
    with pytest.raises(TypeError, match="steps must be an integer"):
        run(steps=4.0)


def test_nan_from_the_model_names_the_step():
    calls = []

    def bad(x, t, **cond):
        calls.append(1)
        out = model(x, t)
        return out * float("nan") if len(calls) == 3 else out

    with pytest.raises(FloatingPointError, match=r"NaN or inf at step 3 of 4 \(t = 250\)"):
        run(model=bad, steps=4)


def test_model_output_shape_is_checked():
    with pytest.raises(ValueError, match=r"returned shape \(2, 1, 2, 2\) for input \(2, 1, 4, 4\)"):
        run(model=lambda x, t: x[..., :2, :2])


def test_cond_batch_must_match():
    ctx = {"context": torch.zeros(3, 7, 8)}
    with pytest.raises(ValueError, match=r"cond\['context'\] has shape \(3, 7, 8\), but the batch has 2 samples"):
        run(cond=ctx)
    with pytest.raises(ValueError, match=r"uncond\['context'\].*batch has 2"):
        run(cond={"context": torch.zeros(2, 7, 8)}, uncond=ctx, guidance_scale=5.0)
    # texts of different lengths cannot be one batch: the model sees the uncond and the cond apart
    seen = []
    run(model=lambda x, t, context: (seen.append(tuple(context.shape)), x)[1], cond={"context": torch.zeros(2, 7, 8)},
        uncond={"context": torch.zeros(2, 5, 8)}, guidance_scale=5.0)
    assert seen[:2] == [(2, 5, 8), (2, 7, 8)]
    from imagine.guidance import concat_cond

    with pytest.raises(ValueError, match="differ beyond the batch dimension"):
        concat_cond({"context": torch.zeros(2, 5, 8)}, {"context": torch.zeros(2, 7, 8)})
    with pytest.raises(ValueError, match="differ beyond the batch dimension"):  # another width: a mistake, said
        run(model=lambda x, t, context: x, cond={"context": torch.zeros(2, 7, 8)},
            uncond={"context": torch.zeros(2, 7, 6)}, guidance_scale=5.0)
    with pytest.raises(ValueError, match="same keys"):
        run(model=lambda x, t, **c: x, cond={"context": torch.zeros(2, 7, 8)},
            uncond={"context": torch.zeros(2, 7, 8), "mask": torch.ones(2, 7)}, guidance_scale=5.0)
    with pytest.raises(TypeError, match="cond must be a dict"):
        run(cond=torch.zeros(2, 7, 8))


def test_guidance_needs_uncond():
    with pytest.raises(ValueError, match="guidance_scale=7.5 needs uncond"):
        run(cond={"context": torch.zeros(2, 7, 8)}, guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"guidance_rescale .* must be in \[0, 1\]"):
        run(guidance_rescale=1.5)
    run(cond={}, guidance_scale=1.0)  # fine: no guidance


def test_other_bad_settings():
    with pytest.raises(ValueError, match="thresholding must be one of"):
        run(thresholding="soft")
    with pytest.raises(ValueError, match="seeds for a batch of 2"):
        run(seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="give seeds or generator, not both"):
        run(generator=torch.Generator())
    with pytest.raises(ValueError, match="deterministic and takes no eta"):
        run(sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="eta for ddim must be"):
        run(eta=-1.0)
    with pytest.raises(ValueError, match="only exists for the ddpm sampler, not 'euler'"):
        run(sampler="euler", classifier=lambda x, t: x.sum((1, 2, 3)), classifier_scale=1.0,
            classifier_guidance_form="mean")
    with pytest.raises(ValueError, match="classifier_scale=1.0 needs a classifier"):
        run(classifier_scale=1.0)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        run(timestep_spacing="middle")
    with pytest.raises(ValueError, match="final_step must be"):
        run(final_step="rk4")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        run(schedule={"kind": "linear"})
    with pytest.raises(ValueError, match="shape must be a tuple of positive ints"):
        sample(model, (4,), schedule=SCHEDULE, sampler="ddim", steps=4, progress=False)


def test_epsilon_at_zero_terminal_snr_is_refused():
    z = NoiseSchedule.from_config("scaled_linear", zero_terminal_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="epsilon-predicting model cannot denoise at zero terminal SNR"):
        run(schedule=z, prediction_type="epsilon")
    out = run(schedule=z, prediction_type="v_prediction")
    assert torch.isfinite(out).all()


def test_callback_contract_and_interrupt():
    seen = []
    run(sampler="heun", steps=3, callback=seen.append)
    assert [d["step"] for d in seen] == [0, 1, 2] and {d["total"] for d in seen} == {3}
    assert set(seen[0]) == {"step", "total", "t", "sigma", "x", "denoised"}
    assert seen[0]["x"].shape == SHAPE and seen[0]["denoised"].shape == SHAPE
    assert seen[0]["sigma"] > seen[1]["sigma"] > seen[2]["sigma"] > 0

    class Stop(Exception):
        pass

    calls = []

    def stop_at_2(d):
        calls.append(d["step"])
        if d["step"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(sampler="euler_a", steps=10, callback=stop_at_2)
    assert calls == [0, 1]


def test_progress_bar_can_be_turned_off(capsys):
    run(progress=False)
    assert capsys.readouterr().err == ""
    run(progress=True)
    assert "ddim" in capsys.readouterr().err


def test_explicit_start_noise_and_final_step():
    # unit noise given as a tensor is scaled like the seeded draws (diffusers' `latents=`)
    z = torch.cat([torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    for sampler, spacing in (("ddim", "leading"), ("euler", "linspace"), ("euler", "leading")):
        a = sample(model, z, schedule=SCHEDULE, sampler=sampler, steps=4, timestep_spacing=spacing, progress=False)
        assert torch.equal(a, run(sampler=sampler, seeds=[3, 4], timestep_spacing=spacing))
        assert torch.equal(a, run(sampler=sampler, seeds=None, timestep_spacing=spacing,
                                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)]))
    h = run(sampler="dpmpp_2m", final_step="heun")
    e = run(sampler="dpmpp_2m")
    assert torch.isfinite(h).all() and not torch.equal(h, e)
    sd = NoiseSchedule.from_config("scaled_linear", set_alpha_to_one=False)
    with pytest.raises(ValueError, match="final_step='heun' needs a plan that ends at sigma = 0"):
        run(schedule=sd, final_step="heun")
