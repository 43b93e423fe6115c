"""Output names taken by another run meanwhile (session 29): two `imagine generate` processes writing into one folder
count the same next number (or find the same free imagine-<seed>.png name) before either writes. The later writer must
not replace the earlier one's picture: it takes the next free name. The other process is stood in for by a file put
at the name after the count (the count itself patched to the stale value a racing process would have read)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from test_generate_cli import _run, models  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_png_exclusive_leaves_a_file_it_finds_alone(tmp_path):
    from imagine.images import save_png

    path = tmp_path / "00000-1.png"
    path.write_bytes(b"another process's picture")
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4)), path, {"seed": 1}, exclusive=True)
    assert path.read_bytes() == b"another process's picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png"]  # (no temporary file left)
    fresh = save_png(Image.new("RGB", (4, 4), (9, 0, 0)), tmp_path / "new.png", {"seed": 2}, exclusive=True)
    assert Image.open(fresh).getpixel((0, 0)) == (9, 0, 0) and json.loads(Image.open(fresh).text["imagine"])["seed"] == 2


def test_save_png_exclusive_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links (FAT, some shares): the name is reserved by an exclusive create instead."""
    from imagine.images import save_png

    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    taken = tmp_path / "a.png"
    taken.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4)), taken, None, exclusive=True)
    assert taken.read_bytes() == b"theirs"
    out = save_png(Image.new("RGB", (4, 4), (3, 0, 0)), tmp_path / "b.png", None, exclusive=True)
    assert Image.open(out).getpixel((0, 0)) == (3, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_from_file_never_replaces_a_picture_another_run_wrote_meanwhile(models, tmp_path, capsys, monkeypatch):
    from imagine.commands import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n", encoding="utf-8")
    out_dir = tmp_path / "batch"
    out_dir.mkdir()
    theirs = out_dir / "00000-1.png"
    counted = generate._next_number

    def stale_count(folder):  # the other run's picture appears right after this run counted an empty folder
        n = counted(folder)
        if not theirs.exists():
            theirs.write_bytes(b"the other run's picture")
        return n

    monkeypatch.setattr(generate, "_next_number", stale_count)
    code, out, err = _run(capsys, "--model", models["folder"], "--from-file", prompts, "--steps", 1, "--seed", 1,
                          "--height", 16, "--width", 16, "-q", "-o", out_dir)
    assert code == 0, err
    assert theirs.read_bytes() == b"the other run's picture"
    records = [json.loads(line) for line in (out_dir / "images.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00001-1.png", "00002-2.png"]
    for r in records:
        assert json.loads(Image.open(out_dir / r["file"]).text["imagine"])["prompt"] == r["prompt"]


def test_a_picked_name_taken_meanwhile_is_picked_again(models, tmp_path, capsys, monkeypatch):
    from imagine.commands import generate

    folder = tmp_path / "pictures"
    folder.mkdir()
    picked = generate._free_name

    def raced(path):  # another process writes the name this run just found free
        free = picked(path)
        if not (folder / "imagine-5.png").exists():
            (folder / "imagine-5.png").write_bytes(b"theirs")
        return free

    monkeypatch.setattr(generate, "_free_name", raced)
    code, out, err = _run(capsys, "--model", models["folder"], "a red circle", "--steps", 1, "--seed", 5,
                          "--height", 16, "--width", 16, "-q", "-o", f"{folder}{os.sep}")
    assert code == 0, err
    assert (folder / "imagine-5.png").read_bytes() == b"theirs"
    assert json.loads(Image.open(folder / "imagine-5-1.png").text["imagine"])["seed"] == 5
