"""Fixes from a review of the training path, each checked against an independent truth: an uninterrupted run
compared bit for bit, AdamW's closed-form first step, the count of bad records made, the error naming the key."""

import argparse
import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagine.models import io
from imagine.testing import make_image_folder
from imagine.train.cli import add_arguments, run

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}
TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 384, "norm_num_groups": 8}
QUIET = {"progress": False, "tensorboard": False, "deterministic": True, "threads": 1}


def vae_config(data, **train):
    return {"seed": 0, "data": {"type": "imagefolder", "path": str(data), "resolution": 16, "eval_count": 2},
            "model": dict(TINY_VAE), "loss": {"reconstruction": "l1", "kl_weight": 1e-6},
            "train": {"batch_size": 4, "lr": 2e-3, "max_steps": 6, "warmup_steps": 2, "checkpoint_every": 3,
                      "log_every": 1, **QUIET, **train}}


def diffusion_config(data, **train):
    return {"seed": 0, "data": {"type": "imagefolder", "path": str(data), "resolution": 16},
            "text_encoder": {"type": "minilm", "max_length": 8},
            "schedule": {"kind": "linear", "num_train_timesteps": 100}, "prediction_type": "epsilon",
            "model": dict(TINY_UNET), "sample": {"prompts": ["square"], "steps": 3, "sampler": "ddim"},
            "train": {"batch_size": 8, "lr": 2e-3, "max_steps": 2, "warmup_steps": 2, "checkpoint_every": 1,
                      "log_every": 1, **QUIET, **train}}


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def train(what: str, cfg: Path, out: Path, *extra) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args([what, "--config", str(cfg), "--output", str(out), *map(str, extra)]))


def tensors(run_dir: Path, step: int, name: str) -> dict:
    return io.load_tensors(run_dir / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors")


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 1. carrying a checkpoint ---------------------------------------------------------------------------------------
def test_packaged_checkpoint_continues_the_run_bit_for_bit(tmp_path):
    """`package --checkpoint` (the default form) keeps the fp32 weights, EMA and AdamW's moments: a run resumed
    from it ends with the weights, EMA and optimizer state of the run never stopped, bit for bit."""
    from imagine.train.package import main as package

    data = make_image_folder(tmp_path / "data", n=8)
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data))
    train("vae", cfg, tmp_path / "straight")
    carried = tmp_path / "carried"
    assert package(["--checkpoint", str(tmp_path / "straight" / "checkpoints" / "step-00000003"), str(carried)]) == 0
    train("vae", cfg, tmp_path / "resumed", "--resume-from", carried)
    for name in ("model", "ema", "optimizer"):
        assert_bit_identical(tensors(tmp_path / "straight", 6, name), tensors(tmp_path / "resumed", 6, name))


def test_compact_checkpoint_resume_warns_and_warms_up_again(tmp_path, caplog):
    """`package --checkpoint --compact` (fp16, no optimizer) resumes with a warning naming it, and the learning
    rate warms up again from its step: AdamW's first update from zero moments is lr_t * g / (|g| + eps), about
    lr_t for every weight, so its largest move is the re-warmed lr_t = lr / warmup_steps (not lr). A checkpoint
    written during that warm-up carries it on: resumed from there, the run is the same bit for bit."""
    from imagine.train.package import package_checkpoint

    lr, warmup = 2e-3, 4
    data = make_image_folder(tmp_path / "data", n=8)
    config = vae_config(data, lr=lr, warmup_steps=warmup, lr_schedule="constant", weight_decay=0.0,
                        max_steps=4, checkpoint_every=4)
    cfg = write_yaml(tmp_path / "vae.yaml", config)
    train("vae", cfg, tmp_path / "a")
    small = tmp_path / "small"
    package_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004", small, compact=True)
    assert not (small / "optimizer.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="imagine.train.loop"):
        train("vae", cfg, tmp_path / "b", "--resume-from", small, "--set", "train.max_steps=6",
              "--set", "train.checkpoint_every=1")
    before = {k: v.float() for k, v in io.load_tensors(small / "model.safetensors").items()}
    after = tensors(tmp_path / "b", 5, "model")
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    expected = lr / warmup   # the first re-warmed step's lr
    assert abs(moved / expected - 1) < 1e-3, (moved, expected)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert str(small) in said and "no optimizer state" in said, said
    assert "warms up again over train.warmup_steps=4 steps from step 4" in said, said
    assert json.loads((tmp_path / "b" / "checkpoints" / "step-00000005" / "state.json").read_text())["rewarm"] == {
        "model": 4}
    train("vae", cfg, tmp_path / "c", "--resume-from", tmp_path / "b" / "checkpoints" / "step-00000005",
          "--set", "train.max_steps=6", "--set", "train.checkpoint_every=1")
    for name in ("model", "ema", "optimizer"):
        assert_bit_identical(tensors(tmp_path / "b", 6, name), tensors(tmp_path / "c", 6, name))


def test_committed_compact_checkpoint_still_resumes(tmp_path, caplog):
    """The repo's training/shapes-ldm/checkpoint (compact: fp16, no optimizer) loads for --resume-from and trains on,
    with the warning and the re-warmed learning rate."""
    ckpt_dir = REPO / "training" / "shapes-ldm" / "checkpoint"
    vae = REPO / "imagine" / "weights" / "default" / "vae"
    if not ckpt_dir.is_dir() or not vae.is_dir():
        pytest.skip("no committed checkpoint or default VAE")
    state = json.loads((ckpt_dir / "state.json").read_text())
    cfg = copy.deepcopy(state["config"])
    cfg.pop("output", None)
    cfg.update(vae=str(vae), cache_text=False)
    cfg["train"].update(max_steps=state["step"] + 1, batch_size=2, mixed_precision="no", max_minutes=0,
                        checkpoint_every=1, sample_every=0, **QUIET)
    with caplog.at_level(logging.WARNING, logger="imagine.train.loop"):
        result = train("diffusion", write_yaml(tmp_path / "ldm.yaml", cfg), tmp_path / "run", "--resume-from",
                       ckpt_dir)
    assert result["step"] == state["step"] + 1
    said = " ".join(r.getMessage() for r in caplog.records)
    assert str(ckpt_dir) in said and "warms up again" in said, said


# -- 2. metadata and captions that are not UTF-8 ---------------------------------------------------------------------
def test_non_utf8_metadata_line_and_caption_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    from imagine.train.data import ImageFolderDataset, WebDatasetShards

    data = make_image_folder(tmp_path / "data", n=6)
    with open(data / "metadata.jsonl", "ab") as f:
        f.write(b'{"file_name": "0.png", "text": "caf\xe9"}\n')   # Latin-1, not UTF-8
    ds = ImageFolderDataset(data, 16)
    assert len(ds) == 6 and ds.skipped == {"malformed metadata lines": 1}

    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as w:
        for j in range(4):
            w.write({"__key__": f"{j:04d}", "png": Image.new("RGB", (8, 8), (j * 40, 0, 0)), "txt": f"picture {j}"})
        w.write({"__key__": "latin", "png": Image.new("RGB", (8, 8)), "txt": b"caf\xe9"})
    ds = WebDatasetShards([str(shard)], 8)
    items = list(ds)
    assert sorted(it["caption"] for it in items) == [f"picture {j}" for j in range(4)]
    assert ds.skipped == {"records whose caption is not UTF-8": 1}


# -- 3 and 4. latent diffusion resumes exactly; flips are drawn per epoch --------------------------------------------
def test_latent_diffusion_with_flips_resumes_bit_identical(tmp_path):
    """A tiny VAE + tiny U-Net LDM with cache_latents and data.flip: 4 steps straight against 1 step then --resume to
    4: the same weights and EMA, bit for bit (the latent store is refilled after the resume in batches of
    another make-up, and each record is drawn both ways over the epochs)."""
    from imagine.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    AutoencoderKL(VAEConfig(**TINY_VAE, sample_size=16)).save_pretrained(tmp_path / "vae")
    data = make_image_folder(tmp_path / "data", n=20)
    config = diffusion_config(data, batch_size=16, max_steps=4, warmup_steps=2, lr_schedule="constant",
                              checkpoint_every=1)
    config["data"]["flip"] = True
    config.update(vae=str(tmp_path / "vae"), cache_latents=True)
    config["model"].update(sample_size=8, in_channels=2, out_channels=2)
    config["sample"]["prompts"] = []
    cfg = write_yaml(tmp_path / "ldm.yaml", config)
    train("diffusion", cfg, tmp_path / "straight")
    train("diffusion", cfg, tmp_path / "split", "--set", "train.max_steps=1")
    train("diffusion", cfg, tmp_path / "split", "--resume")
    for name in ("model", "ema"):
        assert_bit_identical(tensors(tmp_path / "straight", 4, name), tensors(tmp_path / "split", 4, name))


def test_a_flipped_record_is_seen_both_ways_over_the_epochs(tmp_path):
    """data.flip is augmentation: each record is drawn flipped in some epochs and not in others (it used to be
    flipped always or never), each draw the record itself or its mirror image, the same on every read."""
    from imagine.train.data import GlobalBatches, ImageFolderDataset

    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i in range(6):
        a = torch.full((8, 8, 3), 255, dtype=torch.uint8)
        a[:, :3] = torch.tensor([40 * i, 0, 0], dtype=torch.uint8)   # a bar on the left: differs from its mirror
        Image.fromarray(a.numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    plain = ImageFolderDataset(folder, 8)
    flipping = ImageFolderDataset(folder, 8, flip=True, seed=3)

    def seen(epochs):
        batches = GlobalBatches(len(flipping), 3, seed=3)
        ways = {i: [] for i in range(6)}
        for _ in range(epochs * 2):
            for it in batches.take(flipping):
                ref = plain[it["index"]]["image"]
                if torch.equal(it["image"], ref):
                    ways[it["index"]].append(False)
                else:
                    assert torch.equal(it["image"], ref.flip(-1))
                    ways[it["index"]].append(True)
        return ways

    ways = seen(16)
    assert all(len(w) == 16 and set(w) == {False, True} for w in ways.values()), ways
    assert seen(16) == ways


# -- 5 and 6. config values checked before anything is built ---------------------------------------------------------
@pytest.mark.parametrize("what,override,said", [
    ("diffusion", "model.block_out_chanels=[16, 32]", "unknown key(s) in model (the U-Net's UNetConfig fields): "
                                                     "block_out_chanels"),
    ("vae", "model.latent_chanels=4", "unknown key(s) in model (the VAE's VAEConfig fields): latent_chanels"),
    ("diffusion", "text_encoder.max_lenght=8", "unknown key(s) in text_encoder (type minilm): max_lenght"),
    ("diffusion", "data.flip=maybe", "data.flip must be true or false; got 'maybe'"),
    ("diffusion", "cache_text=maybe", "cache_text must be true or false; got 'maybe'"),
    ("vae", "model.scaling_factor=autox", "model.scaling_factor must be 'auto'"),
    ("vae", "data.resolution=0", "data.resolution must be a whole number >= 1; got 0"),
    ("diffusion", "data.resolution=-16", "data.resolution must be a whole number >= 1; got -16"),
    ("diffusion", "data.resolution=abc", "data.resolution must be a whole number"),
    ("vae", "data.eval_count=abc", "data.eval_count must be a whole number"),
    ("diffusion", "caption_dropout=abc", "caption_dropout must be a finite number"),
    ("diffusion", "min_snr_gamma=abc", "min_snr_gamma must be a finite number > 0 or null"),
    ("diffusion", "seed=abc", "seed must be a whole number"),
    ("vae", "seed=abc", "seed must be a whole number"),
    ("vae", "loss.kl_weight=abc", "loss.kl_weight must be a finite number >= 0"),
    ("vae", "loss.disc_start=abc", "loss.disc_start must be a whole number >= 0"),
    ("diffusion", "schedule.foo=1", "unknown key(s) in schedule: foo"),
    ("diffusion", "sample.sampler=foo", "sample.sampler: unknown sampler 'foo'"),
    ("diffusion", "sample.steps=abc", "sample.steps must be a whole number >= 1"),
    ("diffusion", "sample.guidance_scale=abc", "sample.guidance_scale must be a finite number"),
    ("diffusion", "sample.sigma_schedule=foo", "unknown sample.sigma_schedule (or null) 'foo'; valid: 'karras'"),
    ("diffusion", "train.lr=[1", "--set 'train.lr=[1': the value is not valid YAML"),
])
def test_bad_config_values_name_the_key_before_data_or_model(tmp_path, what, override, said):
    """Each bad value is a ValueError naming the key and what is valid; the data folder does not exist, so an error
    about the value (not the folder) was raised before the data (and the model) were built."""
    missing = tmp_path / "no-such-folder"
    config = vae_config(missing) if what == "vae" else diffusion_config(missing)
    cfg = write_yaml(tmp_path / "c.yaml", config)
    with pytest.raises(ValueError) as e:
        train(what, cfg, tmp_path / "run", "--set", override)
    assert said in str(e.value), str(e.value)


def test_config_file_that_is_not_yaml_or_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ValueError, match=f"{bad}: not valid YAML"):
        train("vae", bad, tmp_path / "run")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"seed: 0  # caf\xe9\n")
    with pytest.raises(ValueError, match=f"{latin}: not UTF-8"):
        train("vae", latin, tmp_path / "run")


def test_model_export_is_atomic(tmp_path, monkeypatch):
    """A failure while writing model/ leaves no half-written model folder (it used to leave unet/ and scheduler/
    without model_index.json, which no loader reads)."""
    import imagine.train.diffusion_task as dt

    data = make_image_folder(tmp_path / "data", n=8)
    config = diffusion_config(data, max_steps=1)
    config["sample"]["prompts"] = []
    cfg = write_yaml(tmp_path / "d.yaml", config)
    real = dt.atomic_write_json

    def failing(path, obj, *a, **k):
        if Path(path).name == "model_index.json":
            raise OSError("disk full")
        return real(path, obj, *a, **k)

    monkeypatch.setattr(dt, "atomic_write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        train("diffusion", cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(dt, "atomic_write_json", real)
    train("diffusion", cfg, tmp_path / "run", "--export-only")
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()


# -- 7. the LDM scaling factor ---------------------------------------------------------------------------------------
def test_auto_scaling_factor_from_training_images_when_none_are_held_out(tmp_path, capsys):
    """One WebDataset shard and no data.eval_urls: no held-out images, so `scaling_factor: auto` is 1 / std of the
    exported VAE's latents z ~ q(z|x) of the training images (it used to export 1.0)."""
    import webdataset as wds

    from imagine.models.vae import AutoencoderKL
    from imagine.train.data import image_to_tensor

    pictures = []
    shard = tmp_path / "s.tar"
    g = torch.Generator().manual_seed(1)
    with wds.TarWriter(str(shard)) as w:
        for j in range(10):
            a = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
            pictures.append(Image.fromarray(a))
            w.write({"__key__": f"{j:04d}", "png": pictures[-1]})
    config = vae_config(tmp_path, max_steps=1, checkpoint_every=1)
    config["data"] = {"type": "webdataset", "urls": [str(shard)], "resolution": 8, "eval_count": 16}
    config["model"]["scaling_factor"] = "auto"
    train("vae", write_yaml(tmp_path / "vae.yaml", config), tmp_path / "run")
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "model").eval()
    x = torch.stack([image_to_tensor(p, 8) for p in pictures])
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(0))
    want = float(1 / z.flatten().std())
    assert abs(want - 1.0) > 1e-3   # (distinguishable from the 1.0 it used to export)
    assert vae.config.scaling_factor == pytest.approx(want, rel=1e-5)
    assert "1 / std of the latents of 10 training images" in capsys.readouterr().out


# -- 8. skip counts and logs -----------------------------------------------------------------------------------------
def test_a_bad_record_is_counted_once_over_epochs(tmp_path):
    """2 corrupt files and 1 record without a caption, read over 3 epochs, count 2 and 1 (records, not reads)."""
    from imagine.train.data import GlobalBatches, ImageFolderDataset, SkipCounter, collate

    data = make_image_folder(tmp_path / "data", n=5, bad=2, uncaptioned=1)
    ds = ImageFolderDataset(data, 16)
    batches, skipped = GlobalBatches(len(ds), 4, seed=0), SkipCounter()
    for _ in range(3 * len(ds) // 4 + 1):
        collate(batches.take(ds), skipped)
    assert batches.position * 4 >= 3 * len(ds)
    assert skipped == {"corrupt or unreadable images": 2, "records without a caption": 1}


def test_resumed_run_logs_each_step_once(tmp_path):
    """A run resumed from a checkpoint behind the last logged step (a kill after it) drops the log lines past the
    checkpoint: its log.jsonl is the uninterrupted run's, line for line."""
    data = make_image_folder(tmp_path / "data", n=8)
    cfg = write_yaml(tmp_path / "vae.yaml", vae_config(data, keep_checkpoints=0))
    run_dir = tmp_path / "run"
    train("vae", cfg, run_dir)
    straight = (run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in straight] == [1, 2, 3, 4, 5, 6]
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')   # a line cut by a kill
    train("vae", cfg, run_dir, "--resume-from", run_dir / "checkpoints" / "step-00000003")
    assert (run_dir / "log.jsonl").read_text().splitlines() == straight
