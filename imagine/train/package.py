"""Package a trained model folder for shipping: weights stored in fp16 (half the bytes; they load
back into fp32 modules), configs and model_index.json copied, sizes reported.

    python -m imagine.train.package runs/shapes-ldm/model imagine/weights/default
    python -m imagine.train.package --checkpoint runs/shapes-ldm/checkpoints/step-N training/shapes-ldm/checkpoint
"""

from __future__ import annotations

import argparse
import fnmatch
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


def package_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> int:
    """A training checkpoint made small enough to commit, so a run goes on in another session:
    the weights and the EMA stored in `dtype` (they load back into the fp32 modules, and training
    goes on in fp32: one rounding, 2^-11 relative in fp16, per carry), data position and RNG
    states as they are, AdamW's moments left out, every optimizer's (a resume restarts them, with a warning: float16
    would flush the small second moments to 0 and blow up the first updates)."""
    src = Path(src)
    if not (src / "state.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder (no state.json)")
    return _copy_converting(src, Path(dst), dtype, skip=("optimizer.safetensors", "opt_*.safetensors"))


def _copy_converting(src: Path, dst: Path, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for f in sorted(src.rglob("*")):
        if f.is_dir() or any(fnmatch.fnmatch(f.name, pattern) for pattern in skip):
            continue
        out = tmp / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":  # only float tensors change (RNG states and counters are integers)
            t = io.load_tensors(f)
            io.save_tensors(out, {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()},
                            metadata={"format": "pt", "stored_dtype": str(dtype)})
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
                   help="src is a training checkpoint: carry it without the optimizer (package_checkpoint)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    a = p.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    size = (package_checkpoint if a.checkpoint else package_model)(a.src, a.dst, dtype)
    print(f"{a.dst}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
