"""`imagine serve` against real clients: webuiapi's WebUIApi and openai's OpenAI, on a tiny model.

The server runs for real (uvicorn in a thread, 127.0.0.1, a free port). Queue-full, batching,
interrupt and disconnect tests hold the model worker at a sampler step with a gate (a thin
wrapper around the real pipeline), so what is queued when is certain rather than timed.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")

from imagine.samplers import a1111_guidance_scale, a1111_settings  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # tiny model: small images, few steps
STEPS = 3


class GatedPipe:
    """The real pipeline, but each generate call waits at sampler step `gate_at` until `gate` is
    set (so a test can fill the queue or interrupt mid-run), and records what it was asked."""

    def __init__(self, pipe, gate_at: int = 0):
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.gate_at = gate_at
        self.waiting = threading.Event()  # set while a generate call is held at the gate
        self.calls: list[dict] = []
        self.fail_on: str | None = None  # a prompt containing this makes generate raise

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, negative_prompt=None, **kw):
        call = {"prompts": list(prompts), "seeds": list(kw.get("seeds") or []), "steps_run": 0,
                "height": kw.get("height"), "width": kw.get("width")}
        self.calls.append(call)
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError(f"test failure for a prompt with {self.fail_on!r}")
        inner = kw.get("callback")

        def callback(d):
            if call["steps_run"] == self.gate_at and not self.gate.is_set():
                self.waiting.set()
                self.gate.wait(60)
                self.waiting.clear()
            call["steps_run"] += 1
            if inner is not None:
                inner(d)

        kw["callback"] = callback
        return self.pipe.generate(prompts, negative_prompt, **kw)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    testing = pytest.importorskip("imagine.testing")
    return testing.make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def server(pipe):
    gated = GatedPipe(pipe)
    app = create_app(gated, ServerConfig(queue_size=3, max_batch=8, max_width=64, max_height=64, max_steps=50,
                                         max_images=4, max_prompt_length=200))
    with BackgroundServer(app) as srv:
        srv.gated, srv.worker = gated, app.state.worker
        yield srv


@pytest.fixture(autouse=True)
def _open_gate(request):
    # whatever a test did, leave the shared server's worker free and idle
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.gated.gate.set()
        _wait(lambda: not srv.worker.running() and not srv.worker.queued(), 60)


def _wait(cond, timeout=30.0, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _api(srv) -> "webuiapi.WebUIApi":
    return webuiapi.WebUIApi(host=srv.host, port=srv.port, sampler="Euler a", steps=STEPS)


def _txt2img(srv, **kw):
    body = {"prompt": "a red circle", "seed": 1, "steps": STEPS, "width": SIZE, "height": SIZE,
            "sampler_name": "Euler a", "cfg_scale": 5.0, **kw}
    return requests.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)


def _decode(b64: str) -> Image.Image:
    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# -- AUTOMATIC1111 ---------------------------------------------------------------------------
def test_webuiapi_txt2img_images_seeds_and_info(server):
    api = _api(server)  # its constructor calls /sdapi/v1/scripts
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=1234, steps=STEPS, width=SIZE,
                    height=SIZE + 16, cfg_scale=5.0, batch_size=2, sampler_name="Euler a")
    assert len(r.images) == 2
    for img in r.images:
        assert img.format == "PNG" and img.size == (SIZE, SIZE + 16)
        assert "Seed:" in img.info["parameters"]  # A1111's infotext travels in the PNG
    assert r.info["seed"] == 1234 and r.info["all_seeds"] == [1234, 1235]  # A1111: seed + i within a request
    assert r.info["all_prompts"] == ["a red circle"] * 2
    assert r.info["sampler_name"] == "Euler a" and r.info["sampler"] == "euler_a"
    assert "do_not_save_grid" in r.info["ignored_fields"] and "prompt" not in r.info["ignored_fields"]
    assert "enable_hr" not in r.info["ignored_fields"]  # hires. fix is read (off here)
    assert r.parameters["width"] == SIZE and r.parameters["prompt"] == "a red circle"
    # the two images of one request differ (seeds 1234 and 1235)
    assert np.abs(_pixels(r.images[0]) - _pixels(r.images[1])).max() > 0


def test_same_seed_same_image_and_random_seed_reported(server):
    api = _api(server)
    kw = dict(prompt="a green triangle", steps=STEPS, width=SIZE, height=SIZE, cfg_scale=5.0, sampler_name="DDIM")
    a = api.txt2img(seed=77, **kw)
    b = api.txt2img(seed=77, **kw)
    c = api.txt2img(seed=78, **kw)
    assert np.array_equal(_pixels(a.image), _pixels(b.image))
    assert np.abs(_pixels(a.image) - _pixels(c.image)).max() > 0
    # seed -1: a random seed is drawn and reported; asking for it again gives the same image
    d = api.txt2img(seed=-1, **kw)
    assert 0 <= d.info["seed"] < 2**32 and d.info["seed"] == d.info["all_seeds"][0]
    e = api.txt2img(seed=d.info["seed"], **kw)
    assert np.array_equal(_pixels(d.image), _pixels(e.image))


def test_a1111_listing_endpoints(server):
    api = _api(server)
    names = api.util_get_sampler_names()
    assert {"Euler a", "DDIM", "DPM++ 2M"} <= set(names)
    models = api.util_get_model_names()
    assert len(models) == 1
    assert api.util_get_current_model() == models[0]
    api.util_set_model(models[0])  # posts options with the same checkpoint: accepted
    assert api.get_options()["samples_format"] == "png"
    assert api.get_scripts() == {"txt2img": [], "img2img": ["sd upscale"]}
    assert [(s["name"], s["label"]) for s in api.get_schedulers()] == [
        ("automatic", "Automatic"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("polyexponential", "Polyexponential"), ("beta", "Beta"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("uniform", "Uniform"), ("normal", "Normal"),
        ("sgm_uniform", "SGM Uniform"), ("simple", "Simple"), ("ddim", "DDIM"),
        ("time_uniform", "Time Uniform"), ("time_quadratic", "Time Quadratic"), ("logsnr", "LogSNR")]
    for getter in (api.get_sd_vae, api.get_loras, api.get_prompt_styles):
        assert getter() == []
    p = api.get_progress()
    assert p["progress"] == 0.0 and p["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)  # idle server: returns at once
    r = requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "some other model"})
    assert r.status_code == 422 and "one model" in r.json()["detail"]


def test_unknown_sampler_and_karras_names(server):
    r = _txt2img(server, sampler_name="No Such Sampler")
    assert r.status_code == 422 and r.json()["field"] == "sampler_name"
    assert "Euler a" in r.json()["detail"]  # the message lists the valid names
    r = _txt2img(server, sampler_name="DPM++ 2M Karras")
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["sampler"] == "dpmpp_2m" and info["scheduler"] == "karras"
    r = _txt2img(server, sampler_name="euler")  # our own names work too
    assert r.status_code == 200 and json.loads(r.json()["info"])["sampler"] == "euler"
    # A1111's schedule types: the image changes with the noise levels; an unknown one is named
    plain = _txt2img(server, sampler_name="UniPC", seed=3)
    exp = _txt2img(server, sampler_name="UniPC", scheduler="Exponential", seed=3)
    assert plain.status_code == exp.status_code == 200
    assert json.loads(exp.json()["info"])["scheduler"] == "exponential"
    assert plain.json()["images"] != exp.json()["images"]
    r = _txt2img(server, sampler_name="UniPC", scheduler="cosine")
    assert r.status_code == 422 and r.json()["field"] == "scheduler" and "polyexponential" in r.json()["detail"]
    # a name or A1111's label
    for name in ("align_your_steps", "Align Your Steps"):
        r = _txt2img(server, sampler_name="Euler", scheduler=name, seed=3)
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["scheduler"] == "align_your_steps"


@pytest.mark.parametrize("sampler, scheduler", [("Euler", "Karras"), ("Euler", None), ("DPM++ 2M", "Automatic"),
                                                ("DPM2", None), ("Euler a", "SGM Uniform"), ("Euler", "DDIM"),
                                                ("DDIM", None), ("Restart", None), ("DPM fast", None),
                                                ("DPM adaptive", None), ("DDIM CFG++", None), ("UniPC", None)])
def test_a1111_api_runs_samplers_as_a1111(server, pipe, sampler, scheduler):
    """The A1111 API runs a sampler as A1111 does (samplers.a1111_settings, checked against k-diffusion in
    test_k_diffusion.py): the schedule type "Automatic" picks for it (Euler: k-diffusion's own levels; DPM++ 2M and
    DPM2: Karras), over the model's whole range, from x_T = z sigma_max, with DPM2's discarded level, DPM fast's and
    DPM adaptive's eta 1, DDIM CFG++'s lambda = CFG scale / 12.5, UniPC's own (3rd order, bh1, time-uniform): the
    pipeline's image with those settings, not with diffusers' ways."""
    r = _txt2img(server, sampler_name=sampler, seed=6, **({"scheduler": scheduler} if scheduler else {}))
    assert r.status_code == 200, r.text
    kw = dict(seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=a1111_guidance_scale(sampler, 5.0),
              progress=False)
    asked = None if scheduler in (None, "Automatic") else scheduler.lower().replace(" ", "_").replace("ddim", "ddim_uniform")
    want = pipe.generate("a red circle", **kw, **a1111_settings(sampler, asked)).images[0]
    ours = pipe.generate("a red circle", **kw, sampler=sampler, sigma_schedule=asked).images[0]
    got = _pixels(_decode(r.json()["images"][0]))
    assert np.array_equal(got, _pixels(want)) and not np.array_equal(got, _pixels(ours))
    info = json.loads(r.json()["info"])
    assert info["scheduler"] == ({"Karras": "karras", "SGM Uniform": "sgm_uniform", "DDIM": "ddim_uniform"}
                                 .get(scheduler, "automatic"))
    # the infotext names the schedule type as A1111's does: unless "Automatic" left k-diffusion's own levels
    shown = {"Karras": "Karras", "SGM Uniform": "SGM Uniform", "DDIM": "DDIM"}.get(
        scheduler, "Karras" if sampler in ("DPM++ 2M", "DPM2", "Restart") else None)
    text = info["infotexts"][0]
    assert (f"Schedule type: {shown}" in text) if shown else ("Schedule type" not in text), text
    assert "CFG scale: 5," in text, text  # (DDIM CFG++ too: its lambda 0.4 written back as the CFG scale asked)


def test_a1111_ddim_needs_two_steps(server):
    """A1111's DDIM stops a step short of the end, so one step would leave none (A1111 answers its start noise): a
    422 that says so."""
    r = _txt2img(server, sampler_name="DDIM", steps=1)
    assert r.status_code == 422 and "take more steps" in r.json()["detail"], r.text
    assert _txt2img(server, sampler_name="DDIM", steps=2).status_code == 200


def test_a1111_eta_and_noise_band(server, pipe):
    """A1111's eta / s_tmin / s_tmax / s_churn / s_noise reach the samplers that take them (the image is the
    pipeline's with the same options); webuiapi's defaults sent to a sampler without them (eta to Euler, s_tmin to
    DDIM) are listed in ignored_fields, not refused (s_churn 0 and s_noise 1, which change nothing, are not listed);
    a band with s_tmin > s_tmax, or a negative eta or s_churn, is a 422 naming the field."""
    r = _txt2img(server, sampler_name="DPM++ 3M SDE", s_tmin=5.0, s_tmax=0, eta=1.0, seed=6)
    assert r.status_code == 200, r.text
    a1111 = a1111_settings("DPM++ 3M SDE")
    options = a1111.pop("sampler_options")
    want = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0, eta=1.0,
                         sampler_options={**options, "s_tmin": 5.0}, progress=False, **a1111).images[0]
    plain = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                          sampler_options=options, progress=False, **a1111).images[0]
    got = _pixels(_decode(r.json()["images"][0]))
    assert np.array_equal(got, _pixels(want)) and not np.array_equal(got, _pixels(plain))
    # s_noise reaches the samplers of A1111's sampler_extra_params (DPM++ 2M SDE), not Euler a (not among them)
    r = _txt2img(server, sampler_name="DPM++ 2M SDE", s_noise=0.8, seed=6)
    assert r.status_code == 200, r.text
    a1111 = a1111_settings("DPM++ 2M SDE")
    options = a1111.pop("sampler_options", {})
    want = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                         sampler_options={**options, "s_noise": 0.8}, progress=False, **a1111).images[0]
    plain = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                          sampler_options=options, progress=False, **a1111).images[0]
    got = _pixels(_decode(r.json()["images"][0]))
    assert np.array_equal(got, _pixels(want)) and not np.array_equal(got, _pixels(plain))
    r = _txt2img(server, sampler_name="Euler a", s_noise=0.8)
    assert r.status_code == 200 and json.loads(r.json()["info"])["ignored_fields"] == ["s_noise"]
    r = _txt2img(server, sampler_name="Euler", eta=0.5, s_tmin=0.0, s_tmax=0.0, s_churn=0.0, s_noise=1.0)
    assert r.status_code == 200 and json.loads(r.json()["info"])["ignored_fields"] == ["eta"]
    r = _txt2img(server, sampler_name="DDIM", s_tmin=0.0, s_churn=0.0, s_noise=1.0)
    assert r.status_code == 200 and json.loads(r.json()["info"])["ignored_fields"] == ["s_tmin"]
    r = _txt2img(server, sampler_name="DDIM", s_churn=1.0)
    assert r.status_code == 200 and json.loads(r.json()["info"])["ignored_fields"] == ["s_churn"]
    # Euler's churn (Karras et al. 2022, Algorithm 2), as A1111 passes s_churn and its band to k-diffusion's Euler
    r = _txt2img(server, sampler_name="Euler", s_churn=2.0, s_tmin=0.5, s_tmax=0, seed=6)
    assert r.status_code == 200, r.text
    a1111 = a1111_settings("Euler")
    a1111.pop("sampler_options", None)
    want = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                         sampler_options={"s_churn": 2.0, "s_tmin": 0.5}, progress=False, **a1111).images[0]
    plain = pipe.generate("a red circle", seed=6, steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                          progress=False, **a1111).images[0]
    got = _pixels(_decode(r.json()["images"][0]))
    assert np.array_equal(got, _pixels(want)) and not np.array_equal(got, _pixels(plain))
    r = _txt2img(server, sampler_name="Heun", s_churn=-1)
    assert r.status_code == 422 and r.json()["field"] == "s_churn"
    r = _txt2img(server, sampler_name="DPM++ 2M SDE", s_tmin=3.0, s_tmax=1.0)
    assert r.status_code == 422 and r.json()["field"] == "s_tmin"
    r = _txt2img(server, sampler_name="DDIM", eta=-1)
    assert r.status_code == 422 and r.json()["field"] == "eta"


# -- OpenAI ----------------------------------------------------------------------------------
def test_openai_images_generate(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    res = client.images.generate(prompt="a blue square", n=2, size=f"{SIZE}x{SIZE + 16}",
                                 response_format="b64_json", extra_body={"seed": 5, "steps": STEPS})
    assert len(res.data) == 2 and res.created > 0
    imgs = [_decode(d.b64_json) for d in res.data]
    assert all(im.size == (SIZE, SIZE + 16) for im in imgs)
    again = client.images.generate(prompt="a blue square", n=1, size=f"{SIZE}x{SIZE + 16}",
                                   extra_body={"seed": 5, "steps": STEPS})
    assert np.array_equal(_pixels(_decode(again.data[0].b64_json)), _pixels(imgs[0]))
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", size=f"{SIZE}x{SIZE}", response_format="url")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match=r"\bn\b.*4"):
        client.images.generate(prompt="x", size=f"{SIZE}x{SIZE}", n=9)


def test_openai_and_a1111_agree(server):
    """The two APIs are views of one pipeline: same prompt, seed and settings -> same pixels. (With DDPM, which both
    run diffusers' way; the A1111 API runs its other samplers as A1111 does, the OpenAI API as diffusers:
    test_a1111_api_runs_samplers_as_a1111.)"""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    o = client.images.generate(prompt="a yellow circle", size=f"{SIZE}x{SIZE}",
                               extra_body={"seed": 9, "steps": STEPS, "guidance_scale": 5.0, "sampler": "ddpm"})
    a = _txt2img(server, prompt="a yellow circle", seed=9, sampler_name="DDPM").json()
    assert np.array_equal(_pixels(_decode(o.data[0].b64_json)), _pixels(_decode(a["images"][0])))


def test_cfgpp_default_scale_is_lambda_on_every_api(server, pipe):
    """A CFG++ sampler sent without a guidance scale runs at the model's default CFG / 12.5 (its lambda), not at the
    CFG scale itself, on the OpenAI API as in the pipeline; the A1111 API maps its cfg_scale the same way for our
    Euler CFG++ (A1111's own CFG++ is DDIM's, test_a1111_api_runs_samplers_as_a1111)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    o = client.images.generate(prompt="a yellow circle", size=f"{SIZE}x{SIZE}",
                               extra_body={"seed": 9, "steps": STEPS, "sampler": "ddim_cfgpp"})
    kw = dict(seed=9, steps=STEPS, height=SIZE, width=SIZE, progress=False)
    want = pipe.generate("a yellow circle", sampler="ddim_cfgpp", **kw).images[0]  # (default CFG / 12.5)
    assert np.array_equal(_pixels(_decode(o.data[0].b64_json)), _pixels(want))
    r = _txt2img(server, prompt="a yellow circle", seed=9, sampler_name="Euler CFG++", cfg_scale=7.5)
    assert r.status_code == 200, r.text
    want = pipe.generate("a yellow circle", sampler="euler_cfgpp", guidance_scale=0.6, **kw,
                         **{k: v for k, v in a1111_settings("Euler CFG++").items() if k != "sampler"}).images[0]
    assert np.array_equal(_pixels(_decode(r.json()["images"][0])), _pixels(want))
    assert "CFG scale: 7.5," in json.loads(r.json()["info"])["infotexts"][0]


# -- limits and bad input --------------------------------------------------------------------
@pytest.mark.parametrize("field,value,limit", [
    ("width", 128, "64"), ("height", 4096, "64"), ("steps", 51, "50"), ("steps", 0, "50"),
    ("batch_size", 5, "4"), ("prompt", "x" * 201, "200"), ("negative_prompt", "y" * 201, "200"),
    ("cfg_scale", 1e9, "100"), ("seed", 2**40, str(2**32 - 1)),
])
def test_limits_give_422_naming_field_and_limit(server, field, value, limit):
    r = _txt2img(server, **{field: value})
    assert r.status_code == 422
    body = r.json()
    assert body["field"] == field and field in body["detail"] and limit in body["detail"]


def test_limit_on_images_per_request_counts_n_iter(server):
    r = _txt2img(server, batch_size=2, n_iter=3)
    assert r.status_code == 422 and "4" in r.json()["detail"] and "n_iter" in r.json()["detail"]


def test_size_not_multiple_of_model_factor_is_422(server):
    r = _txt2img(server, width=SIZE + 1)
    assert r.status_code == 422 and r.json()["field"] == "width" and "multiple" in r.json()["detail"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"steps": "many"}', b'{"width": 1.5}', b"null",
                                 b'{"prompt": ["a", "b"]}', b"\xff\xfe"])
def test_malformed_json_is_422_never_500(server, raw):
    for path in ("/sdapi/v1/txt2img", "/v1/images/generations"):
        r = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == (400 if path.startswith('/v1/') else 422), (path, raw, r.status_code, r.text)
        assert "error" in r.json()


def test_oversized_body_is_413(server):
    """The default limit is four base64 RGBA pictures of the largest size, at least 8 MiB."""
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=b"{" + b" " * (9 << 20) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.text


# -- under load: batching, queue full, interrupt, disconnect ----------------------------------
def test_compatible_requests_share_a_batch_with_the_same_images(server):
    g, w = server.gated, server.worker
    solo = {s: _pixels(_decode(_txt2img(server, prompt=p, seed=s).json()["images"][0]))
            for p, s in (("a red circle", 11), ("two blue squares", 22), ("a purple triangle", 33))}
    g.calls.clear()
    g.gate.clear()
    with ThreadPoolExecutor(4) as ex:
        blocker = ex.submit(_txt2img, server, width=SIZE + 16)  # other size: cannot join the batch below
        _wait(g.waiting.is_set, what="the blocker to reach the gate")
        futs = []
        for k, (p, s) in enumerate((("a red circle", 11), ("two blue squares", 22), ("a purple triangle", 33))):
            futs.append((s, ex.submit(_txt2img, server, prompt=p, seed=s)))
            _wait(lambda: w.queued() == k + 1, what="the request to be queued")
        g.gate.set()
        assert blocker.result().status_code == 200
        results = {s: f.result() for s, f in futs}
    assert [len(c["prompts"]) for c in g.calls] == [1, 3]  # the three waiting requests: one forward batch
    assert sorted(g.calls[1]["seeds"]) == [11, 22, 33]
    for s, r in results.items():
        assert r.status_code == 200
        assert json.loads(r.json()["info"])["batch_images"] == 3
        # each request's image is the one it gets alone (max abs difference in 0..255 levels)
        diff = np.abs(_pixels(_decode(r.json()["images"][0])) - solo[s]).max()
        assert diff <= 1, f"seed {s}: batched image differs from the solo one by {diff} levels"


def test_a_failing_job_fails_alone_not_its_batch(server):
    g, w = server.gated, server.worker
    g.calls.clear()
    g.fail_on = "boom"
    g.gate.clear()
    try:
        with ThreadPoolExecutor(4) as ex:
            blocker = ex.submit(_txt2img, server, width=SIZE + 16)
            _wait(g.waiting.is_set, what="the blocker to reach the gate")
            futs = []
            for k, p in enumerate(("fine one", "boom", "fine two")):
                futs.append(ex.submit(_txt2img, server, prompt=p, seed=k))
                _wait(lambda: w.queued() == k + 1, what="queued")
            g.gate.set()
            assert blocker.result().status_code == 200
            ok1, bad, ok2 = (f.result() for f in futs)
    finally:
        g.fail_on = None
    assert [len(c["prompts"]) for c in g.calls] == [1, 3, 1, 1, 1]  # the batch failed, then each alone
    assert ok1.status_code == 200 and ok2.status_code == 200
    assert bad.status_code == 500 and "boom" in bad.json()["detail"]


def test_full_queue_gets_429_with_retry_after_and_nothing_is_dropped(server):
    g, w = server.gated, server.worker
    g.gate.clear()
    with ThreadPoolExecutor(4) as ex:
        running = ex.submit(_txt2img, server, seed=1)
        _wait(g.waiting.is_set, what="the first job to reach the gate")
        queued = []
        for k in range(3):  # queue_size 3
            queued.append(ex.submit(_txt2img, server, seed=100 + k, width=SIZE + 16 * (k % 2)))
            _wait(lambda: w.queued() == k + 1, what="queued")
        t0 = time.perf_counter()
        r = _txt2img(server, seed=9)
        answered_in = time.perf_counter() - t0
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert "full" in r.json()["detail"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.images.generate(prompt="x", size=f"{SIZE}x{SIZE}")
        assert int(e.value.response.headers["retry-after"]) >= 1
        g.gate.set()
        statuses = [f.result().status_code for f in [running, *queued]]
    assert statuses == [200] * 4  # every accepted request got its images
    assert answered_in < 10  # at once, not after the queue drained (loose: a busy CI machine)


def test_live_previews_of_one_batch_decode_once_per_row_and_step(server, monkeypatch):
    """Two requests run in one batch, each client polling its own task: each sees its own image's preview, and the
    server decodes once per row and sampler step however often they poll (a one-slot cache decoded on every poll
    that alternated between them)."""
    g, w = server.gated, server.worker
    decodes = []
    real = w.preview
    monkeypatch.setattr(w, "preview", lambda job_id=None: decodes.append(job_id) or real(job_id))
    g.gate_at = 1
    g.gate.clear()
    try:
        with ThreadPoolExecutor(3) as ex:
            blocker = ex.submit(_txt2img, server, seed=1, steps=2)
            _wait(g.waiting.is_set, what="the first job to reach the gate")
            a = ex.submit(_txt2img, server, seed=10, steps=20, force_task_id="preview-a")
            b = ex.submit(_txt2img, server, seed=20, steps=20, force_task_id="preview-b")
            _wait(lambda: w.queued() == 2, what="both queued")
            g.gate.set()  # the blocker goes on; the batch of a and b stops at its first step's gate
            _wait(lambda: not g.waiting.is_set(), what="the blocker to pass the gate")
            g.gate.clear()
            _wait(lambda: g.waiting.is_set() and len(w.running()) == 2, what="a and b held in one batch")
            decodes.clear()
            seen = {}
            for _ in range(3):
                for task in ("preview-a", "preview-b"):
                    p = requests.get(server.url + "/sdapi/v1/progress", params={"id_task": task}, timeout=30).json()
                    seen.setdefault(task, set()).add(p["current_image"])
            g.gate.set()
            assert all(f.result().status_code == 200 for f in (blocker, a, b))
    finally:
        g.gate_at = 0
    assert sorted(decodes) == ["preview-a", "preview-b"]  # one decode per row at this step, for six polls
    assert all(len(v) == 1 and None not in v for v in seen.values()) and seen["preview-a"] != seen["preview-b"]


def test_interrupt_returns_the_unfinished_images(server):
    g = server.gated
    g.gate_at = 1  # let one step run, so there is an x0 estimate to return
    g.calls.clear()
    g.gate.clear()
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(_txt2img, server, steps=40, seed=3, batch_size=2)
            _wait(g.waiting.is_set, what="the job to reach the gate")
            p = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()
            assert p["state"]["sampling_steps"] == 40 and p["state"]["job_count"] == 1
            assert 0 < p["progress"] < 1 and p["current_image"] is not None  # a live preview of step 1
            assert _decode(p["current_image"]).size == (SIZE, SIZE)
            _api(server).interrupt()
            g.gate.set()
            r = fut.result()
    finally:
        g.gate_at = 0
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True
    assert [_decode(b).size for b in r.json()["images"]] == [(SIZE, SIZE)] * 2
    assert g.calls[-1]["steps_run"] < 40  # sampling stopped early
    # the next job is not affected by the old interrupt
    r = _txt2img(server, seed=3)
    assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is False


def test_disconnected_clients_free_their_slots(server):
    g, w = server.gated, server.worker
    before = dict(w.stats)
    g.calls.clear()
    g.gate.clear()
    with ThreadPoolExecutor(2) as ex:
        # a running job whose client gives up, and a queued one whose client gives up
        running = ex.submit(_post_and_give_up, server, {"seed": 1, "steps": 30}, 1.0)
        _wait(g.waiting.is_set, what="the running job to reach the gate")
        queued = ex.submit(_post_and_give_up, server, {"seed": 2, "steps": 30, "width": SIZE + 16}, 0.5)
        assert queued.result() == "gave up" and running.result() == "gave up"
        _wait(lambda: w.queued() == 0, what="the queued job to be cancelled")
        g.gate.set()
        _wait(lambda: not w.running(), what="the running job to stop")
    assert w.stats["cancelled"] - before.get("cancelled", 0) == 2
    assert g.calls[-1]["steps_run"] < 30  # the abandoned running job was interrupted, not finished
    assert len(g.calls) == 1  # the abandoned queued job never ran


def _post_and_give_up(srv, body, timeout):
    try:
        _txt2img_timeout(srv, body, timeout)
    except requests.exceptions.ReadTimeout:
        return "gave up"
    return "answered"


def _txt2img_timeout(srv, body, timeout):
    full = {"prompt": "x", "width": SIZE, "height": SIZE, "sampler_name": "Euler a", **body}
    return requests.post(srv.url + "/sdapi/v1/txt2img", json=full, timeout=timeout)


# -- the page and the command ----------------------------------------------------------------
def test_page_and_static_files_are_served(server):
    r = requests.get(server.url + "/", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    for ref in ("/static/app.js", "/static/style.css"):
        assert ref in r.text
        assert requests.get(server.url + ref, timeout=30).status_code == 200
    # nothing from a CDN: every src/href is a local path
    import re

    for url in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        assert url.startswith("/"), f"non-local resource {url}"
    c = requests.get(server.url + "/imagine/v1/config", timeout=30).json()
    assert c["limits"]["max_width"] == 64 and "Euler a" in c["samplers"]


def test_serve_command_binds_loopback_by_default():
    import argparse

    from imagine.server import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.model is None
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("::1") and not cli.is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="queue_size"):
        cli.config_from_args(p.parse_args(["--queue-size", "0"]))


def test_serve_command_end_to_end(tiny_model, tmp_path):
    """`imagine serve --model tiny` in a subprocess answers webuiapi, then stops on SIGINT."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "imagine.cli", "serve", "--model", str(tiny_model),
                             "--port", str(port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() - t0 < 120, "server did not start"
            time.sleep(0.2)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        r = api.txt2img(prompt="a circle", seed=1, steps=2, width=SIZE, height=SIZE)
        assert r.image.size == (SIZE, SIZE)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        log.close()
    assert f"127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()


def test_bench_serve_accounts_for_every_request(tmp_path):
    """`imagine bench serve`: a short run against its own server; nothing is lost."""
    from imagine.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "serve", "--clients", "6", "--duration", "2", "--queue-size", "2", "--max-batch", "4",
                 "--steps", "2", "--size", str(SIZE), "--threads", "1", "--backoff", "0.05", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["sent"] > 0 and report["answered"] > 0
    assert report["answered"] + report["rejected_429"] + report["failed"] == report["sent"]
    assert report["failed"] == 0 and report["all_accounted"] and report["server_agrees"]
    assert report["server_counters"]["completed"] == report["answered"]
    assert code == 0


def test_two_requests_with_one_task_id_get_their_own_images(server):
    """A1111's force_task_id names a job for /progress; two jobs sent with the same one and batched together each get
    their own images (the second's used to be given to both)."""
    g, w = server.gated, server.worker
    solo = {s: _pixels(_decode(_txt2img(server, prompt=p, seed=s).json()["images"][0]))
            for p, s in (("a red circle", 1), ("a blue square", 99))}
    g.gate.clear()
    with ThreadPoolExecutor(3) as ex:
        blocker = ex.submit(_txt2img, server, width=SIZE + 16)
        _wait(g.waiting.is_set, what="the blocker to reach the gate")
        futs = []
        for k, (p, s) in enumerate((("a red circle", 1), ("a blue square", 99))):
            futs.append((s, ex.submit(_txt2img, server, prompt=p, seed=s, force_task_id="same")))
            _wait(lambda: w.queued() == k + 1, what="the request to be queued")
        g.gate.set()
        assert blocker.result().status_code == 200
        for s, f in futs:
            r = f.result()
            assert r.status_code == 200 and json.loads(r.json()["info"])["batch_images"] == 2
            assert np.abs(_pixels(_decode(r.json()["images"][0])) - solo[s]).max() <= 1, s


def test_bodies_json_cannot_carry_and_pictures_past_the_limits(server):
    """A chunked body over the limit is 413 as one with a length is; NaN and Infinity (Python's json reads them, JSON
    has none) are a 422, not a 500 when echoed back nor an option that breaks GET /options; a picture that decodes
    to more than MAX_PICTURE_PIXELS (a decompression bomb: kilobytes of PNG) is refused before it is decoded; a
    txt2img body naming img2img's fields is run and says it ignored them; more ControlNet units than the server
    takes is a 422 naming them; an OpenAI size of thousands of digits is a 400."""
    from imagine.server.app import MAX_PICTURE_PIXELS

    big = (b"{" + b" " * (1 << 16) + b"" for _ in range(140))  # 9 MiB in chunks, no length given
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=big, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and "exceeds the server's limit" in r.text
    for path, raw in (("/sdapi/v1/txt2img", '{"prompt": "a", "steps": NaN}'),
                      ("/sdapi/v1/txt2img", '{"prompt": "a", "steps": 2, "width": 32, "height": 32, "foo": Infinity}'),
                      ("/v1/images/generations", '{"prompt": "a", "n": -Infinity}'),
                      ("/sdapi/v1/options", '{"foo": NaN}')):
        r = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == (400 if path.startswith("/v1/") else 422) and "no NaN or Infinity" in r.text, (path, r.status_code, r.text)
    assert requests.get(server.url + "/sdapi/v1/options", timeout=30).status_code == 200
    side = int(MAX_PICTURE_PIXELS ** 0.5) + 8
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1 << 20
    r = requests.post(server.url + "/sdapi/v1/img2img", json={
        "prompt": "a", "steps": 2, "width": 32, "height": 32, "init_images": [base64.b64encode(buf.getvalue()).decode()]},
        timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "init_images" and "resize it first" in r.text
    r = _txt2img(server, resize_mode=7, mask=5, enable_hr=False, hr_scale=2, denoising_strength=0.5)
    assert r.status_code == 200, r.text
    assert {"resize_mode", "mask", "hr_scale", "denoising_strength"} <= set(json.loads(r.json()["info"])[
        "ignored_fields"])
    r = _txt2img(server, enable_hr=True, hr_scale=1.5, denoising_strength=0.04, steps=50)  # (before the first pass)
    assert r.status_code == 422 and r.json()["field"] == "denoising_strength" and "lays out 1250 steps" in r.text
    r = _txt2img(server, alwayson_scripts={"controlnet": {"args": [{"enabled": False}] * 9}})
    assert r.status_code == 422 and "takes up to 8" in r.text
    r = requests.post(server.url + "/v1/images/generations", json={"prompt": "a", "size": "9" * 5000 + "x64"},
                      timeout=30)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == "size", r.text
