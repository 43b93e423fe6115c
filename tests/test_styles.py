"""AUTOMATIC1111's prompt styles (`imagine/styles.py`): its merge rule ({prompt} marks the place, else ", "), the
styles.csv reader, and styles named through the CLI (`--style`, `--styles-file`) and the A1111 API (`styles`, `imagine
serve --styles`, `/sdapi/v1/prompt-styles`) giving the image of the merged texts typed out."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from test_inpainting_api import API, BODY, KW, _image  # noqa: E402
from test_loading import save_diffusers_folder  # noqa: E402

httpx = pytest.importorskip("httpx")

from imagine.styles import PromptStyle, apply_styles, merge_prompts, pick_styles, read_styles  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CSV = ('\ufeffname,prompt,negative_prompt\n'
       'oil,"{prompt}, oil painting, (thick brushstrokes:1.2)","blurry, photo"\n'
       'sharp,highly detailed,\n'
       ',orphan row without a name,\n'
       '"quoted, name","a ""quoted"" style",lowres\n')


def test_merge_is_a1111s_rule():
    assert merge_prompts("{prompt}, oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompts("masterpiece, {prompt} {prompt}", "x") == "masterpiece, x x"
    assert merge_prompts("oil painting", "  a cat ") == "a cat, oil painting"
    assert merge_prompts("oil painting", "") == "oil painting"
    assert merge_prompts("", "a cat") == "a cat"
    assert merge_prompts(" ", " ") == ""
    styles = [PromptStyle("a", "{prompt}, first", "bad"), PromptStyle("b", "second", "{prompt}, worse")]
    assert apply_styles("cat", "", styles) == ("cat, first, second", "bad, worse")  # in order, each on the last


def test_the_styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    styles = read_styles(path)
    assert list(styles) == ["oil", "sharp", "quoted, name"]  # the BOM is not part of the header; no-name rows skipped
    assert styles["oil"] == PromptStyle("oil", "{prompt}, oil painting, (thick brushstrokes:1.2)", "blurry, photo")
    assert styles["quoted, name"].prompt == 'a "quoted" style' and styles["sharp"].negative_prompt == ""
    old = tmp_path / "old.csv"
    old.write_text("name,text\nold,in the text column\n")
    assert read_styles(old)["old"].prompt == "in the text column"  # A1111's older column name
    spaced = tmp_path / "spaced.csv"  # as people write them by hand; A1111 skips the spaces after commas
    spaced.write_text('name, prompt, negative_prompt\nsharp, "highly detailed, 8k", "blurry"\n# old, x, y\n')
    assert read_styles(spaced) == {"sharp": PromptStyle("sharp", "highly detailed, 8k", "blurry")}  # (# rows skipped)
    for header in ("title,prompt\nx,y\n", "name,negative\nx,y\n"):
        bad = tmp_path / "bad.csv"
        bad.write_text(header)
        with pytest.raises(ValueError, match="needs a header row with 'name' and 'prompt' columns"):
            read_styles(bad)
    with pytest.raises(FileNotFoundError, match="styles file not found"):
        read_styles(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="no style named 'oli'; styles: oil, sharp"):
        pick_styles(styles, ["oli"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    tmp = tmp_path_factory.mktemp("styles")
    save_diffusers_folder(tmp / "folder", "sd1")
    (tmp / "styles.csv").write_text(CSV, encoding="utf-8")
    pipe = TextToImagePipeline.from_pretrained(tmp / "folder")
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64),
                                     styles=read_styles(tmp / "styles.csv"))) as srv:
        srv.pipe, srv.tmp = pipe, tmp
        yield srv


def test_a1111_api_styles(setup):
    pipe = setup.pipe
    r = httpx.post(f"{setup.url}/sdapi/v1/txt2img", json={**BODY, "seed": 2, "negative_prompt": "dark",
                                                          "styles": ["oil", "sharp"]}, timeout=120)
    assert r.status_code == 200, r.text
    prompt = "a red circle, oil painting, (thick brushstrokes:1.2), highly detailed"
    want = pipe.generate(prompt, "dark, blurry, photo", seed=2, emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    plain = pipe.generate("a red circle", "dark", seed=2, emphasis=True, progress=False, **API).images[0]
    assert plain.tobytes() != want.tobytes()
    info = json.loads(r.json()["info"])
    assert info["styles"] == ["oil", "sharp"] and info["prompt"] == prompt
    assert info["infotexts"][0].startswith(prompt + "\nNegative prompt: dark, blurry, photo\n")
    assert r.json()["parameters"]["prompt"] == "a red circle"  # the request as sent
    listed = httpx.get(f"{setup.url}/sdapi/v1/prompt-styles").json()
    assert [s["name"] for s in listed] == ["oil", "sharp", "quoted, name"] and listed[2]["negative_prompt"] == "lowres"
    # the hires pass's own prompt is styled too (an empty one is the styled prompt), as A1111's
    r = httpx.post(f"{setup.url}/sdapi/v1/txt2img", json={**BODY, "seed": 2, "styles": ["sharp"], "enable_hr": True,
                                                          "hr_scale": 2, "hr_prompt": "a green circle", "width": 16,
                                                          "height": 16, "denoising_strength": 0.5}, timeout=120)
    assert r.status_code == 200, r.text
    want = pipe.generate_hires("a red circle, highly detailed", seed=2, emphasis=True, progress=False, height=16,
                               width=16, hires_scale=2, hires_strength=0.5,
                               hires_prompt="a green circle, highly detailed", **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    r = httpx.post(f"{setup.url}/sdapi/v1/txt2img", json={**BODY, "styles": ["nope"]}, timeout=120)
    assert r.status_code == 422 and r.json()["field"] == "styles" and "oil, sharp" in r.json()["detail"]


def test_generate_cli_styles(setup, capsys):
    from imagine.cli import main

    out = setup.tmp / "styled.png"
    args = ["generate", "--model", str(setup.tmp / "folder"), "a red circle", "--seed", "2", "--steps", "4",
            "--sampler", "euler", "--guidance-scale", "5", "-o", str(out)]
    assert main([*args, "--styles-file", str(setup.tmp / "styles.csv"), "--style", "oil", "-n", "dark"]) == 0
    want = setup.pipe.generate("a red circle, oil painting, (thick brushstrokes:1.2)", "dark, blurry, photo", seed=2,
                               progress=False, **KW).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    saved = json.loads(Image.open(out).info["imagine"])
    assert saved["prompt"] == "a red circle, oil painting, (thick brushstrokes:1.2)"
    assert saved["negative_prompt"] == "dark, blurry, photo"
    hires = setup.tmp / "hires.png"
    assert main([*args[:-1], str(hires), "--styles-file", str(setup.tmp / "styles.csv"), "--style", "sharp",
                 "--height", "16", "--width", "16", "--hires-scale", "2", "--hires-prompt", "a green circle"]) == 0
    want = setup.pipe.generate_hires("a red circle, highly detailed", seed=2, progress=False, height=16, width=16,
                                     hires_scale=2, hires_prompt="a green circle, highly detailed", **KW).images[0]
    assert Image.open(hires).convert("RGB").tobytes() == want.tobytes()
    assert main([*args, "--style", "oil"]) != 0
    assert "give both" in capsys.readouterr().err
    assert main([*args, "--styles-file", str(setup.tmp / "styles.csv"), "--style", "nope"]) != 0
    assert "no style named 'nope'" in capsys.readouterr().err
