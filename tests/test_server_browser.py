"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright.

Types a prompt, clicks Generate, sees the live progress bar and preview while the model worker
is held at a sampler step, then the finished image in the gallery with its parameters and a
download link; saves a screenshot to docs/serving-page.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
import threading
import time
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

    @contextlib.contextmanager
    def holding(self):
        """Within the block generate calls wait at sampler step 1 until `release`; at its end they no longer wait
        and the one held goes on."""
        self.held.clear()
        self.hold.set()
        self.release.clear()
        try:
            yield self
        finally:
            self.hold.clear()
            self.release.set()

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
    # a picture of another shape, brought to the size by the chosen resize mode (A1111's img2img "Resize mode")
    wide = picture.crop((0, 0, 64, 40))
    wide.save(path)
    page.set_input_files("#init_image", str(path))
    page.select_option("#resize_mode", "1")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 2", timeout=60_000)
    got = _gallery_download(page)  # (the newest card comes first)
    want = {mode: server.pipe.pipe.generate("a red circle", init_image=wide, strength=0.5, steps=4, seed=77,
                                            width=64, height=64, guidance_scale=cfg, emphasis=True, progress=False,
                                            resize_mode=mode, **a1111_settings("Euler")).images[0].tobytes()
            for mode in ("crop_and_resize", "just_resize")}
    assert got.tobytes() == want["crop_and_resize"] != want["just_resize"]


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


# -- reading a picture's parameters, Reuse, Interrupt, the progress loop ----------------------------------------
def _api_picture(server, body: dict, path: Path) -> bytes:
    """A picture the API made for `body`, saved (with its infotext) at `path`: its RGB bytes."""
    import httpx

    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    return Image.open(path).convert("RGB").tobytes()


def _infotext_picture(text: str, path: Path) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def _read_picture(page, path: Path) -> None:
    """PNG Info on the page: the picture chosen, its parameters in the form."""
    if not page.eval_on_selector("#pnginfo", "d => d.open"):
        page.click("#pnginfo summary")
    page.evaluate("document.querySelector('#pnginfo_text').textContent = ''")
    page.set_input_files("#pnginfo_image", str(path))
    page.wait_for_function("document.querySelector('#pnginfo_text').textContent !== ''", timeout=30_000)


def _cards(page) -> int:
    return page.eval_on_selector_all(".gallery .card", "cs => cs.length")


def _card_image(card) -> bytes:
    href = card.query_selector("a.download").get_attribute("href")
    return Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB").tobytes()


def test_a_hires_pictures_parameters_make_it_again(server, page, tmp_path):
    """A hires. fix picture with its own hires steps, the Lanczos upscaler, a hires prompt and negative prompt and a
    hires sampler: all read into the Upscale section, and Generate makes the identical picture."""
    body = {"prompt": "a red circle", "steps": 4, "cfg_scale": 6, "width": 32, "height": 32, "seed": 21,
            "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.55,
            "hr_second_pass_steps": 3, "hr_upscaler": "Lanczos", "hr_prompt": "a blue square",
            "hr_negative_prompt": "green", "hr_sampler_name": "Euler a", "hr_scheduler": "Karras",
            "override_settings": {"randn_source": "CPU"}}
    made = _api_picture(server, body, tmp_path / "hires.png")
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler a", size=64)
    _read_picture(page, tmp_path / "hires.png")
    values = page.evaluate("""() => Object.fromEntries(['hr_scale', 'hr_strength', 'hr_second_pass_steps', 'hr_upscaler',
        'hr_prompt', 'hr_negative_prompt', 'hr_sampler', 'hr_scheduler'].map(k => [k, document.getElementById(k).value]))""")
    assert values == {"hr_scale": "2", "hr_strength": "0.55", "hr_second_pass_steps": "3", "hr_upscaler": "Lanczos",
                      "hr_prompt": "a blue square", "hr_negative_prompt": "green", "hr_sampler": "Euler a",
                      "hr_scheduler": "Karras"}
    assert page.eval_on_selector("#hires", "d => d.open") and page.is_hidden("#pnginfo_notice")
    page.click("#generate")
    got = _gallery_download(page)
    assert got.size == (64, 64) and got.tobytes() == made


def test_fine_values_from_a_picture_generate(server, page, tmp_path):
    """Values between the number fields' old steps (CFG 7.25, a hires strength of 0.42, a variation strength of 0.33,
    hires scale 1.5) read from a picture generate (no silent browser check stops them) the same picture; a second
    picture without hires. fix puts the Upscale section back at its defaults."""
    body = {"prompt": "a red circle", "steps": 3, "cfg_scale": 7.25, "width": 32, "height": 32, "seed": 5,
            "sampler_name": "Euler", "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.42, "subseed": 8,
            "subseed_strength": 0.33, "override_settings": {"randn_source": "CPU"}}
    made = _api_picture(server, body, tmp_path / "fine.png")
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler a", size=64)
    _read_picture(page, tmp_path / "fine.png")
    assert page.input_value("#cfg_scale") == "7.25" and page.input_value("#hr_strength") == "0.42"
    page.click("#generate")
    got = _gallery_download(page)
    assert got.size == (48, 48) and got.tobytes() == made
    plain = {"prompt": "a blue square", "steps": 3, "width": 32, "height": 32, "seed": 6, "sampler_name": "Euler"}
    _api_picture(server, plain, tmp_path / "plain.png")
    _read_picture(page, tmp_path / "plain.png")
    assert page.input_value("#prompt") == "a blue square"
    assert [page.input_value(f"#{k}") for k in ("hr_scale", "hr_strength", "hr_second_pass_steps", "subseed_strength",
                                                 "subseed")] == ["1", "0.7", "0", "0", "-1"]


def test_the_page_says_which_field_is_wrong(server, page):
    """The browser's own form checks are off: an empty or non-whole number, in view or in a folded section, is named in
    the error box, for Generate and for Ctrl+Enter alike, and nothing is sent."""
    _fill_form(page, server, prompt="a red circle", steps=3, seed=1, sampler="Euler", size=32)
    accepted = page.evaluate("fetch('/imagine/v1/stats').then(r => r.json()).then(s => s.accepted)")
    page.fill("#steps", "")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "Steps" in page.inner_text("#error") and page.evaluate("document.activeElement.id") == "steps"
    page.fill("#steps", "2.5")
    page.click("#generate")
    assert "whole number" in page.inner_text("#error")
    page.fill("#steps", "1e1")  # (ten)
    page.click("#hires summary")
    page.fill("#hr_scale", "2")
    page.fill("#hr_strength", "")
    page.click("#hires summary")  # folded again: the check opens it
    page.evaluate("document.querySelector('#error').hidden = true")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "Upscale strength" in page.inner_text("#error") and page.eval_on_selector("#hires", "d => d.open")
    assert page.evaluate("fetch('/imagine/v1/stats').then(r => r.json()).then(s => s.accepted)") == accepted


def test_an_old_sampler_name_with_its_schedule_fills_both(server, page, tmp_path):
    """A1111 before 1.9 wrote the schedule type in the sampler's name ("DPM++ 2M Karras"): the form gets DPM++ 2M
    and, Karras being DPM++ 2M's "Automatic" pick, Automatic (A1111's reader converts it so), and makes the picture
    the API makes for that name."""
    text = "a red circle\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 5, Size: 32x32, RNG: CPU, Version: v1.8.0"
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler", size=64)
    _read_picture(page, _infotext_picture(text, tmp_path / "karras.png"))
    assert page.input_value("#sampler") == "DPM++ 2M" and page.input_value("#scheduler") == "Automatic"
    assert page.is_hidden("#error")
    other = text.replace("DPM++ 2M Karras", "DPM++ 2M SDE Karras")  # (its Automatic is Exponential: Karras kept)
    _read_picture(page, _infotext_picture(other, tmp_path / "sde.png"))
    assert page.input_value("#sampler") == "DPM++ 2M SDE" and page.input_value("#scheduler") == "Karras"
    _read_picture(page, _infotext_picture(text, tmp_path / "karras.png"))
    page.click("#generate")
    got = _gallery_download(page)
    want = _api_picture(server, {"prompt": "a red circle", "steps": 3, "cfg_scale": 6, "width": 32, "height": 32,
                                 "seed": 5, "sampler_name": "DPM++ 2M Karras",
                                 "override_settings": {"randn_source": "CPU"}}, tmp_path / "want.png")
    assert got.tobytes() == want


def test_eta_seed_resize_and_imagines_schedule_types_are_read(server, page, tmp_path):
    """Eta, Seed resize from and one of imagine's own schedule types (Time Uniform) are read into the form and sent;
    a setting the page cannot apply (Emphasis) is named in a notice."""
    text = ("a red circle\nSteps: 3, Sampler: Euler a, Schedule type: Time Uniform, CFG scale: 6, Eta: 0.5, Seed: 5, "
            "Seed resize from: 48x40, Emphasis: No norm, RNG: CPU, Size: 32x32, FP8 weight: Disable, "
            "Masked area padding: 16, Pad conds: True, Version: imagine 0.1.0")
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler", size=64)
    _read_picture(page, _infotext_picture(text, tmp_path / "eta.png"))
    assert page.input_value("#scheduler") == "Time Uniform" and page.input_value("#eta") == "0.5"
    assert (page.input_value("#seed_resize_from_w"), page.input_value("#seed_resize_from_h")) == ("48", "40")
    notice = page.inner_text("#pnginfo_notice")
    assert "Emphasis: No norm" in notice and "Version" not in notice and "Eta" not in notice
    # (a field at the default A1111's reader fills in asks for nothing; the server's defaults, at another value named)
    assert "FP8 weight" not in notice and "Masked area padding: 16" in notice
    assert "Pad conds" not in notice and page.input_value("#pad_conds") == "empty"  # (read into the Noise section)
    page.click("#generate")
    got = _gallery_download(page)
    want = _api_picture(server, {"prompt": "a red circle", "steps": 3, "cfg_scale": 6, "width": 32, "height": 32,
                                 "seed": 5, "sampler_name": "Euler a", "scheduler": "Time Uniform", "eta": 0.5,
                                 "seed_resize_from_w": 48, "seed_resize_from_h": 40,
                                 "override_settings": {"randn_source": "CPU", "pad_cond_uncond": True}},
                       tmp_path / "want.png")
    assert got.tobytes() == want


def test_reading_parameters_removes_the_chosen_picture(server, page, tmp_path):
    """A picture to start from can be removed; with one chosen the Upscale section says it is not applied; reading a
    picture's parameters removes it (else the form would make an img2img picture, without hires. fix)."""
    start = tmp_path / "start.png"
    Image.fromarray((np.indices((32, 32)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB").save(start)
    _fill_form(page, server, prompt="x", steps=3, seed=1, sampler="Euler", size=32)
    page.click("#img2img summary")
    page.set_input_files("#init_image", str(start))
    page.click("#hires summary")
    page.fill("#hr_scale", "2")
    assert page.is_visible("#hires_ignored") and "not applied" in page.inner_text("#hires_ignored")
    page.click("#init_image_clear")
    assert page.eval_on_selector("#init_image", "e => e.files.length") == 0 and page.is_hidden("#hires_ignored")
    page.set_input_files("#init_image", str(start))
    made = _api_picture(server, {"prompt": "a red circle", "steps": 3, "width": 32, "height": 32, "seed": 9,
                                 "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2,
                                 "override_settings": {"randn_source": "CPU"}}, tmp_path / "made.png")
    _read_picture(page, tmp_path / "made.png")
    assert page.eval_on_selector("#init_image", "e => e.files.length") == 0
    assert "picture to start from" in page.inner_text("#pnginfo_notice") and page.is_hidden("#hires_ignored")
    page.click("#generate")
    got = _gallery_download(page)
    assert got.size == (64, 64) and got.tobytes() == made


def test_reuse_puts_back_the_whole_request(server, page):
    """Reuse on a card puts back the request that made it (hires. fix, variation, noise, batch size), with the card's
    seed: Generate then makes the same images."""
    _fill_form(page, server, prompt="a red circle", steps=3, seed=100, sampler="Euler", size=32)
    page.fill("#batch_size", "2")
    page.click("#hires summary")
    page.fill("#hr_scale", "2")
    page.fill("#hr_strength", "0.6")
    page.fill("#hr_second_pass_steps", "2")
    page.select_option("#hr_upscaler", "Lanczos")
    page.click("#variation summary")
    page.fill("#subseed", "40")
    page.fill("#subseed_strength", "0.3")
    page.click("#noise summary")
    page.select_option("#randn_source", "NV")
    page.fill("#eta_noise_seed_delta", "7")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 2", timeout=60_000)
    first = {s: _card_image(page.query_selector(f".gallery .card[data-subseed='{s}']")) for s in ("40", "41")}
    for field, value in (("#prompt", "something else"), ("#hr_scale", "1"), ("#subseed_strength", "0"),
                         ("#batch_size", "1"), ("#eta_noise_seed_delta", "0"), ("#seed", "-1")):
        page.fill(field, value)
    page.select_option("#randn_source", "CPU")
    page.click(".gallery .card[data-subseed='40'] .reuse")
    got = page.evaluate("""() => Object.fromEntries(['prompt', 'seed', 'batch_size', 'hr_scale', 'hr_strength',
        'hr_second_pass_steps', 'hr_upscaler', 'subseed', 'subseed_strength', 'randn_source', 'eta_noise_seed_delta']
        .map(k => [k, document.getElementById(k).value]))""")
    assert got == {"prompt": "a red circle", "seed": "100", "batch_size": "2", "hr_scale": "2", "hr_strength": "0.6",
                   "hr_second_pass_steps": "2", "hr_upscaler": "Lanczos", "subseed": "40", "subseed_strength": "0.3",
                   "randn_source": "NV", "eta_noise_seed_delta": "7"}
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 4", timeout=60_000)
    again = [page.query_selector_all(".gallery .card")[i] for i in (0, 1)]
    assert {c.get_attribute("data-subseed"): _card_image(c) for c in again} == first


def test_the_noise_section_starts_from_the_servers_options(server, page, tmp_path):
    """The Noise section's first values are the server's options (POST /sdapi/v1/options), so the page's requests
    make what a request without override_settings makes."""
    import httpx

    options = {"randn_source": "NV", "eta_noise_seed_delta": 31337, "sd_noise_schedule": "Zero Terminal SNR",
               "use_old_scheduling": True, "pad_cond_uncond_v0": True}
    assert httpx.post(f"{server.url}/sdapi/v1/options", json=options, timeout=30).status_code == 200
    try:
        _fill_form(page, server, prompt="a [red:blue:2] circle", steps=3, seed=12, sampler="Euler a", size=32)
        page.wait_for_function("document.querySelector('#controlnet').dataset.ready === '1'")
        assert page.input_value("#randn_source") == "NV" and page.input_value("#eta_noise_seed_delta") == "31337"
        assert page.is_checked("#zero_terminal_snr") and page.is_checked("#old_prompt_editing")
        assert not page.is_checked("#downcast_alphas_cumprod") and page.input_value("#pad_conds") == "v0"
        page.fill("#cfg_scale", "6")
        page.click("#generate")
        got = _gallery_download(page)
        want = _api_picture(server, {"prompt": "a [red:blue:2] circle", "steps": 3, "cfg_scale": 6, "width": 32,
                                     "height": 32, "seed": 12, "sampler_name": "Euler a"}, tmp_path / "want.png")
        assert got.tobytes() == want
    finally:
        httpx.post(f"{server.url}/sdapi/v1/options", timeout=30, json={
            "randn_source": "GPU", "eta_noise_seed_delta": 0, "sd_noise_schedule": "Default",
            "use_downcasted_alpha_bar": False, "use_old_scheduling": False, "pad_cond_uncond_v0": False})


def test_interrupt_stops_this_pages_job_only(server, page):
    """While another client's job runs, the page's own job waits: Interrupt (then "Cancel") takes it out of the
    queue through POST /imagine/v1/cancel and leaves the running job alone; once the page's job runs, Interrupt stops
    it and the card is marked interrupted."""
    import httpx

    pipe = server.pipe
    other = {}
    pipe.held.clear()
    pipe.hold.set()
    pipe.release.clear()
    body = {"prompt": "someone else's", "steps": 3, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler",
            "force_task_id": "someone-else"}
    thread = threading.Thread(target=lambda: other.update(
        r=httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)))
    thread.start()
    try:
        assert pipe.held.wait(60), "the other job never reached the sampler"
        _fill_form(page, server, prompt="a red circle", steps=3, seed=1, sampler="Euler a", size=32)
        assert page.is_disabled("#interrupt")
        page.click("#generate")
        page.wait_for_function("!document.querySelector('#interrupt').disabled", timeout=30_000)
        assert page.inner_text("#interrupt") == "Cancel" and "waiting" in page.inner_text("#progress-text")
        page.click("#interrupt")
        page.wait_for_selector("#notice:not([hidden])", timeout=30_000)
        assert "Cancelled" in page.inner_text("#notice") and page.is_enabled("#generate")
        assert page.is_hidden("#error") and _cards(page) == 0
        # (the cancel endpoint: a task that is not waiting nor running is a 404)
        r = httpx.post(f"{server.url}/imagine/v1/cancel", params={"id_task": "nobody"}, timeout=30)
        assert r.status_code == 404 and r.json()["field"] == "id_task"
    finally:
        pipe.hold.clear()
        pipe.release.set()
        thread.join(120)
    import json

    assert other["r"].status_code == 200
    info = json.loads(other["r"].json()["info"])
    assert info["interrupted"] is False and len(other["r"].json()["images"]) == 1

    with pipe.holding():
        page.click("#generate")
        assert pipe.held.wait(60), "the page's job never reached the sampler"
        # (the label follows the progress polls: "Cancel" until one says the job runs)
        page.wait_for_function("document.querySelector('#interrupt').textContent === 'Interrupt' && "
                               "!document.querySelector('#interrupt').disabled", timeout=30_000)
        page.click("#interrupt")
        page.wait_for_function("document.querySelector('#interrupt').disabled")
    card = page.wait_for_selector(".gallery .card", timeout=60_000)
    assert "interrupted" in card.get_attribute("class") and "interrupted" in card.inner_text()


_FETCH_LOG = """() => {
  window.__log = [];
  window.__gate = new Promise((resolve) => { window.__open = resolve; });
  const real = window.fetch;
  window.fetch = async (url, options) => {
    const entry = { url: String(url), t: performance.now() };
    window.__log.push(entry);
    if (entry.url.includes('/sdapi/v1/progress')) await window.__gate;  // (held until the test opens the gate)
    if (entry.url.includes('/sdapi/v1/txt2img') && window.__postDelay) {
      await new Promise((r) => setTimeout(r, window.__postDelay));
    }
    return real(url, options);
  };
}"""


def test_an_old_generations_progress_loop_stops(server, page):
    """A progress poll still on its way when its generation ends does not poll that task again in the next one."""
    pipe = server.pipe
    _fill_form(page, server, prompt="a red circle", steps=2, seed=1, sampler="Euler", size=16)
    page.evaluate(_FETCH_LOG)
    page.click("#generate")
    page.wait_for_selector(".gallery .card", timeout=60_000)  # (its first poll still waits at the gate)
    first = page.evaluate("window.__log.find(e => e.url.includes('progress')).url.split('id_task=')[1]")
    with pipe.holding():
        page.click("#generate")
        assert pipe.held.wait(60), "the second job never reached the sampler"
        opened = page.evaluate("window.__open(), performance.now()")
        page.wait_for_timeout(1500)
        stale = page.evaluate(f"window.__log.filter(e => e.t > {opened} && e.url.endsWith('id_task={first}')).length")
        second = page.evaluate(f"window.__log.filter(e => e.t > {opened} && e.url.includes('progress')"
                               f" && !e.url.endsWith('id_task={first}')).length")
        assert stale == 0 and second > 0
        assert "step" in page.inner_text("#progress-text")
    page.wait_for_function("document.querySelectorAll('.gallery .card').length === 2", timeout=60_000)


def test_the_status_says_queued_until_the_server_has_the_job(server, page):
    """Polls that reach the server before the request does show "queued…", not the server's "unknown task"."""
    _fill_form(page, server, prompt="a red circle", steps=2, seed=1, sampler="Euler", size=16)
    page.evaluate(_FETCH_LOG)
    page.evaluate("window.__open(); window.__postDelay = 1500")
    page.click("#generate")
    page.wait_for_function("window.__log.filter(e => e.url.includes('progress')).length >= 2", timeout=30_000)
    assert page.inner_text("#progress-text") == "queued…"
    page.wait_for_selector(".gallery .card", timeout=60_000)


def test_favicon_and_picture_types(server, page):
    """No /favicon.ico request (the icon is inline); PNG Info takes JPEG and WebP pictures (their EXIF) too."""
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    _fill_form(page, server, prompt="x", steps=2, seed=1, sampler="Euler")
    page.wait_for_timeout(500)
    assert not [u for u in asked if u.endswith("/favicon.ico")]
    accept = page.get_attribute("#pnginfo_image", "accept")
    assert all(t in accept for t in ("image/png", "image/jpeg", "image/webp"))


def test_cancel_by_task_id_leaves_a_batched_jobs_neighbour_alone(server):
    """POST /imagine/v1/cancel on a job that runs in one batch with another request's job: "cancelling"; the other
    request gets its image, the cancelled one a 499 that says it was cancelled; a waiting job: "cancelled"."""
    import httpx

    pipe, answers = server.pipe, {}

    def post(name, **extra):
        body = {"prompt": name, "steps": 3, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler",
                "force_task_id": name, **extra}
        answers[name] = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)

    def queued(name):
        return httpx.get(f"{server.url}/sdapi/v1/progress", params={"id_task": name},
                         timeout=30).json()["textinfo"].startswith("waiting")

    pipe.held.clear()
    pipe.hold.set()
    pipe.release.clear()
    threads = [threading.Thread(target=post, args=("first",), kwargs={"sampler_name": "Euler a"})]
    threads[0].start()
    try:
        assert pipe.held.wait(60)
        for name in ("batched-a", "batched-b", "waiting"):
            threads.append(threading.Thread(target=post, args=(name,), kwargs={"seed": 7} if name == "waiting" else {}))
            threads[-1].start()
            deadline = time.time() + 30
            while not queued(name):
                assert time.time() < deadline, f"{name} never queued"
                time.sleep(0.05)
        r = httpx.post(f"{server.url}/imagine/v1/cancel", params={"id_task": "waiting"}, timeout=30)
        assert r.status_code == 200 and r.json() == {"id_task": "waiting", "states": ["cancelled"]}
        pipe.held.clear()
        pipe.release.set()  # ("first" goes on: the two batched jobs run next, held at their step 1)
        pipe.release.clear()
        assert pipe.held.wait(60), "the batch never reached the sampler"
        running = httpx.get(f"{server.url}/sdapi/v1/progress", timeout=30).json()["state"]["job"].split(",")
        assert running == ["batched-a", "batched-b"]
        r = httpx.post(f"{server.url}/imagine/v1/cancel", params={"id_task": "batched-a"}, timeout=30)
        assert r.json()["states"] == ["cancelling"]
    finally:
        pipe.hold.clear()
        pipe.release.set()
        for t in threads:
            t.join(120)
    assert answers["first"].status_code == 200 and answers["batched-b"].status_code == 200
    assert len(answers["batched-b"].json()["images"]) == 1
    for name in ("batched-a", "waiting"):
        assert answers[name].status_code == 499 and "cancelled (POST /imagine/v1/cancel" in answers[name].json()["detail"]


def test_a_hires_picture_on_the_default_schedules_is_made_again(server, page, tmp_path):
    """DPM++ 2M on "Automatic" (Karras, which the infotext names) with a hires sampler on "Use same scheduler" (Euler
    a's own levels, not named): read back, Karras is taken as DPM++ 2M's Automatic, as A1111's reader takes it, so the
    hires pass runs Euler a's own levels again and the form makes the same picture."""
    body = {"prompt": "a red circle", "steps": 6, "cfg_scale": 6, "width": 32, "height": 32, "seed": 21,
            "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "enable_hr": True, "hr_scale": 2,
            "denoising_strength": 0.7, "hr_sampler_name": "Euler a", "hr_scheduler": "Use same scheduler",
            "override_settings": {"randn_source": "CPU"}}
    made = _api_picture(server, body, tmp_path / "hires.png")
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler a", size=64)
    _read_picture(page, tmp_path / "hires.png")
    assert page.input_value("#scheduler") == "Automatic" and page.input_value("#hr_sampler") == "Euler a"
    page.click("#generate")
    assert _gallery_download(page).tobytes() == made


def test_a_hires_size_from_the_page_and_from_a_picture(server, page, tmp_path):
    """The Upscale section's "Resize width to / height to" sends A1111's hr_resize_x / hr_resize_y (a size in place
    of the scale); a picture made so ("Hires resize: 48x0") reads back into them and Generate makes it again."""
    body = {"prompt": "a red circle", "steps": 3, "cfg_scale": 6, "width": 32, "height": 32, "seed": 21,
            "sampler_name": "Euler", "enable_hr": True, "hr_resize_x": 48, "denoising_strength": 0.55,
            "override_settings": {"randn_source": "CPU"}}
    made = _api_picture(server, body, tmp_path / "resized.png")
    _fill_form(page, server, prompt="something else", steps=9, seed=1, sampler="Euler a", size=64)
    _read_picture(page, tmp_path / "resized.png")
    assert [page.input_value(f"#{k}") for k in ("hr_resize_x", "hr_resize_y")] == ["48", "0"]
    assert page.is_hidden("#pnginfo_notice")
    page.click("#generate")
    got = _gallery_download(page)
    assert got.size == (48, 48) and got.tobytes() == made


@pytest.fixture(scope="module")
def upscaler_server(tmp_path_factory):
    """A server with an upscaler folder (serve --upscaler-dir) holding a random Real-ESRGAN compact x2 file."""
    import torch

    from imagine.models.esrgan import CompactSRNet
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    folder = tmp_path_factory.mktemp("upscalers")
    torch.manual_seed(5)
    torch.save(CompactSRNet(3, 3, 8, 2, 2).state_dict(), folder / "2x-Test.pth")
    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny-up")))
    pipe.upscaler_dir = folder
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=256, max_height=256))) as srv:
        srv.folder = folder
        yield srv


def test_upscale_a_picture_from_the_page(upscaler_server, page, tmp_path):
    """The "Upscale a picture" section (A1111's Extras) lists the server's upscaler models first, sends the chosen
    picture to /sdapi/v1/extra-single-image and shows the result as a card: A1111's Upscaler.upscale with that model
    (imagine.upscalers.a1111_upscale); the hires. fix's upscaler list offers the model too."""
    from imagine.upscalers import a1111_upscale, load_upscale_model

    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    path = tmp_path / "small.png"
    picture.save(path)
    page.goto(upscaler_server.url + "/")
    page.wait_for_function("document.body.dataset.ready === '1'")
    assert page.eval_on_selector("#extras_upscaler", "s => [...s.options].map(o => o.value)") == \
        ["2x-Test", "Lanczos", "Nearest"]
    assert "2x-Test" in page.eval_on_selector("#hr_upscaler", "s => [...s.options].map(o => o.value)")
    page.click("#extras summary")
    page.click("#extras_run")  # (no picture yet: said, nothing sent)
    assert "Choose the picture to upscale" in page.text_content("#error")
    page.set_input_files("#extras_image", str(path))
    page.fill("#extras_scale", "2")
    page.click("#extras_run")
    got = _gallery_download(page)
    want = a1111_upscale(picture, 2, load_upscale_model(upscaler_server.folder / "2x-Test.pth"))
    assert got.size == (80, 48) and got.tobytes() == want.tobytes()
    assert "Postprocess upscaler: 2x-Test" in page.text_content("#infotext")
