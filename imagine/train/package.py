"""Package a trained model folder for shipping: weights stored in fp16 (half the bytes; they load
back into fp32 modules), configs and model_index.json copied, sizes reported. Or carry a training
checkpoint to another session or machine.

    python -m imagine.train.package runs/shapes-ldm/model imagine/weights/default
    python -m imagine.train.package --checkpoint runs/shapes-ldm/checkpoints/step-N DIR            # exact
    python -m imagine.train.package --checkpoint --compact runs/shapes-ldm/checkpoints/step-N DIR  # small
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
from pathlib import Path

import torch

from imagine.models import io


def package_model(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> int:
    """Copy a model folder to `dst`, converting every safetensors file's float tensors to `dtype`.
    Returns the total size in bytes. `dst` is replaced whole (written beside it, then renamed)."""
    src = Path(src)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is not a model folder (no model_index.json)")
    return _copy_converting(src, Path(dst), dtype)


def package_checkpoint(src: str | Path, dst: str | Path, compact: bool = False,
                       dtype: torch.dtype = torch.float16) -> int:
    """A training checkpoint carried to another session or machine, so that a run goes on there with
    `--resume-from dst`. Returns the size in bytes; `dst` is replaced whole (written beside it, then renamed).

    By default the checkpoint is copied as it is (fp32 weights and EMA, every optimizer's AdamW moments, data
    position, RNG states, step): the resumed run gives the same weights, bit for bit, as one never stopped.

    `compact`: about a quarter of the size, and the run does NOT go on exactly: weights and EMA stored in `dtype`
    (they load back into the fp32 modules: one rounding, 2^-11 relative in fp16, per carry), every optimizer's
    moments left out (float16 would flush the small second moments to 0). A resume from it warns, restarts AdamW's
    moments from zero and warms the learning rate up again over train.warmup_steps from its step (AdamW's first
    steps would otherwise move every weight by about lr); data position and RNG states are kept."""
    src = Path(src)
    if not (src / "state.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder (no state.json)")
    if not compact:
        return _copy_converting(src, Path(dst), None)
    note = {"packaged": {"form": "compact", "dtype": str(dtype).replace("torch.", ""),
                         "note": "no optimizer state: a resume restarts AdamW's moments and warms the lr up again"}}
    return _copy_converting(src, Path(dst), dtype, skip=("optimizer.safetensors", "opt_*.safetensors"), state=note)


def _copy_converting(src: Path, dst: Path, dtype: torch.dtype | None, skip: tuple[str, ...] = (),
                     state: dict | None = None) -> int:
    """Copy `src` to `dst` (written beside it, then renamed); float tensors converted to `dtype` (None: every
    file copied byte for byte); `state`: entries added to the top-level state.json."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for f in sorted(src.rglob("*")):
        if f.is_dir() or any(fnmatch.fnmatch(f.name, pattern) for pattern in skip):
            continue
        out = tmp / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors" and dtype is not None:  # only float tensors change (RNG states and counters are integers)
            t = io.load_tensors(f)
            io.save_tensors(out, {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()},
                            metadata={"format": "pt", "stored_dtype": str(dtype)})
        elif state and f.relative_to(src) == Path("state.json"):
            io.atomic_write_json(out, {**json.loads(f.read_text()), **state})
        else:
            shutil.copy2(f, out)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m imagine.train.package", description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--checkpoint", action="store_true",
                   help="src is a training checkpoint: copy it whole, so that --resume-from dst continues the run "
                        "exactly (fp32 weights and EMA, optimizer moments, data position, RNG states)")
    p.add_argument("--compact", action="store_true",
                   help="with --checkpoint: weights and EMA in --dtype, no optimizer state (about a quarter of the "
                        "size); a resume from it is NOT exact: AdamW restarts, the lr warms up again")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="a model folder's weights, or a --compact checkpoint's (default fp16)")
    a = p.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    if a.compact and not a.checkpoint:
        p.error("--compact goes with --checkpoint")
    if a.checkpoint:
        size = package_checkpoint(a.src, a.dst, compact=a.compact, dtype=dtype)
    else:
        size = package_model(a.src, a.dst, dtype)
    print(f"{a.dst}: {size / 2**20:.1f} MiB" + (" (compact: a resume from it is not exact)" if a.compact else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
