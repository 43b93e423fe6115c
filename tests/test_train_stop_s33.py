"""Ctrl-C (SIGINT) or SIGTERM during `imagine train` (session 33): the step under way ends, a checkpoint is written
at that step and the run stops with rc 0, as train.max_minutes stops it; `--resume` continues from there. Before,
a signal killed the run and lost the steps since the last checkpoint_every."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from test_imagen_train_s31 import stage_config


def test_a_signal_writes_a_checkpoint_and_stops(tmp_path, sig=signal.SIGINT):
    cfg = stage_config(16, max_steps=10_000, checkpoint_every=10_000, log_every=1, sample_every=0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "imagine.cli", "train", "imagen", "--config", str(path), "--output", str(out)]
    # (its output to files: a pipe nobody reads while it runs would fill and block it)
    with open(tmp_path / "out.txt", "w") as so, open(tmp_path / "err.txt", "w") as se:
        proc = subprocess.Popen(cmd, env=env, stdout=so, stderr=se, text=True)
        log = out / "log.jsonl"
        t0 = time.time()
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-2000:]
            assert time.time() - t0 < 240, "no steps logged"
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=240)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest")
    assert saved == [f"step-{steps[-1]:08d}"], (saved, steps)  # (the last step taken, not step 10000's)
    assert f"stopped ({sig.name} here or in another process) at step {steps[-1]}" in stdout
    # --resume: on from that step
    cfg["train"]["max_steps"] = steps[-1] + 2
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-2:] == [steps[-1] + 1, steps[-1] + 2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_handlers_take_the_first_signal_and_are_put_back(sig):
    """The loop's stop_signals: the first SIGINT or SIGTERM sets the event (no KeyboardInterrupt, no end), and from then
    on, and after the run, the handlers are the ones before it."""
    from imagine.train.loop import stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals() as asked:
        assert signal.getsignal(sig) is not before[sig]
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert asked.is_set() and asked.signal == sig.name
        assert {s: signal.getsignal(s) for s in before} == before  # (a second one is handled as before: at once)
    assert {s: signal.getsignal(s) for s in before} == before
