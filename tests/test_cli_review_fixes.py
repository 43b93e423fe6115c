"""Fixes from a review of `imagine generate` as an A1111/diffusers user would run it: fast mode is recorded and
replayed; flags that would do nothing are refused by name; only PNG is written; --from-file refuses A1111's option
lines; an embedding is recorded; a replay's notes name only what is not loaded again."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from imagine.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--steps", "3", "--seed", "7", "-q"]


def test_fast_mode_is_recorded_and_a_replay_runs_it(tmp_path, capsys):
    """A fast-mode picture (bf16: not the exact mode's) made again from its PNG alone is the same picture; the notes
    do not call the default model, loaded again, not applied."""
    first, again, exact = tmp_path / "fast.png", tmp_path / "again.png", tmp_path / "exact.png"
    assert main(["generate", "two yellow circles", "--precision", "fast", "-o", str(first), *RUN]) == 0
    made = Image.open(first)
    assert json.loads(made.text["imagine"])["precision"] == "fast" and "Precision: fast" in made.text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--infotext", str(first), "-o", str(again), "-q"]) == 0
    assert "not applied" not in capsys.readouterr().err
    assert Image.open(again).tobytes() == made.tobytes()
    assert main(["generate", "two yellow circles", "-o", str(exact), *RUN]) == 0
    assert "precision" not in json.loads(Image.open(exact).text["imagine"])
    assert Image.open(exact).tobytes() != made.tobytes()  # (so the replay above had to run fast mode)


@pytest.mark.parametrize("flags,message", [
    (["--strength", "0.5"], "--strength is how far from --init-image"),
    (["--hires-steps", "3"], r"--hires-steps is for hires. fix's second pass: give --hires-scale \(or --hires-resize\) too"),
    (["--hires-prompt", "y"], "--hires-prompt is for hires. fix's second pass"),
    (["--hires-upscaler", "lanczos"], "--hires-upscaler is for hires. fix's second pass"),
    (["--hires-strength", "0.5"], "--hires-strength is for hires. fix's second pass"),
    (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength must be in \\(0, 1\\]"),
    (["--no-karras", "--sampler", "DPM++ 2M Karras"], "--no-karras with --sampler 'DPM\\+\\+ 2M Karras'"),
    (["--no-karras", "--sampler", "k_dpmpp_2m_ka"], "--no-karras with --sampler 'k_dpmpp_2m_ka'"),
    (["-o", "x.jpg"], "--output x.jpg: imagine writes PNG files"),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys, flags, message):
    import re

    out = ["-o", str(tmp_path / "x.png")] if "-o" not in flags else []
    assert main(["generate", "a red circle", *flags, *out, *RUN]) != 0
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("*.png"))


def test_schedule_type_takes_a1111s_labels_and_hires_steps_0_is_the_first_pass(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "--schedule-type", "KL Optimal", "-o", str(a), *RUN]) == 0
    assert main(["generate", "a red circle", "--schedule-type", "kl_optimal", "-o", str(b), *RUN]) == 0
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    assert json.loads(Image.open(a).text["imagine"])["schedule_type"] == "kl_optimal"
    c = tmp_path / "c.png"
    assert main(["generate", "a red circle", "--hires-scale", "1.5", "--hires-steps", "0", "--hires-strength", "0.7",
                 "-o", str(c), "--steps", "4", "--seed", "7", "-q"]) == 0
    assert json.loads(Image.open(c).text["imagine"])["hires_steps"] == 4  # (A1111's 0: the first pass's steps)


def test_from_file_refuses_a1111_option_lines_and_folders(tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text('a red circle\n--prompt "two blue squares" --steps 5\n', encoding="utf-8")
    assert main(["generate", "--from-file", str(lines), "-o", str(tmp_path / "out"), *RUN]) != 0
    assert "line 2 starts with '--', an option line of A1111's 'Prompts from file' script" in capsys.readouterr().err
    assert main(["generate", "--from-file", str(tmp_path), "-o", str(tmp_path / "out"), *RUN]) != 0
    assert "is a folder; give a text file with one prompt a line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_embedding_is_recorded_and_named_when_not_loaded_again(tmp_path, capsys):
    from test_loading import write_single_file
    from test_textual_inversion import _vectors, _write

    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    path = _write("diffusers.bin", _vectors(2), tmp_path / "emb", "<style>")
    first, again = tmp_path / "emb.png", tmp_path / "again.png"
    common = ["--model", str(single), "--height", "32", "--width", "32"]
    assert main(["generate", *common, "--embedding", f"{path}:mystyle", "a red circle, mystyle", "-o", str(first),
                 *RUN]) == 0
    assert json.loads(Image.open(first).text["imagine"])["embeddings"] == "mystyle"
    capsys.readouterr()
    assert main(["generate", *common, "--infotext", str(first), "-o", str(again), "-q"]) == 0
    assert "not applied: embeddings: mystyle" in capsys.readouterr().err  # (and not the model, loaded again)
    assert main(["generate", *common, "--embedding", f"{path}:mystyle", "--infotext", str(first), "-o", str(again),
                 "-q"]) == 0
    assert "not applied" not in capsys.readouterr().err
    assert Image.open(again).tobytes() == Image.open(first).tobytes()


def test_a_lora_tag_nothing_loads_is_refused_before_the_model_loads(tmp_path, capsys):
    """(the model path does not exist: the refusal must come first)"""
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), "a <lora:watercolor:0.8> circle",
                 "-o", str(tmp_path / "x.png"), *RUN]) != 0
    err = capsys.readouterr().err
    assert "asks for <lora:watercolor:0.8>, which no --lora merges: give the folder of LoRAs" in err


def test_an_infotexts_seed_out_of_range_is_said_to_be_the_infotexts(tmp_path, capsys):
    text = tmp_path / "big.txt"
    text.write_text("a circle\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 5000000000, Size: 64x64\n",
                    encoding="utf-8")
    assert main(["generate", "--infotext", str(text), "-o", str(tmp_path / "a.png"), "-q"]) != 0
    assert "--infotext" in (err := capsys.readouterr().err) and "its Seed 5000000000 is outside imagine's seeds" in err
    assert main(["generate", "--infotext", str(text), "--seed", "3", "-o", str(tmp_path / "b.png"), "-q"]) == 0


def test_a_rho_no_schedule_type_reads_is_not_recorded(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "--sampler", "ddim", "--rho", "3", "-o", str(a), *RUN]) == 0
    assert "schedule_rho" not in json.loads(Image.open(a).text["imagine"])
    assert "Schedule rho" not in Image.open(a).text["parameters"]
    assert main(["generate", "a red circle", "--sampler", "k_dpmpp_2m_ka", "--rho", "5", "-o", str(b), *RUN]) == 0
    assert json.loads(Image.open(b).text["imagine"])["schedule_rho"] == 5.0
    c = tmp_path / "c.png"  # (A1111's "Automatic" schedule type: the sampler's own)
    assert main(["generate", "a red circle", "--schedule-type", "Automatic", "-o", str(c), *RUN]) == 0


def test_the_schedule_names_are_the_libraries():
    from imagine.commands.generate import SCHEDULE_NAMES
    from imagine.schedules import SIGMA_SCHEDULES

    assert SCHEDULE_NAMES == tuple(SIGMA_SCHEDULES)


def test_a_fast_servers_pictures_say_so_and_a_bf16_record_replays_in_exact_mode(tmp_path, capsys):
    import base64
    import io

    import httpx

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    pipe = TextToImagePipeline.from_pretrained(None, precision="fast")
    with BackgroundServer(create_app(pipe, ServerConfig())) as srv:
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 3,
                                                              "width": 64, "height": 64}, timeout=120)
    assert r.status_code == 200, r.text
    assert "Precision: fast" in json.loads(r.json()["info"])["infotexts"][0]
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).text["parameters"].count("Precision: fast")
    first, again = tmp_path / "bf16.png", tmp_path / "exact.png"
    assert main(["generate", "a red circle", "--precision", "fast", "--dtype", "bfloat16", "-o", str(first),
                 *RUN]) == 0
    assert json.loads(Image.open(first).text["imagine"])["dtype"] == "bfloat16"
    assert main(["generate", "--infotext", str(first), "--precision", "exact", "-o", str(again), "-q"]) == 0
    assert "dtype" not in json.loads(Image.open(again).text["imagine"])


def test_verbose_is_taken_after_the_command_too(tmp_path):
    """`imagine generate -v ...` as `imagine -v generate ...`: -v shows the error's traceback (here, the raise)."""
    args = ["--model", str(tmp_path / "no-such-model"), "a red circle", "-o", str(tmp_path / "x.png"), *RUN]
    assert main(["generate", *args]) == 2
    for argv in (["-v", "generate", *args], ["generate", "-v", *args]):
        with pytest.raises(FileNotFoundError):
            main(argv)


def test_a_loras_strength_that_is_not_a_number_is_named(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    assert main(["generate", "--lora", f"{lora}:abc", "a red circle", "-o", str(tmp_path / "x.png"), *RUN]) == 2
    assert "the strength after the last colon, 'abc', is not a number" in capsys.readouterr().err


def test_brackets_read_as_text_are_written_as_a1111s_emphasis_none(tmp_path):
    """A1111 writes "Emphasis: None" where its emphasis is off and a prompt has "(" or "[" (sd_hijack_clip), so that
    its reader takes them as text again; imagine's default reading (diffusers') is that one."""
    texts = {}
    for name, prompt, extra in (("plain", "a (red) circle", []), ("weighted", "a (red) circle", ["--emphasis"]),
                                ("none", "a red circle", [])):
        out = tmp_path / f"{name}.png"
        assert main(["generate", prompt, "-o", str(out), *extra, *RUN]) == 0
        texts[name] = Image.open(out).text["parameters"]
    assert "Emphasis: None" in texts["plain"]
    assert "Emphasis" not in texts["weighted"] and "Emphasis" not in texts["none"]
