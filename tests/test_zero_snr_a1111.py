"""AUTOMATIC1111's "Zero Terminal SNR" noise schedule (its sd_noise_schedule option; NoiseSchedule.a1111_zero_terminal_snr,
generate(zero_terminal_snr=True), --zero-terminal-snr, the A1111 API's override_settings, the infotext's "Noise
Schedule").

Checked: the rescaled alphas_cumprod against A1111's rescale_zero_terminal_snr_abar restated (float32 sqrt, shift,
scale, square, the last set to 4.8973451890853435e-08) bit for bit; k-diffusion's samplers as A1111 runs them over a
model holding those alphas_cumprod, eps and v, against sample() over the rescaled schedule; the CLI's picture made again
from its infotext, and the API's equal to the pipeline's.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from test_k_diffusion import CONFIGS, _run_a1111, kd  # noqa: F401 (kd: the fixture)
from test_loading import save_diffusers_folder
from test_samplers_parity import SEEDS, SHAPE, make_model

from imagine.samplers import a1111_settings
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have:UserWarning")]


def a1111_rescale(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's rescale_zero_terminal_snr_abar (modules/sd_models.py), on its float32 alphas_cumprod."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    abar = root ** 2
    abar[-1] = 4.8973451890853435e-08
    return abar


@pytest.mark.parametrize("cfg", CONFIGS, ids=["eps", "v"])
def test_the_schedule_is_a1111s(cfg):
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    rescaled = schedule.a1111_zero_terminal_snr()
    want = a1111_rescale(schedule.alphas_cumprod.float())
    assert torch.equal(rescaled.alphas_cumprod.float(), want)
    assert rescaled.alphas_cumprod[0] == schedule.alphas_cumprod.float()[0].double()
    assert abs(float(rescaled.sigmas[-1]) - 4518.76) < 0.01 and rescaled.prediction_type == schedule.prediction_type
    again = NoiseSchedule.from_diffusers_config(rescaled.to_config())  # (its betas kept: trained_betas)
    assert torch.equal(again.alphas_cumprod, rescaled.alphas_cumprod)
    # DDPM's linear betas rescaled fall under A1111's last abar before the end: refused, named
    with pytest.raises(ValueError, match="second-last timestep, under A1111's last"):
        NoiseSchedule.from_config("linear").a1111_zero_terminal_snr()


class RescaledModel:
    """What k-diffusion's CompVisDenoiser wraps in A1111 under its Zero Terminal SNR option: the model with its
    alphas_cumprod rescaled (A1111's apply_alpha_schedule_override)."""

    def __init__(self, cfg):
        self.model = make_model(cfg)
        self.alphas_cumprod = a1111_rescale(NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float())

    def apply_model(self, x, t, cond=None):
        return self.model(x, t)


# (v-prediction, the kind zero-terminal-SNR models are: an eps model's x_0 at the last level divides by
# sqrt(abar_T) = 2.2e-4 and so multiplies float32's rounding by 4500; Heun is left out, as k-diffusion's float32 Heun
# step from sigma 4519 cancels catastrophically, ~1e-2 of rounding in its own result)
@pytest.mark.parametrize("label", ["Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DPM2", "DPM++ 2M SDE"])
def test_samplers_equal_a1111s_over_the_rescaled_schedule(kd, label):
    cfg, steps = CONFIGS[1], 8
    theirs, _ = _run_a1111(kd, cfg, label, steps, inner=RescaledModel(cfg))
    schedule = NoiseSchedule.from_diffusers_config(cfg).a1111_zero_terminal_snr()
    ours = sample(make_model(cfg), SHAPE, schedule=schedule, steps=steps, seeds=SEEDS, progress=False,
                  **a1111_settings(label))
    err = (ours.float() - theirs).abs().max().item()
    assert err < 1e-4, f"{label}: max |ours - A1111's| = {err:.2e}"
    plain = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps,
                   seeds=SEEDS, progress=False, **a1111_settings(label))
    assert (plain - ours).abs().max() > 0.05  # (the option moves the picture)


# a small run as the A1111 API makes it (Euler a under A1111's rules, its prompt syntax read), for the pipeline's side
SMALL_RUN = dict(steps=4, height=16, width=16, guidance_scale=5.0, seed=5, progress=False)
A1111_API_RUN = {**a1111_settings("Euler a"), "emphasis": True, "long_prompts": True, "prompt_editing": True,
                 "composable": True}


def tiny_sd1(tmp_path_factory, **kw):
    """A tiny random SD-1-shaped pipeline (DDIM's scheduler config), `kw` for save_diffusers_folder."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    save_diffusers_folder(folder, "sd1", scheduler="ddim", **kw)
    return TextToImagePipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd1(tmp_path_factory, prediction_type="v_prediction")


def test_the_cli_and_the_a1111_api_follow(pipe, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    kw, api = SMALL_RUN, A1111_API_RUN
    want = pipe.generate("a red circle", zero_terminal_snr=True, **kw, **api)
    assert want.parameters["zero_terminal_snr"] is True
    plain = pipe.generate("a red circle", **kw, **api).images[0]
    assert want.images[0].tobytes() != plain.tobytes()
    body = {"prompt": "a red circle", "steps": 4, "cfg_scale": 5, "width": 16, "height": 16, "seed": 5,
            "sampler_name": "Euler a"}
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img",
                       json={**body, "override_settings": {"sd_noise_schedule": "Zero Terminal SNR"}}, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.images[0].convert("RGB").tobytes()
        assert "Noise Schedule: Zero Terminal SNR" in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_noise_schedule": "ztsnr"}},
                       timeout=60)
        assert r.status_code == 422 and "sd_noise_schedule must be one of Default, Zero Terminal SNR" in r.text
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    for args in (["a red circle", "--zero-terminal-snr", "--a1111-sampling", "--sampler", "Euler a", "--seed", "5",
                  "--steps", "4", "--guidance-scale", "5", "--height", "16", "--width", "16", "-o", str(first)],
                 ["--infotext", str(first), "-o", str(again)]):
        assert main(["generate", "--model", pipe.c.source, *args, "-q"]) == 0, capsys.readouterr().err
    a, b = Image.open(first), Image.open(again)
    assert "Noise Schedule: Zero Terminal SNR" in a.text["parameters"]
    assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
