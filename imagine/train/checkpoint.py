"""Training checkpoints that survive `kill -9` at any moment.

A checkpoint is a folder `step-00001234/` holding safetensors files for every tensor (model, EMA,
optimizer moments, RNG states) and `state.json` for the rest (step, data position, LR schedule,
the full config, the library version). It is written under a temporary name and renamed into
place, and `latest` (a one-line file, replaced atomically) names the newest complete one. A kill
during a write leaves at worst a `.tmp` folder, which is ignored and cleaned up.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagine import __version__
from imagine.models import io

log = logging.getLogger(__name__)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors by flat key, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):   # (dropout and randn on a GPU draw from these)
            tensors[f"cuda.{i}"] = st
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _py_state_to_json(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("the checkpoint holds the RNG states of %d GPU(s); %d here: they are not restored", len(cuda),
                    torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for name, g in generators.items():
        if f"gen.{name}" in tensors:
            g.set_state(tensors[f"gen.{name}"])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["numpy.keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    random.setstate(_py_state_from_json(meta["python"]))


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def save_checkpoint(run_dir: Path, step: int, *, modules: dict[str, torch.nn.Module | dict],
                    optimizer: torch.optim.Optimizer | None, state: dict, generators: dict[str, torch.Generator],
                    keep: int = 2, files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep it and the newest `keep` - 1 before it
    (0: all). `files`: more tensor files by name (e.g. another optimizer's), written inside the same atomic step.
    Checkpoints numbered above `step` (a run resumed from an earlier one) are left alone: only older ones go."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, m in modules.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        io.save_tensors(tmp / f"{name}.safetensors", {k: v.detach().cpu() for k, v in sd.items()})
    meta: dict[str, Any] = {"step": step, "imagine_version": __version__, **state}
    if optimizer is not None:
        t, m = flatten_optimizer(optimizer.state_dict())
        io.save_tensors(tmp / "optimizer.safetensors", t)
        meta["optimizer"] = m
    for name, tensors in (files or {}).items():
        io.save_tensors(tmp / f"{name}.safetensors", tensors)
    rt, rm = rng_state(generators)
    io.save_tensors(tmp / "rng.safetensors", rt)
    meta["rng"] = rm
    io.atomic_write_json(tmp / "state.json", meta)
    if final.exists():
        # (a run resumed from an earlier checkpoint reaching this step again): the old folder is renamed away whole
        # before the new one takes its name, so `step-N` is never a half-deleted folder that still has its state.json
        old = ckpt_root / f".step-{step:08d}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    io.atomic_write_bytes(ckpt_root / "latest", (final.name + "\n").encode())
    older = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name < final.name)
    for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".step-*.tmp"), *ckpt_root.glob(".step-*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    # Fall back to the newest complete folder (e.g. if `latest` was lost).
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, *, modules: dict[str, torch.nn.Module], optimizer=None,
                    generators: dict[str, torch.Generator] | None = None, may_lack=None) -> dict:
    """Restore modules, optimizer and RNG states from `path`; returns state.json's content.

    `may_lack(key)`: parameters a checkpoint saved before they existed may leave out (a model
    extension that starts at zero, e.g. `imagine.models.unet.new_parameter`); they keep their
    initialisation, listed in the result's "new_parameters", and AdamW's saved moments, which
    belong to the old parameter list, are not restored."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    new = []
    for name, m in modules.items():
        f = path / f"{name}.safetensors"
        new += [f"{name}:{k}" for k in io.load_state_into(m, io.load_tensors(f), str(f), may_lack=may_lack)]
    meta["new_parameters"] = new
    if new and optimizer is not None and (path / "optimizer.safetensors").is_file():
        log.warning("%s: %d parameters are new to this checkpoint (kept at their initialisation); its optimizer "
                    "state is for the old parameters, so AdamW's moments start from zero", path, len(new))
    elif optimizer is not None and (path / "optimizer.safetensors").is_file():
        optimizer.load_state_dict(unflatten_optimizer(io.load_tensors(path / "optimizer.safetensors"), meta["optimizer"]))
    if generators is not None:
        set_rng_state(io.load_tensors(path / "rng.safetensors"), meta["rng"], generators)
    return meta
