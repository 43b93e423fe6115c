"""Reading and writing model components: a folder of `config.json` plus `*.safetensors` (or safetensors shards
and their `.safetensors.index.json`, as save_pretrained writes a large model).

This is diffusers' layout, so a diffusers component folder loads as it is, and ours loads in
diffusers. Writes are atomic (temporary file, then rename), so a kill during a save leaves the
previous file intact. Weights only ever load from safetensors here; pickle checkpoints go through
`imagine.loading.single_file`, which uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# the index of weights saved in shards (diffusers' save_pretrained past max_shard_size, 10 GB by default: e.g. any
# float32 SDXL U-Net): {"weight_map": {name: shard file}} beside <stem>-0000k-of-0000n.safetensors
WEIGHT_INDEX_NAMES = tuple(n + ".index.json" for n in WEIGHT_NAMES)
# the pickle forms diffusers saved before safetensors (2022-era fine-tunes' folders), which its from_pretrained still
# loads: read with torch.load(weights_only=True) only, and only where no safetensors file is there
PICKLE_WEIGHT_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
PICKLE_INDEX_NAMES = tuple(n + ".index.json" for n in PICKLE_WEIGHT_NAMES)


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
    """Load a safetensors file, or the shards a `.safetensors.index.json` lists, with an error that names the file
    if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith((".safetensors.index.json", ".bin.index.json")):
        return load_shards(path, device)
    if path.suffix == ".bin":
        return _load_pickled_tensors(path, device)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise unreadable_weights(path, e) from None


def _load_pickled_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, through the checkpoint reader's torch.load(weights_only=True) (a pickle that needs more
    than tensors is refused, naming what it needs)."""
    from imagine.loading.single_file import read_weights_file

    state = read_weights_file(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (names to tensors), as diffusers' save_pretrained "
                         f"writes one; found {type(state).__name__}")
    return {k: v.to(device) for k, v in state.items()}


def unreadable_weights(path: str | os.PathLike, error: BaseException) -> ValueError:
    """The error for a weights file its reader refused (a cut download, a disk error): it names the file and
    what to do, in place of the reader's own message from deep inside safetensors or torch."""
    kind = "safetensors" if Path(path).suffix == ".safetensors" else "weights"
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return ValueError(f"{path} is not a readable {kind} file ({detail}); it may be truncated or corrupt - "
                      "re-download or re-save it")


def load_shards(index: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the shards a safetensors index (`weight_map`: name -> shard file beside it) lists, every
    name checked to be in the shard it is listed in (a shard from another save would load silently wrong)."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a safetensors shard index, {{\"weight_map\": {{weight name: shard "
                         "file}}, as diffusers' and transformers' save_pretrained write it; found no such weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        kind = ".bin" if index.name.endswith(".bin.index.json") else ".safetensors"
        if Path(shard).name != shard or not shard.endswith(kind):  # (no file outside the folder)
            raise ValueError(f"{index}: lists the shard {shard!r}; expected a {kind} file name in {index.parent}")
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(f"{index}: its shard {shard} is not in {index.parent}; the download may be "
                                    "incomplete")
        part = load_tensors(index.parent / shard, device)
        lacking = sorted(k for k, v in weight_map.items() if v == shard and k not in part)
        if lacking:
            raise ValueError(f"{index.parent / shard} lacks {', '.join(lacking[:3])}"
                             + (f" ... ({len(lacking)} in all)" if len(lacking) > 3 else "")
                             + f", which {index.name} lists in it; the shards are from another save")
        tensors.update(part)
    return tensors


def find_weights(folder: str | os.PathLike) -> Path:
    """A component folder's weights: its safetensors file, else the index of its safetensors shards, else (an old
    save) its .bin pickle or the index of its .bin shards, as diffusers' from_pretrained prefers them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    names = WEIGHT_NAMES + WEIGHT_INDEX_NAMES + PICKLE_WEIGHT_NAMES + PICKLE_INDEX_NAMES
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())
    variants = [n for n in found if n.startswith(tuple(n.split(".")[0] + "." for n in WEIGHT_NAMES))
                and n.endswith((".safetensors", ".bin"))]
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of {', '.join(names)}; found {found or 'nothing'}"
        + (f" ({variants[0]} is a variant's file, e.g. fp16: rename it to "
           f"{'diffusion_pytorch_model' if variants[0].startswith('diffusion') else 'model'}"
           f"{Path(variants[0]).suffix} to load it)" if variants else ""))


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


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    # (nn.init's random fills, called as functions or as Tensor methods, do nothing: the tensor is given back)
    FILLS = frozenset({torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.trunc_normal_,
                       torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_,
                       torch.nn.init.xavier_normal_, torch.nn.init.orthogonal_, torch.Tensor.uniform_,
                       torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def without_random_init() -> torch.overrides.TorchFunctionMode:
    """A context in which modules are built without drawing their random initial weights (nn.init's random fills
    skipped; the parameters hold whatever memory they were given), for a model whose every weight is loaded next:
    the draws would be thrown away, and they are most of a small model's loading time (MiniLM's 30522 x 384 word
    table alone). Only this thread is affected (torch's function modes are per thread); not for training from
    scratch."""
    return _NoRandomInit()


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
    wrong = sorted((k, tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
                   if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise misfit_error(source, type(module).__name__, layout, missing, unexpected, wrong)
    module.load_state_dict(state, strict=not kept, assign=assign)
    return kept


def misfit_error(source: str, class_name: str, layout: str, missing, unexpected, wrong) -> ValueError:
    """The error for weights that do not fit a module: the keys missing from them, those it has no place for, and
    the (key, shape in the weights, shape in the module) that disagree; a few of each."""
    def show(keys):
        keys = list(keys)
        return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if wrong:
        parts.append("shape mismatches: " + show(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in wrong))
    return ValueError(f"weights from {source} do not fit {class_name} {layout}: " + "; ".join(parts))


# transformers' weight files in a model folder, in the order it looks for them
TRANSFORMERS_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                             "pytorch_model.bin.index.json")


def load_transformers_model(model_cls, folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """`model_cls.from_pretrained(folder)` (a transformers model class), offline and strict.

    transformers fills a weight the file lacks, or one whose shape disagrees with config.json, with random
    values and only logs a report: the model would load and compute silently wrong. Here the keys it reports
    missing, unexpected or misshapen make a ValueError (as `load_state_into` words it for our own modules),
    and a weights file its readers refuse (truncated, corrupt) one that names the file. `position_ids`, a
    buffer older transformers saved and newer ones rebuild from the config, is no weight and is let pass."""
    from safetensors import SafetensorError

    folder = Path(folder)
    read_config(folder)  # without a config.json transformers would build its default model around the weights
    weights = next((folder / n for n in TRANSFORMERS_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(TRANSFORMERS_WEIGHT_NAMES)}; "
                                f"found {found}")
    try:
        # ignore_mismatched_sizes: report a misshapen weight in the loading info (checked below) instead of
        # raising transformers' RuntimeError that points at its log
        model, info = model_cls.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                ignore_mismatched_sizes=True,
                                                **({} if dtype is None else {"dtype": dtype}))
    except FileNotFoundError:
        raise
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        # (what safetensors and torch.load raise for a damaged file, or a pickle weights_only refuses; a sharded
        # folder's error is one shard's)
        raise unreadable_weights(f"{weights}{' (one of its shards)' if weights.suffix == '.json' else ''}", e) from None

    def real(keys):
        return sorted(k for k in keys if not k.endswith("position_ids"))
    missing, unexpected = real(info.get("missing_keys", ())), real(info.get("unexpected_keys", ()))
    wrong = sorted(info.get("mismatched_keys", ()))
    if missing or unexpected or wrong:
        raise misfit_error(str(weights), model_cls.__name__, f"as configured in {folder / 'config.json'}", missing,
                           unexpected, wrong)
    if info.get("error_msgs"):
        raise ValueError(f"weights from {weights} did not load into {model_cls.__name__}: "
                         + "; ".join(map(str, info["error_msgs"][:3])))
    return model
