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
    the PNG's parameters (A1111's "Schedule rho", "Sigma tmin")."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "band.png"
    code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 6, "--sampler", "DPM++ 3M SDE",
                        "--schedule-type", "polyexponential", "--rho", 1.25, "--sampler-option", "s_tmin=1.5",
                        "--seed", 4, "--height", 16, "--width", 16, "-q", "-o", out)
    assert code == 0, err
    img = Image.open(out)
    meta = json.loads(img.text["imagine"])
    assert meta["schedule_rho"] == 1.25 and meta["sampler_options"] == {"s_tmin": 1.5}
    assert "Schedule rho: 1.25" in img.text["parameters"] and "Sigma tmin: 1.5" in img.text["parameters"]
    pipe = TextToImagePipeline.from_pretrained(models["folder"])
    kw = dict(steps=6, sampler="dpmpp_3m_sde", sigma_schedule="polyexponential", seed=4, height=16, width=16,
              progress=False)
    want = pipe.generate("a red circle", rho=1.25, sampler_options={"s_tmin": 1.5}, **kw).images[0]
    other = pipe.generate("a red circle", rho=1.25, **kw).images[0]
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes() != other.convert("RGB").tobytes()


def test_a1111_sampling_flag(models, tmp_path, capsys):
    """--a1111-sampling runs the sampler as AUTOMATIC1111 does (samplers.a1111_settings: here DPM2's Karras levels
    over the model's range with the penultimate dropped, from x_T = z sigma_max): the pipeline's image with those
    settings, which the PNG's parameters record; --discard-penultimate-sigma and --start sigma_max on their own
    reach the pipeline too."""
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.samplers import a1111_settings

    pipe = TextToImagePipeline.from_pretrained(models["folder"])
    kw = dict(steps=5, seed=4, height=16, width=16, progress=False)
    base = ["--model", models["folder"], "a red circle", "--steps", 5, "--seed", 4, "--height", 16, "--width", 16,
            "-q"]
    out = tmp_path / "a1111.png"
    code, _, err = _run(capsys, *base, "--sampler", "DPM2", "--a1111-sampling", "-o", out)
    assert code == 0, err
    img = Image.open(out)
    meta = json.loads(img.text["imagine"])
    assert meta["discard_penultimate_sigma"] is True and meta["start"] == "sigma_max"
    assert meta["schedule_type"] == "karras" and meta["sigma_range"] == "model"
    want = pipe.generate("a red circle", **kw, **a1111_settings("DPM2")).images[0]
    plain = pipe.generate("a red circle", **kw, sampler="dpm2").images[0]
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes() != plain.convert("RGB").tobytes()
    assert "Schedule type: Karras" in img.text["parameters"]  # (DPM2's Automatic pick, named as A1111 names it)
    # Euler's Automatic is k-diffusion's own levels, and DDIM and UniPC run their own timesteps: A1111 names no
    # schedule type for them (the run's record still has it)
    for sampler, schedule in (("euler", "uniform"), ("DDIM", "compvis"), ("UniPC", "compvis_time_uniform")):
        out = tmp_path / f"{sampler}.png"
        code, _, err = _run(capsys, *base, "--sampler", sampler, "--a1111-sampling", "-o", out)
        assert code == 0, err
        img = Image.open(out)
        assert "Schedule type" not in img.text["parameters"], sampler
        assert json.loads(img.text["imagine"])["schedule_type"] == schedule
    out = tmp_path / "parts.png"
    code, _, err = _run(capsys, *base, "--sampler", "euler", "--discard-penultimate-sigma", "--start", "sigma_max",
                        "-o", out)
    assert code == 0, err
    want = pipe.generate("a red circle", **kw, sampler="euler", discard_penultimate_sigma=True,
                         start="sigma_max").images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.convert("RGB").tobytes()


@pytest.mark.parametrize("args,message", [
    (["--sampler-option", "s_tmin"], "expected KEY=VALUE"),
    (["--sampler-option", "warp=9"], "takes no option 'warp'"),
    (["--height", "31"], "height 31 is not a multiple of"),
    (["--sampler", "warp_drive"], "unknown sampler 'warp_drive'"),
    (["--model", "/nonexistent/model.safetensors"], "model not found"),
    (["--from-file", "/nonexistent/prompts.txt"], "--from-file: /nonexistent/prompts.txt not found"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--a1111-sampling", "--karras"], "--a1111-sampling sets the noise levels' range"),
    (["--a1111-sampling", "--schedule-type", "karras", "--sampler", "DPM++ 2M Karras", "--schedule-type",
      "exponential"], "names Karras levels; scheduler 'exponential' contradicts it"),
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


# -- the output path: checked before the model loads, a folder gets imagine-<seed>.png ---------------------------
def test_one_image_into_a_folder(models, tmp_path, capsys):
    """-o an existing folder, or a path ending in a separator, is a folder: imagine-<seed>.png goes inside it (not
    an IsADirectoryError after the generation, nor an extension-less file named like the folder)."""
    existing = tmp_path / "existing"
    existing.mkdir()
    for out, folder in ((existing, existing), (f"{tmp_path / 'new'}/", tmp_path / "new")):
        code, stdout, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 1, "--seed", 11,
                                 "--height", 16, "--width", 16, "-q", "-o", out)
        assert code == 0, err
        assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["imagine-11.png"]
        assert str(folder / "imagine-11.png") in stdout
        assert json.loads(Image.open(folder / "imagine-11.png").text["imagine"])["seed"] == 11


@pytest.mark.parametrize("extra,message", [
    (["--num-images", 2, "-o", "{tmp}/results.txt"], "several images need a folder, and"),
    (["-o", "{tmp}/results.txt/x.png"], "results.txt is a file, not a folder"),
    (["--num-images", 2, "-o", "{tmp}/results.txt/batch"], "results.txt is a file, not a folder"),
])
def test_bad_output_path_is_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    """The model path does not exist: the output's error coming first shows it was checked before loading."""
    (tmp_path / "results.txt").write_text("mine\n")
    argv = [str(a).format(tmp=tmp_path) for a in extra]
    code, _, err = _run(capsys, "--model", tmp_path / "no-such-model.safetensors", "a red circle", "-q", *argv)
    assert code == 2 and message in err, err
    assert err.startswith("imagine: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "results.txt").read_text() == "mine\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_os_errors_are_one_clear_line(models, tmp_path, capsys):
    """A path the system refuses (here a file name over the 255-byte limit) is one line naming it, no traceback."""
    out = tmp_path / ("x" * 300 + ".png")
    code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 1, "--height", 16,
                        "--width", 16, "-q", "-o", out)
    assert code == 2 and err.startswith("imagine: error:") and "name too long" in err.lower(), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- --from-file: safe to rerun, records kept when stopped -------------------------------------------------------
def test_from_file_reruns_add_to_the_folder(models, tmp_path, capsys):
    """A second run into the same folder (same seed even) continues the NNNNN- numbering, as A1111 does: no PNG is
    overwritten and every images.jsonl record describes the file it names."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n", encoding="utf-8")
    out_dir = tmp_path / "batch"
    out_dir.mkdir()
    (out_dir / "00007-notes.txt").write_text("a file of mine numbered as A1111 numbers\n")
    for _ in range(2):
        code, _, err = _run(capsys, "--model", models["folder"], "--from-file", prompts, "--steps", 1, "--seed", 1,
                            "--height", 16, "--width", 16, "-q", "-o", out_dir)
        assert code == 0, err
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["00008-1.png", "00009-2.png", "00010-1.png", "00011-2.png"]
    records = [json.loads(line) for line in (out_dir / "images.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == pngs
    for r in records:
        meta = json.loads(Image.open(out_dir / r["file"]).text["imagine"])
        assert (meta["seed"], meta["prompt"]) == (r["seed"], r["prompt"])


def test_a_stopped_run_keeps_the_records_of_its_images(models, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the second batch: the first batch's PNG is on disk and so is its images.jsonl line."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    original, calls = TextToImagePipeline.generate, []

    def stopped_on_the_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(TextToImagePipeline, "generate", stopped_on_the_second_batch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n", encoding="utf-8")
    code, _, _ = _run(capsys, "--model", models["folder"], "--from-file", prompts, "--batch-size", 1, "--steps", 1,
                      "--seed", 3, "--height", 16, "--width", 16, "-q", "-o", tmp_path / "out")
    assert code == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-3.png", "images.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [("00000-3.png", "a red circle", 3)]


# -- sizes, prompts, seeds -------------------------------------------------------------------------------------
def test_one_side_keeps_the_models_other_side(models, tmp_path, capsys):
    """The tiny model draws 32x32 by default; --height 48 alone gives 32 wide, 48 high (diffusers and A1111 keep
    the default width), not a 48x48 square."""
    for extra, size in ((["--height", 48], (32, 48)), (["--width", 24], (24, 32))):
        out = tmp_path / "one-side.png"
        code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 1, "--seed", 1, "-q",
                            *extra, "-o", out)
        assert code == 0, err
        assert Image.open(out).size == size


@pytest.mark.parametrize("extra,message", [
    (["--height", 0, "--width", 16], "--height must be a positive number of pixels; got 0"),
    (["--width", -8], "--width must be a positive number of pixels; got -8"),
    (["--seed", 2**32 + 5], "--seed must be -1 (random) or 0..4294967295; got 4294967301"),
    (["--seed", -7], "--seed must be -1 (random) or 0..4294967295; got -7"),
])
def test_bad_sizes_and_seeds_are_refused(models, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 1, "-q", *extra, "-o", out)
    assert code == 2 and message in err, err
    assert err.startswith("imagine: error:") and "Traceback" not in err
    assert not out.exists()


def test_prompt_files(models, tmp_path, capsys):
    """A byte-order mark is not part of the first prompt; a file in another encoding, or a prompt given beside
    --from-file (which would be dropped), is a clear error naming the problem."""
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red circle\n".encode("utf-8"))
    code, _, err = _run(capsys, "--model", models["folder"], "--from-file", bom, "--steps", 1, "--seed", 1,
                        "--height", 16, "--width", 16, "-q", "-o", tmp_path / "bom")
    assert code == 0, err
    [record] = [json.loads(line) for line in (tmp_path / "bom" / "images.jsonl").read_text().splitlines()]
    assert record["prompt"] == "a red circle"

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 on a table\n".encode("latin-1"))
    code, _, err = _run(capsys, "--model", models["folder"], "--from-file", latin1, "-q", "-o", tmp_path / "l1")
    assert code == 2 and f"--from-file: {latin1} is not UTF-8 text" in err, err
    assert "Traceback" not in err and not (tmp_path / "l1").exists()

    code, _, err = _run(capsys, "--model", models["folder"], "a lone prompt", "--from-file", bom, "-q",
                        "-o", tmp_path / "both")
    assert code == 2 and "give a prompt or --from-file, not both" in err, err
    assert not (tmp_path / "both").exists()


def test_clip_skip_help_says_which_numbering(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "diffusers' clip_skip" in text and "AUTOMATIC1111's 'Clip skip' is N + 1" in text


# -- the PNG's "parameters": AUTOMATIC1111's infotext, read back as A1111 reads it ------------------------------
_A1111_FIELD = __import__("re").compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _parse_infotext(text: str) -> dict:
    """AUTOMATIC1111's parse_generation_parameters (modules/infotext_utils.py), the fields' line: its regex, and
    a value that starts with a quote read as JSON (its unquote())."""
    *_, last = text.strip().split("\n")
    out = {}
    for key, value in _A1111_FIELD.findall(last):
        value = value.strip()
        if value.startswith('"'):
            value = json.loads(value)
        out[key] = value
    return out


def test_png_parameters_read_back_as_automatic1111_reads_them(tmp_path, capsys):
    """A checkpoint named "tiny, v2.safetensors" and sampler euler_a: A1111 reads Model "tiny, v2" (its name
    without the extension, the comma inside kept by quoting) and its own label "Euler a"."""
    model = tmp_path / "ckpt" / "tiny, v2.safetensors"
    write_single_file(model, "sd1")
    out = tmp_path / "x.png"
    code, _, err = _run(capsys, "--model", model, "a red circle", "--sampler", "euler_a", "--karras", "--steps", 2,
                        "--seed", 3, "--height", 16, "--width", 16, "--guidance-scale", 6, "-q", "-o", out)
    assert code == 0, err
    got = _parse_infotext(Image.open(out).text["parameters"])
    assert got["Sampler"] == "Euler a" and got["Schedule type"] == "Karras"
    assert got["Model"] == "tiny, v2"
    assert (got["Steps"], got["Seed"], got["Size"], got["CFG scale"]) == ("2", "3", "16x16", "6")
    assert got["Version"].startswith("imagine ")


def test_infotext_quotes_values_and_numbers_clip_skip_as_automatic1111():
    from imagine.images import a1111_parameters

    text = a1111_parameters({"prompt": "a cat", "negative_prompt": "blurry", "steps": 20, "sampler": "dpmpp_2m",
                             "guidance_scale": 7.5, "seed": 1, "width": 512, "height": 512,
                             "model": "v1-5-pruned-emaonly.ckpt", "lora": "style: 0.7, detail: 1", "clip_skip": 1,
                             "version": "0.1.0"})
    assert text.split("\n")[:2] == ["a cat", "Negative prompt: blurry"]
    got = _parse_infotext(text)
    assert got["Sampler"] == "DPM++ 2M" and got["Model"] == "v1-5-pruned-emaonly"
    assert got["Lora"] == "style: 0.7, detail: 1"
    assert got["Clip skip"] == "2"  # diffusers' clip_skip 1 (the penultimate layer) is A1111's 2
    assert (got["CFG scale"], got["Size"], got["Version"]) == ("7.5", "512x512", "imagine 0.1.0")
    assert "Clip skip" not in _parse_infotext(a1111_parameters({"prompt": "a cat", "steps": 2, "clip_skip": None}))
    # A1111's CompVis samplers (DDIM, PLMS, UniPC) run their own timesteps, with no schedule type in its infotext; a
    # schedule type asked for is named
    for sampler, schedule, shown in (("ddim", "compvis", None), ("unipc", "compvis_time_uniform", None),
                                     ("unipc", "time_uniform", "Time Uniform"), ("euler", "karras", "Karras")):
        got = _parse_infotext(a1111_parameters({"prompt": "a cat", "steps": 20, "sampler": sampler,
                                                "schedule_type": schedule}))
        assert got.get("Schedule type") == shown, (sampler, schedule)


def test_server_infotext_is_the_same_writer():
    """The server's text: A1111's sampler label and model name, quoting, and its own model hash, VAE and
    version fields."""
    pytest.importorskip("fastapi")
    from imagine.server.app import _infotext

    text = _infotext("a cat", "", 4, "euler_a", 7.0, 9, 24, 16, "tiny, v2.safetensors", "0123456789abcdef",
                     "0.1.0", "my: vae.safetensors", "karras")
    got = _parse_infotext(text)
    assert (got["Sampler"], got["Schedule type"], got["Model"]) == ("Euler a", "Karras", "tiny, v2")
    assert (got["Model hash"], got["VAE"], got["Version"]) == ("0123456789", "my: vae.safetensors", "imagine 0.1.0")
    assert (got["Steps"], got["CFG scale"], got["Seed"], got["Size"]) == ("4", "7", "9", "24x16")
    assert "Negative prompt" not in text


def test_bf16_weights_for_the_fast_mode(models, tmp_path, capsys):
    """--dtype bfloat16 loads the weights in bf16 (half the memory) for --precision fast, whose copies compute in bf16:
    close to the float32-loaded fast image (the same weights rounded once more); refused with the exact mode."""
    import numpy as np

    from imagine.pipelines.text_to_image import TextToImagePipeline

    outs = []
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.png"
        code, _, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 3, "--seed", 2, "--height",
                            32, "--width", 32, "--precision", "fast", "--dtype", dtype, "-o", out, "-q")
        assert code == 0, err
        outs.append(np.asarray(Image.open(out).convert("RGB"), dtype=np.float64))
    mse = ((outs[0] - outs[1]) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 30
    import torch

    assert TextToImagePipeline.from_pretrained(models["folder"], dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    code, _, err = _run(capsys, "--model", models["folder"], "x", "--dtype", "bfloat16", "-q")
    assert code == 2 and "--dtype bfloat16 is for --precision fast" in err


def test_emphasis_mode_runs_a1111s_modes(models, tmp_path, capsys):
    """--emphasis-mode 'No norm' is generate(emphasis='No norm'): the picture and A1111's 'Emphasis: No norm'."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    out = tmp_path / "nonorm.png"
    code, _, err = _run(capsys, "--model", models["folder"], "a (red:1.5) circle", "--steps", 2, "--sampler", "ddim",
                        "--seed", 3, "--height", 16, "--width", 16, "--emphasis-mode", "No norm", "-o", out, "-q")
    assert code == 0, err
    want = TextToImagePipeline.from_pretrained(models["folder"]).generate(
        "a (red:1.5) circle", steps=2, sampler="ddim", seed=3, height=16, width=16, emphasis="No norm",
        progress=False).images[0]
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want.tobytes() and "Emphasis: No norm" in img.text["parameters"]
    code, _, err = _run(capsys, "--model", models["folder"], "a", "--no-emphasis", "--emphasis-mode", "Ignore",
                        "-o", tmp_path / "x.png", "-q")
    assert code == 2 and "--no-emphasis and --emphasis-mode 'Ignore': give one" in err
