"""imagine train upscaler: the shapes scenes drawn finer (render_array's scale: its area average is the 64-pixel
picture but for a few levels at the edges), a compact net trained on them beating bicubic on held-out scenes, its
export loading as an upscaler model, a resumed run ending with an unbroken run's weights, a folder of photos without
captions; bad configs named; the shipped model against bicubic."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from imagine.data.shapes import ShapesDataset, render_array
from imagine.train.cli import add_arguments, run
from test_train import write_yaml


def test_a_scene_drawn_finer_averages_to_its_64_pixel_picture():
    ds = ShapesDataset(20, seed=4)
    for i in range(20):
        scene, _ = ds.scene(i)
        fine = render_array(scene, 4).astype(np.float64)
        small = fine.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        # (both are sub-pixel coverage of the same shapes: the finer drawing samples a 64-px pixel 16x16 times, the
        # 64-px one 4x4, so edge pixels differ by a few levels; the rest agree)
        d = np.abs(small - render_array(scene))
        assert d.max() <= 32 and (d > 1).mean() < 0.05, (d.max(), (d > 1).mean())
    assert ShapesDataset(2, render_scale=2)[0]["image"].shape == (3, 128, 128)
    with pytest.raises(ValueError, match="scale must be a whole number"):
        render_array(scene, 0)


def config(**train):
    return {"seed": 0, "data": {"type": "shapes", "length": 5000, "seed": 1, "resolution": 128, "eval_count": 16},
            "model": {"architecture": "compact", "scale": 2, "features": 16, "convs": 3},
            "degrade": {"noise": 0.01, "blur_prob": 0.3},
            "train": {"batch_size": 8, "lr": 2e-3, "warmup_steps": 5, "max_steps": 150, "eval_every": 150,
                      "checkpoint_every": 50, "log_every": 25, "mixed_precision": "no", "ema_decay": 0.0,
                      "sample_every": 0, **train}}


def train(tmp_path, cfg, *extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    path = write_yaml(tmp_path / "up.yaml", cfg)
    return run(p.parse_args(["upscaler", "--config", str(path), "--output", str(tmp_path / "run"), *extra]))


def test_it_learns_to_beat_bicubic_and_exports_an_upscaler_model(tmp_path):
    from imagine.upscalers import load_upscale_model, upscale_image

    result = train(tmp_path, config(max_steps=300, eval_every=300))
    ev = result["eval"]
    # (mean PSNR over held-out scenes: 38.2 against 33.3 seen after 300 steps, 40.5 after 600)
    assert ev["psnr"] > ev["psnr_bicubic"] + 3.0, ev
    model = load_upscale_model(tmp_path / "run" / "model")
    assert (model.scale, model.architecture) == (2, "Real-ESRGAN Compact")
    from PIL import Image

    ours = bicubic = 0.0
    held_out = ShapesDataset(20, seed=99, split="heldout")
    for i in range(20):  # (as a user runs it: a 64-pixel picture through imagine.upscalers, 8 bits out)
        scene, _ = held_out.scene(i)
        small, truth = Image.fromarray(render_array(scene)), render_array(scene, 2).astype(np.float64)
        out = upscale_image(model, small)
        assert out.size == (128, 128)
        ours += ((np.asarray(out, np.float64) - truth) ** 2).mean()
        bicubic += ((np.asarray(small.resize((128, 128), Image.BICUBIC), np.float64) - truth) ** 2).mean()
    assert ours < 0.95 * bicubic, (ours / 20, bicubic / 20)  # (24.8 against 28.6 seen)


def exported(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_run(tmp_path):
    cfg = config(max_steps=40, eval_every=40, checkpoint_every=20, ema_decay=0.9)
    for side in ("unbroken", "resumed"):
        (tmp_path / side).mkdir()
    train(tmp_path / "unbroken", cfg)
    halfway = tmp_path / "unbroken" / "run" / "checkpoints" / "step-00000020"
    result = train(tmp_path / "resumed", cfg, "--resume-from", str(halfway))
    assert result["step"] == 40
    a, b = exported(tmp_path / "unbroken" / "run"), exported(tmp_path / "resumed" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    ema = {k.removeprefix("model."): v for k, v in load_file(str(halfway / "ema.safetensors")).items()}
    common = [k for k in a if k in ema]  # (the export is the EMA; the second half did train)
    assert common and not all(torch.equal(a[k], ema[k]) for k in common), sorted(ema)[:3]


def test_it_trains_on_a_folder_of_photos_without_captions(tmp_path, caplog):
    from PIL import Image

    from imagine.upscalers import load_upscale_model

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(21):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).resize((64, 64)).save(photos / f"{i:02}.png")
    (photos / "05-broken.png").write_bytes(b"not a picture")  # (a training record)
    cfg = config(max_steps=6, eval_every=6, checkpoint_every=6)
    cfg["data"] = {"type": "imagefolder", "path": str(photos), "resolution": 64, "eval_count": 2}
    result = train(tmp_path, cfg)  # (the last 2 of 22 records held out: 19.png, 20.png)
    assert result["skipped"].get("corrupt or unreadable images", 0) >= 1, result["skipped"]
    assert np.isfinite(result["eval"]["psnr"]) and np.isfinite(result["eval"]["psnr_bicubic"])
    assert load_upscale_model(tmp_path / "run" / "model").scale == 2
    # a corrupt held-out picture: counted in a warning, the rest measured
    (photos / "20.png").write_bytes(b"not a picture either")
    (tmp_path / "again").mkdir()
    with caplog.at_level("WARNING"):
        result = train(tmp_path / "again", cfg)
    assert "1 of the 2 held-out record(s) skipped (1 corrupt or unreadable images)" in caplog.text
    assert np.isfinite(result["eval"]["psnr"])


def test_bad_upscaler_configs_are_named(tmp_path):
    for change, message in (({"model": {"architecture": "swinir"}}, "model.architecture"),
                            ({"model": {"scale": 3, "architecture": "rrdb"}}, "power of 2"),
                            ({"degrade": {"blur_prob": 2}}, "blur_prob"),
                            ({"model": {"scale": 3}}, "not a multiple of model.scale"),
                            ({"degrade": {"jpeg": 1}}, "jpeg")):
        cfg = config()
        for k, v in change.items():
            cfg[k] = {**cfg[k], **v}
        with pytest.raises(ValueError, match=message):
            train(tmp_path, cfg)
    with pytest.raises(ValueError, match="resolution"):
        cfg = config()
        cfg["data"]["resolution"] = 100
        train(tmp_path, cfg)


def test_the_embedded_upscaler_beats_bicubic_on_held_out_scenes(tmp_path):
    import json
    import subprocess
    import sys

    from imagine.upscalers import EMBEDDED_UPSCALER, upscaler_named

    model = upscaler_named("default")
    assert model.path == str(EMBEDDED_UPSCALER) and (model.scale, model.architecture) == (4, "Real-ESRGAN Compact")
    r = subprocess.run([sys.executable, "-m", "imagine.cli", "eval", "upscaler", "--n", "40", "--seed", "5", "--json",
                        str(tmp_path / "e.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sides = json.loads((tmp_path / "e.json").read_text())["sides"]
    # (the shipped model: 41.6 dB of the mean squared error against bicubic's 31.8 on 200 scenes, seed 0;
    #  the first, L1-trained weights gave 31.9 against 31.6 here and failed)
    assert sides["model"]["psnr_of_mean_mse_db"] > sides["bicubic"]["psnr_of_mean_mse_db"] + 3
    assert sides["model"]["psnr_mean_db"] > sides["lanczos"]["psnr_mean_db"] + 5
