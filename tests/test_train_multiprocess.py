"""Several processes through accelerate (DDP, gloo on CPU): the curve of 2 processes is the curve of 1.

With the same global batch, DDP averages the slice gradients into the global-batch gradient, so
2 processes take the same steps as 1 provided each sample's random draws (caption dropout,
timestep, noise) are a function of its slot in the global batch and not of the process that
holds it. "Within noise" is then float rounding: the per-step losses agree to ~1e-6, where draws
that depended on the rank would make them differ by the spread of the loss over timesteps
(tenths here). The data hold corrupt and caption-less records, so the slices
are unequal: each slice's loss is weighted by its share of the global batch's good records. The
same runs also check that only the main process writes (one log line a step, one TensorBoard
file, one sample grid, checkpoints), that skipped records are counted once, and that a 2-process
run resumed from its checkpoint ends with exactly the weights of an uninterrupted one.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagine.models import io
from imagine.testing import make_image_folder

STEPS = 10
TINY_UNET = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 384, "norm_num_groups": 4}

# (one xdist worker takes the whole module: its runs, a minute of training, once and not on each worker)
pytestmark = [pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed"),
              pytest.mark.xdist_group("train_multiprocess")]


def write_config(path: Path, data: Path, **train) -> Path:
    import yaml

    cfg = {
        # With seed 0 the first process's slice of global batch 9 holds only bad records: it runs a
        # stand-in record with weight 0 (slices per step, good records: 4+3, 3+1, ..., 0+4, 2+3).
        "seed": 0,
        "data": {"type": "imagefolder", "path": str(data), "resolution": 8},
        "text_encoder": {"type": "minilm", "max_length": 8},
        "schedule": {"kind": "linear", "num_train_timesteps": 100},
        "prediction_type": "epsilon",
        "caption_dropout": 0.25,   # exercised: a quarter of the captions are dropped
        "model": TINY_UNET,
        "sample": {"prompts": ["a bar at 1", "a bar at 3"], "steps": 2, "guidance_scale": 2.0, "sampler": "ddim"},
        # A constant LR after warm-up, so that a run stopped at max_steps=STEPS/2 and resumed to STEPS
        # follows the same schedule as one run to STEPS.
        "train": {"batch_size": 8, "lr": 3e-3, "max_steps": STEPS, "warmup_steps": 2, "lr_schedule": "constant",
                  "checkpoint_every": STEPS // 2, "log_every": 1, "sample_every": STEPS // 2, "ema_decay": 0.9,
                  "progress": False, "tensorboard": True, "deterministic": True, "threads": 1, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def train(cfg: Path, out: Path, processes: int, *extra) -> subprocess.CompletedProcess:
    cmd = ["train", "diffusion", "--config", str(cfg), "--output", str(out), *extra]
    if processes == 1:
        argv = [sys.executable, "-m", "imagine.cli", *cmd]
    else:
        # --multi_gpu is accelerate's name for multi-process DDP; with no GPU it runs MULTI_CPU on gloo.
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0", "-m", "imagine.cli", *cmd]
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def losses(run: Path) -> list[float]:
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one log line a step, written by one process"
    return [r["loss"] for r in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return io.load_tensors(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    data = make_image_folder(root / "data", n=20, size=8, bad=4, uncaptioned=2)
    cfg = write_config(root / "run.yaml", data)
    out = {"one": root / "one", "two": root / "two", "two_resumed": root / "two_resumed"}
    out["one_stdout"] = train(cfg, out["one"], 1).stdout
    out["two_stdout"] = train(cfg, out["two"], 2).stdout
    half = write_config(root / "half.yaml", data, max_steps=STEPS // 2)
    train(half, out["two_resumed"], 2)
    out["resume_stdout"] = train(cfg, out["two_resumed"], 2, "--resume").stdout
    return out


def test_two_processes_follow_the_one_process_curve(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    # The loss moves by tenths from step to step (timesteps are redrawn), so a tolerance of 1e-4
    # separates "the same draws, rounded differently" from "different draws".
    spread = max(one) - min(one)
    assert spread > 0.05, one
    diffs = [abs(a - b) for a, b in zip(one, two)]
    assert max(diffs) < 1e-4, list(zip(one, two))
    a, b = weights(runs["one"]), weights(runs["two"])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


def test_only_the_main_process_writes(runs):
    for name in ("one", "two"):
        run = runs[name]
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000005.png", "step-00000010.png"]
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
        assert runs[f"{name}_stdout"].count("skipped records:") == 1
    # The EMA lives on the main process only, and it is what the export holds (not the raw weights).
    state = io.load_tensors(runs["two"] / "checkpoints" / f"step-{STEPS:08d}" / "ema.safetensors")
    raw = io.load_tensors(runs["two"] / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert int(state["num_updates"]) == STEPS
    exported = weights(runs["two"])
    k = "conv_in.weight"
    assert torch.equal(exported[k], state[f"model.{k}"]) and not torch.equal(exported[k], raw[k])


def skip_report(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("skipped records:"))


def test_skipped_records_are_counted_once_across_processes(runs):
    # Each process counts the bad records of its own slices; the report sums them, and a resumed
    # run adds its counts to the checkpoint's.
    one = skip_report(runs["one_stdout"])
    assert "corrupt or unreadable images" in one and "records without a caption" in one, one
    assert skip_report(runs["two_stdout"]) == one
    assert skip_report(runs["resume_stdout"]) == one


def test_two_process_resume_gives_identical_weights(runs):
    assert runs["resume_stdout"].count("resumed from") == 1
    assert losses(runs["two_resumed"]) == losses(runs["two"])
    a, b = weights(runs["two"]), weights(runs["two_resumed"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tensorboard_scalars_and_sample_grid(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs["one"] / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm"} <= tags, tags
    logged = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    assert [v for _, v in logged] == pytest.approx(losses(runs["one"]), rel=1e-6)
    lr = [e.value for e in ea.Scalars("train/lr")]
    assert lr[0] == pytest.approx(3e-3 / 2) and lr[-1] == pytest.approx(3e-3)   # warm-up, then constant
    grid = Image.open(runs["one"] / "samples" / "step-00000010.png")
    assert grid.size == (2 * 8 + 3 * 2, 8 + 2 * 2)   # two 8x8 samples in a row, 2-pixel borders
