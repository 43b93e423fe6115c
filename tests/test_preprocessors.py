"""ControlNet preprocessors without a model (imagine.preprocessors), as AUTOMATIC1111's ControlNet extension runs
them: Canny's edges equal OpenCV's `cv2.Canny` pixel for pixel (the extension calls it on the RGB picture); the map
is made at the preprocessor's resolution with the extension's padding to 64; the fit to the image's size follows
the extension's rules for its three resize modes, written out here from its description; the server's unit and
/controlnet/detect, and the CLI, give the pipeline's image for the map they make."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from imagine import preprocessors as pp

cv2 = pytest.importorskip("cv2")

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth random colour fields with sharp wraps: edges of every direction and strength."""
    g = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(g.random((h, w, channels)) * 255, (2, 2, 0)) * 3 % 256
    return x.astype(np.uint8) if channels > 1 else x[..., 0].astype(np.uint8)


@pytest.mark.parametrize("seed,h,w,channels,low,high", [
    (0, 173, 134, 3, 100, 200), (1, 141, 89, 1, 134, 187), (2, 64, 64, 3, 10, 50), (3, 90, 120, 3, 250, 255),
    (4, 37, 211, 1, 1, 2), (5, 120, 80, 3, 200, 100),  # (thresholds given the wrong way round: OpenCV swaps them)
])
def test_canny_is_opencvs_pixel_for_pixel(seed, h, w, channels, low, high):
    x = _photo(h, w, seed, channels)
    want = cv2.Canny(x, float(low), float(high))
    got = pp.canny_edges(x, low, high)
    assert got.dtype == np.uint8 and got.shape == (h, w)
    assert np.array_equal(got, want)
    assert 0 < (want > 0).mean() < 0.5  # (an image with edges, and not all edges)


def test_canny_at_its_resolution_pads_to_64_as_the_extension():
    """At a resolution equal to the picture's short side there is no resize: the map is cv2.Canny of the picture
    padded with its edge to multiples of 64 (bottom and right), the padding then cut off; as RGB."""
    x = _photo(100, 150, 7)
    padded = np.pad(x, ((0, 28), (0, 42), (0, 0)), mode="edge")
    want = cv2.Canny(padded, 100.0, 200.0)[:100, :150]
    got = np.asarray(pp.canny(Image.fromarray(x), resolution=100))
    assert got.shape == (100, 150, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    # another resolution: the short side becomes it
    assert pp.canny(Image.fromarray(x), resolution=64).size == (96, 64)


@pytest.mark.parametrize("resolution", [64, 72, 160, 512])
def test_canny_at_another_resolution_resizes_as_opencv(resolution):
    """Away from the picture's size the extension resizes with cv2 (INTER_CUBIC up, INTER_AREA down; its
    resize_image_with_pad) before Canny: the edges are OpenCV's of that picture (within a few pixels where a cubic
    rounding tie puts a grey level one off: Canny's thresholds can flip there)."""
    x = _photo(100, 150, 7)
    k = resolution / 100
    size = (int(np.round(150 * k)), int(np.round(100 * k)))
    scaled = cv2.resize(x, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(scaled, [(0, -n % 64) for n in scaled.shape[:2]] + [(0, 0)], mode="edge")
    want = cv2.Canny(padded, 100.0, 200.0)[: size[1], : size[0]]
    got = np.asarray(pp.canny(Image.fromarray(x), resolution=resolution))[..., 0]
    assert got.shape == want.shape
    assert (got != want).mean() < 1e-3, f"{(got != want).sum()} of {want.size} edge pixels differ"


def test_invert_and_the_settings_rules():
    x = _photo(20, 30, 1)
    assert np.array_equal(np.asarray(pp.preprocess("invert (from white bg & black line)", Image.fromarray(x))), 255 - x)
    # transparency is laid over white (the extension's HWC3)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(pp.preprocess("none", rgba)).min() == 255
    # a value out of its slider's range (-1: not given) is the default, as the extension resets it
    assert pp.settings("canny", -1, -1, -1) == {"resolution": 512, "low": 100, "high": 200}
    assert pp.settings("canny", 256, 300, 50) == {"resolution": 256, "low": 100, "high": 50}
    assert pp.settings("invert", 300) == {}
    with pytest.raises(ValueError, match="'openpose' is not one imagine runs; valid: 'none', 'canny', 'invert'"):
        pp.find_preprocessor("openpose")


def _columns(w: int, h: int) -> Image.Image:
    """A picture whose column j is grey level j (and rows a little apart): where a fit cuts shows in the values."""
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = np.arange(w, dtype=np.uint8)[None, :, None]
    a[..., 1] = (np.arange(h, dtype=np.uint8) * 2)[:, None]
    return Image.fromarray(a)


def test_fit_follows_the_extensions_resize_modes():
    """A 100 x 50 picture into 64 x 64. Crop and Resize: k = max(64/50, 64/100) = 1.28, scaled to 128 x 64, the
    middle 64 columns (from 32). Resize and Fill: k = min = 0.64, scaled to 64 x 32, centred 16 rows down on the
    median colour of the picture's border. Just Resize: stretched."""
    src = _columns(100, 50)
    # (the resize is the extension's high_quality_resize, cv2 INTER_CUBIC up / INTER_AREA down for a many-colour
    # map -- no longer Lanczos, which thickened or erased binary edge maps; imagine's 8-bit rounding may be a level
    # off OpenCV's fixed-point paths, hence the tolerance of 1)
    def close(a, b):
        return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1

    crop = np.asarray(pp.fit(src, 64, 64, "crop_and_resize"))
    want = cv2.resize(np.asarray(src), (128, 64), interpolation=cv2.INTER_CUBIC)[:, 32:96]
    assert crop.shape == (64, 64, 3) and close(crop, want)
    fill = np.asarray(pp.fit(src, 64, 64, "resize_and_fill"))
    a = np.asarray(src)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    median = np.median(border, axis=0).astype(np.uint8)
    assert np.array_equal(fill[:16], np.broadcast_to(median, (16, 64, 3)))
    assert np.array_equal(fill[48:], np.broadcast_to(median, (16, 64, 3)))
    assert close(fill[16:48], cv2.resize(np.asarray(src), (64, 32), interpolation=cv2.INTER_AREA))
    assert close(np.asarray(pp.fit(src, 64, 64, "just_resize")),
                 cv2.resize(np.asarray(src), (64, 64), interpolation=cv2.INTER_AREA))
    # a two-colour map (edges) stays two colours
    edges = pp.canny(Image.fromarray(_photo(50, 100, 3)), resolution=50)
    out = np.asarray(pp.fit(edges, 64, 64, "crop_and_resize"))
    assert set(np.unique(out)) <= {0, 255} and out.max() == 255
    # pixel perfect: the resolution that makes the map at the image's scale
    assert pp.pixel_perfect_resolution(src, 64, 64, "crop_and_resize") == 64  # 1.28 x 50
    assert pp.pixel_perfect_resolution(src, 64, 64, "resize_and_fill") == 32  # 0.64 x 50
    with pytest.raises(ValueError, match="resize mode must be one of just_resize, crop_and_resize, resize_and_fill"):
        pp.fit(src, 8, 8, "stretch")
    # extreme shapes: a 400 x 2 strip fits (at least a pixel high); a 2048 x 8 one at resolution 512 would be a
    # 131072 x 512 picture: refused by name, not run
    strip = Image.new("RGB", (400, 2), (200, 10, 10))
    assert pp.fit(strip, 32, 32, "resize_and_fill").size == (32, 32)
    with pytest.raises(ValueError, match="a 2048x8 picture at resolution 512 .* would be 131072x512"):
        pp.preprocess("canny", Image.new("RGB", (2048, 8)), 512)
    labels = {k: pp.A1111_RESIZE_MODES[k] for k in ("envelope (outer fit)", "scale to fit (inner fit)", "3")}
    assert labels == {"envelope (outer fit)": "resize_and_fill", "scale to fit (inner fit)": "crop_and_resize",
                      "3": "just_resize"}


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_server_runs_the_units_preprocessor_and_detect(tmp_path):
    """A unit with module "canny" and its thresholds, a picture of another shape, the extension's default resize
    mode: the pipeline's image for the map canny(...) fitted by Crop and Resize. /controlnet/detect answers the map
    itself; /controlnet/module_list lists the sliders."""
    httpx = pytest.importorskip("httpx")
    from test_controlnet_files import SD1, diffusers_controlnet
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.samplers import a1111_settings
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    save_diffusers_folder(tmp_path / "sd", "sd1")
    diffusers_controlnet(SD1, seed=3).save_pretrained(tmp_path / "edges", safe_serialization=True)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "sd", controlnets=[tmp_path / "edges"])
    photo = Image.fromarray(_photo(48, 80, 5))
    made = pp.fit(pp.canny(photo, 60, 120, resolution=512), 32, 32, "crop_and_resize")
    a1111 = a1111_settings("Euler")  # (Euler as AUTOMATIC1111 runs it, as its API does)
    want = pipe.generate("a red circle", control_image=made, steps=3, guidance_scale=5.0, seed=2,
                         height=32, width=32, emphasis=True, progress=False, **a1111).images[0]
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        unit = {"model": "edges", "module": "canny", "image": _b64(photo), "threshold_a": 60, "threshold_b": 120}
        body = {"prompt": "a red circle", "steps": 3, "cfg_scale": 5, "sampler_name": "Euler", "seed": 2,
                "width": 32, "height": 32, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.tobytes()
        info = json.loads(r.json()["info"])
        assert "Module: canny, Model: edges" in info["extra_generation_params"]["ControlNet 0"]
        assert "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 60, Threshold B: 120" in \
            info["extra_generation_params"]["ControlNet 0"]
        # pixel perfect (its resolution, 32 here, below the slider's 64) and Just Resize
        unit.update(pixel_perfect=True, resize_mode="Just Resize")
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        made = pp.fit(pp.canny(photo, 60, 120, resolution=32), 32, 32, "just_resize")
        want = pipe.generate("a red circle", control_image=made, steps=3, guidance_scale=5.0, seed=2,
                             height=32, width=32, emphasis=True, progress=False, **a1111).images[0]
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.tobytes()
        assert "Processor Res: 32" in json.loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"]
        r = httpx.post(f"{srv.url}/controlnet/detect", json={
            "controlnet_module": "canny", "controlnet_input_images": [_b64(photo)], "controlnet_processor_res": 64,
            "controlnet_threshold_a": 60, "controlnet_threshold_b": 120}, timeout=60)
        assert r.status_code == 200 and r.json()["info"] == "Success"
        detected = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert detected.convert("RGB").tobytes() == pp.canny(photo, 60, 120, resolution=64).tobytes()
        thin = {**unit, "image": _b64(Image.new("RGB", (2048, 8))), "pixel_perfect": False}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [thin]}}})
        assert r.status_code == 422 and "would be 131072x512" in r.text
        r = httpx.post(f"{srv.url}/controlnet/detect", json={"controlnet_module": "depth_midas",
                                                              "controlnet_input_images": [_b64(photo)]})
        assert r.status_code == 422 and "not one imagine runs" in r.text
        listing = httpx.get(f"{srv.url}/controlnet/module_list", params={"alias_names": True}).json()
        assert listing["module_list"] == ["none", "canny", "invert (from white bg & black line)"]
        assert listing["module_detail"]["canny"]["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1,
                                                                   "max": 255, "step": 1}


def test_the_cli_makes_the_map(tmp_path, capsys):
    from test_controlnet_files import SD1, diffusers_controlnet
    from test_loading import save_diffusers_folder

    from imagine.cli import main
    from imagine.pipelines.text_to_image import TextToImagePipeline

    save_diffusers_folder(tmp_path / "sd", "sd1")
    diffusers_controlnet(SD1, seed=3).save_pretrained(tmp_path / "edges", safe_serialization=True)
    photo = Image.fromarray(_photo(48, 80, 5))
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    code = main(["generate", "--model", str(tmp_path / "sd"), "a red circle", "--controlnet", str(tmp_path / "edges"),
                 "--control-image", str(tmp_path / "photo.png"), "--control-preprocessor", "canny:60:120",
                 "--control-resize", "crop_and_resize", "--height", "32", "--width", "32", "--steps", "3",
                 "--seed", "2", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "sd", controlnets=[tmp_path / "edges"])
    # pixel perfect by default: the resolution of the image's scale, 32 (k = max(32/48, 32/80) = 2/3, x 48)
    made = pp.fit(pp.canny(photo, 60, 120, resolution=32), 32, 32, "crop_and_resize")
    want = pipe.generate("a red circle", control_image=made, steps=3, seed=2, height=32, width=32,
                         progress=False).images[0]
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want.tobytes()
    assert "Module: canny, Model: edges, Weight: 1, Resize Mode: Crop and Resize, Processor Res: 32, Threshold A: 60, " \
           "Threshold B: 120" in img.text["parameters"] and "Pixel Perfect: True" in img.text["parameters"]
    code = main(["generate", "--model", str(tmp_path / "sd"), "x", "--controlnet", str(tmp_path / "edges"),
                 "--control-image", str(tmp_path / "photo.png"), "--control-preprocessor", "openpose", "-q"])
    assert code == 2 and "'openpose' is not one imagine runs" in capsys.readouterr().err
