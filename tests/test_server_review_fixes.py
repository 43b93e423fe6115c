"""The server's review fixes, each held to AUTOMATIC1111's (1.10) behaviour on a tiny model: variation seeds,
/sdapi/v1/skip, NaN whatever the content type, the eta and CLIP options, transparent init pictures, OpenAI's 400,
the hires. fix's size and upscaler fields, JSON nulls, and img2img's size without width/height."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from imagine.samplers import a1111_settings  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(max_width=64, max_height=64, max_steps=50, max_images=8)
BODY = {"prompt": "a red circle", "steps": 2, "seed": 5, "width": 16, "height": 16, "sampler_name": "Euler",
        "cfg_scale": 3}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny MiniLM model (16 x 16, the VAE's factor 2): a text encoder without clip skip."""
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    return TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServerConfig(**CFG)), raise_server_exceptions=False) as c:
        yield c


def _info(r) -> dict:
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def _image(r, k: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][k])))


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _params(text: str) -> str:
    return text.rsplit("\n", 1)[-1]


# -- 1. variation seeds ------------------------------------------------------------------------
def test_variation_seeds_keep_the_seed_and_count_the_subseeds_up(client):
    """A1111's processing: all_seeds = [seed + (x if subseed_strength == 0 else 0)], all_subseeds = [subseed + x], over
    batch_size and n_iter; the subseed is reported (and -1 drawn) at strength 0 too."""
    info = _info(client.post("/sdapi/v1/txt2img", json={**BODY, "subseed": 10, "subseed_strength": 0.5,
                                                        "batch_size": 2, "n_iter": 2}))
    assert info["all_seeds"] == [5, 5, 5, 5] and info["all_subseeds"] == [10, 11, 12, 13]
    for i, text in enumerate(info["infotexts"]):
        assert f"Seed: 5, Variation seed: {10 + i}, Variation seed strength: 0.5" in text
    info = _info(client.post("/sdapi/v1/txt2img", json={**BODY, "subseed": 10, "batch_size": 2}))
    assert (info["all_seeds"], info["subseed"], info["all_subseeds"]) == ([5, 6], 10, [10, 11])
    assert "Variation seed" not in info["infotexts"][0]
    info = _info(client.post("/sdapi/v1/txt2img", json={**BODY, "subseed": -1, "batch_size": 2}))
    assert 0 <= info["subseed"] < 2**32 and info["all_subseeds"] == [info["subseed"], info["subseed"] + 1]


# -- 2. skip -----------------------------------------------------------------------------------
class _HeldPipe:
    """The real pipeline; the first generate call after `hold()` waits at its second sampler step until `release`."""

    def __init__(self, pipe):
        self.pipe, self.armed = pipe, False
        self.held, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def hold(self):
        self.armed = True
        self.held.clear()
        self.release.clear()

    def generate(self, prompts, negative_prompt=None, **kw):
        inner, calls = kw["callback"], []
        hold, self.armed = self.armed, False

        def callback(d):
            if hold and len(calls) == 1:
                self.held.set()
                self.release.wait(60)
            calls.append(d)
            inner(d)

        kw["callback"] = callback
        return self.pipe.generate(prompts, negative_prompt, **kw)


def test_skip_ends_the_running_round_and_the_next_rounds_run(pipe):
    """A1111's skip (state.skip()) ends the current n_iter round; its images are kept as they were (the x0 estimate
    of that step) and the next rounds run as they would have; state.skipped is true while it skips. It used to stop
    the whole request, as /sdapi/v1/interrupt does."""
    import requests

    held = _HeldPipe(pipe)
    app = create_app(held, ServerConfig(**{**CFG, "max_batch": 1}))  # (one image a forward pass: n_iter rounds apart)
    body = {**BODY, "steps": 4, "n_iter": 3}
    with BackgroundServer(app) as srv:
        plain = requests.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert requests.post(srv.url + "/sdapi/v1/skip", timeout=30).status_code == 200  # (idle: nothing to skip)
        held.hold()
        out = {}
        thread = threading.Thread(target=lambda: out.update(r=requests.post(srv.url + "/sdapi/v1/txt2img", json=body,
                                                                              timeout=120)))
        thread.start()
        assert held.held.wait(60)
        assert requests.post(srv.url + "/sdapi/v1/skip", timeout=30).status_code == 200
        assert requests.get(srv.url + "/sdapi/v1/progress", timeout=30).json()["state"]["skipped"] is True
        held.release.set()
        thread.join(120)
        r = out["r"]
        info = _info(r)
        assert len(r.json()["images"]) == 3 and info["all_seeds"] == [5, 6, 7]
        assert info["skipped"] is True and info["interrupted"] is False
        got = [_image(r, k).convert("RGB").tobytes() for k in range(3)]
        want = [_image(plain, k).convert("RGB").tobytes() for k in range(3)]
        assert got[0] != want[0] and got[1:] == want[1:]
        assert requests.get(srv.url + "/sdapi/v1/progress", timeout=30).json()["state"]["skipped"] is False
        assert app.state.worker.stats["interrupted"] == 0


# -- 3. NaN ------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {}])
def test_nan_is_refused_whatever_the_content_type(client, headers):
    """NaN and Infinity got past the JSON check with another content type (or none), which FastAPI and
    request.json() read as JSON anyway: a stored NaN option made every GET /sdapi/v1/options a 500."""
    r = client.post("/sdapi/v1/options", content=b'{"eta_ddim": NaN}', headers=headers)
    assert r.status_code == 422 and "no NaN or Infinity" in r.text
    assert client.get("/sdapi/v1/options").status_code == 200
    r = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "a", "steps": 2, "foo": Infinity}', headers=headers)
    assert r.status_code == 422 and "no NaN or Infinity" in r.text


# -- 4. options: eta_ddim, eta_ancestral, CLIP_stop_at_last_layers --------------------------------
def test_eta_options_are_the_default_eta_and_written_as_a1111_writes_them(pipe):
    """A1111 runs a request without eta at opts.eta_ancestral (its ancestral and SDE samplers) or opts.eta_ddim (DDIM),
    the request's override_settings first, and writes "Eta" / "Eta DDIM" where the eta is not at its default (1 / 0);
    the options were stored and not read."""
    with TestClient(create_app(pipe, ServerConfig(**CFG))) as c:
        ancestral = {**BODY, "sampler_name": "Euler a", "steps": 3}
        before = c.post("/sdapi/v1/txt2img", json=ancestral)
        sent_zero = c.post("/sdapi/v1/txt2img", json={**ancestral, "eta": 0})
        sent_one = c.post("/sdapi/v1/txt2img", json={**ancestral, "eta": 1})
        assert "Eta" not in _params(_info(before)["infotexts"][0])
        assert "Eta" not in _params(_info(sent_one)["infotexts"][0])  # (A1111's default: not written)
        assert "Eta: 0" in _info(sent_zero)["infotexts"][0]
        override = c.post("/sdapi/v1/txt2img", json={**ancestral, "override_settings": {"eta_ancestral": 0}})
        assert _image(override).tobytes() == _image(sent_zero).tobytes() != _image(before).tobytes()
        assert "override_settings.eta_ancestral" not in _info(override)["ignored_fields"]
        assert c.post("/sdapi/v1/options", json={"eta_ancestral": 0.0}).status_code == 200
        after = c.post("/sdapi/v1/txt2img", json=ancestral)
        assert _image(after).tobytes() == _image(sent_zero).tobytes()
        assert "Eta: 0" in _info(after)["infotexts"][0]
        ddim = {**BODY, "sampler_name": "DDIM", "steps": 3}
        want = c.post("/sdapi/v1/txt2img", json={**ddim, "eta": 0.5})
        got = c.post("/sdapi/v1/txt2img", json={**ddim, "override_settings": {"eta_ddim": 0.5}})
        assert _image(got).tobytes() == _image(want).tobytes()
        assert "Eta DDIM: 0.5" in _info(got)["infotexts"][0]
        r = c.post("/sdapi/v1/options", json={"eta_ddim": -1})
        assert r.status_code == 422 and "eta_ddim must be a finite number >= 0" in r.json()["detail"]


def test_clip_stop_at_last_layers_without_clip_skip_is_422_naming_the_servers_value(client):
    """A text encoder without clip skip (MiniLM) cannot run another CLIP_stop_at_last_layers: a 422 naming the option
    and the server's value, where it was stored and not used."""
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and "CLIP_stop_at_last_layers" in r.json()["detail"]
    assert "the server's value is 1" in r.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 422 and "the server's value is 1" in r.json()["detail"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from test_loading import save_diffusers_folder  # the tiny SD folder: a 2-layer CLIP

    folder = tmp_path_factory.mktemp("clip") / "folder"
    save_diffusers_folder(folder, "sd1")
    return folder


def test_clip_stop_at_last_layers_runs_per_request_and_is_restored(clip_folder):
    """A CLIP text encoder's clip_skip is set for the job from CLIP_stop_at_last_layers (override_settings, else the
    options; A1111's 2 is clip_skip 1) and restored after it: the image is the one of a model loaded with that clip
    skip, info and infotext say it; jobs with different values never share a forward pass."""
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.worker import Job, ModelWorker, Settings

    plain = TextToImagePipeline.from_pretrained(clip_folder)
    skipping = TextToImagePipeline.from_pretrained(clip_folder, clip_skip=1)
    with TestClient(create_app(skipping, ServerConfig(**CFG))) as c:
        want = c.post("/sdapi/v1/txt2img", json=BODY)
    with TestClient(create_app(plain, ServerConfig(**CFG))) as c:
        base = c.post("/sdapi/v1/txt2img", json=BODY)
        r = c.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}})
        assert _image(r).tobytes() == _image(want).tobytes() != _image(base).tobytes()
        info = _info(r)
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        assert plain.text_encoder.clip_skip == 0  # (restored after the job)
        again = c.post("/sdapi/v1/txt2img", json=BODY)
        assert _image(again).tobytes() == _image(base).tobytes()
        assert c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert _image(c.post("/sdapi/v1/txt2img", json=BODY)).tobytes() == _image(want).tobytes()
        r = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3})  # (a 2-layer CLIP: 1 or 2)
        assert r.status_code == 422 and "from 1 (the last layer) to 2" in r.json()["detail"]
    worker = ModelWorker(plain)
    settings = Settings(height=16, width=16, steps=2, sampler="euler", guidance_scale=3.0)
    jobs = [Job(prompts=["a"], negative_prompts=[None], seeds=[1], settings=Settings(**{**settings.__dict__,
                                                                                         "clip_skip": k}))
            for k in (0, 1)]
    worker._pending.extend(jobs)
    assert worker._take_batch() == [jobs[0]] and worker._take_batch() == [jobs[1]]


# -- 5. transparent init pictures ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_init_pictures_are_laid_on_white(client, mode):
    """A1111 flattens an RGBA img2img picture onto img2img_background_color (#ffffff) before use (images.flatten,
    after fix_png_transparency, which makes RGBA of a palette picture with per-entry transparency bytes only);
    convert("RGB") showed the colour hidden under transparent pixels (here black) instead. An LA picture, or a
    palette with one transparent index, A1111 converts as it is."""
    picture = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    picture.paste((255, 0, 0, 255), (4, 4, 12, 12))
    sent = picture.convert("LA") if mode == "LA" else picture
    if mode == "P":  # (a palette whose entry 0, black, is transparent: PNG's tRNS)
        sent = Image.new("P", (16, 16), 0)
        sent.putpalette([0, 0, 0, 255, 0, 0])
        sent.paste(1, (4, 4, 12, 12))
        sent.info["transparency"] = 0
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    white.paste(sent.convert("RGBA"), mask=sent.convert("RGBA"))
    if mode != "RGBA":  # (A1111: convert("RGB"), the hidden colour shown)
        white = sent.convert("RGB")
    body = {**BODY, "denoising_strength": 0.5}
    got = client.post("/sdapi/v1/img2img", json={**body, "init_images": [_b64(sent)]})
    want = client.post("/sdapi/v1/img2img", json={**body, "init_images": [_b64(white)]})
    assert _image(got).tobytes() == _image(want).tobytes()
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (6, 6, 10, 10))
    r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [_b64(sent)], "mask": _b64(mask), "mask_blur": 0,
                                               "inpaint_full_res": False})
    assert _image(r).convert("RGB").getpixel((0, 0)) == white.getpixel((0, 0))  # (the kept part: the picture used)


# -- 6. OpenAI's 400 -----------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "size": "big"}, "size"),
                                        ({"prompt": " "}, "prompt"), ({"prompt": "x", "n": "two"}, "n"),
                                        ({"n": 1}, "prompt"), ({"prompt": "x", "size": "4096x4096"}, "size")])
def test_openai_paths_answer_400_with_openais_error_object(client, body, param):
    """OpenAI answers a request it will not run with 400 (the openai client's BadRequestError); these were 422
    (UnprocessableEntityError), though /v1/images/edits answered 400 for the same faults."""
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_openai_paths_answer_400_for_bodies_they_cannot_read(client):
    for raw, headers in ((b"{not json", {"content-type": "application/json"}),
                         (b'{"prompt": "a", "n": -Infinity}', {"content-type": "application/json"}),
                         (b'{"prompt": "a", "n": NaN}', {})):
        r = client.post("/v1/images/generations", content=raw, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (raw, r.text)
    r = client.post("/v1/images/edits", files={"image": ("a.png", base64.b64decode(_b64(Image.new("RGB", (16, 16)))),
                                                         "image/png")}, data={"prompt": "a hat", "strength": "2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"
    assert client.post("/sdapi/v1/txt2img", json={**BODY, "steps": 0}).status_code == 422  # (A1111's API: 422)


# -- 7. hires. fix fields --------------------------------------------------------------------------
HIRES = {**BODY, "enable_hr": True, "denoising_strength": 0.5}


def test_hr_resize_sets_the_hires_size_as_a1111(client, pipe):
    """A1111's calculate_target_resolution: hr_resize_x / hr_resize_y, either non-zero, stand for hr_scale (infotext
    "Hires resize"); one of them 0 keeps the first pass's aspect; both given, the upscale covers them and its latents
    are cut to them, centred; the first pass stays at width x height. They were ignored."""
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_resize_x": 24, "hr_resize_y": 24, "hr_scale": 3})
    want = pipe.generate_hires("a red circle", hires_scale=1.5, hires_strength=0.5, steps=2, seed=5, width=16,
                               height=16, guidance_scale=3, progress=False, **a1111_settings("Euler"))
    assert _image(r).size == (24, 24) and _image(r).convert("RGB").tobytes() == want.images[0].tobytes()
    info = _info(r)
    assert "Hires resize: 24x24" in info["infotexts"][0] and "Hires upscale:" not in info["infotexts"][0]
    assert "Size: 16x16" in info["infotexts"][0] and info["ignored_fields"] == ["hr_scale"]
    # one side 0: the other from the first pass's aspect (16 x 24 -> 32 wide, 32 * 24 // 16 = 48 tall)
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "height": 24, "hr_resize_x": 32})
    assert _image(r).size == (32, 48)
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "height": 24, "hr_resize_y": 36})
    assert _image(r).size == (24, 36)
    # both, another shape: upscaled to cover 32 x 24 (32 x 32), its latents cut by (32 - 24) // 2 = 4 rows, 2 a side
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_resize_x": 32, "hr_resize_y": 24})
    assert _image(r).size == (32, 24) and "Hires resize: 32x24" in _info(r)["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_resize_x": 96})
    assert r.status_code == 422 and r.json()["field"] == "hr_resize_x"


def test_hr_resize_crop_is_a1111s_centred_latent_cut(pipe, monkeypatch):
    """Both sizes given in another shape: the first pass's latents upscaled to cover them, then cut by truncate // 2
    cells before and (truncate + 1) // 2 after, as A1111's sample_hr_pass slices them (here 4 rows: 2 and 2)."""
    import torch

    from imagine.pipelines.text_to_image import hires_target

    assert hires_target(16, 16, 2.0, (32, 24), 2) == ((32, 32), (4, 0))
    seen, generate = [], pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda *a, **kw: (seen.append(kw), generate(*a, **kw))[1])
    pipe.generate_hires("a red circle", hires_resize=(32, 24), hires_strength=0.5, steps=2, seed=5, width=16,
                        height=16, guidance_scale=3, progress=False, **a1111_settings("Euler"))
    monkeypatch.undo()
    first = pipe.generate("a red circle", steps=2, seed=5, width=16, height=16, guidance_scale=3, progress=False,
                          output_type="latent", **a1111_settings("Euler")).latents
    up = torch.nn.functional.interpolate(first.float(), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(seen[1]["init_latents"], up[:, :, 2:14, :]) and (seen[1]["height"], seen[1]["width"]) == (24, 32)


def test_hr_scale_1_the_api_default_strength_and_the_upscalers(client):
    """hr_scale 1 is valid (A1111's slider starts there: a second pass at the same size); a request with enable_hr and
    no denoising_strength takes A1111's API default, 0.75 (StableDiffusionProcessingTxt2Img); hr_upscaler names an
    upscaler the server runs (A1111's latent modes, None, Lanczos, Nearest, listed by /sdapi/v1/latent-upscale-modes
    and /sdapi/v1/upscalers in A1111's shapes), another is a 422 listing them, as A1111 refuses a name it lacks."""
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_scale": 1})
    assert _image(r).size == (16, 16) and "Hires upscale: 1" in _info(r)["infotexts"][0]
    for body in ({**BODY, "enable_hr": True}, {**BODY, "enable_hr": True, "denoising_strength": None}):
        info = _info(client.post("/sdapi/v1/txt2img", json=body))
        assert info["denoising_strength"] == 0.75 and "Denoising strength: 0.75" in info["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and r.json()["field"] == "hr_upscaler"
    assert "Latent (bicubic)" in r.json()["detail"] and "Lanczos" in r.json()["detail"]
    plain = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": "Latent"})
    for name in ("latent (nearest)", "Nearest", "None"):
        r = client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": name})
        assert _image(r).tobytes() != _image(plain).tobytes(), name
    assert "Hires upscaler: Latent (nearest)" in _info(
        client.post("/sdapi/v1/txt2img", json={**HIRES, "hr_upscaler": "latent (nearest)"}))["infotexts"][0]
    ups = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest"]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in ups)
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == [
        {"name": n} for n in ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                              "Latent (nearest)", "Latent (nearest-exact)")]


# -- 8. JSON nulls -------------------------------------------------------------------------------
def test_nulls_are_the_defaults(client):
    """A1111's API fields are Optional; clients built from its schema send null for a field left at its default: seed
    and subseed null are random, styles [], negative_prompt "", the others their defaults (they were 422s)."""
    want = client.post("/sdapi/v1/txt2img", json=BODY)
    nulls = {k: None for k in ("negative_prompt", "styles", "sampler_index", "batch_size", "n_iter", "send_images",
                               "denoising_strength", "subseed", "subseed_strength", "enable_hr", "hr_scale", "eta",
                               "seed_resize_from_h", "restore_faces", "override_settings", "alwayson_scripts")}
    got = client.post("/sdapi/v1/txt2img", json={**BODY, **nulls})
    assert _image(got).tobytes() == _image(want).tobytes()
    assert _info(got)["ignored_fields"] == []  # (a null extra is a field not sent)
    info = _info(client.post("/sdapi/v1/txt2img", json={**BODY, "seed": None}))
    assert 0 <= info["seed"] < 2**32
    picture = _b64(Image.new("RGB", (16, 16), (200, 50, 50)))
    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [picture], "mask": None, "mask_blur": None,
                                               "inpainting_fill": None, "resize_mode": None, "inpaint_full_res": None,
                                               "denoising_strength": None, "image_cfg_scale": None})
    assert _info(r)["denoising_strength"] == 0.75


# -- img2img without width and height --------------------------------------------------------------
def test_img2img_at_the_pictures_size_past_the_limit_says_to_send_width_and_height(client):
    """img2img without width / height runs at the picture's own size (documented, docs/serving.md; A1111's API would
    run 512 x 512): a picture past the server's limit was a 422 about width's bounds, which the request never sent."""
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a", "steps": 2,
                                               "init_images": [_b64(Image.new("RGB", (120, 90)))]})
    assert r.status_code == 422 and r.json()["field"] == "width"
    assert "120x90" in r.json()["detail"] and "send width and height" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a", "steps": 2, "width": 16, "height": 16,
                                               "init_images": [_b64(Image.new("RGB", (120, 90)))]})
    assert _image(r).size == (16, 16)


def test_clip_stop_at_last_layers_is_not_applied_where_a1111_ignores_it(tmp_path):
    """A1111 reads CLIP_stop_at_last_layers for SD 1.x's CLIP alone: SD 2.x's OpenCLIP tower always takes its
    penultimate layer (sd_hijack_open_clip). On an SD 2.x-shaped model (exact GELU) the option changes nothing."""
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    save_diffusers_folder(tmp_path / "sd2", "sd2")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "sd2")
    assert pipe.text_encoder.model.config.hidden_act == "gelu"
    with TestClient(create_app(pipe, ServerConfig(**CFG))) as c:
        base = c.post("/sdapi/v1/txt2img", json=BODY)
        r = c.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}})
        assert r.status_code == 200 and _image(r).tobytes() == _image(base).tobytes()
