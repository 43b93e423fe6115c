"""The page's "Read parameters" button (session 29): A1111's paste button (↙), which reads an infotext pasted into the
prompt box (as people copy them from a PNG Info tab or a model site) into the form, or the last generation's with the
box empty. Checked by making the picture again: the infotext comes from the A1111 API's own answer."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from test_server_browser import _fill_form, _gallery_download, page, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _made(server, **kw):
    import httpx

    body = {"prompt": "a red circle, blue square", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6,
            "width": 32, "height": 48, "seed": 123, "sampler_name": "Euler", "scheduler": "Karras", **kw}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return (Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"),
            json.loads(r.json()["info"])["infotexts"][0])


def test_an_infotext_pasted_into_the_prompt_box_fills_the_form(server, page):
    made, infotext = _made(server)
    assert "Steps: 3" in infotext and "Seed: 123" in infotext
    _fill_form(page, server, prompt=infotext, steps=9, seed=1, sampler="DDIM", size=64)
    page.click("#read_prompt")
    page.wait_for_function("document.querySelector('#prompt').value === 'a red circle, blue square'")
    assert page.input_value("#negative_prompt") == "blurry"
    assert (page.input_value("#steps"), page.input_value("#seed")) == ("3", "123")
    assert (page.input_value("#width"), page.input_value("#height")) == ("32", "48")
    assert page.input_value("#sampler") == "Euler" and page.input_value("#scheduler") == "Karras"
    page.click("#generate")
    assert _gallery_download(page).tobytes() == made.tobytes()


def test_plain_prompt_text_changes_nothing(server, page):
    _fill_form(page, server, prompt="a cat, with: colons, and more: words", steps=7, seed=5, sampler="DDIM", size=64)
    page.click("#read_prompt")
    page.wait_for_function("document.querySelector('#error') && !document.querySelector('#error').hidden")
    assert "no parameters line" in page.inner_text("#error")
    assert page.input_value("#prompt") == "a cat, with: colons, and more: words"
    assert (page.input_value("#steps"), page.input_value("#seed")) == ("7", "5")


def test_an_empty_prompt_box_reads_the_last_picture_made(server, page):
    _fill_form(page, server, prompt="a green triangle", steps=2, seed=31, sampler="Euler", size=32)
    page.click("#generate")
    _gallery_download(page)
    page.fill("#prompt", "")
    page.fill("#steps", "11")
    page.fill("#seed", "4")
    page.click("#read_prompt")
    page.wait_for_function("document.querySelector('#prompt').value === 'a green triangle'")
    assert (page.input_value("#steps"), page.input_value("#seed")) == ("2", "31")


def test_the_infotext_endpoint(server):
    import httpx

    r = httpx.post(f"{server.url}/imagine/v1/infotext",
                   json={"text": "a cat\nNegative prompt: dog\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 9, "
                                 "Size: 64x32"}, timeout=30)
    assert r.status_code == 200 and r.json()["has_settings"] is True
    p = r.json()["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"], p["Size-1"], p["Size-2"]) == (
        "a cat", "dog", "12", "9", "64", "32")
    plain = httpx.post(f"{server.url}/imagine/v1/infotext", json={"text": "a cat, x: 1"}, timeout=30).json()
    assert plain["has_settings"] is False and plain["parameters"]["Prompt"] == "a cat, x: 1"
    bad = httpx.post(f"{server.url}/imagine/v1/infotext", json={"text": 5}, timeout=30)
    assert bad.status_code == 422
