"""Session 28's review of the command line as a diffusers / AUTOMATIC1111 user runs it (`imagine generate`, `serve`,
`train`): usage errors are one line with the near misses of a mistyped flag, choice, sampler, schedule type or
upscaler, exit 2, and are found before the model loads; numbers are finite and in range by their flag; pictures and
infotexts that are folders or not pictures are named; a PNG goes into an existing folder (a folder given as one is
made); a name imagine picks never replaces an earlier picture; a PNG is written whole or not at all; flags that would
do nothing are refused; `serve` takes its port before the model loads; `train` checks its paths first."""

from __future__ import annotations

import errno
import json
import socket

import pytest
from PIL import Image

from imagine.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--steps", "2", "--seed", "7", "-q"]


def _run(capsys, *argv):
    try:
        code = main([*map(str, argv)])
    except SystemExit as e:  # (argparse's usage errors end so, as for the console script)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, *says):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in says:
        assert text in err, err


# -- argparse's errors: one line, the near misses, exit 2 ----------------------------------------------------------
@pytest.mark.parametrize("argv,says", [
    (["genrate", "x"], ["invalid choice: 'genrate' (did you mean 'generate'?)"]),
    (["generate", "x", "--stpes", "3"], ["unrecognized arguments: --stpes", "did you mean '--steps'?"]),
    (["generate", "x", "--stpes=3", "--sedd", "1"],
     ["--stpes: did you mean '--steps'?", "--sedd: did you mean '--seed'?"]),
    (["generate", "a", "red", "circle"], ["a prompt of several words goes in quotes"]),
    (["generate", "x", "--control-mode", "balancd"], ["'balancd' (did you mean 'balanced'?); choose from"]),
    (["serve", "--log-level", "warn"], ["(did you mean 'warning'?)"]),
    (["train", "vea"], ["(did you mean 'vae'?)"]),
    (["bench", "samplrs"], ["(did you mean 'samplers'?)"]),
    (["generate", "x", "--schedule-type", "karas"], ["'karas' (did you mean 'karras'?)", "valid: automatic"]),
    (["generate", "x", "--guidance-scale", "nan"], ["--guidance-scale", "must be a finite number"]),
    (["generate", "x", "--strength", "inf"], ["must be a finite number"]),
    (["generate", "x", "-n", "4"], ["-n is the negative prompt here", "--num-images 4"]),
])
def test_usage_errors_are_one_line_with_near_misses(capsys, argv, says):
    code, _, err = _run(capsys, *argv)
    _one_line_error(code, err, *says)
    assert "usage:" not in err  # (not argparse's 40-line synopsis)
    assert err.rstrip().endswith("--help")


def test_help_still_prints_everything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-images", "--output", "--infotext", "--negative-prompt", "--seed"):
        assert flag in text
    assert "imagine-<seed>-1.png" in " ".join(text.split())  # (--output says a picked name never replaces a file)


# -- names and numbers checked before the model loads (the model here does not exist: its error would come first) ----
@pytest.mark.parametrize("extra,says", [
    (["--sampler", "eulr"], ["--sampler: unknown sampler 'eulr' (did you mean 'euler'", "valid names: ddpm"]),
    (["--sampler", "DPM++ 2M Karas"], ["(did you mean 'DPM++ 2M Karras'"]),
    (["--a1111-sampling", "--sampler", "Eular a"], ["(did you mean 'Euler a'"]),
    (["--hires-scale", "2", "--hires-sampler", "eulr"], ["--hires-sampler: unknown sampler 'eulr' (did you mean"]),
    (["--hires-scale", "2", "--hires-upscaler", "lancos"], ["--hires-upscaler: unknown upscaler 'lancos' (did you "
                                                            "mean 'lanczos'?); valid: latent"]),
    (["--hires-scale", "10"], ["--hires-scale must be in [1, 4]"]),
    (["--hires-resize", "big"], ["--hires-resize must be WIDTHxHEIGHT"]),
    (["--guidance-rescale", "2"], ["--guidance-rescale must be in [0, 1]; got 2"]),
    (["--variation-strength", "2"], ["--variation-strength must be in [0, 1]"]),
    (["--variation-strength", "0.5", "--variation-seed", str(2**33)], ["--variation-seed must be -1 (random) or 0.."]),
    (["--schedule-type", "karras", "--rho", "-1"], ["--rho must be above 0"]),
    (["--eta", "-1"], ["--eta must be 0 or more"]),
    (["--clip-skip", "-2"], ["--clip-skip must be 0"]),
    (["--init-image", "{pic}", "--strength", "1.5"], ["--strength must be in (0, 1]"]),
    (["--init-image", "{pic}", "--hires-scale", "2"], ["start from text"]),
    (["--height", "100000", "--width", "100000"], ["the picture's pixels alone take", "GiB of memory"]),
    # flags that contradict each other
    (["--hires-scale", "2", "--hires-resize", "128x128"], ["--hires-scale and --hires-resize are two ways"]),
    (["--karras", "--schedule-type", "exponential"], ["--karras asks for Karras levels and --schedule-type "
                                                      "exponential for others"]),
    (["--sampler", "DPM++ 2M Karras", "--schedule-type", "beta"], ["--sampler 'DPM++ 2M Karras' asks for Karras"]),
    (["--a1111-prompts", "--no-emphasis"], ["--a1111-prompts turns on", "with --no-emphasis"]),
    # flags that would do nothing
    (["--variation-seed", "5"], ["--variation-seed does nothing without --variation-strength"]),
    (["--threshold-range", "2"], ["--threshold-range does nothing without --thresholding"]),
    (["--control-resolution", "512"], ["--control-resolution does nothing without a --controlnet"]),
    (["--control-resize", "crop_and_resize"], ["--control-resize does nothing without a --controlnet"]),
    (["--old-prompt-editing"], ["--old-prompt-editing does nothing without --prompt-editing"]),
])
def test_bad_values_are_named_before_the_model_loads(tmp_path, capsys, extra, says):
    pic = tmp_path / "pic.png"
    Image.new("RGB", (64, 64)).save(pic)
    extra = [a.format(pic=pic) for a in extra]
    code, _, err = _run(capsys, "generate", "--model", tmp_path / "no-such-model", "a red circle", *RUN,
                        "-o", tmp_path / "x.png", *extra)
    _one_line_error(code, err, *says)
    assert not (tmp_path / "x.png").exists()


def test_library_errors_name_the_flag_given(tmp_path, capsys):
    """The pipeline's "steps must be ..." / "height 63 is not ..." name the flag the user gave (--steps, --height)."""
    code, _, err = _run(capsys, "generate", "a red circle", "--steps", 100000, "-q", "-o", tmp_path / "x.png")
    _one_line_error(code, err, "error: --steps must be between 1 and")
    code, _, err = _run(capsys, "generate", "a red circle", "--height", 63, "--steps", 1, "-q",
                        "-o", tmp_path / "x.png")
    _one_line_error(code, err, "error: --height 63 is not a multiple of")


def test_the_flag_is_not_named_for_a_value_not_given():
    """A message about a value the user did not give (the hires pass's strength, 'strength 0.7 of 1 steps') keeps the
    library's name: --strength would be another flag."""
    import argparse

    from imagine.cli import _in_flags
    from imagine.commands.generate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["x", "--steps", "5"])
    assert _in_flags("strength 0.7 of 1 steps leaves no step", p, args) == "strength 0.7 of 1 steps leaves no step"
    assert _in_flags("steps must be at least 1", p, args) == "--steps must be at least 1"
    assert _in_flags("sigma_schedule: x", p, p.parse_args(["x", "--schedule-type", "karras"])) == "--schedule-type: x"


# -- paths: pictures, infotexts, the output -----------------------------------------------------------------------
def test_pictures_and_infotexts_that_are_not_pictures(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    fake = tmp_path / "fake.png"
    fake.write_text("Steps: 20, Sampler: Euler\n")  # (text under a picture's name: not run as an infotext)
    out = tmp_path / "x.png"
    for extra, says in ((["--init-image", folder], "--init-image: " + str(folder) + " is a folder"),
                        (["--init-image", fake], "is not an image Pillow can read"),
                        (["--init-image", fake.with_name("absent.png")], "not found"),
                        (["--init-image", fake, "--mask", folder], "is not an image"),
                        (["--infotext", folder], "--infotext: " + str(folder) + " is a folder"),
                        (["--infotext", fake], "is named as a picture but is not one")):
        code, _, err = _run(capsys, "generate", "a red circle", *RUN, "-o", out, *extra)
        _one_line_error(code, err, says)
        assert not out.exists()


def test_an_output_folder_that_does_not_exist(tmp_path, capsys):
    """-o new/x.png: said, nothing made (a mistyped folder is not created); -o new/ makes the folder."""
    code, _, err = _run(capsys, "generate", "a red circle", *RUN, "-o", tmp_path / "new" / "deeper" / "x.png")
    _one_line_error(code, err, "the folder", "does not exist")
    assert not (tmp_path / "new").exists()
    code, out, err = _run(capsys, "generate", "a red circle", *RUN, "-o", f"{tmp_path / 'new' / 'deeper'}/")
    assert code == 0, err
    assert (tmp_path / "new" / "deeper" / "imagine-7.png").is_file()


def test_a_name_imagine_picks_never_replaces_a_picture(tmp_path, capsys, monkeypatch):
    """imagine-<seed>.png (here or in -o FOLDER) is never replaced by a later run with the same seed: the next is
    imagine-<seed>-1.png; a path the user names is replaced, as other tools replace it."""
    monkeypatch.chdir(tmp_path)
    for prompt in ("a red circle", "a blue square", "a green triangle"):
        code, out, err = _run(capsys, "generate", prompt, *RUN)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["imagine-7-1.png", "imagine-7-2.png", "imagine-7.png"]
    prompts = [json.loads(Image.open(tmp_path / n).text["imagine"])["prompt"]
               for n in ("imagine-7.png", "imagine-7-1.png", "imagine-7-2.png")]
    assert prompts == ["a red circle", "a blue square", "a green triangle"]
    assert out.strip() == "imagine-7-2.png"  # (the path printed is the one written)
    (tmp_path / "in").mkdir()
    for _ in range(2):
        assert _run(capsys, "generate", "a red circle", *RUN, "-o", tmp_path / "in")[0] == 0
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["imagine-7-1.png", "imagine-7.png"]
    for prompt in ("a red circle", "a blue square"):
        assert _run(capsys, "generate", prompt, *RUN, "-o", "named.png")[0] == 0
    assert json.loads(Image.open("named.png").text["imagine"])["prompt"] == "a blue square"


def test_batches_count_seeds_and_number_on(tmp_path, capsys):
    """--num-images 2 --seed 5 into a folder twice: seeds 5, 6 each run, numbered on (00002-5.png), nothing replaced."""
    for _ in range(2):
        code, out, err = _run(capsys, "generate", "a red circle", "--steps", 2, "--seed", 5, "--num-images", 2, "-q",
                              "-o", tmp_path / "out")
        assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["00000-5.png", "00001-6.png", "00002-5.png", "00003-6.png"]
    records = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"]) for r in records] == [(n, int(n[6:-4])) for n in names]


def test_a_png_is_written_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """The disk fills while the PNG is written: the earlier x.png is still whole, no temporary file is left, and the
    error is one line naming the file (exit 2)."""
    out = tmp_path / "x.png"
    assert _run(capsys, "generate", "a red circle", *RUN, "-o", out)[0] == 0
    before = out.read_bytes()
    real_save = Image.Image.save

    def disk_full(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        with open(fp, "r+b") as f:  # (half of it written, then the disk is full)
            f.truncate(len(before) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, _, err = _run(capsys, "generate", "a blue square", *RUN, "-o", out)
    _one_line_error(code, err, "No space left on device")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_out_of_memory_is_one_line_and_other_faults_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    def no_memory(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(TextToImagePipeline, "generate", no_memory)
    code, _, err = _run(capsys, "generate", "a red circle", *RUN, "-o", tmp_path / "x.png")
    assert code == 1 and err.count("\n") == 1 and "error: out of memory" in err and "--batch-size" in err, err

    def fault(self, *a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(TextToImagePipeline, "generate", fault)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "a red circle", *RUN, "-o", str(tmp_path / "x.png")])


def test_an_infotext_replay_with_flags_that_would_otherwise_do_nothing(tmp_path, capsys):
    """A record's values are the run's as it was: --variation-seed-style checks do not refuse a replay."""
    first = tmp_path / "first.png"
    code, _, err = _run(capsys, "generate", "a red circle", *RUN, "--variation-seed", 3, "--variation-strength", 0.3,
                        "-o", first)
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = _run(capsys, "generate", "--infotext", first, "-q", "-o", again)
    assert code == 0, err
    assert Image.open(first).tobytes() == Image.open(again).tobytes()


def test_a_hires_form_given_wins_over_the_pictures_other_form(tmp_path, capsys):
    """A picture made with --hires-resize run again with --hires-scale: the scale given is the run's (flags given win),
    not a conflict with the picture's resize."""
    first = tmp_path / "first.png"
    code, _, err = _run(capsys, "generate", "a red circle", *RUN, "--hires-resize", "96x96", "-o", first)
    assert code == 0, err
    assert Image.open(first).size == (96, 96)
    again = tmp_path / "again.png"
    code, _, err = _run(capsys, "generate", "--infotext", first, "--hires-scale", "1.5", "-q", "-o", again)
    assert code == 0, err
    meta = json.loads(Image.open(again).text["imagine"])
    assert Image.open(again).size == (96, 96) and meta["hires_scale"] == 1.5 and "hires_resize" not in meta


# -- imagine serve ----------------------------------------------------------------------------------------------------
def test_serve_takes_its_port_before_the_model_loads(tmp_path, capsys):
    """A port in use, an address this machine has not, and a bad limit are said at once by flag (the model does not
    exist: its error would come first otherwise)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = _run(capsys, "serve", "--model", tmp_path / "no-such-model", "--port", port)
        _one_line_error(code, err, f"--port {port}: cannot listen there: the port is in use")
    for extra, says in ((["--host", "999.1.1.1"], "--host 999.1.1.1: not an address to listen on"),
                        (["--max-batch", "0"], "--max-batch must be at least 1; got 0"),
                        (["--queue-size", "-1"], "--queue-size must be at least 1"),
                        (["--clip-skip", "-1"], "--clip-skip must be 0")):
        code, _, err = _run(capsys, "serve", "--model", tmp_path / "no-such-model", "--port", 0, *extra)
        _one_line_error(code, err, says)
        assert "warning" not in err


def test_listen_binds_a_free_port_and_names_it():
    from imagine.server.cli import listen

    socks = listen("127.0.0.1", 0)
    try:
        port = socks[0].getsockname()[1]
        assert port != 0
        with pytest.raises(ValueError, match="in use"):
            listen("127.0.0.1", port)
    finally:
        for s in socks:
            s.close()


# -- imagine train ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A two-step tiny VAE run with its checkpoints."""
    from test_train import vae_config, write_yaml

    from imagine.testing import make_image_folder

    root = tmp_path_factory.mktemp("train")
    cfg = write_yaml(root / "vae.yaml", vae_config(make_image_folder(root / "data"), max_steps=2, checkpoint_every=2))
    assert main(["train", "vae", "--config", str(cfg), "--output", str(root / "run")]) == 0
    return root


def test_train_checks_its_paths_first(vae_run, capsys):
    root = vae_run
    for extra, says in ((["--config", root / "data"], "--config " + str(root / "data") + " is a folder"),
                        (["--config", root / "vae.yaml", "--output", root / "vae.yaml"], "is a file; the run folder"),
                        (["--config", root / "vae.yaml", "--output", root / "empty", "--export-only"],
                         "--export-only: no checkpoint in"),
                        (["--config", root / "vae.yaml", "--output", root / "o", "--resume-from", root / "absent"],
                         "--resume-from " + str(root / "absent") + ": not found"),
                        (["--config", root / "vae.yaml", "--output", root / "o", "--resume-from", root / "data"],
                         "not a checkpoint folder")):
        code, _, err = _run(capsys, "train", "vae", *extra)
        _one_line_error(code, err, says)
        assert "WARNING" not in err
    assert not (root / "empty").exists() and not (root / "o").exists()


@pytest.mark.parametrize("given", ["run", "run/checkpoints", "run/checkpoints/latest"])
def test_resume_from_a_run_folder_or_its_latest(vae_run, capsys, given):
    out = vae_run / ("export-" + given.replace("/", "-"))
    code, stdout, err = _run(capsys, "train", "vae", "--config", vae_run / "vae.yaml", "--output", out,
                             "--resume-from", vae_run / given, "--export-only")
    assert code == 0, err
    assert (out / "model").is_dir()
