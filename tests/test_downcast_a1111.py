"""AUTOMATIC1111's "Downcast alphas_cumprod" (its use_downcasted_alpha_bar option, "for reproducing old seeds";
NoiseSchedule.a1111_downcast, generate(downcast_alphas_cumprod=True), --downcast-alphas-cumprod, the A1111 API's
override_settings, the infotext's "Downcast alphas_cumprod") and the options A1111's infotext reader turns on for its
older versions' pictures (images.a1111_backcompat, its infotext_versions.backcompat), among them "Old prompt editing
timelines" (generate(old_prompt_editing=True), --old-prompt-editing, override_settings use_old_scheduling).

Checked: the float16 alphas_cumprod, and the noise levels k-diffusion derives from them (its CompVisDenoiser over a
model holding float16 alphas_cumprod, as A1111's apply_alpha_schedule_override leaves it), bit for bit; k-diffusion's
samplers as A1111 runs them over that model, eps and v, against sample() over the downcast schedule; the version rule
on A1111's own version strings; the CLI's picture from an old infotext and the API's equal to the pipeline's.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from test_k_diffusion import CONFIGS, _run_a1111, kd  # noqa: F401 (kd: the fixture)
from test_samplers_parity import SEEDS, SHAPE, make_model
from test_zero_snr_a1111 import A1111_API_RUN, SMALL_RUN, tiny_sd1

from imagine.commands.generate import infotext_defaults
from imagine.images import a1111_backcompat, a1111_version, parse_a1111_parameters
from imagine.samplers import a1111_settings
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have:UserWarning")]


class DowncastModel:
    """What k-diffusion's CompVisDenoiser wraps in A1111 under "Downcast alphas_cumprod": the model with its float32
    alphas_cumprod turned to float16 (apply_alpha_schedule_override's .half())."""

    def __init__(self, cfg):
        self.model = make_model(cfg)
        self.alphas_cumprod = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float().half()

    def apply_model(self, x, t, cond=None):
        return self.model(x, t)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["eps", "v"])
def test_the_levels_are_k_diffusions_over_float16(kd, cfg):
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    down = schedule.a1111_downcast()
    inner = DowncastModel(cfg)
    assert torch.equal(down.alphas_cumprod, inner.alphas_cumprod.double()) and down.held_dtype == torch.float16
    theirs = kd.external.CompVisDenoiser(inner)
    assert theirs.sigmas.dtype == torch.float16  # (k-diffusion computes them in the dtype it is given)
    assert torch.equal(torch.from_numpy(down._sigma_table(held=True)), theirs.sigmas.double())
    assert torch.equal(down.kdiffusion_log_sigmas(), theirs.log_sigmas)
    # a level's timestep read against the float16 logs, as k-diffusion's sigma_to_t (float32 arithmetic) reads it
    sigmas = torch.tensor([0.05, 0.3, 1.0, 4.2, 14.0])
    got, want = down.sigma_to_t(sigmas.numpy()), theirs.sigma_to_t(sigmas).double().numpy()
    assert abs(got - want).max() < 1e-3
    assert abs(schedule.sigma_to_t(sigmas.numpy()) - want).max() > 0.05  # (float32 levels would put them elsewhere)
    # sigma_min rounds from 0.0292 to 0.03125: the first and last levels a Karras schedule spans move
    assert float(theirs.sigmas[0]) == 0.03125 and down.a1111_downcast() is down


def test_what_float16_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="timesteps 0 and 1 round to the same value"):
        NoiseSchedule.from_config("linear").a1111_downcast()  # (DDPM's betas of 1e-4 near abar = 1)
    down = NoiseSchedule.from_config("scaled_linear").a1111_downcast()
    with pytest.raises(ValueError, match="infinite noise level"):
        down.a1111_zero_terminal_snr()  # (A1111's rescale of a float16 abar overflows sigma_max)
    for rule, kind in (("ddim", None), ("ddpm", None), ("lcm", None), ("dpm_solver", "compvis_time_uniform")):
        with pytest.raises(ValueError, match=r"step in noise levels \(Euler.*\), not for the"):
            down.plan(10, rule=rule, sigma_schedule=kind)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["eps", "v"])
@pytest.mark.parametrize("label, scheduler", [("Euler", None), ("Euler a", None), ("DPM++ 2M", "karras"),
                                              ("Heun", None), ("LMS", None), ("DPM2", None), ("DPM++ SDE", None),
                                              ("DPM++ 3M SDE", None), ("DPM adaptive", None), ("Restart", None)])
def test_samplers_equal_a1111s_over_the_downcast_schedule(kd, cfg, label, scheduler):
    steps = 8
    theirs, _ = _run_a1111(kd, cfg, label, steps, scheduler=scheduler, inner=DowncastModel(cfg))
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    settings = a1111_settings(label, scheduler)
    ours = sample(make_model(cfg), SHAPE, schedule=schedule.a1111_downcast(), steps=steps, seeds=SEEDS,
                  progress=False, **settings)
    err = (ours.float() - theirs).abs().max().item()
    assert err < 1e-4, f"{label}: max |ours - A1111's| = {err:.2e}"
    plain = sample(make_model(cfg), SHAPE, schedule=schedule, steps=steps, seeds=SEEDS, progress=False, **settings)
    assert (plain - ours).abs().max() > 1e-3  # (the option moves the picture)


def test_the_versions_a1111_turns_options_on_for():
    # A1111's version strings: a release, a dev build (commits after a tag), a release candidate, a fork's
    assert a1111_version("v1.7.0-375-gf92d6149") > a1111_version("v1.7.0-225") > a1111_version("v1.7.0-RC-5-gf2")
    assert a1111_version("f0.0.17v1.8.0rc-latest-276-g29be1da7") is None and a1111_version(None) is None
    for version, prompt, sampler, want in (
            ("v1.5.1", "a [red:blue:5] circle", "DDIM", {"Old prompt editing timelines", "Pad conds v0",
                                                         "Downcast alphas_cumprod"}),
            ("v1.6.0", "a [red:blue:5] circle", "DDIM", {"Downcast alphas_cumprod"}),
            ("v1.7.0-RC-5-gf2", "a circle", "Euler a", {"Downcast alphas_cumprod"}),
            ("v1.7.0-375-gf92d6149", "a circle", "Euler a", set()),
            ("v1.10.1", "a circle", "Euler a", set()),
            ("f0.0.17v1.8.0rc-latest-276-g29be1da7", "a circle", "Euler a", set())):
        fields = {"Prompt": prompt, "Sampler": sampler, "Version": version}
        notes = a1111_backcompat(fields)
        assert {k for k, v in fields.items() if v is True} == want, version
        assert bool(notes) == bool(want)
    old = {"Version": "v1.7.0", "Refiner": "sd_xl_refiner_1.0"}
    a1111_backcompat(old)
    assert old["Refiner switch by sampling steps"] is True
    # the reader with A1111's defaults turns them on, as its parse_generation_parameters does
    text = "a circle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.5.1"
    assert parse_a1111_parameters(text, defaults=True)["Downcast alphas_cumprod"] is True
    assert "Downcast alphas_cumprod" not in parse_a1111_parameters(text)
    # the CLI's reading: on for an old picture of a noise-level sampler, said and left off for DDIM
    flags = infotext_defaults(parse_a1111_parameters(text))
    assert flags["downcast_alphas_cumprod"] is True
    assert any("A1111 turns on Downcast alphas_cumprod" in n for n in flags["_infotext_notes"])
    ddim = infotext_defaults(parse_a1111_parameters(text.replace("Euler a", "DDIM")))
    assert "downcast_alphas_cumprod" not in ddim
    assert any("not reproduced for DDIM" in n for n in ddim["_infotext_notes"])
    assert any("Pad conds v0" in n for n in ddim["_infotext_notes"])  # (turned on by A1111, not applied here)
    for sampler in ("UniPC", "LCM", "PLMS"):  # (the levels A1111 runs them on: the refusal's own rule)
        other = infotext_defaults(parse_a1111_parameters(text.replace("Euler a", sampler)))
        assert "downcast_alphas_cumprod" not in other, sampler
        assert any(f"not reproduced for {sampler}" in n for n in other["_infotext_notes"]), sampler
    new = infotext_defaults(parse_a1111_parameters(text.replace("v1.5.1", "v1.10.1") + ", Downcast alphas_cumprod: "
                                                                                       "True"))
    assert new["downcast_alphas_cumprod"] is True


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd1(tmp_path_factory)


def test_the_cli_and_the_a1111_api_follow(pipe, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    kw, api = SMALL_RUN, A1111_API_RUN
    want = pipe.generate("a red circle", downcast_alphas_cumprod=True, **kw, **api)
    assert want.parameters["downcast_alphas_cumprod"] is True
    assert want.images[0].tobytes() != pipe.generate("a red circle", **kw, **api).images[0].tobytes()
    with pytest.raises(ValueError, match="one of the two options"):
        pipe.generate("a red circle", downcast_alphas_cumprod=True, zero_terminal_snr=True, **kw, **api)
    body = {"prompt": "a red circle", "steps": 4, "cfg_scale": 5, "width": 16, "height": 16, "seed": 5,
            "sampler_name": "Euler a"}
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img",
                       json={**body, "override_settings": {"use_downcasted_alpha_bar": True}}, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.images[0].convert("RGB").tobytes()
        assert "Downcast alphas_cumprod: True" in json.loads(r.json()["info"])["infotexts"][0]
        for override, said in (({"use_downcasted_alpha_bar": "yes"}, "must be true or false"),
                               ({"use_downcasted_alpha_bar": True, "sd_noise_schedule": "Zero Terminal SNR"},
                                "use one of the two")):
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": override}, timeout=60)
            assert r.status_code == 422 and said in r.text
        for other in ({"sampler_name": "DDIM"}, {"sampler_name": "DDPM"},
                      {"sampler_name": "DPM++ 2M", "scheduler": "time_uniform"}):
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, **other, "override_settings": {
                "use_downcasted_alpha_bar": True}}, timeout=60)
            assert r.status_code == 422 and "reproduced for the samplers that step in noise levels" in r.text, other
        # a pair that cannot run, half from the options and half from the request (or the options posted)
        assert httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_noise_schedule": "Zero Terminal SNR"},
                          timeout=30).status_code == 200
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {
            "use_downcasted_alpha_bar": True}}, timeout=60)
        assert r.status_code == 422 and "use one of the two" in r.text
        r = httpx.post(f"{srv.url}/sdapi/v1/options", json={"use_downcasted_alpha_bar": True}, timeout=30)
        assert r.status_code == 422 and "use one of the two" in r.text
    # refused before any work: no text encoded
    encoded = []
    encode = pipe.encode_prompts
    pipe.encode_prompts = lambda *a, **k: (encoded.append(1), encode(*a, **k))[1]
    try:
        for sampler in ("DDIM", "ddpm", "UniPC"):
            with pytest.raises(ValueError, match="reproduced for the samplers that step in noise levels"):
                pipe.generate("a red circle", downcast_alphas_cumprod=True, **kw, **{**api, **a1111_settings(sampler)})
    finally:
        del pipe.encode_prompts
    assert not encoded
    # an infotext from A1111 1.5 (no Downcast field: its version turns it on), run by the CLI as A1111 runs it
    text = tmp_path / "old.txt"
    text.write_text("a red circle\nSteps: 4, Sampler: Euler a, CFG scale: 5, Seed: 5, Size: 16x16, RNG: CPU, "
                    "Version: v1.5.1", encoding="utf-8")
    out = tmp_path / "old.png"
    assert main(["generate", "--model", pipe.c.source, "--infotext", str(text), "-o", str(out)]) == 0
    assert "A1111 turns on Downcast alphas_cumprod" in capsys.readouterr().err
    made = Image.open(out)
    assert made.convert("RGB").tobytes() == want.images[0].convert("RGB").tobytes()
    assert "Downcast alphas_cumprod: True" in made.text["parameters"]
    again = tmp_path / "again.png"  # (and from its own record, with --no-downcast-alphas-cumprod winning)
    assert main(["generate", "--model", pipe.c.source, "--infotext", str(out), "--no-downcast-alphas-cumprod",
                 "-o", str(again), "-q"]) == 0
    assert "Downcast" not in Image.open(again).text["parameters"]


def test_old_prompt_editing_timelines_follow(pipe, tmp_path, capsys):
    """A1111's "Old prompt editing timelines" (use_old_scheduling; its reader turns it on for a picture from before
    1.6 whose prompt has '['): `[red:blue:1.0]` switches after step 1 there, never under the new rule."""
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    flags = infotext_defaults(parse_a1111_parameters("a [red:blue:1.0] circle\nSteps: 4, Sampler: Euler a, CFG "
                                                     "scale: 5, Seed: 5, Size: 16x16, Version: v1.5.1"))
    assert flags["old_prompt_editing"] is True and flags["downcast_alphas_cumprod"] is True
    kw, api = SMALL_RUN, A1111_API_RUN
    want = pipe.generate("a [red:blue:1.0] circle", old_prompt_editing=True, **kw, **api)
    assert want.images[0].tobytes() == pipe.generate("a [red:blue:1] circle", **kw, **api).images[0].tobytes()
    assert want.images[0].tobytes() != pipe.generate("a [red:blue:1.0] circle", **kw, **api).images[0].tobytes()
    body = {"prompt": "a [red:blue:1.0] circle", "steps": 4, "cfg_scale": 5, "width": 16, "height": 16, "seed": 5,
            "sampler_name": "Euler a"}
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {"use_old_scheduling": True}},
                       timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.images[0].convert("RGB").tobytes()
        assert "Old prompt editing timelines: True" in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {"use_old_scheduling": 1}},
                       timeout=60)
        assert r.status_code == 422 and "use_old_scheduling must be true or false" in r.text
    out = tmp_path / "old.png"
    assert main(["generate", "--model", pipe.c.source, "a [red:blue:1.0] circle", "--old-prompt-editing",
                 "--a1111-sampling", "--a1111-prompts", "--sampler", "Euler a", "--steps", "4", "--guidance-scale",
                 "5", "--seed", "5", "--height", "16", "--width", "16", "-o", str(out), "-q"]) == 0
    made = Image.open(out)
    assert made.convert("RGB").tobytes() == want.images[0].convert("RGB").tobytes()
    assert "Old prompt editing timelines: True" in made.text["parameters"]
