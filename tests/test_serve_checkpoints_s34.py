"""`imagine serve --ckpt-dir`: a folder of checkpoints behind one server, as AUTOMATIC1111 serves its models folder.

The truth each switch is held to: the picture a server serving only that model gives for the same request (its own
app, `create_app`), to the pixel, and the infotext's model name; what is listed, in A1111's shapes."""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from imagine.server import cli
from imagine.server.app import BackgroundServer, ServerConfig, create_app
from imagine.server.checkpoints import Checkpoint, CheckpointServer, find, scan

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
BODY = {"prompt": "a red circle", "seed": 7, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler",
        "cfg_scale": 3.0}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    testing = pytest.importorskip("imagine.testing")
    root = tmp_path_factory.mktemp("models")
    testing.make_tiny_model(root / "alpha", seed=0)
    testing.make_tiny_model(root / "sub" / "beta", seed=5)
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")  # a header, no tensors
    return root


def _args(ckpt_dir, *extra):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(["--ckpt-dir", str(ckpt_dir), "--threads", "1", *extra])


CONFIG = ServerConfig(queue_size=4, max_batch=4, max_width=64, max_height=64, max_steps=20, max_images=4)


def _served(args) -> CheckpointServer:
    return cli._checkpoint_server(args, CONFIG, None)


@pytest.fixture(scope="module")
def alone(ckpt_dir):
    """What a server serving only each model answers: {name: (picture, infotext)}."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    truth = {}
    for name in ("alpha", "sub/beta"):
        app = create_app(TextToImagePipeline.from_pretrained(ckpt_dir / name), CONFIG, model_name=name)
        with BackgroundServer(app) as srv:
            r = requests.post(srv.url + "/sdapi/v1/txt2img", json=BODY, timeout=120)
            assert r.status_code == 200, r.text
            truth[name] = (_pixels(r.json()["images"][0]), json.loads(r.json()["info"])["infotexts"][0])
    assert not np.array_equal(truth["alpha"][0], truth["sub/beta"][0])  # (the two models differ)
    return truth


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _txt2img(srv, **kw):
    r = requests.post(srv.url + "/sdapi/v1/txt2img", json={**BODY, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return _pixels(r.json()["images"][0]), json.loads(r.json()["info"])["infotexts"][0]


def _options(srv) -> dict:
    return requests.get(srv.url + "/sdapi/v1/options", timeout=30).json()


def test_scan_and_a1111_names(ckpt_dir):
    found = scan(ckpt_dir)
    assert [c.name for c in found] == ["alpha", "broken.safetensors", "sub/beta"]
    beta = found[2]
    assert beta.model_name == "sub_beta" and found[1].model_name == "broken"
    sha = beta.sha256()
    assert len(sha) == 64 and beta.title(sha) == f"sub/beta [{sha[:10]}]"
    # exact names (what /options takes), and A1111's closest match (what override_settings takes)
    assert find(found, "sub_beta") is beta and find(found, sha[:10]) is beta and find(found, "beta") is beta
    assert find(found, "bet") is None and find(found, "bet", closest=True) is beta
    assert find(found, "sub/beta [0000000000]", closest=True) is beta  # (a stale hash: matched without it)
    assert find(found, "gamma", closest=True) is None


def test_lists_switches_and_carries_settings(ckpt_dir, alone):
    server = _served(_args(ckpt_dir))
    assert server.current.name == "alpha"  # (no --model: the folder's first)
    with BackgroundServer(server) as srv:
        models = requests.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()
        assert [m["model_name"] for m in models] == ["alpha", "broken", "sub_beta"]
        assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert _options(srv)["sd_model_checkpoint"] == models[0]["title"]
        assert [m["id"] for m in requests.get(srv.url + "/v1/models", timeout=30).json()["data"]] == [
            "alpha", "broken.safetensors", "sub/beta"]

        pixels, info = _txt2img(srv)
        assert np.array_equal(pixels, alone["alpha"][0]) and info == alone["alpha"][1]

        # a setting set before the switch is kept after it; the model switched from is gone from memory (FastAPI's
        # endpoint caches held every app's endpoints, and with them its pipeline)
        import gc
        import weakref

        alpha = weakref.ref(server.app.state.pipe)
        assert requests.post(srv.url + "/sdapi/v1/options", json={"eta_ancestral": 0.5}, timeout=30).ok
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": models[2]["title"]}, timeout=60)
        assert r.status_code == 200, r.text
        options = _options(srv)
        assert options["sd_model_checkpoint"] == models[2]["title"] and options["eta_ancestral"] == 0.5
        assert list(server._apps) == [server.current]  # (one in memory: alpha left before beta loaded)
        gc.collect()
        assert alpha() is None
        # and the model a request ran on by override_settings, after the restore (the request's scope held its app)
        loaded = []
        load = server._load
        server._load = lambda c: loaded.append(load(c)) or loaded[-1]
        beta = weakref.ref(server.app.state.pipe)
        _txt2img(srv, override_settings={"sd_model_checkpoint": "alpha"})
        pipes = [weakref.ref(app.state.pipe) for app in loaded]  # (alpha for the request, then beta anew)
        del loaded[:]
        gc.collect()
        assert beta() is None and pipes[0]() is None and pipes[1]() is server.app.state.pipe
        pixels, info = _txt2img(srv)
        assert np.array_equal(pixels, alone["sub/beta"][0]) and info == alone["sub/beta"][1]
        assert "Model: beta," in info  # (A1111's name_for_extra: no folder)


def test_override_settings_runs_one_request_on_another_model(ckpt_dir, alone):
    loads = []

    server = _served(_args(ckpt_dir, "--model", str(ckpt_dir / "sub" / "beta"), "--checkpoints-in-memory", "2"))
    load = server._load
    server._load = lambda c: loads.append(c.name) or load(c)
    with BackgroundServer(server) as srv:
        beta_title = _options(srv)["sd_model_checkpoint"]
        assert beta_title.startswith("sub/beta [")
        # A1111's closest match by part of a title; the model served is back after the request
        pixels, info = _txt2img(srv, override_settings={"sd_model_checkpoint": "alph"})
        assert np.array_equal(pixels, alone["alpha"][0]) and info == alone["alpha"][1]
        r = requests.post(srv.url + "/sdapi/v1/txt2img", timeout=60,
                          json={**BODY, "override_settings": {"sd_model_checkpoint": "alpha"}})
        assert json.loads(r.json()["info"])["ignored_fields"] == []  # (read, not passed over)
        assert _options(srv)["sd_model_checkpoint"] == beta_title
        assert np.array_equal(_txt2img(srv)[0], alone["sub/beta"][0])
        assert loads == ["alpha"]  # (two in memory: alpha loaded once, beta never left)

        # override_settings_restore_afterwards false: the model stays
        _txt2img(srv, override_settings={"sd_model_checkpoint": "alpha"}, override_settings_restore_afterwards=False)
        assert _options(srv)["sd_model_checkpoint"].startswith("alpha [")
        assert np.array_equal(_txt2img(srv)[0], alone["alpha"][0])

        # OpenAI's `model` where it names one of ours; another name (a client's default) runs on the one served
        r = requests.post(srv.url + "/v1/images/generations", timeout=60,
                          json={"prompt": "a red circle", "model": "sub/beta", "size": f"{SIZE}x{SIZE}"})
        assert r.status_code == 200, r.text
        r = requests.post(srv.url + "/v1/images/generations", timeout=60,
                          json={"prompt": "a red circle", "model": "dall-e-2", "size": f"{SIZE}x{SIZE}"})
        assert r.status_code == 200, r.text
        assert _options(srv)["sd_model_checkpoint"].startswith("alpha [")


def test_unknown_or_broken_checkpoints_are_422_and_the_model_stays(ckpt_dir, alone):
    server = _served(_args(ckpt_dir))
    with BackgroundServer(server) as srv:
        before = _options(srv)["sd_model_checkpoint"]
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "gamma"}, timeout=30)
        assert r.status_code == 422 and "no checkpoint 'gamma'" in r.json()["detail"]
        assert "'alpha [" in r.json()["detail"] and r.json()["field"] == "sd_model_checkpoint"
        r = requests.post(srv.url + "/sdapi/v1/txt2img", json={**BODY, "override_settings": {
            "sd_model_checkpoint": "gamma"}}, timeout=30)
        assert r.status_code == 422 and "no checkpoint like 'gamma'" in r.json()["detail"]

        # a file that does not load: the error names it and why; the model served before (which had left memory
        # for it) is loaded again and serves
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"},
                          timeout=60)
        assert r.status_code == 422, r.text
        assert "broken.safetensors did not load" in r.json()["detail"] and "still serving alpha" in r.json()["detail"]
        assert _options(srv)["sd_model_checkpoint"] == before
        assert np.array_equal(_txt2img(srv)[0], alone["alpha"][0])


def test_a_switch_waits_for_the_picture_under_way(ckpt_dir, alone):
    """A picture begun on one model ends on it: the switch asked for meanwhile waits, then serves the other."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    gate, held = threading.Event(), threading.Event()

    class Held:  # the real pipeline, held at its first step until the test lets it go
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def generate(self, *a, **kw):
            inner = kw.get("callback")

            def callback(d):
                held.set()
                gate.wait(60)
                if inner is not None:
                    inner(d)
            return self.pipe.generate(*a, **{**kw, "callback": callback})

    def load(c):
        return create_app(Held(TextToImagePipeline.from_pretrained(c.path)), CONFIG, model_name=c.name)

    found = scan(ckpt_dir)
    server = CheckpointServer(found[0], load(found[0]), load, lambda: found)
    with BackgroundServer(server) as srv:
        answers = {}
        first = threading.Thread(target=lambda: answers.update(first=_txt2img(srv)))
        first.start()
        assert held.wait(60)
        switch = threading.Thread(target=lambda: answers.update(switch=requests.post(
            srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sub/beta"}, timeout=120)))
        switch.start()
        time.sleep(0.5)
        assert server.current.name == "alpha" and switch.is_alive()  # (waiting for the picture)
        # a request naming alpha, the model served as it arrives, waits at the gate behind the switch: it must still
        # run on alpha (and leave beta served after it)
        named = threading.Thread(target=lambda: answers.update(named=_txt2img(
            srv, override_settings={"sd_model_checkpoint": "alpha"})))
        named.start()
        time.sleep(0.5)
        gate.set()
        for t in (first, switch, named):
            t.join(60)
        assert np.array_equal(answers["first"][0], alone["alpha"][0])
        assert answers["switch"].status_code == 200
        assert np.array_equal(answers["named"][0], alone["alpha"][0]) and "Model: alpha," in answers["named"][1]
        assert server.current.name == "sub/beta"
        assert np.array_equal(_txt2img(srv)[0], alone["sub/beta"][0])


def test_serve_flags_are_checked(ckpt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt-dir"):
        cli.run(_args(tmp_path / "none"))
    with pytest.raises(ValueError, match="--checkpoints-in-memory must be at least 1"):
        cli.run(_args(ckpt_dir, "--checkpoints-in-memory", "0"))
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    with pytest.raises(ValueError, match="--checkpoints-in-memory is for --ckpt-dir"):
        cli.run(p.parse_args(["--checkpoints-in-memory", "2"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    server = _served(_args(empty))  # (an empty folder: the embedded model, listed alone)
    assert [c.name for c in server.checkpoints] == ["default"] and server.current == Checkpoint(None, "default")


def test_the_page_picks_a_checkpoint(ckpt_dir, alone):
    """The page's checkpoint picker (shown when the server has several): picking one loads it, and the next picture
    is that model's."""
    from headless import page_at

    server = _served(_args(ckpt_dir))
    with BackgroundServer(server) as srv, page_at(srv.url) as (page, errors):
        titles = [m["title"] for m in requests.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()]
        assert page.is_visible("#checkpoint") and page.input_value("#checkpoint") == titles[0]
        assert page.eval_on_selector_all("#checkpoint option", "os => os.map(o => o.value)") == titles
        page.select_option("#checkpoint", titles[2])
        page.wait_for_function("!document.querySelector('#checkpoint').disabled && "
                               "!document.querySelector('#model').textContent.startsWith('loading')")
        assert server.current.name == "sub/beta" and page.input_value("#checkpoint") == titles[2]
        assert page.is_hidden("#error")
        page.select_option("#checkpoint", titles[1])  # (broken.safetensors: the error shows, beta stays)
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "did not load" in page.inner_text("#error")
        page.wait_for_function("!document.querySelector('#checkpoint').disabled")
        assert page.input_value("#checkpoint") == titles[2] and server.current.name == "sub/beta"

        page.fill("#prompt", BODY["prompt"])
        for field in ("steps", "seed", "width", "height"):
            page.fill(f"#{field}", str(BODY[field]))
        page.fill("#cfg_scale", str(BODY["cfg_scale"]))
        page.select_option("#sampler", BODY["sampler_name"])
        page.click("#generate")
        card = page.wait_for_selector(".gallery .card", timeout=60_000)
        href = card.query_selector("a.download").get_attribute("href")
        assert np.array_equal(_pixels(href.split(",", 1)[1]), alone["sub/beta"][0])
        assert not errors, errors


def test_a_single_file_is_listed_by_name_until_hashed_then_with_its_sha256(tmp_path):
    """A1111's listing: a file not yet hashed is listed by its name; once it loads (and is hashed), by its title
    with the file's sha256 (hashlib's over its bytes), which the infotext carries."""
    import hashlib

    from test_loading import write_single_file

    write_single_file(tmp_path / "sd" / "tiny-sd.safetensors", "sd1")
    testing = pytest.importorskip("imagine.testing")
    testing.make_tiny_model(tmp_path / "alpha")
    digest = hashlib.sha256((tmp_path / "sd" / "tiny-sd.safetensors").read_bytes()).hexdigest()
    server = _served(_args(tmp_path))
    with BackgroundServer(server) as srv:
        models = requests.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()
        assert [(m["title"], m["hash"]) for m in models][1] == ("sd/tiny-sd.safetensors", None)
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sd/tiny-sd.safetensors"},
                          timeout=120)
        assert r.status_code == 200, r.text
        models = requests.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()
        assert models[1] == {"title": f"sd/tiny-sd.safetensors [{digest[:10]}]", "model_name": "sd_tiny-sd",
                             "hash": digest[:10], "sha256": digest,
                             "filename": str(tmp_path / "sd" / "tiny-sd.safetensors"), "config": None}
        assert _options(srv)["sd_model_checkpoint"] == models[1]["title"]
        body = {**BODY, "width": 32, "height": 32}
        _, info = _txt2img(srv, **body)
        assert f"Model hash: {digest[:10]}, Model: tiny-sd," in info
        # its hash names it now, as A1111's aliases do
        assert requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"}, timeout=60).ok
        assert requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": digest[:10]},
                             timeout=60).ok
        assert server.current.name == "sd/tiny-sd.safetensors"
    # the file served alone (`imagine serve --model FILE`) is listed by A1111's names too
    from imagine.pipelines.text_to_image import TextToImagePipeline

    app = create_app(TextToImagePipeline.from_pretrained(tmp_path / "sd" / "tiny-sd.safetensors"), CONFIG)
    with BackgroundServer(app) as srv:
        alone = requests.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()[0]
        for name in ("tiny-sd", "tiny-sd.safetensors", digest[:10], alone["title"]):  # (A1111's names for it)
            r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=30)
            assert r.status_code == 200, (name, r.text)
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "other"}, timeout=30)
        assert r.status_code == 422 and "--ckpt-dir" in r.json()["detail"]
    assert (alone["title"], alone["model_name"], alone["sha256"]) == (f"tiny-sd.safetensors [{digest[:10]}]",
                                                                      "tiny-sd", digest)


def test_unload_and_reload_checkpoint(ckpt_dir, alone):
    """A1111's unload-checkpoint takes the model out of memory (its worker stopped); reload-checkpoint, or the next
    request, loads it again, and its pictures are the same."""
    server = _served(_args(ckpt_dir))
    loads = []
    load = server._load
    server._load = lambda c: loads.append(c.name) or load(c)
    with BackgroundServer(server) as srv:
        assert requests.post(srv.url + "/sdapi/v1/unload-checkpoint", timeout=30).status_code == 200
        assert not server._apps
        assert requests.post(srv.url + "/sdapi/v1/reload-checkpoint", timeout=60).status_code == 200
        assert list(server._apps) == [server.current] and loads == ["alpha"]
        assert requests.post(srv.url + "/sdapi/v1/unload-checkpoint", timeout=30).status_code == 200
        assert np.array_equal(_txt2img(srv)[0], alone["alpha"][0])  # (loaded again by the request)
        assert loads == ["alpha", "alpha"]
        assert requests.post(srv.url + "/sdapi/v1/unload-checkpoint", timeout=30).status_code == 200
        r = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sub/beta"}, timeout=60)
        assert r.status_code == 200, r.text  # (from nothing loaded to another model)
        assert np.array_equal(_txt2img(srv)[0], alone["sub/beta"][0])
