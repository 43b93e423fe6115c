"""ComfyUI's classic cache: a node of a prompt whose signature (class, IS_CHANGED, widget values, and the signatures
of the nodes it reads) equals one of the last prompt's is not run again. Queued again unchanged, a graph runs no node
(execution_cached names them all, no file is written, the history shows the same pictures); with a new seed only the
KSampler and what follows run; a picture uploaded again under its name with other pixels is loaded again (LoadImage's
IS_CHANGED, the file's hash); the cache holds the last prompt's nodes only."""

from __future__ import annotations

import io

import numpy as np
import requests
from PIL import Image

from test_comfyui_api_s35 import graph, pictures, pipe, run, server  # noqa: F401 (the fixtures)


def cached(entry) -> list[str]:
    return next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")


def test_a_graph_queued_again_runs_nothing_and_a_new_seed_runs_the_sampler_on(server, tmp_path):
    g = graph(server.name, seed=4242, steps=3, batch=1)
    _, first = run(server, g)
    assert cached(first) == []
    files = first["outputs"]["9"]["images"]
    _, again = run(server, g)
    assert sorted(cached(again)) == sorted(g)  # (every node)
    assert again["outputs"]["9"]["images"] == files  # (the same files: none written)
    g2 = graph(server.name, seed=4243, steps=3, batch=1)
    _, other = run(server, g2)
    assert sorted(cached(other)) == ["4", "5", "6", "7"]  # (the loader, the latent and the texts)
    assert other["outputs"]["9"]["images"] != files
    assert not np.array_equal(pictures(server, other)[0], pictures(server, first)[0])
    _, back = run(server, g)  # (the cache holds the last prompt's nodes only: the first seed's sampler runs again)
    assert sorted(cached(back)) == ["4", "5", "6", "7"]
    assert np.array_equal(pictures(server, back)[0], pictures(server, first)[0])


def test_an_upload_under_the_same_name_is_loaded_again(server):
    def upload(seed):
        rgb = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        r = requests.post(server.url + "/upload/image", files={"image": ("same.png", buffer.getvalue(), "image/png")},
                          data={"overwrite": "true"})
        assert r.status_code == 200

    g = graph(server.name, seed=7, steps=3, batch=1, latent=["11", 0], denoise=0.5)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "same.png"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    upload(1)
    _, first = run(server, g)
    _, again = run(server, g)
    assert "10" in cached(again) and "3" in cached(again)
    upload(2)
    _, changed = run(server, g)
    assert "10" not in cached(changed) and "3" not in cached(changed) and "6" in cached(changed)
    assert not np.array_equal(pictures(server, changed)[0], pictures(server, first)[0])


def test_model_folders_and_free(server):
    assert requests.get(server.url + "/models").json() == ["checkpoints", "loras", "vae", "controlnet",
                                                           "upscale_models", "embeddings"]
    assert requests.get(server.url + "/models/checkpoints").json() == [server.name]
    assert requests.get(server.url + "/api/models/loras").json() == []
    assert requests.get(server.url + "/models/upscale_models").json() == []  # (no --upscaler-dir)
    assert requests.get(server.url + "/models/style_models").status_code == 404
    g = graph(server.name, seed=99, steps=3, batch=1)
    run(server, g)
    assert requests.post(server.url + "/free", json={"free_memory": True}).status_code == 200
    _, again = run(server, g)  # (the cache let go: the graph runs again)
    assert cached(again) == []


def test_front_runs_next_and_numbers_order_the_queue(server):
    """ComfyUI's queue runs by number: a prompt sent with `front` (a negative number) runs before those waiting, and
    /queue lists the waiting in that order."""
    import time

    def send(seed, **body):
        g = graph(server.name, seed=seed, steps=3, batch=1)
        return requests.post(server.url + "/prompt", json={"prompt": g, **body}).json()["prompt_id"]

    heavy = graph(server.name, seed=1, steps=20, batch=2)  # (a few seconds: the two others are sent meanwhile)
    heavy["5"]["inputs"].update(width=64, height=64)
    first = requests.post(server.url + "/prompt", json={"prompt": heavy}).json()["prompt_id"]
    later, front = send(2), send(3, front=True)
    pending = [item[1] for item in requests.get(server.url + "/queue").json()["queue_pending"]]
    if first not in pending:  # (the heavy one runs; the two wait)
        assert pending == [front, later]
    starts = {}
    for pid in (first, later, front):
        t0 = time.time()
        while time.time() - t0 < 120:
            h = requests.get(f"{server.url}/history/{pid}").json()
            if h:
                starts[pid] = h[pid]["status"]["messages"][0][1]["timestamp"]
                break
            time.sleep(0.05)
    assert starts[first] <= starts[front] <= starts[later]
