"""ComfyUI's `embedding:NAME` in CLIPTextEncode texts (its sd1_clip tokenize_with_weights): the textual inversion of
its embeddings folder's file NAME (with or without the extension) in place of the word, at the word's weight; a word
that does not start with it is text; a NAME it has no file for is left out. Through a real server on a tiny SD 1.x
folder (CLIP text encoder) with an embedding loaded by its file (serve --embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from imagine.server.comfyui import comfyui_embeddings
from test_comfyui_api_s35 import graph, pictures, run

pytestmark = pytest.mark.usefixtures("one_thread")
FILES = {"sketchy": "sketchy.safetensors", "easy_word": "EasyNegative.pt"}


@pytest.mark.parametrize("text,read", [
    ("embedding:EasyNegative, a cat", "easy_word , a cat"),  # (its trailing comma: a word of its own)
    ("(embedding:sketchy:1.2) dog", "(sketchy:1.2) dog"),
    ("a (embedding:sketchy.safetensors) b", "a (sketchy) b"),  # (the file's name with its extension)
    ("x embedding:missing, y", "x , y"),  # (no such file: left out, its comma kept)
    ("photo,embedding:sketchy", "photo,embedding:sketchy"),  # (not at a word's start: text)
    ("no embeddings here", "no embeddings here")])
def test_the_words_read_as_comfyui_reads_them(text, read):
    assert comfyui_embeddings(text, FILES) == read


def test_an_embedding_word_gives_the_pictures_of_its_loaded_word(tmp_path):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_loading import save_diffusers_folder
    from test_textual_inversion import _vectors, _write

    save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    pipe.load_embedding(_write("a1111.safetensors", _vectors(3) * 4, tmp_path / "emb", "sketchy"))
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="folder",
                     comfyui=str(tmp_path / "comfy"))

    def picture(srv, text):
        g = graph("folder", batch=1, sampler="euler", scheduler="normal", text=text)
        g["5"]["inputs"].update(width=32, height=32)
        _, entry = run(srv, g)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return pictures(srv, entry)[0]

    with BackgroundServer(app) as srv:
        assert requests.get(srv.url + "/embeddings").json() == ["sketchy"]
        word = picture(srv, "a red sketchy circle")
        assert np.array_equal(picture(srv, "a red embedding:sketchy circle"), word)
        assert np.array_equal(picture(srv, "a red (embedding:sketchy:1.3) circle"),
                              picture(srv, "a red (sketchy:1.3) circle"))
        plain = picture(srv, "a red circle")
        assert not np.array_equal(word, plain)  # (the vectors reach the picture)
        assert np.array_equal(picture(srv, "a red embedding:other circle"), plain)  # (left out, as ComfyUI does)
