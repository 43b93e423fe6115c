"""`imagine generate --model PATH` end to end on a tiny Stable-Diffusion-shaped model, as a
diffusers folder and as an original single file: PNGs with their parameters, --from-file
batches with a JSONL record, and the errors a user can run into."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from test_loading import save_diffusers_folder, write_single_file  # noqa: E402

pytest.importorskip("diffusers")

from imagine.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    save_diffusers_folder(root / "folder", "sd1", scheduler="ddim")
    write_single_file(root / "single" / "tiny-sd.safetensors", "sd1")
    return {"folder": root / "folder", "single": root / "single" / "tiny-sd.safetensors"}


def _run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("which", ["folder", "single"])
def test_generate_writes_png_with_parameters(models, tmp_path, capsys, which):
    out = tmp_path / "picture.png"
    code, stdout, err = _run(capsys, "--model", models[which], "a red circle", "--steps", 3, "--sampler", "euler",
                             "--seed", 7, "--height", 32, "--width", 24, "--guidance-scale", 5, "-n", "blue",
                             "-o", out, "-q")
    assert code == 0, err
    assert str(out) in stdout
    img = Image.open(out)
    assert img.size == (24, 32)
    params = json.loads(img.text["imagine"])
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blue"
    assert (params["seed"], params["steps"], params["sampler"], params["guidance_scale"]) == (7, 3, "euler", 5.0)
    assert (params["width"], params["height"]) == (24, 32)
    assert "Steps: 3" in img.text["parameters"] and "Seed: 7" in img.text["parameters"]


def test_same_seed_same_image_from_folder_and_single_file(models, tmp_path, capsys):
    """Both forms hold the same weights (written from the same seed): the same PNG comes out."""
    paths = []
    for which in ("folder", "single"):
        out = tmp_path / f"{which}.png"
        code, _, err = _run(capsys, "--model", models[which], "a blue square", "--steps", 2, "--sampler", "ddim",
                            "--seed", 3, "--height", 16, "--width", 16, "-o", out, "-q")
        assert code == 0, err
        paths.append(out)
    a, b = (Image.open(p).convert("RGB").tobytes() for p in paths)
    assert a == b


def test_from_file_writes_numbered_pngs_and_jsonl(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nthe blue square\n", encoding="utf-8")
    out_dir = tmp_path / "batch"
    code, stdout, err = _run(capsys, "--model", models["single"], "--from-file", prompts, "--num-images", 2,
                             "--steps", 2, "--seed", 100, "--height", 16, "--width", 16, "-o", out_dir, "-q",
                             "--batch-size", 3)
    assert code == 0, err
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 4
    records = [json.loads(line) for line in (out_dir / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "a red circle", "the blue square", "the blue square"]
    assert [r["seed"] for r in records] == [100, 101, 102, 103]
    assert sorted(r["file"] for r in records) == [p.name for p in pngs]
    for r in records:
        meta = json.loads(Image.open(out_dir / r["file"]).text["imagine"])
        assert meta["seed"] == r["seed"] and meta["prompt"] == r["prompt"]


def test_single_file_options_match_the_v_prediction_folder(tmp_path, capsys):
    """An SD-2-like v-prediction model: the folder says so in its scheduler config; the single file (its
    tokenizer elsewhere) needs --prediction-type and --tokenizer. Same weights, same seed: the same PNG; without
    --prediction-type the single file is read as epsilon and the image differs."""
    save_diffusers_folder(tmp_path / "folder", "sd2", scheduler="dpmpp_2m", prediction_type="v_prediction")
    single = tmp_path / "ckpt" / "tiny-sd2-v.safetensors"
    write_single_file(single, "sd2", tokenizer_next_to_it=False)
    common = ["a green triangle", "--steps", 3, "--sampler", "dpmpp_2m", "--seed", 5, "--height", 16, "--width", 16,
              "-q"]
    outs = {}
    for name, extra in (("folder", ["--model", tmp_path / "folder"]),
                        ("single", ["--model", single, "--prediction-type", "v_prediction",
                                    "--tokenizer", tmp_path / "folder" / "tokenizer"]),
                        ("single-eps", ["--model", single, "--tokenizer", tmp_path / "folder" / "tokenizer"])):
        outs[name] = tmp_path / f"{name}.png"
        code, _, err = _run(capsys, *extra, *common, "-o", outs[name])
        assert code == 0, err
    pixels = {k: Image.open(v).convert("RGB").tobytes() for k, v in outs.items()}
    assert pixels["single"] == pixels["folder"]
    assert pixels["single-eps"] != pixels["folder"]
    code, _, err = _run(capsys, "--model", tmp_path / "folder", "--prediction-type", "epsilon", *common,
                        "-o", tmp_path / "x.png")
    assert code == 2 and "only for single-file checkpoints" in err


def test_schedule_type_and_final_step_reach_the_sampler(models, tmp_path, capsys):
    common = ["--model", models["folder"], "a red circle", "--steps", 4, "--sampler", "unipc", "--seed", 9,
              "--height", 16, "--width", 16, "-q"]
    paths = {}
    for name, extra in (("plain", []), ("exp", ["--schedule-type", "exponential"]),
                        ("exp-heun", ["--schedule-type", "exponential", "--final-step", "heun"])):
        paths[name] = tmp_path / f"{name}.png"
        code, _, err = _run(capsys, *common, *extra, "-o", paths[name])
        assert code == 0, err
    meta = json.loads(Image.open(paths["exp-heun"]).text["imagine"])
    assert (meta["sampler"], meta["schedule_type"], meta["final_step"]) == ("unipc", "exponential", "heun")
    pixels = {k: Image.open(v).convert("RGB").tobytes() for k, v in paths.items()}
    assert len(set(pixels.values())) == 3


def test_matched_start_reaches_the_sampler(models, tmp_path, capsys):
    """--start matched gives the pipeline's start="matched" image, written as "Start: matched"; the tiny SD-like
    model's scaled-linear schedule has a non-zero terminal SNR, so the image differs from the plain start."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "matched.png"
    code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 5, "--sampler", "unipc",
                        "--start", "matched", "--seed", 2, "--height", 16, "--width", 16, "-q", "-o", out)
    assert code == 0, err
    img = Image.open(out)
    assert json.loads(img.text["imagine"])["start"] == "matched" and "Start: matched" in img.text["parameters"]
    pipe = TextToImagePipeline.from_pretrained(models["folder"])
    kw = dict(steps=5, sampler="unipc", seed=2, height=16, width=16, progress=False)
    want = pipe.generate("a red circle", start="matched", **kw).images[0]
    plain = pipe.generate("a red circle", **kw)
    assert "start" not in plain.parameters
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes() != plain.images[0].convert("RGB").tobytes()


def test_rho_and_sampler_options_reach_the_sampler(models, tmp_path, capsys):
    """--rho and --sampler-option give the image the pipeline gives with the same options, and are written into
    the PNG's parameters (A1111's "Schedule rho", "s_tmin")."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "band.png"
    code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 6, "--sampler", "DPM++ 3M SDE",
                        "--schedule-type", "polyexponential", "--rho", 1.25, "--sampler-option", "s_tmin=1.5",
                        "--seed", 4, "--height", 16, "--width", 16, "-q", "-o", out)
    assert code == 0, err
    img = Image.open(out)
    meta = json.loads(img.text["imagine"])
    assert meta["schedule_rho"] == 1.25 and meta["sampler_options"] == {"s_tmin": 1.5}
    assert "Schedule rho: 1.25" in img.text["parameters"] and "s_tmin: 1.5" in img.text["parameters"]
    pipe = TextToImagePipeline.from_pretrained(models["folder"])
    kw = dict(steps=6, sampler="dpmpp_3m_sde", sigma_schedule="polyexponential", seed=4, height=16, width=16,
              progress=False)
    want = pipe.generate("a red circle", rho=1.25, sampler_options={"s_tmin": 1.5}, **kw).images[0]
    other = pipe.generate("a red circle", rho=1.25, **kw).images[0]
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes() != other.convert("RGB").tobytes()


@pytest.mark.parametrize("args,message", [
    (["--sampler-option", "s_tmin"], "expected KEY=VALUE"),
    (["--sampler-option", "warp=9"], "takes no option 'warp'"),
    (["--height", "30"], "height 30 is not a multiple of 4"),
    (["--sampler", "warp_drive"], "unknown sampler 'warp_drive'"),
    (["--model", "/nonexistent/model.safetensors"], "model not found"),
    (["--from-file", "/nonexistent/prompts.txt"], "--from-file: /nonexistent/prompts.txt not found"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_errors_are_one_clear_line(models, tmp_path, capsys, args, message):
    argv = ["--model", models["single"], "a red circle", "--steps", "1", "--height", "16", "--width", "16",
            "-o", tmp_path / "x.png",
            "-q"]
    # later options win in argparse: the bad value replaces the good one
    code, _, err = _run(capsys, *argv, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("imagine: error:")
