"""`imagine train vae|diffusion --config run.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imagine.train.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["vae", "diffusion"], help="which model to train")
    p.add_argument("--config", "-c", help="the run's YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--output", "-o", help="run folder (checkpoints, samples, logs, and the trained model in model/)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--export-only", action="store_true",
                   help="write model/ from the latest checkpoint (EMA weights) without training further")


def _heldout_split(dataset, n_eval: int):
    """Hold out the last `n_eval` records (for PSNR); the rest is trained on."""
    n = len(dataset)
    n_eval = min(n_eval, max(1, n // 10)) if n > 1 else 0
    train = torch.utils.data.Subset(dataset, range(n - n_eval))
    train.skipped = getattr(dataset, "skipped", {})
    return train, torch.utils.data.Subset(dataset, range(n - n_eval, n))


def _stack_images(ds) -> torch.Tensor | None:
    items = [ds[i] for i in range(len(ds))]
    imgs = [it["image"] for it in items if "image" in it]
    return torch.stack(imgs) if imgs else None


def run(args) -> dict:
    from imagine.train.data import build_dataset
    from imagine.train.loop import run_training

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output or cfg.get("output") or f"runs/{args.what}")
    data_cfg = cfg.setdefault("data", {"type": "shapes"})
    n_eval = int(data_cfg.get("eval_count", 64))
    if args.what == "vae":
        from imagine.train.vae_task import VAETask

        dataset = build_dataset(data_cfg, require_captions=False)
        if data_cfg.get("type", "shapes") == "shapes":
            eval_ds = build_dataset({**data_cfg, "length": n_eval, "seed": int(data_cfg.get("seed", 0)) + 7919})
        else:
            dataset, eval_ds = _heldout_split(dataset, n_eval)
        task = VAETask(cfg, _stack_images(eval_ds))
    else:
        from imagine.train.diffusion_task import DiffusionTask

        dataset = build_dataset(data_cfg)
        task = DiffusionTask(cfg, dataset_len=len(dataset))
        if data_cfg.get("type", "shapes") == "shapes" and cfg.get("cache_text", True):
            from imagine.data.shapes import all_captions

            task.precompute_text(all_captions("train") + [""])
    result = run_training(cfg, task, dataset, out, resume=args.resume or args.export_only,
                          export_only=args.export_only)
    return result
