"""Reading and writing model components: a folder of `config.json` plus `*.safetensors`.

This is diffusers' layout, so a diffusers component folder loads as it is, and ours loads in
diffusers. Writes are atomic (temporary file, then rename), so a kill during a save leaves the
previous file intact. Weights only ever load from safetensors here; pickle checkpoints go through
`imagine.loading.single_file`, which uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors (contiguous copies; shared storage split)."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
            for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def _shares_storage(t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with an error that names the file if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt - "
            "re-download or re-save it") from None


def find_weights(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}; found {found or 'nothing'}"
        + (" (a .bin pickle is not loaded from a component folder; convert it to safetensors)"
           if any(n.endswith(".bin") for n in found) else ""))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_config(folder: str | os.PathLike, class_name: str | None = None) -> dict[str, Any]:
    """A component folder's config.json; with `class_name`, checked to be that class's (diffusers' `_class_name`;
    a config without one is taken as it)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = read_json(Path(folder) / "config.json")
    if class_name is not None and cfg.get("_class_name", class_name) != class_name:
        raise ValueError(f"{folder}: config.json is for {cfg['_class_name']}, not {class_name}")
    return cfg


def save_component(module: torch.nn.Module, config: dict[str, Any], folder: str | os.PathLike,
                   class_name: str, weights_name: str = WEIGHT_NAMES[0]) -> None:
    """Write `config.json` (with the class name and our version) and the weights, atomically."""
    from imagine import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = {"_class_name": class_name, "_imagine_version": __version__, **config}
    save_tensors(folder / weights_name, module.state_dict(), metadata={"format": "pt", "imagine_version": __version__})
    atomic_write_json(folder / "config.json", full)


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False,
                    layout: str = "as configured", may_lack=None) -> list[str]:
    """`load_state_dict(strict=True)` with an error that lists what was missing, unexpected or
    misshapen. `assign=True` makes the given tensors the parameters (no second copy of a big model).

    `may_lack(key) -> bool` names keys `state` may leave out (they keep the module's own values);
    returns those it did leave out."""
    own = module.state_dict()
    kept = sorted(k for k in set(own) - set(state) if may_lack is not None and may_lack(k))
    missing = sorted(set(own) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("shape mismatches: " + show([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
        raise ValueError(f"weights from {source} do not fit {type(module).__name__} {layout}: " + "; ".join(parts))
    module.load_state_dict(state, strict=not kept, assign=assign)
    return kept
