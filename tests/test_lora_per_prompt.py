"""AUTOMATIC1111's LoRAs per prompt (`<lora:name:s>` naming a file in the pipeline's lora_dir; `serve --lora-dir`,
`generate --lora-dir`): the image equals the one of the model with that LoRA merged at load, and a request without
it afterwards equals the plain model's, bit for bit (the weights it changed are put back exactly)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from test_lora import _kohya_lora  # noqa: E402
from test_loading import save_diffusers_folder  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=3, seed=11, progress=False, output_type="latent")


@pytest.fixture
def setup(tmp_path):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    (tmp_path / "loras").mkdir()
    for name, seed in (("style", 0), ("other", 1)):
        save_file(_kohya_lora(ref.unet, ref.text_encoder, seed=seed), str(tmp_path / "loras" / f"{name}.safetensors"))
    return tmp_path


def test_a_prompts_lora_is_the_merged_model_and_goes_away_exactly(setup):
    tmp = setup
    pipe = TextToImagePipeline.from_pretrained(tmp / "folder")
    pipe.lora_dir = tmp / "loras"
    plain = pipe.generate("a red circle", **KW).latents
    asked = pipe.generate("a red circle <lora:style:0.7>", **KW)
    merged = TextToImagePipeline.from_pretrained(tmp / "folder", loras=[(tmp / "loras" / "style.safetensors", 0.7)])
    assert torch.equal(asked.latents, merged.generate("a red circle", **KW).latents)
    assert asked.parameters["lora"] == "style: 0.7" and pipe.request_loras == [("style", 0.7)]
    both = pipe.generate("a red circle <lora:style:0.7>", "blurry <lora:other:0.4>", **KW)
    assert pipe.request_loras == [("style", 0.7), ("other", 0.4)] and not torch.equal(both.latents, asked.latents)
    again = pipe.generate("a red circle", **KW)
    assert torch.equal(again.latents, plain) and pipe.request_loras == [] and "lora" not in again.parameters
    assert pipe.available_loras() == ["other", "style"]


def test_bad_tags_are_clear_errors_and_change_nothing(setup):
    tmp = setup
    pipe = TextToImagePipeline.from_pretrained(tmp / "folder")
    plain = pipe.generate("a red circle", **KW).latents
    with pytest.raises(ValueError, match="give a folder of LoRAs"):
        pipe.generate("a <lora:style:0.5>", **KW)
    pipe.lora_dir = tmp / "loras"
    with pytest.raises(ValueError, match="has no nope.safetensors.*LoRAs there: other, style"):
        pipe.generate("a <lora:nope:0.5>", **KW)
    with pytest.raises(ValueError, match="asked for at strengths 0.5 and 0.6"):
        pipe.generate(["a <lora:style:0.5>", "b <lora:style:0.6>"], **KW)
    with pytest.raises(ValueError, match="not a third field .*A1111's dyn"):
        pipe.generate("a <lora:style:0.5:0.2:4>", **KW)
    with pytest.raises(ValueError, match="the U-Net strength 'x' is not a number"):
        pipe.generate("a <lora:style:0.5:x>", **KW)
    with pytest.raises(ValueError, match="nor other settings"):  # (A1111 reads a named field's key as written)
        pipe.generate("a <lora:style:TE=0.3>", **KW)
    with pytest.raises(ValueError, match="the text encoder strength '' is not a number"):
        pipe.generate("a <lora:style::0.3>", **KW)
    assert pipe.request_loras == [] and torch.equal(pipe.generate("a red circle", **KW).latents, plain)


def test_the_a1111_api_merges_a_prompts_lora(setup):
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.server.app import create_app

    tmp = setup
    pipe = TextToImagePipeline.from_pretrained(tmp / "folder")
    merged = TextToImagePipeline.from_pretrained(tmp / "folder", loras=[(tmp / "loras" / "style.safetensors", 0.7)])
    pipe.lora_dir = tmp / "loras"
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings)
    want = merged.generate("a red circle", seed=5, steps=3, guidance_scale=5.0, progress=False, emphasis=True,
                           **a1111_settings("Euler")).images[0]
    with TestClient(create_app(pipe)) as client:
        body = {"prompt": "a red circle <lora:style:0.7>", "seed": 5, "steps": 3, "cfg_scale": 5,
                "sampler_name": "Euler"}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert {d["name"] for d in client.get("/sdapi/v1/loras").json()} == {"style", "other"}
        bad = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nope:1>"})
        assert bad.status_code == 422 and "nope" in bad.text


def test_the_cli_takes_a_folder_of_loras(setup, capsys):
    from PIL import Image

    from imagine.cli import main

    tmp = setup
    out = tmp / "out.png"
    base = ["generate", "--model", str(tmp / "folder"), "a red circle <lora:style:0.7>", "--steps", "3", "--seed",
            "11", "-q", "-o", str(out)]
    assert main([*base, "--lora-dir", str(tmp / "loras")]) == 0
    merged = TextToImagePipeline.from_pretrained(tmp / "folder", loras=[(tmp / "loras" / "style.safetensors", 0.7)])
    want = merged.generate("a red circle", steps=3, seed=11, progress=False).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert 'Lora: "style: 0.7"' in Image.open(out).text["parameters"]
    assert main([*base, "--lora-dir", str(tmp / "nowhere")]) == 2
    assert "--lora-dir" in capsys.readouterr().err


@pytest.mark.parametrize("tag,te,unet", [("<lora:style:0.5:0.2>", 0.5, 0.2), ("<lora:style:unet=0.2>", 1.0, 0.2),
                                         ("<lora:style:te=0.3:unet=0.6>", 0.3, 0.6), ("<lora:style:0.4>", 0.4, 0.4)])
def test_a_tags_text_encoder_and_unet_strengths_are_a1111s(setup, tag, te, unet):
    """AUTOMATIC1111's <lora:name:te:unet> (and te= / unet=): the text encoder gets the LoRA at the first strength and
    the U-Net at the second, weight for weight what a merge at each strength alone gives those parts."""
    tmp = setup
    pipe = TextToImagePipeline.from_pretrained(tmp / "folder")
    pipe.lora_dir = tmp / "loras"
    res = pipe.generate("a red circle " + tag, **KW)
    want = "style: " + (f"{te:g}" if te == unet else f"{te:g}:{unet:g}")
    assert res.parameters["lora"] == want
    for part, strength in (("text_encoder", te), ("unet", unet)):
        alone = TextToImagePipeline.from_pretrained(tmp / "folder")
        alone.load_lora(tmp / "loras" / "style.safetensors", strength)
        got, exp = pipe._lora_parts()[part].state_dict(), alone._lora_parts()[part].state_dict()
        assert all(torch.equal(got[k], exp[k]) for k in exp), part


def test_the_cli_batches_lines_by_the_loras_they_ask_for(setup):
    """--from-file: a line asking for a LoRA runs in a batch of its own, so the line beside it gives the image it gives
    alone (one batch merges one set of LoRAs for all its rows), and lines asking for one LoRA at two strengths run."""
    from PIL import Image

    from imagine.cli import main

    tmp = setup
    lines = tmp / "prompts.txt"
    lines.write_text("a red circle <lora:style:0.7>\na blue square\na green circle <lora:style:0.4>\n")
    for size in ("1", "3"):
        assert main(["generate", "--model", str(tmp / "folder"), "--from-file", str(lines), "--steps", "3", "--seed",
                     "50", "--lora-dir", str(tmp / "loras"), "--batch-size", size, "-q", "-o",
                     str(tmp / f"b{size}")]) == 0
    for one, three in zip(*(sorted((tmp / f"b{s}").glob("*.png")) for s in ("1", "3"))):
        assert Image.open(one).convert("RGB").tobytes() == Image.open(three).convert("RGB").tobytes(), three.name
    assert "Lora" not in Image.open(sorted((tmp / "b3").glob("*.png"))[1]).text["parameters"]
