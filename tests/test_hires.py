"""AUTOMATIC1111's hires. fix: text to image at the base size, the pictures upscaled (Lanczos), then image to
image at the large size with each image's own seed. It must be exactly that composition of the two tested
passes, give the large size, record A1111's fields, and refuse what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imagine.pipelines.text_to_image import TextToImagePipeline
from imagine.samplers import a1111_settings
from imagine.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.testing import make_tiny_model

    return TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_hires_is_text_to_image_then_image_to_image(pipe):
    kw = dict(steps=3, guidance_scale=4.0, sampler="euler", height=16, width=24, progress=False)
    res = pipe.generate_hires(["a red circle", "a blue square"], "green", hires_scale=2, hires_strength=0.6,
                              hires_steps=5, seeds=[4, 9], hires_upscaler="lanczos", **kw)
    first = pipe.generate(["a red circle", "a blue square"], "green", seeds=[4, 9], **kw)
    upscaled = pipe.generate(["a red circle", "a blue square"], "green", seeds=[4, 9], init_image=first.images,
                             strength=0.6, steps=5, guidance_scale=4.0, sampler="euler", height=32, width=48,
                             progress=False)
    assert [im.size for im in res.images] == [(48, 32), (48, 32)]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(res.images, upscaled.images))
    p = res.parameters
    assert (p["width"], p["height"], p["steps"], p["hires_scale"], p["hires_steps"], p["strength"]) == \
        (24, 16, 3, 2.0, 5, 0.6)


def test_latent_hires_is_a_bilinear_latent_upscale_then_image_to_image(pipe):
    """A1111's default "Latent" upscaler: the first pass's latents resized bilinearly, no VAE round trip."""
    kw = dict(steps=3, guidance_scale=4.0, sampler="euler", height=16, width=24, progress=False)
    res = pipe.generate_hires("a red circle", hires_scale=1.5, hires_strength=0.7, seed=4, **kw)
    first = pipe.generate("a red circle", seed=4, output_type="latent", **kw)
    up = torch.nn.functional.interpolate(first.latents, size=(12, 18), mode="bilinear", align_corners=False)
    second = pipe.generate("a red circle", seed=4, init_latents=up, strength=0.7, steps=3, guidance_scale=4.0,
                           sampler="euler", progress=False)
    assert res.images[0].size == (36, 24) and res.images[0].tobytes() == second.images[0].tobytes()
    assert res.parameters["hires_upscaler"] == "Latent"
    # A1111's hires prompt: the second pass reads it; the parameters keep the first pass's prompt and name it
    other = pipe.generate_hires("a red circle", hires_scale=1.5, hires_strength=0.7, seed=4, hires_prompt="a square",
                                hires_negative_prompt="blur", **kw)
    second = pipe.generate("a square", "blur", seed=4, init_latents=up, strength=0.7, steps=3, guidance_scale=4.0,
                           sampler="euler", progress=False)
    assert other.images[0].tobytes() == second.images[0].tobytes()
    assert (other.parameters["prompt"], other.parameters["hires_prompt"]) == (["a red circle"], "a square")
    with pytest.raises(ValueError, match="hires_upscaler must be one of latent, latent_antialiased"):
        pipe.generate_hires("x", hires_upscaler="ESRGAN_4x", steps=2, progress=False)
    with pytest.raises(ValueError, match="init_latents must be"):
        pipe.generate("x", init_latents=torch.zeros(2, 4, 8, 8), steps=2, progress=False)


def test_hires_sizes_round_to_the_vae_factor_and_errors(pipe):
    assert pipe.scale == 2  # the tiny model's VAE factor
    res = pipe.generate_hires("x", hires_scale=1.5, steps=2, height=18, width=16, seed=1, progress=False)
    # (A1111's calculate_target_resolution: int(side x scale), then its latents floor-divided by the factor)
    assert res.images[0].size == (24, 26)  # 16 x 1.5 = 24; 18 x 1.5 = 27 -> 26, a multiple of 2
    for bad in (0.5, 5, True):
        with pytest.raises(ValueError, match=r"hires_scale must be a number in \[1, 4\]"):
            pipe.generate_hires("x", hires_scale=bad, steps=2, progress=False)
    with pytest.raises(ValueError, match="hires_steps"):
        pipe.generate_hires("x", hires_steps=0, steps=2, progress=False)
    with pytest.raises(ValueError, match="starts from text"):
        pipe.generate_hires("x", init_image=Image.new("RGB", (16, 16)), steps=2, progress=False)


def test_generate_cli_hires(tmp_path, pipe, capsys):
    from imagine.cli import main
    from imagine.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "big.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "2", "--seed", "3", "--hires-scale",
                 "2", "--hires-strength", "0.5", "-o", str(out), "-q"]) == 0
    img = Image.open(out)
    assert img.size == (32, 32)
    text = img.text["parameters"]
    assert "Size: 16x16" in text and "Hires upscale: 2" in text and "Denoising strength: 0.5" in text
    assert json.loads(img.text["imagine"])["hires_scale"] == 2.0
    want = TextToImagePipeline.from_pretrained(model).generate_hires("a red circle", hires_scale=2, hires_strength=0.5,
                                                                      steps=2, seed=3, progress=False)
    assert img.convert("RGB").tobytes() == want.images[0].tobytes()
    assert torch.is_tensor(want.latents)
    # A1111's other latent modes by its label: torch's bicubic interpolation of the latents (a record replays it)
    bicubic = tmp_path / "bicubic.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "2", "--seed", "3", "--hires-scale",
                 "2", "--hires-strength", "0.5", "--hires-upscaler", "Latent (bicubic)", "-o", str(bicubic), "-q"]) == 0
    first = TextToImagePipeline.from_pretrained(model).generate("a red circle", steps=2, seed=3, progress=False,
                                                                output_type="latent")
    up = torch.nn.functional.interpolate(first.latents, size=(16, 16), mode="bicubic", align_corners=False)
    second = TextToImagePipeline.from_pretrained(model).generate("a red circle", seed=3, init_latents=up,
                                                                 strength=0.5, steps=2, progress=False)
    assert Image.open(bicubic).convert("RGB").tobytes() == second.images[0].tobytes() != want.images[0].tobytes()
    assert "Hires upscaler: Latent (bicubic)" in Image.open(bicubic).text["parameters"]


def test_the_a1111_api_runs_hires_fix(tmp_path, pipe):
    """txt2img with enable_hr: the picture at width x height x hr_scale, as generate_hires gives it; the infotext
    names the first pass's size and A1111's hires fields."""
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 2, "seed": 5, "width": 16, "height": 16, "sampler_name": "Euler",
                "cfg_scale": 3, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 3}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings)
        a1111 = a1111_settings("Euler")
        want = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=3, steps=2, seed=5,
                                   width=16, height=16, guidance_scale=3, progress=False, **a1111)
        assert got.size == (32, 32) and got.convert("RGB").tobytes() == want.images[0].tobytes()
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert "Size: 16x16" in text and "Hires upscale: 2" in text and "Hires steps: 3" in text
        assert "Denoising strength: 0.5" in text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_prompt": "a blue square"}, timeout=120)
        assert r.status_code == 200, r.text
        want = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.5, hires_steps=3, steps=2, seed=5,
                                   width=16, height=16, guidance_scale=3, hires_prompt="a blue square",
                                   progress=False, **a1111)
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert got.convert("RGB").tobytes() == want.images[0].tobytes()
        assert "Hires prompt: a blue square" in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_prompt": "x" * 3000}, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "hr_prompt"
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_scale": 8}, timeout=120)
        assert r.status_code == 422


def _latent_hires_by_hand(pipe, prompt, seed, first_kw, second_kw, strength, scale=2):
    """A1111's sample_hr_pass restated: the first pass's latents, bilinearly upscaled, then image to image with the
    hires pass's own sampler (A1111 creates it anew from hr_sampler_name) at the same seed."""
    first = pipe.generate(prompt, seed=seed, output_type="latent", progress=False, **first_kw)
    h, w = first.latents.shape[-2:]
    up = torch.nn.functional.interpolate(first.latents, size=(h * scale, w * scale), mode="bilinear",
                                         align_corners=False)
    return pipe.generate(prompt, seed=seed, init_latents=up, strength=strength, progress=False, **second_kw)


def test_a_hires_sampler_samples_the_second_pass(pipe):
    """hires_sampling: the second pass samples with its own sampler and schedule type (A1111's "Hires sampler" and
    "Hires schedule type"); the parameters keep the first pass's sampling and name the second's apart."""
    from imagine.images import a1111_parameters

    kw = dict(steps=3, guidance_scale=4.0, height=16, width=16)
    res = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.6, seed=4, sampler="dpmpp_2m",
                              hires_sampling={"sampler": "euler_a", "sigma_schedule": "karras"}, progress=False, **kw)
    want = _latent_hires_by_hand(pipe, "a red circle", 4, {**kw, "sampler": "dpmpp_2m"},
                                 {"steps": 3, "guidance_scale": 4.0, "sampler": "euler_a", "sigma_schedule": "karras"},
                                 0.6)
    plain = pipe.generate_hires("a red circle", hires_scale=2, hires_strength=0.6, seed=4, sampler="dpmpp_2m",
                                progress=False, **kw)
    assert res.images[0].tobytes() == want.images[0].tobytes() != plain.images[0].tobytes()
    p = res.parameters
    assert p["sampler"] == "dpmpp_2m" and "schedule_type" not in p
    assert p["hires_sampling"] == {"sampler": "euler_a", "sigma_schedule": "karras"}
    text = a1111_parameters({**p, "prompt": "a red circle"})
    assert "Sampler: DPM++ 2M," in text and "Hires sampler: Euler a," in text and "Hires schedule type: Karras" in text
    # the same sampler and schedule as the first pass's: nothing written
    same = a1111_parameters({**p, "prompt": "x", "hires_sampling": {"sampler": "dpmpp_2m"}})
    assert "Hires sampler" not in same and "Hires schedule type" not in same
    runs = []
    real = pipe.generate
    for bad, match in (({"sigma_schedule": "karras"}, "with a 'sampler'"), ({"sampler": "euler", "steps": 3}, "'steps'"),
                       ({"sampler": "euler_cfgpp"}, "CFG\\+\\+ samplers for both passes or for neither"),
                       ({"sampler": "ddim", "sigma_schedule": "align_your_steps"}, "hires sampler 'ddim': align_your"),
                       # (refused by the sampler's own code on the plan the second pass runs: Restart needs a run
                       # down to sigma 0, the LogSNR levels end at abar_0)
                       ({"sampler": "restart", "sigma_schedule": "logsnr"},
                        "hires sampler 'restart': restart runs down to sigma = 0; this plan stops above it"),
                       ({"sampler": "euler", "start": "matched"}, "start='matched' moves pure noise")):
        pipe.generate = lambda *a, **k: runs.append(1) or real(*a, **k)
        try:
            with pytest.raises(ValueError, match=match):
                pipe.generate_hires("x", hires_sampling=bad, steps=2, sampler="euler", progress=False)
        finally:
            del pipe.generate
    assert not runs  # (refused before the first pass)


def test_the_cli_and_the_a1111_api_run_a_hires_sampler(tmp_path, pipe, capsys):
    """--hires-sampler / --hires-schedule-type and the API's hr_sampler_name / hr_scheduler: the second pass as A1111
    runs that sampler (samplers.a1111_settings, its fixed hires step count), the infotext naming it; an A1111 infotext
    and imagine's own record run it again."""
    import base64
    import io

    from imagine.cli import main
    from imagine.images import read_infotext

    model = pipe.c.source
    first_kw = {**a1111_settings("DPM++ 2M"), "steps": 3, "guidance_scale": 3.0, "height": 16, "width": 16}
    second_kw = {**a1111_settings("Euler a", "exponential"), "strength_rule": "a1111_fixed_steps", "steps": 3,
                 "guidance_scale": 3.0}
    want = _latent_hires_by_hand(pipe, "a red circle", 5, first_kw, second_kw, 0.5)
    out = tmp_path / "big.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "3", "--seed", "5", "--height", "16",
                 "--width", "16", "--guidance-scale", "3", "--hires-scale", "2", "--hires-strength", "0.5",
                 "--a1111-sampling", "--sampler", "DPM++ 2M", "--hires-sampler", "Euler a",
                 "--hires-schedule-type", "Exponential", "-o", str(out), "-q"]) == 0
    got = Image.open(out)
    assert got.convert("RGB").tobytes() == want.images[0].tobytes()
    text = read_infotext(out)
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in text
    assert "Hires sampler: Euler a," in text and "Hires schedule type: Exponential" in text
    # run again from imagine's own record, and from the A1111 infotext alone (a PNG without the record)
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(model), "--infotext", str(out), "-o", str(again), "-q"]) == 0
    assert Image.open(again).convert("RGB").tobytes() == want.images[0].tobytes()
    bare = tmp_path / "bare.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    got.save(bare, pnginfo=info)
    a1111 = tmp_path / "a1111.png"
    assert main(["generate", "--model", str(model), "--infotext", str(bare), "--rng", "cpu", "-o", str(a1111),
                 "-q"]) == 0
    assert Image.open(a1111).convert("RGB").tobytes() == want.images[0].tobytes()
    assert main(["generate", "--model", str(model), "x", "--hires-sampler", "euler", "-q", "-o",
                 str(tmp_path / "n.png")]) == 2
    assert "--hires-sampler is for hires. fix's second pass: give --hires-scale (or --hires-resize) too" in capsys.readouterr().err

    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 3, "seed": 5, "width": 16, "height": 16, "sampler_name": "DPM++ 2M",
                "cfg_scale": 3, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5,
                "hr_sampler_name": "Euler a", "hr_scheduler": "Exponential", "eta": 1.0}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert got.convert("RGB").tobytes() == want.images[0].tobytes()
        info = json.loads(r.json()["info"])
        assert "Hires sampler: Euler a," in info["infotexts"][0]
        assert "eta" not in info.get("ignored_fields", [])  # (Euler a takes it: used by one pass)
        # "Use same sampler" is the first pass's: as no field
        r1 = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "hr_sampler_name": "Use same sampler",
                                                               "hr_scheduler": "Use same scheduler"}, timeout=120)
        r2 = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={k: v for k, v in body.items()
                                                              if k not in ("hr_sampler_name", "hr_scheduler")},
                        timeout=120)
        assert r1.json()["images"] == r2.json()["images"]
        assert "Hires sampler" not in json.loads(r1.json()["info"])["infotexts"][0]
        for field, value in (("hr_sampler_name", "Euler b"), ("hr_scheduler", "Fancy")):
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, field: value}, timeout=60)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "enable_hr": False}, timeout=120)
        assert {"hr_sampler_name", "hr_scheduler"} <= set(json.loads(r.json()["info"])["ignored_fields"])


def test_eta_and_sigma_options_reach_the_hires_pass_whose_sampler_takes_them(tmp_path, pipe, capsys):
    """--eta and --sampler-option go to each pass whose sampler takes them, as A1111 hands p.eta and its sigma
    settings to whichever sampler it makes: a deterministic first pass with an ancestral hires sampler takes the eta
    in the hires pass (it was refused), and Euler's churn stays with Euler when the hires pass is Heun's too."""
    from imagine.cli import main

    model = pipe.c.source
    first_kw = {**a1111_settings("Euler"), "steps": 3, "guidance_scale": 3.0, "height": 16, "width": 16}
    second_kw = {**a1111_settings("Euler a"), "strength_rule": "a1111_fixed_steps", "steps": 3, "guidance_scale": 3.0}
    want = _latent_hires_by_hand(pipe, "a red circle", 5, first_kw, {**second_kw, "eta": 0.3}, 0.5)
    base = ["generate", "--model", str(model), "a red circle", "--steps", "3", "--seed", "5", "--height", "16",
            "--width", "16", "--guidance-scale", "3", "--hires-scale", "2", "--hires-strength", "0.5",
            "--a1111-sampling", "-q"]
    out = tmp_path / "eta.png"
    assert main([*base, "--sampler", "Euler", "--hires-sampler", "Euler a", "--eta", "0.3", "-o", str(out)]) == 0
    assert Image.open(out).convert("RGB").tobytes() == want.images[0].tobytes()
    again = tmp_path / "again.png"  # (its record runs it again)
    assert main(["generate", "--model", str(model), "--infotext", str(out), "-o", str(again), "-q"]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    churn = {"sampler_options": {"s_churn": 0.5}}
    want = _latent_hires_by_hand(pipe, "a red circle", 5, {**first_kw, **churn},
                                 {**second_kw, **a1111_settings("Heun"), "strength_rule": "a1111_fixed_steps",
                                  **churn}, 0.5)
    out = tmp_path / "churn.png"
    assert main([*base, "--sampler", "Euler", "--hires-sampler", "Heun", "--sampler-option", "s_churn=0.5",
                 "-o", str(out)]) == 0
    assert Image.open(out).convert("RGB").tobytes() == want.images[0].tobytes()
    # taken by neither pass: the refusal names it
    assert main([*base, "--sampler", "Euler", "--hires-sampler", "Heun", "--eta", "0.3", "-o", str(out)]) == 2
    assert "takes no eta" in capsys.readouterr().err


def test_an_automatic_schedule_type_read_back_leaves_the_hires_sampler_its_own(tmp_path, pipe):
    """A1111's reader takes the schedule type its "Automatic" picks for the sampler (Karras for DPM++ 2M) as Automatic
    (get_sampler_and_scheduler's convert_automatic), so a hires sampler on "Use same scheduler" runs its own levels
    again: the infotext of such a run makes the same picture."""
    from PIL.PngImagePlugin import PngInfo

    from imagine.cli import main
    from imagine.images import read_infotext

    model = pipe.c.source
    out = tmp_path / "made.png"
    assert main(["generate", "--model", str(model), "a red circle", "--steps", "3", "--seed", "5", "--height", "16",
                 "--width", "16", "--hires-scale", "2", "--a1111-sampling", "--sampler", "DPM++ 2M",
                 "--hires-sampler", "Euler a", "-o", str(out), "-q"]) == 0
    text = read_infotext(out)
    assert "Schedule type: Karras," in text and "Hires schedule type" not in text
    bare = tmp_path / "bare.png"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.open(out).save(bare, pnginfo=info)
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(model), "--infotext", str(bare), "--rng", "cpu", "-o", str(again),
                 "-q"]) == 0
    assert Image.open(again).convert("RGB").tobytes() == Image.open(out).convert("RGB").tobytes()


def test_progress_counts_the_two_passes(pipe):
    """The second pass's reports carry "hires_pass", and the server's progress counts the two passes as halves of the
    run, as A1111's does (it went to 100% at the first pass's end, then back to 10%); its text names the pass."""
    import threading

    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    seen = []
    pipe.generate_hires("x", hires_scale=2, steps=2, hires_steps=3, seed=1, height=16, width=16, progress=False,
                        callback=lambda d: seen.append(bool(d.get("hires_pass"))))
    assert seen == [False] * 2 + [True] * int(3 * 0.7)  # (diffusers' image-to-image count: int(steps x strength))

    class Held:  # the real pipeline, its hires pass held at its second step
        def __init__(self, inner):
            self.inner, self.held, self.release = inner, threading.Event(), threading.Event()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate_hires(self, *a, callback=None, **kw):
            def hold(d):
                callback(d)
                if d.get("hires_pass") and d.get("step") == 1:
                    self.held.set()
                    self.release.wait(60)
            return self.inner.generate_hires(*a, callback=hold, **kw)

    held = Held(pipe)
    with BackgroundServer(create_app(held, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 4, "seed": 5, "width": 16, "height": 16, "sampler_name": "Euler",
                "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 4,
                "force_task_id": "two-passes"}
        out = {}
        thread = threading.Thread(target=lambda: out.update(r=httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body,
                                                                          timeout=120)))
        thread.start()
        try:
            assert held.held.wait(60)
            p = httpx.get(f"{srv.url}/sdapi/v1/progress", params={"id_task": "two-passes"}, timeout=30).json()
        finally:
            held.release.set()
            thread.join(120)
    assert out["r"].status_code == 200
    assert p["progress"] == pytest.approx(0.5 + 0.5 * 2 / 4) and "hires pass" in p["textinfo"]


@pytest.mark.parametrize("sampler,settings,strength", [
    ("euler", {}, 0.6),
    ("dpmpp_2m", {"sigma_schedule": "karras", "strength_rule": "a1111"}, 0.45),
    ("euler_a", {"sigma_schedule": "exponential", "strength_rule": "a1111_fixed_steps"}, 0.7),
    ("ddim", {"sigma_schedule": "compvis", "strength_rule": "a1111_fixed_steps"}, 0.5),
    ("restart", {"sigma_schedule": "kl_optimal", "strength_rule": "a1111"}, 0.8),
])
def test_run_plan_is_the_plan_sample_runs(sampler, settings, strength):
    """sampling.run_plan (what generate_hires lays out before its first pass) gives the levels `sample` steps through
    for the same settings, its image-to-image rules included."""
    from imagine.sampling import run_plan, sample

    schedule = NoiseSchedule.from_config("scaled_linear")
    seen = []
    sample(lambda x, t, **c: torch.zeros_like(x), (1, 2, 4, 4), schedule=schedule, sampler=sampler, steps=9,
           init=torch.zeros(1, 2, 4, 4), strength=strength, seeds=[1], progress=False,
           callback=lambda d: seen.append(float(d["sigma"])), **settings)
    plan = run_plan(schedule, sampler, 9, img2img=True, strength=strength, **settings)
    levels = plan.sigmas.tolist()
    assert seen and all(s in levels for s in seen) and seen[0] == levels[0]


def test_run_plan_checks_the_part_an_image_to_image_run_takes():
    """A sampler's own refusal (samplers.check_plan) reads the plan run: DPM++ 2M over linspace spacing at 1000 steps
    repeats a level halfway down, which a run from strength 0.3 never reaches."""
    from imagine.sampling import run_plan

    schedule = NoiseSchedule.from_config("scaled_linear")
    with pytest.raises(ValueError, match="dpmpp_2m: noise level .* repeats at steps 499 and 500 of 1000"):
        run_plan(schedule, "dpmpp_2m", 1000, timestep_spacing="linspace")
    assert len(run_plan(schedule, "dpmpp_2m", 1000, timestep_spacing="linspace", img2img=True, strength=0.3)) == 300
    with pytest.raises(ValueError, match="restart runs down to sigma = 0; this plan stops above it"):
        run_plan(schedule, "restart", 10, sigma_schedule="logsnr", img2img=True, strength=0.5)


def test_the_hires_plan_check_reads_the_second_passs_own_rule(pipe):
    """With a hires sampler, the second pass runs hires_sampling's settings alone (its strength rule too, diffusers'
    where it names none): the early check must not lay out the first pass's A1111 rule (600 steps at strength 0.5
    would be the last of 1200, more than the model's timesteps)."""
    res = pipe.generate_hires("x", steps=1, hires_steps=600, hires_strength=0.5, strength_rule="a1111",
                              sampler="euler", hires_sampling={"sampler": "euler"}, height=16, width=16, seed=1,
                              progress=False, output_type="latent")
    assert res.parameters["hires_steps"] == 600


def test_the_cli_takes_a_hires_size_and_replays_it(tmp_path, capsys):
    """--hires-resize WxH is A1111's "Resize width to / height to" (generate_hires(hires_resize)): written as its
    "Hires resize", read back from the record and from an A1111 infotext (whose size it ran at: a scale from it
    lost pixels to int(), e.g. 704 -> 960 wide ran 952)."""
    from imagine.cli import main
    from imagine.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out, again = tmp_path / "r.png", tmp_path / "again.png"
    args = ["generate", "--model", str(model), "a red circle", "--steps", "2", "--seed", "3", "-q"]
    assert main([*args, "--hires-resize", "30x0", "--width", "22", "-o", str(out)]) == 0
    img = Image.open(out)
    # (A1111's calculate_target_resolution: 30 x 16 // 22 = 21 rows, down to the VAE's factor 2: 20)
    assert img.size == (30, 20) and "Hires resize: 30x0" in img.text["parameters"]
    assert main(["generate", "--model", str(model), "--infotext", str(out), "-o", str(again), "-q"]) == 0
    assert "not applied" not in capsys.readouterr().err
    assert Image.open(again).tobytes() == img.tobytes()
    text = tmp_path / "a1111.txt"
    text.write_text(img.text["parameters"].split("\n")[-1].join(["a red circle\n", ""]).replace("Version", "X"))
    assert main(["generate", "--model", str(model), "--infotext", str(text), "-o", str(again), "-q"]) == 0
    assert Image.open(again).size == (30, 20)
    assert main([*args, "--hires-resize", "30", "-o", str(again)]) != 0
    assert "--hires-resize must be WIDTHxHEIGHT" in capsys.readouterr().err
