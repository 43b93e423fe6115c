"""The trainer: loss falls, exact resume after kill -9, bad records skipped and counted, empty data refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagine.models import io
from imagine import testing
from imagine.testing import make_image_folder as make_folder
from imagine.train.config import load_config

TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}


def vae_config(data: Path, **train):
    return {
        "seed": 0,
        "data": {"type": "imagefolder", "path": str(data), "resolution": 16, "eval_count": 4},
        "model": TINY_VAE,
        "loss": {"reconstruction": "l1", "kl_weight": 1e-6},
        "train": {"batch_size": 4, "lr": 2e-3, "max_steps": 40, "warmup_steps": 2, "checkpoint_every": 10,
                  "log_every": 5, "progress": False, "tensorboard": False, "deterministic": True, "threads": 1,
                  **train},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, check=True):
    # (in this process: imagine.testing.run_cli; the kill test below needs a process of its own)
    return testing.run_cli(*args, check=check)


def test_vae_loss_falls_and_psnr_reported(tmp_path):
    from imagine.train.cli import add_arguments, run
    import argparse

    data = make_folder(tmp_path / "data")
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=60))
    p = argparse.ArgumentParser()
    add_arguments(p)
    result = run(p.parse_args(["vae", "--config", str(cfg), "--output", str(tmp_path / "run")]))
    hist = result["history"]
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"], hist
    assert result["eval"]["psnr"] > 15
    # The trained result is a component folder that loads.
    from imagine.models.vae import AutoencoderKL

    AutoencoderKL.from_pretrained(tmp_path / "run" / "model")


def test_resume_after_kill_gives_identical_weights(tmp_path):
    data = make_folder(tmp_path / "data")
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=60, checkpoint_every=3))
    run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "straight")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "imagine.cli", "train", "vae", "--config", str(cfg),
                             "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # let it get somewhere between checkpoints (or into a write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").exists(), "no checkpoint was written before the kill"
    assert not (killed / "model").exists(), "the run finished before it could be killed; the test proves nothing"
    # The latest complete checkpoint exports as a loadable model without further training.
    run_cli("train", "vae", "--config", cfg, "--output", killed, "--export-only")
    from imagine.models.vae import AutoencoderKL

    AutoencoderKL.from_pretrained(killed / "model")
    out = run_cli("train", "vae", "--config", cfg, "--output", killed, "--resume")
    assert "resumed from" in out.stdout
    a = io.load_tensors(tmp_path / "straight" / "model" / "diffusion_pytorch_model.safetensors")
    b = io.load_tensors(killed / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_records_skipped_and_counted(tmp_path):
    data = make_folder(tmp_path / "data", n=16, bad=3, uncaptioned=2)
    from imagine.train.data import ImageFolderDataset, SkipCounter, collate

    ds = ImageFolderDataset(data, 16)
    skipped = SkipCounter()
    batch = collate([ds[i] for i in range(len(ds))], skipped)
    assert batch["image"].shape[0] == 16
    assert skipped == {"corrupt or unreadable images": 3, "records without a caption": 2}


def test_empty_dataset_and_missing_caption_column_refused(tmp_path):
    from imagine.train.data import ImageFolderDataset

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        ImageFolderDataset(empty, 16)
    data = make_folder(tmp_path / "data", n=4)
    with pytest.raises(ValueError, match="caption column 'caption' is in no record"):
        ImageFolderDataset(data, 16, caption_column="caption")
    # (a diffusion config: the VAE's loss and model sections would be refused first, as unknown keys)
    cfg = write_yaml(tmp_path / "bad.yaml", {k: v for k, v in vae_config(empty).items() if k not in ("loss", "model")})
    out = run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / "r", check=False)
    assert out.returncode == 2 and "no records" in out.stderr


def test_config_overrides(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"train": {"lr": 1.0, "max_steps": 5}})
    c = load_config(cfg, ["train.lr=0.5", "model.block_out_channels=[4, 8]"])
    assert c["train"] == {"lr": 0.5, "max_steps": 5}
    assert c["model"]["block_out_channels"] == [4, 8]
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(cfg, ["train.lr"])


TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 384, "norm_num_groups": 8}


def diffusion_config(data: Path, **train):
    return {
        "seed": 0,
        "data": {"type": "imagefolder", "path": str(data), "resolution": 16},
        "text_encoder": {"type": "minilm", "max_length": 8},
        "schedule": {"kind": "linear", "num_train_timesteps": 100},
        "prediction_type": "epsilon",
        "model": TINY_UNET,
        "sample": {"prompts": ["square 1", "square 2"], "steps": 4, "guidance_scale": 2.0, "sampler": "ddim"},
        "train": {"batch_size": 8, "lr": 2e-3, "max_steps": 50, "warmup_steps": 2, "checkpoint_every": 25,
                  "log_every": 5, "progress": False, "tensorboard": False, "deterministic": True, "threads": 1,
                  "sample_every": 50, **train},
    }


def test_diffusion_pixel_space_trains_exports_and_generates(tmp_path):
    data = make_folder(tmp_path / "data", n=16)
    config = diffusion_config(data)
    config["sample"]["threshold_range"] = 2.5
    cfg = write_yaml(tmp_path / "d.yaml", config)
    run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / "run")
    # the run's sampling settings become the model's defaults, the thresholding range among them
    defaults = json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())["defaults"]
    assert defaults["threshold_range"] == 2.5 and defaults["sampler"] == "ddim" and defaults["steps"] == 4
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # The DDPM loss on this data starts near 1 (predicting eps ~ N(0, I) from noise) and must fall.
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], log
    assert (tmp_path / "run" / "samples" / "step-00000050.png").is_file()
    out = tmp_path / "img.png"
    run_cli("generate", "--model", tmp_path / "run" / "model", "square 3", "--steps", "3", "--seed", "5",
            "-o", out, "--quiet")
    img = Image.open(out)
    assert img.size == (16, 16)
    assert "Seed: 5" in img.text["parameters"]


def test_resume_from_a_carried_checkpoint_without_optimizer(tmp_path):
    """A checkpoint carried to another machine without its optimizer moments (to keep it small)
    continues: weights, EMA, data position and RNG states come back; the step count goes on."""
    import shutil

    data = make_folder(tmp_path / "data")
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=10, checkpoint_every=5))
    run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "a")
    carried = tmp_path / "carried"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000010", carried)
    (carried / "optimizer.safetensors").unlink()
    out = run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "b", "--resume-from", carried,
                  "--set", "train.max_steps=14")
    assert "resumed from" in out.stdout and "at step 10" in out.stdout
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000014" / "state.json").read_text())
    assert state["step"] == 14 and state["data_position"] == 14

    # The compact form: package --checkpoint --compact stores weights and EMA in fp16 and drops the optimizer.
    from imagine.train.package import package_checkpoint

    small = tmp_path / "small"
    package_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000010", small, compact=True)
    assert not (small / "optimizer.safetensors").exists()
    full, half = (io.load_tensors(d / "ema.safetensors") for d in (tmp_path / "a" / "checkpoints" / "step-00000010", small))
    assert set(full) == set(half)
    for k, v in full.items():
        if v.is_floating_point():
            assert half[k].dtype == torch.float16 and torch.equal(half[k], v.half()), k
        else:
            assert torch.equal(half[k], v), k   # the EMA's update count stays an integer
    out = run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "c", "--resume-from", small,
                  "--set", "train.max_steps=12")
    assert "at step 10" in out.stdout
    assert (tmp_path / "c" / "checkpoints" / "step-00000012" / "state.json").is_file()


def test_resume_into_a_model_with_new_zero_started_extensions(tmp_path):
    """A run switched to the U-Net's position code and context refiner part-way resumes from the plain
    model's checkpoint: the new parameters start at their initialisation (zero output), the old
    ones come back, AdamW's moments (for the old parameter list) restart, the step count goes on."""
    data = make_folder(tmp_path / "data", n=16)
    cfg = write_yaml(tmp_path / "d.yaml", diffusion_config(data, max_steps=10, checkpoint_every=10, sample_every=0))
    run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / "run")
    old = io.load_tensors(tmp_path / "run" / "checkpoints" / "step-00000010" / "model.safetensors")
    out = run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / "run", "--resume",
                  "--set", "train.max_steps=12", "--set", "model.attention_position_embedding=true",
                  "--set", "model.context_refiner_layers=1")
    assert "at step 10" in out.stdout and "parameters are not in" in out.stdout, out.stdout
    assert "AdamW's moments start from zero" in out.stderr
    new = io.load_tensors(tmp_path / "run" / "checkpoints" / "step-00000012" / "model.safetensors")
    ema = io.load_tensors(tmp_path / "run" / "checkpoints" / "step-00000012" / "ema.safetensors")
    added = set(new) - set(old)
    assert added and all("pos_proj" in k or k.startswith("context_refiner.") for k in added)
    assert {f"model.{k}" for k in added} <= set(ema)
    # Two steps on, the zero-started output layers have moved off zero (they learn).
    assert new["context_refiner.proj_out.weight"].abs().max() > 0
    # Without the extensions switched on, a checkpoint that has them is refused, not cut down.
    bad = run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / "run", "--resume",
                  "--set", "train.max_steps=14", check=False)
    assert bad.returncode != 0 and "unexpected keys" in bad.stderr


def test_compiled_training_matches_eager(tmp_path):
    """train.compile runs the training forward/backward through torch.compile: the same steps
    from the same seed give the same weights as eager to float tolerance, and the checkpoint and
    export hold the plain module's keys (no `_orig_mod.` prefix)."""
    data = make_folder(tmp_path / "data", n=16)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        config = diffusion_config(data, max_steps=6, checkpoint_every=3, sample_every=0, compile=compiled)
        # (one level with attention: inductor's compile of the forward and backward graphs is most of this test's
        # time, 4 min on a 2-core AVX2 CPU with TINY_UNET's two levels)
        config["model"] = {**TINY_UNET, "block_out_channels": [16], "down_block_types": ["CrossAttnDownBlock2D"],
                           "up_block_types": ["CrossAttnUpBlock2D"]}
        cfg = write_yaml(tmp_path / f"{name}.yaml", config)
        run_cli("train", "diffusion", "--config", cfg, "--output", tmp_path / name)
        runs[name] = {s: io.load_tensors(tmp_path / name / "checkpoints" / f"step-0000000{s}" / "model.safetensors")
                      for s in (3, 6)}
    a, b = runs["eager"][6], runs["compiled"][6]
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    exported = io.load_tensors(tmp_path / "compiled" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == io.load_tensors(tmp_path / "eager" / "model" / "unet" / "diffusion_pytorch_model.safetensors").keys()
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - runs["eager"][3][k]).abs().max()) for k in a)
    print(f"compiled vs eager after 6 steps: max |diff| {apart:.2e}; steps 3 to 6 moved {moved:.2e}")
    assert apart < 0.05 * moved, (apart, moved)   # compiled and eager agree far better than steps 3 and 6 do


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())


def test_a_run_keeps_its_own_checkpoints(tmp_path):
    """A fresh run into a folder holding an earlier run's checkpoints is refused (they would mix); a run resumed from
    an earlier checkpoint prunes only what is older than the one it writes, so `latest` names a checkpoint that is
    there (keep_checkpoints 1 deleted the new one at once when the abandoned later one sorted after it)."""
    from imagine.train import checkpoint as ckpt

    data = make_folder(tmp_path / "data", n=8)
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=8, checkpoint_every=4, keep_checkpoints=2))
    run = tmp_path / "run"
    run_cli("train", "vae", "--config", cfg, "--output", run)
    out = run_cli("train", "vae", "--config", cfg, "--output", run, check=False)
    assert out.returncode == 2 and "holds checkpoints of an earlier run (the newest step-00000008)" in out.stderr
    out = run_cli("train", "vae", "--config", cfg, "--output", run, "--resume-from",
                  run / "checkpoints" / "step-00000004", "--set", "train.max_steps=6", "--set",
                  "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1")
    assert "at step 4" in out.stdout
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    # keep_checkpoints 4: the newest four stay, the set growing to four first
    net = torch.nn.Linear(2, 2)
    for step in range(1, 7):
        ckpt.save_checkpoint(tmp_path / "k4", step, modules={"model": net}, optimizer=None, state={}, generators={},
                             keep=4)
    assert sorted(p.name for p in (tmp_path / "k4" / "checkpoints").glob("step-*")) == [
        f"step-{s:08d}" for s in (3, 4, 5, 6)]


def test_train_options_are_checked_and_yaml_floats_read(tmp_path):
    from imagine.train.loop import TRAIN_DEFAULTS, check_train_options

    c = load_config(None, ["train.lr=1e-4", "train.betas=[0.9, 0.99]"])
    assert c["train"]["lr"] == 1e-4  # (PyYAML alone reads 1e-4 as a string)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 2e-4\n")
    assert load_config(tmp_path / "c.yaml")["train"]["lr"] == 2e-4
    assert check_train_options({**TRAIN_DEFAULTS, "lr": "3e-4"})["lr"] == 3e-4
    for key, value, said in (("batch_size", 0, "train.batch_size must be a whole number >= 1"),
                             ("checkpoint_every", 0, "train.checkpoint_every must be a whole number >= 1"),
                             ("log_every", 2.5, "train.log_every must be a whole number"),
                             ("grad_accum", 0, "train.grad_accum must be a whole number >= 1"),
                             ("lr", "fast", "train.lr must be a number"), ("lr", 0, "train.lr must be a finite number > 0"),
                             ("lr", float("inf"), "train.lr must be a finite number"),
                             ("betas", "00", "train.betas must be two numbers"),
                             ("betas", [0.9], "train.betas must be two numbers"),
                             ("ema_decay", 1.0, "train.ema_decay must be below 1"),
                             ("compile", "yes", "train.compile must be true or false"),
                             ("lr_schedule", "linear", "unknown train.lr_schedule")):
        with pytest.raises(ValueError, match=said):
            check_train_options({**TRAIN_DEFAULTS, key: value})
    data = make_folder(tmp_path / "data", n=4)
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=2))
    for override, said in (("train.batch_size=0", "train.batch_size must be a whole number >= 1"),
                           ("loss.kl_wieght=1.0", "unknown key(s) in loss: kl_wieght"),
                           ("data.captoin_column=text", "unknown key(s) in data: captoin_column"),
                           ("min_snr_gama=5", "unknown key(s) in the VAE's config: min_snr_gama")):
        out = run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "r", "--set", override, check=False)
        assert out.returncode == 2 and said in out.stderr, (override, out.stderr[-400:])


def test_bad_metadata_records_are_counted_once(tmp_path):
    """A record whose file_name is no string is a malformed line (skipped, counted); a resumed run's counts are the
    checkpoint's, not those plus the ones the dataset counted again while loading; the checkpoint stores the whole
    config (defaults filled in) and a resume takes the configured AdamW settings."""
    data = make_folder(tmp_path / "data", n=8)
    with open(data / "metadata.jsonl", "a") as f:
        f.write('{"file_name": null, "text": "x"}\n{"file_name": 3, "text": "y"}\n')
    from imagine.train.data import ImageFolderDataset

    assert ImageFolderDataset(data, 16).skipped == {"malformed metadata lines": 2}
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, max_steps=4, checkpoint_every=2))
    run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "straight")
    run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "resumed", "--set", "train.max_steps=2")
    run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "resumed", "--resume", "--set",
            "train.weight_decay=0.5")
    want = _state(tmp_path / "straight", 4)
    got = _state(tmp_path / "resumed", 4)
    assert got["skipped"] == want["skipped"] == {"malformed metadata lines": 2}
    assert got["optimizer"]["param_groups"][0]["weight_decay"] == 0.5  # (the checkpoint said 0.01)
    assert want["resolved"]["train"]["ema_decay"] == 0.9999 and want["resolved"]["loss"]["disc_start"] == 5000
    assert want["resolved"]["model"]["latent_channels"] == 2


def test_a_discriminators_optimizer_is_part_of_the_atomic_checkpoint(tmp_path, monkeypatch):
    """A VAE trained with its PatchGAN: the discriminator's AdamW state is written inside the checkpoint's atomic
    step, so a failure while writing it leaves the previous checkpoint as `latest` (it used to be written after the
    rename, `latest` naming a checkpoint that could not resume); a compact packaged checkpoint leaves every
    optimizer's moments out (float16 would flush them) and still resumes."""
    from imagine.models import io as mio
    from imagine.train import checkpoint as ckpt
    from imagine.train.cli import add_arguments, run
    from imagine.train.package import package_checkpoint
    import argparse

    data = make_folder(tmp_path / "data", n=8)
    config = vae_config(data, max_steps=4, checkpoint_every=2)
    config["loss"].update(discriminator=True, disc_start=0, disc_layers=1)
    cfg = write_yaml(tmp_path / "vae.yaml", config)
    save = mio.save_tensors

    def failing(path, tensors, *a, **k):
        if Path(path).name == "opt_disc.safetensors" and "00000004" in str(path):
            raise OSError("disk full")
        return save(path, tensors, *a, **k)

    monkeypatch.setattr(mio, "save_tensors", failing)
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(OSError, match="disk full"):
        run(p.parse_args(["vae", "--config", str(cfg), "--output", str(tmp_path / "run")]))
    monkeypatch.setattr(mio, "save_tensors", save)
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert last.name == "step-00000002" and (last / "opt_disc.safetensors").is_file()
    out = run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "run", "--resume")
    assert "at step 2" in out.stdout and (tmp_path / "run" / "checkpoints" / "step-00000004" / "opt_disc.safetensors").is_file()
    small = tmp_path / "small"
    package_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004", small, compact=True)
    assert not list(small.glob("opt*.safetensors"))
    out = run_cli("train", "vae", "--config", cfg, "--output", tmp_path / "c", "--resume-from", small, "--set",
                  "train.max_steps=5")
    assert "at step 4" in out.stdout and "no state for the disc optimizer" in out.stderr
