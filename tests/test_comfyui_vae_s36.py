"""ComfyUI's VAELoader: the VAE files and folders of serve --vae-dir by name; VAEDecode and VAEEncode with it give
what the model loaded with that VAE (serve --vae, from_pretrained(vae=...)) gives with its own, to the pixel."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import graph, pictures, run

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_loaded_vae_decodes_as_the_model_loaded_with_it(tmp_path):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_loading import save_diffusers_folder, tiny_diffusers_parts

    save_diffusers_folder(tmp_path / "sd", "sd1")
    (tmp_path / "vaes").mkdir()
    tiny_diffusers_parts("sd1", seed=7)[1].save_pretrained(tmp_path / "vaes" / "other", safe_serialization=True)

    def served(pipe, g, vae_dir=None):
        pipe.vae_dir = vae_dir
        app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="sd",
                         comfyui=str(tmp_path / f"c{len(list(tmp_path.iterdir()))}"))
        with BackgroundServer(app) as srv:
            names = requests.get(srv.url + "/object_info/VAELoader").json()["VAELoader"]["input"]["required"]
            _, entry = run(srv, g)
            assert entry["status"]["status_str"] == "success", entry["status"]
            return names["vae_name"][0], pictures(srv, entry)[0]

    g = graph("sd", seed=3, steps=3, batch=1, sampler="euler", scheduler="normal")
    g["5"]["inputs"].update(width=32, height=32)
    loaded = dict(g)
    loaded["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "other"}}
    loaded["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["30", 0]}}
    names, got = served(TextToImagePipeline.from_pretrained(tmp_path / "sd"), loaded, tmp_path / "vaes")
    assert names == ["other"]
    _, want = served(TextToImagePipeline.from_pretrained(tmp_path / "sd", vae=tmp_path / "vaes" / "other"), g)
    _, own = served(TextToImagePipeline.from_pretrained(tmp_path / "sd"), g)
    assert np.array_equal(got, want) and not np.array_equal(got, own)
