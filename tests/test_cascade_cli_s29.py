"""`imagine generate` on DeepFloyd IF folders (session 29): --model IF-I (stage I) and --stage-2 IF-II, each image
from its own seed's generator through both stages, as diffusers' IF documentation chains IFPipeline and
IFSuperResolutionPipeline with one generator; flags a cascade does not read are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_cascade_if_s29 import KW, parts, psnr  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    theirs_1, theirs_2, _, _ = parts
    theirs_1.save_pretrained(root / "IF-I")
    theirs_2.save_pretrained(root / "IF-II")
    return root / "IF-I", root / "IF-II"


def _run(capsys, *argv):
    from imagine.cli import main

    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_runs_both_stages_as_diffusers(parts, folders, tmp_path, capsys):
    theirs_1, theirs_2, _, _ = parts
    one, two = folders
    out = tmp_path / "cascade.png"
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "A Red circle", "-n", "blue square", "--steps", 5,
                        "--stage-2-steps", 4, "--guidance-scale", 6, "--stage-2-guidance-scale", 3,
                        "--noise-level", 100, "--seed", 11, "-o", out, "-q")
    assert code == 0, err
    g = torch.Generator().manual_seed(11)
    low = theirs_1("A Red circle", negative_prompt="blue square", num_inference_steps=5, guidance_scale=6.0,
                   generator=g, output_type="pt", **KW).images
    want = theirs_2("A Red circle", image=low, negative_prompt="blue square", num_inference_steps=4,
                    guidance_scale=3.0, noise_level=100, generator=g, output_type="pil", **KW).images
    got = Image.open(out)
    assert got.size == want[0].size == (32, 32)
    assert psnr([got.convert("RGB")], want) >= 50
    record = json.loads(got.text["imagine"])
    assert (record["seed"], record["stage_2"], record["noise_level"], record["steps"]) == (11, "IF-II", 100, 5)


def test_stage_one_alone_and_several_images(parts, folders, tmp_path, capsys):
    theirs_1 = parts[0]
    one, _ = folders
    code, stdout, err = _run(capsys, "--model", one, "a cat", "--steps", 4, "--seed", 3, "--num-images", 2,
                             "-o", tmp_path / "out", "-q")
    assert code == 0, err
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000-3.png", "00001-4.png"]
    for f, seed in zip(files, (3, 4)):  # (each image its own seed's, whatever the batch)
        want = theirs_1("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(seed), **KW).images
        assert psnr([Image.open(f).convert("RGB")], want) >= 50


def test_flags_a_cascade_does_not_read_are_refused(folders, tmp_path, capsys):
    one, two = folders
    code, _, err = _run(capsys, "--model", one, "a cat", "--eta", "0.5", "-o", tmp_path / "x.png")
    assert code != 0 and "--eta: not for a pixel cascade" in err
    code, _, err = _run(capsys, "--model", one, "a cat", "--noise-level", 10, "-o", tmp_path / "x.png")
    assert code != 0 and "give --stage-2 FOLDER too" in err
    code, _, err = _run(capsys, "--model", two, "a cat", "-o", tmp_path / "x.png")
    assert code != 0 and "must be a DeepFloyd IF stage I folder" in err
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "a cat", "--stage-2-steps", 0)
    assert code != 0 and "--stage-2-steps must be at least 1" in err
    code, _, err = _run(capsys, "--model", one, "a cat", "--num-images", 0)
    assert code != 0 and "--num-images" in err
    assert not list(tmp_path.glob("*.png"))


def test_the_latent_pipeline_and_the_server_name_an_if_folder(folders):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    for folder in folders:
        with pytest.raises(ValueError, match=r"is a DeepFloyd IF stage \(IF(SuperResolution)?Pipeline\), a pixel "
                                             r"cascade: run it with `imagine generate --model IF-I-FOLDER"):
            TextToImagePipeline.from_pretrained(folder)


def test_bfloat16_weights_for_the_memory(folders, tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 loads both stages' U-Nets and T5 in bf16 (half the memory: the real IF-I-XL with T5-XXL take
    about 36 GB in float32) and records it; the picture stays near the float32 one on these weights."""
    from imagine.pipelines import cascade

    loaded = []
    real = cascade.IFStage.from_pretrained.__func__

    def spy(cls, folder, dtype=torch.float32, encoder=None):
        stage = real(cls, folder, dtype, encoder)
        loaded.append((next(stage.model.parameters()).dtype, next(stage.encoder.model.parameters()).dtype))
        return stage

    monkeypatch.setattr(cascade.IFStage, "from_pretrained", classmethod(spy))
    one, two = folders
    paths = {}
    for dtype in ("float32", "bfloat16"):
        paths[dtype] = tmp_path / f"{dtype}.png"
        code, _, err = _run(capsys, "--model", one, "--stage-2", two, "a cat", "--steps", 4, "--stage-2-steps", 3,
                            "--seed", 2, "--dtype", dtype, "-o", paths[dtype], "-q")
        assert code == 0, err
    assert loaded[2:] == [(torch.bfloat16, torch.bfloat16)] * 2
    assert json.loads(Image.open(paths["bfloat16"]).text["imagine"])["dtype"] == "bfloat16"
    db = psnr([Image.open(paths["bfloat16"]).convert("RGB")], [Image.open(paths["float32"]).convert("RGB")])
    assert db > 20  # (24 dB measured: bf16 weights drift on random ones; unrelated pictures are near 10 dB)


def test_stage_3_is_sds_x4_upscaler_on_stage_2s_picture(folders, tmp_path_factory, tmp_path, capsys):
    """--stage-3 FOLDER (IF's stage III: SD's x4 upscaler) makes stage II's picture 4x larger at noise level 100, as
    diffusers' StableDiffusionUpscalePipeline does on that picture with the image's seed."""
    from test_upscale import _tiny_upscaler

    one, two = folders
    x4 = tmp_path_factory.mktemp("x4") / "folder"
    _tiny_upscaler(x4)
    import diffusers

    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(x4, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    base = ["--model", one, "--stage-2", two, "A Red circle", "--steps", 3, "--stage-2-steps", 3, "--seed", 9, "-q"]
    code, _, err = _run(capsys, *base, "-o", tmp_path / "two.png")
    assert code == 0, err
    code, _, err = _run(capsys, *base, "--stage-3", x4, "-o", tmp_path / "three.png")
    assert code == 0, err
    low = Image.open(tmp_path / "two.png").convert("RGB")
    want = ref("A Red circle", image=low, noise_level=100, generator=torch.Generator().manual_seed(9)).images
    got = Image.open(tmp_path / "three.png")
    assert got.size == want[0].size == (4 * low.width, 4 * low.height)
    assert psnr([got.convert("RGB")], want) >= 50
    assert json.loads(got.text["imagine"])["stage_3_noise_level"] == 100
    code, _, err = _run(capsys, "--model", one, "a cat", "--stage-3", x4)
    assert code != 0 and "give --stage-2 FOLDER too" in err
