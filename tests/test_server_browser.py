"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright.

Types a prompt, clicks Generate, sees the live progress bar and preview while the model worker
is held at a sampler step, then the finished image in the gallery with its parameters and a
download link; saves a screenshot to docs/serving-page.png.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
# The screenshot goes to docs/ only when asked (IMAGINE_UPDATE_DOCS=1), so a test run leaves the tree clean.
SCREENSHOT = (Path(__file__).resolve().parent.parent / "docs" / "serving-page.png" if os.environ.get("IMAGINE_UPDATE_DOCS")
              else Path(tempfile.gettempdir()) / "imagine-serving-page.png")

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from imagine.samplers import a1111_settings  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class HeldPipe:
    """The real pipeline; generate waits at sampler step 1 while `hold` is set."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, negative_prompt=None, **kw):
        inner, seen = kw.get("callback"), [0]

        def callback(d):
            if seen[0] == 1 and self.hold.is_set():
                self.held.set()
                self.release.wait(60)
            seen[0] += 1
            inner(d)

        kw["callback"] = callback
        return self.pipe.generate(prompts, negative_prompt, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    testing = pytest.importorskip("imagine.testing")
    from imagine.pipelines.text_to_image import TextToImagePipeline

    pipe = HeldPipe(TextToImagePipeline.from_pretrained(testing.make_tiny_model(tmp_path_factory.mktemp("tiny"))))
    app = create_app(pipe, ServerConfig(max_width=256, max_height=256))
    with BackgroundServer(app) as srv:
        srv.pipe = pipe
        yield srv
        pipe.release.set()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 760})
        finally:
            browser.close()


def _fill_form(page, server, *, prompt: str, steps: int, seed: int, sampler: str, negative_prompt: str = "",
               size: int = 64) -> None:
    """Open the page, wait for its samplers, and fill the form as a person would."""
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")
    page.fill("#prompt", prompt)
    page.fill("#negative_prompt", negative_prompt)
    for field, value in (("#steps", steps), ("#seed", seed), ("#width", size), ("#height", size)):
        page.fill(field, str(value))
    page.select_option("#sampler", sampler)


def _gallery_download(page) -> Image.Image:
    """The first gallery card's download: the image the page received, as RGB."""
    card = page.wait_for_selector(".gallery .card", timeout=60_000)
    href = card.query_selector("a.download").get_attribute("href")
    return Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB")


def test_generate_from_the_page(server, page):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    _fill_form(page, server, prompt="a red circle to the left of a blue square", negative_prompt="blurry", steps=6,
               seed=4242, sampler="Euler a")
    assert "[" in page.inner_text("#model")  # the model's title with its fingerprint

    server.pipe.hold.set()
    server.pipe.release.clear()
    page.click("#generate")
    assert server.pipe.held.wait(60), "the job never reached the sampler"
    # live progress: the bar moved and the x0 preview of step 1 is shown
    page.wait_for_selector("#preview:not([hidden])", timeout=30_000)
    page.wait_for_function("parseFloat(document.querySelector('#progress-fill').style.width) > 0")
    assert "step" in page.inner_text("#progress-text")
    assert page.is_disabled("#generate") and page.is_enabled("#interrupt")
    server.pipe.hold.clear()
    server.pipe.release.set()

    card = page.wait_for_selector(".gallery .card", timeout=60_000)
    img = card.query_selector("img.image")
    page.wait_for_function("document.querySelector('.gallery .card img.image').naturalWidth > 0")
    assert img.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [64, 64]
    params = card.query_selector(".params").inner_text()
    assert "4242" in params and "Euler a" in params and "64×64" in params and "blurry" in params
    link = card.query_selector("a.download")
    assert link.get_attribute("download") == "imagine-4242.png"
    href = link.get_attribute("href")
    assert href.startswith("data:image/png;base64,")
    generated = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB")
    assert generated.size == (64, 64)
    assert page.is_hidden("#progress") and page.is_enabled("#generate")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    # the screenshot shows the image: the card's pixels on screen match the generated image
    shot = Image.open(io.BytesIO(img.screenshot())).convert("RGB").resize((64, 64), Image.BILINEAR)
    a, b = np.asarray(shot, dtype=np.float32), np.asarray(generated, dtype=np.float32)
    assert a.std() > 5, "the image on screen is blank"
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < 12, "the image on screen is not the generated one"
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr > 0.8, f"the image on screen does not look like the generated one (correlation {corr:.2f})"
    assert not errors, errors


def test_page_shows_server_errors(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")
    page.fill("#prompt", "x")
    page.evaluate("document.querySelector('#width').removeAttribute('max')")  # past the browser's own check
    page.fill("#width", "512")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    text = page.inner_text("#error")
    assert "width" in text and "256" in text


def test_img2img_from_the_page(server, page, tmp_path):
    """A picture chosen in "Start from a picture" goes to /sdapi/v1/img2img: the gallery shows the pipeline's own
    image-to-image result for it."""
    picture = Image.fromarray((np.indices((64, 64)).sum(0) % 32 * 8).astype(np.uint8)).convert("RGB")
    path = tmp_path / "start.png"
    picture.save(path)
    _fill_form(page, server, prompt="a red circle", steps=4, seed=77, sampler="Euler")
    page.click("#img2img summary")
    page.set_input_files("#init_image", str(path))
    page.fill("#denoising_strength", "0.5")
    page.click("#generate")
    got = _gallery_download(page)
    cfg = float(page.input_value("#cfg_scale"))
    # (Euler as AUTOMATIC1111 runs it, as the page's A1111 API does: samplers.a1111_settings)
    want = server.pipe.pipe.generate("a red circle", init_image=picture, strength=0.5, steps=4, seed=77,
                                     width=64, height=64, guidance_scale=cfg, emphasis=True,
                                     progress=False, **a1111_settings("Euler")).images[0]
    assert got.tobytes() == want.tobytes()


def test_inpainting_from_the_page(server, page, tmp_path):
    """A mask chosen with the picture goes with it as A1111's `mask` (its defaults: blur 4, fill, only masked):
    outside the crop around the mask the answer is the picture's own pixels; inside, the mask's box is painted."""
    from imagine.inpainting import blur_mask, crop_region

    picture = Image.fromarray((np.indices((64, 64)).sum(0) % 32 * 8).astype(np.uint8)).convert("RGB")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (26, 26, 38, 38))
    picture.save(tmp_path / "start.png")
    mask.save(tmp_path / "mask.png")
    _fill_form(page, server, prompt="a red circle", steps=4, seed=78, sampler="Euler")
    page.click("#img2img summary")
    page.set_input_files("#init_image", str(tmp_path / "start.png"))
    page.set_input_files("#mask", str(tmp_path / "mask.png"))
    page.click("#generate")
    got = np.asarray(_gallery_download(page), dtype=np.int16)
    x1, y1, x2, y2 = crop_region(blur_mask(mask, 4), 64, 64, 0)
    assert 0 < x1 < 26 and 38 < x2 < 64, (x1, x2)
    want = np.asarray(picture, dtype=np.int16)
    outside = np.ones((64, 64), bool)
    outside[y1:y2, x1:x2] = False
    assert (got[outside] == want[outside]).all()
    assert np.abs(got[28:36, 28:36] - want[28:36, 28:36]).mean() > 5


@pytest.fixture(scope="module")
def controlnet_server(tmp_path_factory):
    """The tiny model (f = 2) with a random ControlNet made for its U-Net, served."""
    import torch

    testing = pytest.importorskip("imagine.testing")
    from imagine.models.controlnet import ControlNetModel
    from imagine.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(testing.make_tiny_model(tmp_path_factory.mktemp("tinycn")))
    torch.manual_seed(7)
    net = ControlNetModel({**pipe.unet.config.to_dict(), "conditioning_embedding_out_channels": [8, 16]}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero convolutions must not be zero here
    pipe.load_controlnet(net, "edges")
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=256, max_height=256))) as srv:
        srv.pipe = pipe
        yield srv


def test_controlnet_from_the_page(controlnet_server, page, tmp_path):
    """With a ControlNet loaded the page offers it; a control picture chosen goes as one unit of A1111's ControlNet
    extension, and the gallery shows the pipeline's own image for that picture and weight."""
    server = controlnet_server
    picture = Image.fromarray(((np.indices((16, 16)).sum(0) % 4 == 0) * 255).astype(np.uint8)).convert("RGB")
    picture.save(tmp_path / "edges.png")
    _fill_form(page, server, prompt="a red circle", steps=4, seed=31, sampler="Euler", size=16)
    page.wait_for_function("document.querySelector('#controlnet').dataset.ready === '1'")
    assert page.is_visible("#controlnet summary")
    assert page.eval_on_selector("#controlnet_model", "s => s.options[0].value").startswith("edges")
    modules = page.eval_on_selector("#control_module", "s => [...s.options].map(o => o.value)")
    assert modules == ["none", "canny", "invert (from white bg & black line)"]  # the server's preprocessors
    page.click("#controlnet summary")
    page.set_input_files("#control_image", str(tmp_path / "edges.png"))
    page.fill("#control_weight", "0.7")
    page.click("#generate")
    got = np.asarray(_gallery_download(page))
    cfg = float(page.input_value("#cfg_scale"))  # the model's default, as the page sent it
    a1111 = a1111_settings("Euler")  # (Euler as AUTOMATIC1111 runs it, as the page's A1111 API does)
    want = server.pipe.generate("a red circle", control_image=picture, controlnet_scale=0.7, steps=4, seed=31,
                                height=16, width=16, guidance_scale=cfg, progress=False, **a1111).images[0]
    plain = server.pipe.generate("a red circle", steps=4, seed=31, height=16, width=16,
                                 guidance_scale=cfg, progress=False, **a1111).images[0]
    assert np.array_equal(got, np.asarray(want)) and not np.array_equal(got, np.asarray(plain))


def test_the_controlnet_section_stays_hidden_without_controlnets(server, page):
    _fill_form(page, server, prompt="x", steps=2, seed=1, sampler="Euler")
    page.wait_for_function("document.querySelector('#controlnet').dataset.ready === '1'")
    assert not page.is_visible("#controlnet summary")


def test_hires_and_a_variation_seed_from_the_page(server, page):
    """The Upscale section sends A1111's hires. fix (enable_hr, hr_scale, the hires strength and sampler) and the Variation section
    its subseed / subseed_strength: the gallery shows the pipeline's own image for them, at the larger size."""
    _fill_form(page, server, prompt="a red circle", steps=3, seed=12, sampler="Euler", size=32)
    page.click("#hires summary")
    page.fill("#hr_scale", "2")
    page.fill("#hr_strength", "0.6")
    page.select_option("#hr_sampler", "Euler a")  # (A1111's hires sampler: the second pass's own)
    page.click("#variation summary")
    page.fill("#subseed", "40")
    page.fill("#subseed_strength", "0.3")
    page.click("#generate")
    got = _gallery_download(page)
    cfg = float(page.input_value("#cfg_scale"))
    # (Euler as AUTOMATIC1111 runs it, as the page's A1111 API does: samplers.a1111_settings)
    want = server.pipe.pipe.generate_hires("a red circle", hires_scale=2.0, hires_strength=0.6, steps=3, seed=12,
                                           subseeds=[40], subseed_strength=0.3, width=32, height=32,
                                           guidance_scale=cfg, emphasis=True, long_prompts=True, prompt_editing=True,
                                           composable=True, progress=False, **a1111_settings("Euler"),
                                           hires_sampling=a1111_settings("Euler a")).images[0]
    assert got.size == (64, 64) and got.tobytes() == want.tobytes()


def test_the_noise_section_sends_a1111s_source_and_ensd(server, page):
    """The Noise section sends A1111's randn_source and eta_noise_seed_delta as the request's override_settings: the
    gallery shows the pipeline's image with rng "nv" and that delta (Euler a: the delta moves its ancestral noise)."""
    _fill_form(page, server, prompt="a red circle", steps=3, seed=12, sampler="Euler a", size=32)
    page.click("#noise summary")
    page.select_option("#randn_source", "NV")
    page.fill("#eta_noise_seed_delta", "31337")
    page.click("#generate")
    got = _gallery_download(page)
    cfg = float(page.input_value("#cfg_scale"))
    kw = dict(steps=3, seed=12, width=32, height=32, guidance_scale=cfg, emphasis=True, long_prompts=True,
              prompt_editing=True, composable=True, progress=False, **a1111_settings("Euler a"))
    want = server.pipe.pipe.generate("a red circle", rng="nv", noise_seed_delta=31337, **kw).images[0]
    assert got.tobytes() == want.tobytes()
    assert got.tobytes() != server.pipe.pipe.generate("a red circle", **kw).images[0].tobytes()


def test_a_pictures_parameters_fill_the_form(server, page, tmp_path):
    """A1111's PNG Info on the page: a picture the API made (Euler with the Karras schedule type, a variation seed, the
    NV source and an ENSD) read through /sdapi/v1/png-info into the form, which then makes the same picture again."""
    import httpx

    body = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6, "width": 32,
            "height": 32, "seed": 77, "sampler_name": "Euler a", "scheduler": "Karras", "subseed": 9,
            "subseed_strength": 0.2, "override_settings": {"randn_source": "NV", "eta_noise_seed_delta": 5,
                                                           "sd_noise_schedule": "Zero Terminal SNR"}}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    made = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    path = tmp_path / "made.png"
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler", size=64)
    page.click("#pnginfo summary")
    page.set_input_files("#pnginfo_image", str(path))
    page.wait_for_function("document.querySelector('#prompt').value === 'a red circle'")
    assert page.input_value("#scheduler") == "Karras" and page.input_value("#randn_source") == "NV"
    assert page.is_checked("#zero_terminal_snr")
    assert "Seed: 77" in page.inner_text("#pnginfo_text")
    page.click("#generate")
    got = _gallery_download(page)
    assert got.tobytes() == made.convert("RGB").tobytes()


def test_an_old_a1111_pictures_options_fill_the_form(server, page, tmp_path):
    """An A1111 1.5 picture (its infotext's Version): the options A1111's reader turns on for it, Downcast alphas_cumprod
    and Old prompt editing timelines, ticked, and the picture the form then makes is the API's with both; for an old
    DDIM picture the downcast is left off (imagine reproduces it for the samplers that step in noise levels)."""
    import httpx
    from PIL import PngImagePlugin

    text = ("a [red:blue:1.0] circle\nSteps: 3, Sampler: Euler a, CFG scale: 6, Seed: 77, Size: 32x32, RNG: CPU, "
            "Version: v1.5.1")
    path = tmp_path / "old.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler", size=64)
    page.click("#pnginfo summary")
    page.set_input_files("#pnginfo_image", str(path))
    page.wait_for_function("document.querySelector('#prompt').value === 'a [red:blue:1.0] circle'")
    assert page.is_checked("#downcast_alphas_cumprod") and page.is_checked("#old_prompt_editing")
    page.click("#generate")
    got = _gallery_download(page)
    body = {"prompt": "a [red:blue:1.0] circle", "steps": 3, "cfg_scale": 6, "width": 32, "height": 32, "seed": 77,
            "sampler_name": "Euler a", "override_settings": {"randn_source": "CPU", "use_downcasted_alpha_bar": True,
                                                             "use_old_scheduling": True}}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert got.tobytes() == Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB").tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text.replace("Euler a", "DDIM"))
    path = tmp_path / "old-ddim.png"
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    page.set_input_files("#pnginfo_image", str(path))
    page.wait_for_function("document.querySelector('#sampler').value === 'DDIM'")
    assert not page.is_checked("#downcast_alphas_cumprod") and page.is_checked("#old_prompt_editing")
