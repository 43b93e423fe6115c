"""ControlNet through the CLI (`--controlnet PATH[:SCALE]`, `--control-image`) and the server's AUTOMATIC1111
ControlNet extension API (`alwayson_scripts.controlnet.args` on txt2img and img2img, `/controlnet/model_list`,
`/controlnet/version`).

Each answer is held to the pipeline: the CLI's PNG, and the server's image for a request, are the bytes of
`pipe.generate(..., control_image=..., controlnet_scale=...)` on a pipeline holding the ControlNets the request
names, in its order. Tiny models: test_loading's SD 1.x folder, a diffusers ControlNet folder ("edges") and the
same kind of ControlNet as lllyasviel's original file ("control_v11p_sd15_canny.pth", written by
test_controlnet_files' own mapping)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from test_controlnet import _edges  # noqa: E402
from test_controlnet_files import SD1, diffusers_controlnet, save_state, to_lllyasviel  # noqa: E402
from test_inpainting_api import _b64, _image, run_queued  # noqa: E402
from test_loading import save_diffusers_folder  # noqa: E402
from test_sd_parity import SIZE  # noqa: E402

diffusers = pytest.importorskip("diffusers")
httpx = pytest.importorskip("httpx")

from imagine.cli import main  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=3, guidance_scale=5.0, sampler="euler")  # the bodies below ask for the same
BODY = {"prompt": "a red circle", "steps": 3, "cfg_scale": 5, "sampler_name": "Euler"}
# (the A1111 API runs Euler as AUTOMATIC1111 does: samplers.a1111_settings; the CLI and the worker as KW)
API = dict(KW, **a1111_settings("Euler"))


def _picture(size: int = SIZE, seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((size, size, 3)) * 255).astype(np.uint8))




def _a1111_hash(path) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_api")
    save_diffusers_folder(root / "sd", "sd1")
    diffusers_controlnet(SD1, seed=3).save_pretrained(root / "edges", safe_serialization=True)
    ref = diffusers_controlnet(SD1, seed=4)
    state = {"control_model." + k: v for k, v in to_lllyasviel(ref.state_dict(), ref.config).items()}
    save_state(root / "control_v11p_sd15_canny.pth", state, "pth")
    return root


def _pipe(models, *names):
    paths = {"edges": models / "edges", "canny": models / "control_v11p_sd15_canny.pth"}
    return TextToImagePipeline.from_pretrained(models / "sd", controlnets=[paths[n] for n in names])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_controlnets_give_the_pipelines_image(models, tmp_path, capsys):
    edges, other = tmp_path / "edges.png", tmp_path / "other.png"
    _edges().save(edges)
    _edges(seed=5).save(other)
    base = ["generate", "--model", str(models / "sd"), "a red circle", "--steps", "3", "--seed", "3", "-q"]
    assert main([*base, "--controlnet", f"{models / 'edges'}:0.7", "--control-image", str(edges),
                 "-o", str(tmp_path / "one.png")]) == 0
    got = Image.open(tmp_path / "one.png")
    want = _pipe(models, "edges").generate("a red circle", control_image=_edges(), controlnet_scale=0.7, steps=3,
                                           seed=3, progress=False)
    assert got.convert("RGB").tobytes() == want.images[0].tobytes()
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 0.7, Resize Mode: Just Resize' in got.text["parameters"]
    assert json.loads(got.text["imagine"])["controlnet"] == "edges: 0.7"

    canny = models / "control_v11p_sd15_canny.pth"
    assert main([*base, "--controlnet", str(canny), "--controlnet", f"{models / 'edges'}:0.5",
                 "--control-image", str(other), "--control-image", str(edges), "-o", str(tmp_path / "two.png")]) == 0
    got = Image.open(tmp_path / "two.png")
    want = _pipe(models, "canny", "edges").generate("a red circle", control_image=[_edges(seed=5), _edges()],
                                                    controlnet_scale=[1.0, 0.5], steps=3, seed=3, progress=False)
    assert got.convert("RGB").tobytes() == want.images[0].tobytes()
    text = got.text["parameters"]
    assert "ControlNet 0: \"Module: none, Model: control_v11p_sd15_canny, Weight: 1," in text
    assert "ControlNet 1: \"Module: none, Model: edges, Weight: 0.5," in text
    # the guidance window
    assert main([*base, "--controlnet", str(models / "edges"), "--control-image", str(edges), "--control-start",
                 "0.3", "--control-end", "0.9", "-o", str(tmp_path / "window.png")]) == 0
    want = _pipe(models, "edges").generate("a red circle", control_image=_edges(), control_guidance_start=0.3,
                                           control_guidance_end=0.9, steps=3, seed=3, progress=False)
    assert Image.open(tmp_path / "window.png").convert("RGB").tobytes() == want.images[0].tobytes()
    capsys.readouterr()


@pytest.mark.parametrize("extra,message", [
    (["--controlnet", "{cn}"], "1 --controlnet and 0 --control-image given"),
    (["--controlnet", "{cn}", "--control-image", "{img}", "--control-image", "{img}"],
     "1 --controlnet and 2 --control-image given"),
    (["--control-image", "{img}"], "--control-image needs a --controlnet"),
    (["--controlnet", "{cn}", "--control-image", "{bad}"], "--control-image: {bad} is not an image Pillow can read"),
    (["--controlnet", "{cn}", "--control-image", "{none}"], "--control-image: {none} not found"),
    (["--controlnet", "{none}", "--control-image", "{img}"], "--controlnet: {none} not found"),
    (["--control-start", "0.2"], "--control-start / --control-end need a --controlnet"),
    (["--controlnet", "{cn}", "--control-image", "{img}", "--control-end", "1.5"],
     "--control-end must be a fraction of the steps, from 0 to 1"),
])
def test_cli_errors_exit_2_before_the_model_loads(models, tmp_path, capsys, extra, message):
    img, bad = tmp_path / "e.png", tmp_path / "bad.png"
    _edges().save(img)
    bad.write_text("not a picture")
    names = {"cn": str(models / "edges"), "img": str(img), "bad": str(bad), "none": str(tmp_path / "none.png")}
    # the model does not exist: an error about it would mean the ControlNet options were checked too late
    argv = ["generate", "--model", str(tmp_path / "no-such-model"), "x", "-q", *[a.format(**names) for a in extra]]
    assert main(argv) == 2
    assert message.format(**names) in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The server: AUTOMATIC1111's ControlNet extension API
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(models):
    pipe = _pipe(models, "edges", "canny")
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        srv.pipe = pipe
        yield srv


def _post(srv, path="txt2img", **body):
    return httpx.post(f"{srv.url}/sdapi/v1/{path}", json={**BODY, **body}, timeout=120)


def _unit(model, image=None, **kw):
    return {"model": model, "module": "none", **({"image": _b64(image)} if image is not None else {}), **kw}


def _units(*units):
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


def test_model_list_version_and_scripts(server, models):
    r = httpx.get(f"{server.url}/controlnet/model_list")
    assert r.status_code == 200
    edges_hash = _a1111_hash(models / "edges" / "diffusion_pytorch_model.safetensors")
    canny_hash = _a1111_hash(models / "control_v11p_sd15_canny.pth")
    assert r.json() == {"model_list": [f"edges [{edges_hash}]", f"control_v11p_sd15_canny [{canny_hash}]"]}
    assert httpx.get(f"{server.url}/controlnet/version").json() == {"version": 2}
    assert httpx.get(f"{server.url}/controlnet/module_list").json()["module_list"] == ["none", "canny", "invert"]
    assert "controlnet" in httpx.get(f"{server.url}/sdapi/v1/scripts").json()["txt2img"]


def test_txt2img_unit_is_the_pipelines_image(server, models):
    """One unit (the model named with a hash suffix, as clients copy it from the model list): the pipeline's image
    with that ControlNet at that weight; the info and infotext name it as the extension does; the unit's unused
    fields are listed as ignored; the picture is not echoed back."""
    unit = _unit("control_v11p_sd15_canny [d14c016b]", _edges(), weight=0.6, resize_mode="Crop and Resize",
                 processor_res=512, threshold_a=64, control_mode="Balanced", pixel_perfect=False, lowvram=False)
    r = _post(server, seed=11, **_units(unit))
    assert r.status_code == 200, r.text
    want = _pipe(models, "canny").generate("a red circle", control_image=_edges(), controlnet_scale=0.6, seed=11,
                                           emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    info = json.loads(r.json()["info"])
    title = httpx.get(f"{server.url}/controlnet/model_list").json()["model_list"][1]
    text = (f"Module: none, Model: {title}, Weight: 0.6, Resize Mode: Crop and Resize, Guidance Start: 0, "
            "Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced")
    assert info["extra_generation_params"] == {"ControlNet 0": text}
    assert f"ControlNet 0: {json.dumps(text)}" in info["infotexts"][0]
    where = "alwayson_scripts.controlnet.args[0]"
    assert {f"{where}.{k}" for k in ("lowvram",)} <= set(info["ignored_fields"])
    assert not {f"{where}.{k}" for k in ("resize_mode", "processor_res", "threshold_a", "pixel_perfect",
                                         "control_mode")} & set(info["ignored_fields"])  # (tests/test_preprocessors.py)
    assert "alwayson_scripts" not in info["ignored_fields"] and f"{where}.weight" not in info["ignored_fields"]
    echoed = r.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]
    assert echoed["image"].endswith("base64 characters>") and echoed["weight"] == 0.6

    # a disabled unit is not used; other scripts are listed as ignored
    r = _post(server, seed=11, alwayson_scripts={"controlnet": {"args": [{**unit, "enabled": False}]},
                                                 "Other Script": {"args": [1]}})
    assert r.status_code == 200, r.text
    plain = _pipe(models).generate("a red circle", seed=11, emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == plain.tobytes()
    assert np.abs(np.asarray(want, np.int16) - np.asarray(plain, np.int16)).mean() > 1  # the unit mattered
    info = json.loads(r.json()["info"])
    assert info["extra_generation_params"] == {} and "alwayson_scripts.Other Script" in info["ignored_fields"]


def test_two_units_in_their_order_and_a_real_client(server, models):
    """Two units, the second ControlNet first: the pipeline holding them in that order, each at its weight; and
    webuiapi's ControlNetUnit (alwayson_scripts "ControlNet", image/mask/resize_mode/... fields) works unchanged."""
    units = _units(_unit("control_v11p_sd15_canny", _edges(seed=1), weight=0.8),
                   _unit("edges", _edges(seed=2), weight=1.3, input_image=None))
    r = _post(server, seed=12, batch_size=2, **units)
    assert r.status_code == 200, r.text
    want = _pipe(models, "canny", "edges").generate(
        "a red circle", control_image=[_edges(seed=1), _edges(seed=2)], controlnet_scale=[0.8, 1.3], seed=12,
        num_images_per_prompt=2, emphasis=True, progress=False, **API).images
    got = [_image(x) for x in r.json()["images"]]
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    assert list(json.loads(r.json()["info"])["extra_generation_params"]) == ["ControlNet 0", "ControlNet 1"]

    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host=server.host, port=server.port)
    # (alwayson_scripts given: webuiapi writes the units into its mutable default dict, which later calls would send)
    res = api.txt2img(prompt="a red circle", seed=13, steps=3, cfg_scale=5, sampler_name="Euler", width=SIZE,
                      height=SIZE, alwayson_scripts={},
                      controlnet_units=[webuiapi.ControlNetUnit(image=_edges(seed=3), model="edges", weight=0.9)])
    want = _pipe(models, "edges").generate("a red circle", control_image=_edges(seed=3), controlnet_scale=0.9,
                                           seed=13, emphasis=True, progress=False, **API).images[0]
    assert res.image.convert("RGB").tobytes() == want.tobytes()
    assert api.controlnet_model_list()[0].startswith("edges [") and api.controlnet_version() == 2


def test_guidance_window_reaches_the_pipeline(server, models):
    """guidance_start / guidance_end: the pipeline's control_guidance_start / end, which under A1111's rules (the
    API's) act by the ControlNet extension's rule (models.controlnet.a1111_acts; this test asserted diffusers' rule
    before, which the extension does not follow: test_controlnet_review_fixes), and the infotext says the window."""
    r = _post(server, seed=17, steps=5, **_units(_unit("edges", _edges(), guidance_start=0.2, guidance_end=0.6)))
    assert r.status_code == 200, r.text
    pipe = _pipe(models, "edges")
    kw = dict(API, steps=5)
    want = pipe.generate("a red circle", control_image=_edges(), control_guidance_start=0.2, control_guidance_end=0.6,
                         seed=17, emphasis=True, progress=False, **kw).images[0]
    whole = pipe.generate("a red circle", control_image=_edges(), seed=17, emphasis=True, progress=False,
                          **kw).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes() != whole.tobytes()
    info = json.loads(r.json()["info"])
    assert "Guidance Start: 0.2, Guidance End: 0.6" in info["extra_generation_params"]["ControlNet 0"]
    assert "Guidance Start: 0.2, Guidance End: 0.6" in info["infotexts"][0]


def test_img2img_unit_without_a_picture_reads_the_init_image(server, models):
    """In img2img a unit with no picture takes the picture the image starts from, as the extension does; with a
    picture (the older input_image name) it takes that."""
    picture = _picture()
    r = _post(server, "img2img", seed=14, init_images=[_b64(picture)], denoising_strength=0.7,
              **_units(_unit("edges", weight=0.9)))
    assert r.status_code == 200, r.text
    pipe = _pipe(models, "edges")
    want = pipe.generate("a red circle", init_image=picture, strength=0.7, control_image=picture,
                         controlnet_scale=0.9, seed=14, emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    r = _post(server, "img2img", seed=14, init_images=[_b64(picture)], denoising_strength=0.7,
              **_units({"model": "edges", "input_image": _b64(_edges()), "guidance": 1.0}))
    assert r.status_code == 200, r.text
    want = pipe.generate("a red circle", init_image=picture, strength=0.7, control_image=_edges(), seed=14,
                         emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    # a picture of another shape: the unit reads it stretched to the image's size, as the init picture is (img2img's
    # "Just resize"), not by the unit's resize mode, so that map and picture line up
    wide = _picture(seed=2).resize((2 * SIZE, SIZE))
    r = _post(server, "img2img", seed=14, init_images=[_b64(wide)], width=SIZE, height=SIZE, denoising_strength=0.7,
              **_units(_unit("edges", weight=0.9)))
    assert r.status_code == 200, r.text
    # (the unit's map is the picture through preprocessors.fit, the extension's high_quality_resize -- cv2 area /
    # bicubic since the review fixes, no longer the Lanczos the pipeline itself stretches a picture with)
    from imagine.preprocessors import fit
    want = pipe.generate("a red circle", init_image=wide, strength=0.7, control_image=fit(wide, SIZE, SIZE),
                         controlnet_scale=0.9, seed=14, height=SIZE, width=SIZE, emphasis=True, progress=False,
                         **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()


def test_hires_fix_and_only_masked_inpainting_with_a_unit(server, models):
    """enable_hr: both passes read the picture (generate_hires, as the extension's hr_option "Both"), each pass its
    map fitted to its own size from the one preprocessed map (the extension's hint_cond / hr_hint_cond), a canny unit
    with the soft weights in the second pass (its hook's forced soft injection); "Only masked" inpainting: the
    control picture is cut to the same crop as the init picture, as the extension crops it."""
    from imagine.images import fit_picture
    from imagine.preprocessors import canny, fit
    from imagine.server.app import prepare_inpainting

    pipe = _pipe(models, "edges")
    r = _post(server, seed=15, width=16, height=16, enable_hr=True, hr_scale=2, denoising_strength=0.6,
              **_units(_unit("edges", _edges())))
    assert r.status_code == 200, r.text
    # the map fitted to each pass's size (the extension's default "Crop and Resize")
    kw = dict(seed=15, height=16, width=16, hires_scale=2.0, hires_strength=0.6, emphasis=True, progress=False, **API)
    want = pipe.generate_hires("a red circle", control_image=fit(_edges(), 16, 16, "crop_and_resize"),
                               hires_control_image=fit(_edges(), 32, 32, "crop_and_resize"), **kw).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    scaled_up = pipe.generate_hires("a red circle", control_image=fit(_edges(), 16, 16, "crop_and_resize"),
                                    **kw).images[0]
    assert want.tobytes() != scaled_up.tobytes()  # (the first pass's map scaled up: another picture)
    # a canny unit: its edges made once at the first pass's resolution, fitted to each pass, "balanced" in the first
    # pass and with the soft weights ("prompt") in the second
    photo = _picture(seed=4)
    r = _post(server, seed=15, width=16, height=16, enable_hr=True, hr_scale=2, denoising_strength=0.6,
              **_units(_unit("edges", photo, module="canny", processor_res=64)))
    assert r.status_code == 200, r.text
    edges = canny(photo, 100, 200, 64)
    want = pipe.generate_hires("a red circle", control_image=fit(edges, 16, 16, "crop_and_resize"),
                               hires_control_image=fit(edges, 32, 32, "crop_and_resize"),
                               hires_control_mode="prompt", **kw).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    balanced = pipe.generate_hires("a red circle", control_image=fit(edges, 16, 16, "crop_and_resize"),
                                   hires_control_image=fit(edges, 32, 32, "crop_and_resize"), **kw).images[0]
    assert want.tobytes() != balanced.tobytes()
    with pytest.raises(ValueError, match="give control_image .the first pass's. too"):
        pipe.generate_hires("a red circle", hires_control_image=edges, **kw)
    with pytest.raises(ValueError, match="hires_control_mode must be one of balanced, prompt"):
        pipe.generate_hires("a red circle", control_image=edges, hires_control_mode="soft", **kw)

    picture, mask = _picture(seed=3), Image.new("L", (SIZE, SIZE))
    mask.paste(255, (4, 6, 14, 12))
    r = _post(server, "img2img", seed=16, init_images=[_b64(picture)], mask=_b64(mask), width=16, height=16,
              **_units(_unit("edges", _edges(size=2 * SIZE))))  # a control picture of twice the picture's size
    assert r.status_code == 200, r.text
    inp = prepare_inpainting([picture], mask, 16, 16, blur=4, fill=0, full_res=True, padding=0, invert=0)
    box = inp.boxes[0]
    assert box is not None and box != (0, 0, SIZE, SIZE)
    # (the extension crops, then preprocesses: the picture to the init's size by the unit's mode, cut to the crop,
    # to the image's size by "Resize and fill", A1111's resize_image each time)
    control = fit_picture(fit_picture(_edges(size=2 * SIZE), SIZE, SIZE, "crop_and_resize").crop(box), 16, 16,
                          "resize_and_fill")
    result = pipe.generate("a red circle", init_image=inp.inits[0], mask_image=inp.masks[0], control_image=control,
                           strength=0.75, seed=16, height=16, width=16, emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == inp.finish(result, 0).tobytes()
    # a unit without a picture reads the init picture, cut to the same crop (once: the crop is not cut again)
    r = _post(server, "img2img", seed=16, init_images=[_b64(picture)], mask=_b64(mask), width=16, height=16,
              **_units(_unit("edges")))
    assert r.status_code == 200, r.text
    result = pipe.generate("a red circle", init_image=inp.inits[0], mask_image=inp.masks[0],
                           control_image=fit_picture(picture.crop(box), 16, 16, "resize_and_fill"), strength=0.75, seed=16, height=16, width=16, emphasis=True,
                           progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == inp.finish(result, 0).tobytes()


@pytest.mark.parametrize("unit,field,words", [
    ({"model": "edges", "module": "depth_midas"}, ".module", "'depth_midas' is not one imagine runs; valid: 'none', "),
    ({"model": "edges", "resize_mode": "Stretch"}, ".resize_mode", "must be 'Just Resize', 'Crop and Resize' or"),
    ({"model": "edges", "threshold_a": "x"}, ".threshold_a", "must be a number (-1: the preprocessor's default)"),
    # (the extension refuses only start > end; start == end is accepted: test_controlnet_review_fixes)
    ({"model": "edges", "guidance_start": 0.6, "guidance_end": 0.4}, ".guidance_start", "must not be above guidance_end"),
    ({"model": "edges", "guidance_end": 1.5}, ".guidance_end", "between 0 and 1"),
    ({"model": "edges", "guidance": -1}, ".guidance", "between 0 and 1"),
    ({"model": "depth [12345678]"}, ".model", "'depth [12345678]' is not a loaded ControlNet; loaded: edges ["),
    ({"model": "None"}, ".model", "is not a loaded ControlNet"),
    ({"model": "edges", "weight": 3}, ".weight", "between 0 and 2"),
    ({"model": "edges", "weight": "x"}, ".weight", "between 0 and 2"),
    ({"model": "edges", "image": None}, ".image", "needs a control picture"),
    ({"model": "edges", "image": "bm90IGFuIGltYWdl"}, ".image", "not a base64 image"),
    ({"model": "edges", "image": [1, 2, 3]}, ".image", "one control picture per unit"),
])
def test_bad_units_are_422(server, unit, field, words):
    unit = {"image": _b64(_edges()), **unit}
    r = _post(server, seed=1, **_units(unit))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "alwayson_scripts.controlnet.args[0]" + field and words in r.json()["detail"], r.json()


@pytest.mark.parametrize("scripts,field", [
    ("controlnet", "alwayson_scripts"),
    ({"controlnet": [{"model": "edges"}]}, "alwayson_scripts.controlnet"),
    ({"controlnet": {"args": ["edges"]}}, "alwayson_scripts.controlnet.args[0]"),
])
def test_malformed_scripts_are_422(server, scripts, field):
    r = _post(server, seed=1, alwayson_scripts=scripts)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_no_controlnet_loaded_is_422(models):
    app = create_app(_pipe(models))
    with BackgroundServer(app) as srv:
        r = _post(srv, seed=1, **_units(_unit("edges", _edges())))
        assert r.status_code == 422 and "no ControlNet is loaded" in r.json()["detail"], r.text
        assert httpx.get(f"{srv.url}/controlnet/model_list").json() == {"model_list": []}


def test_jobs_batch_with_their_own_pictures_not_across_units(server, models):
    """Two jobs with the same unit and weight and different pictures share one forward pass, each with its own
    picture (its image as alone, up to one 8-bit level of float rounding); a job at another weight runs apart."""
    from imagine.server.worker import Job, ModelWorker, Settings

    pipe = server.pipe
    worker = ModelWorker(pipe, max_batch=8)
    settings = Settings(height=SIZE, width=SIZE, steps=3, sampler="euler", guidance_scale=5.0,
                        controlnets=(("edges", 0.8),))
    pictures = [_edges(seed=6), _edges(seed=7)]
    jobs = [Job(prompts=["a red circle"], negative_prompts=[""], seeds=[50 + i], settings=settings,
                control_images=[[pictures[i]]]) for i in range(2)]
    other = dataclasses.replace(settings, controlnets=(("edges", 0.4),))
    jobs.append(Job(prompts=["a red circle"], negative_prompts=[""], seeds=[52], settings=other,
                    control_images=[[pictures[0]]]))
    results = run_queued(worker, jobs)  # all queued before the worker starts: the first two go in one batch
    assert worker.stats["batches"] == 2 and results[0].batch_images == 2 and results[2].batch_images == 1
    alone = _pipe(models, "edges")
    for i, (pic, weight, seed) in enumerate([(pictures[0], 0.8, 50), (pictures[1], 0.8, 51), (pictures[0], 0.4, 52)]):
        want = alone.generate("a red circle", control_image=pic, controlnet_scale=weight, seed=seed, progress=False,
                              **KW).images[0]
        diff = np.abs(np.asarray(results[i].images[0], np.int16) - np.asarray(want, np.int16)).max()
        assert diff <= 1, (i, diff)
    assert [n for n, _ in pipe.controlnets] == ["edges", "control_v11p_sd15_canny"]  # all of them again
    with pytest.raises(ValueError, match="1 ControlNet units needs one list of control pictures per unit"):
        Job(prompts=["x"], negative_prompts=[""], seeds=[1], settings=settings)


def test_serve_loads_controlnets_at_start(models, tmp_path, monkeypatch, capsys):
    """imagine serve --controlnet PATH (repeatable) loads them before serving; a missing one is exit code 2 before
    the model loads."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    canny = models / "control_v11p_sd15_canny.pth"
    assert main(["serve", "--model", str(models / "sd"), "--controlnet", str(models / "edges"),
                 "--controlnet", str(canny), "--port", "0"]) == 0
    (app,) = served
    assert [n for n, _ in app.state.worker.controlnets()] == ["edges", "control_v11p_sd15_canny"]
    assert main(["serve", "--model", str(tmp_path / "no-such-model"), "--controlnet", str(tmp_path / "x.pth")]) == 2
    assert f"--controlnet: {tmp_path / 'x.pth'} not found" in capsys.readouterr().err


def test_a_units_control_mode_reaches_the_pipeline(server, models):
    """The extension's control_mode: "ControlNet is more important" is the pipeline's control_mode "controlnet", and
    the infotext names it; an unknown mode is 422."""
    unit = _unit("edges", _edges(), control_mode="ControlNet is more important")
    r = _post(server, seed=21, **_units(unit))
    assert r.status_code == 200, r.text
    want = _pipe(models, "edges").generate("a red circle", control_image=_edges(), control_mode="controlnet",
                                           seed=21, emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    assert "Control Mode: ControlNet is more important" in json.loads(r.json()["info"])["infotexts"][0]
    balanced = _pipe(models, "edges").generate("a red circle", control_image=_edges(), seed=21, emphasis=True,
                                               progress=False, **API).images[0]
    assert balanced.tobytes() != want.tobytes()  # (the mode changes the image)
    r = _post(server, seed=21, **_units(_unit("edges", _edges(), control_mode="Louder")))
    assert r.status_code == 422 and "control_mode must be 'Balanced'" in r.text
