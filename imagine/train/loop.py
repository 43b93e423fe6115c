"""The training loop shared by the VAE and the diffusion model.

One process or several through Hugging Face accelerate (DDP; `accelerate launch
--num_processes N`, gloo on CPU): the config's `batch_size` is the global batch, each process
takes its slice, so N processes follow the same curve as one. AdamW, linear warm-up then cosine
decay, gradient clipping and accumulation, EMA, bf16 autocast on CPU (fp16/bf16 on GPU), atomic
checkpoints with exact resume, a tqdm bar with loss, it/s and ETA, TensorBoard scalars and a
sample grid every N steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imagine import __version__
from imagine.models import io
from imagine.train import checkpoint as ckpt
from imagine.train.config import check_keys
from imagine.train.data import GlobalBatches, SkipCounter, collate

log = logging.getLogger(__name__)

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "max_steps": 1000,
    "warmup_steps": 100, "lr_schedule": "cosine", "min_lr_ratio": 0.0, "grad_clip": 1.0, "grad_accum": 1,
    "mixed_precision": "no", "ema_decay": 0.9999, "ema_warmup": True, "checkpoint_every": 500,
    "keep_checkpoints": 2, "sample_every": 0, "log_every": 10, "eval_every": 0, "num_workers": 0,
    "deterministic": False, "threads": 0, "progress": True, "tensorboard": True, "max_minutes": 0,
}


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Linear warm-up then constant or cosine decay (Loshchilov & Hutter 2017) to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown train.lr_schedule {kind!r}; valid: 'cosine', 'constant'")
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class Task:
    """What differs between the VAE and the diffusion model. The loop owns everything else."""

    name = "task"
    trainable: torch.nn.Module
    extra_optimizers: dict[str, torch.optim.Optimizer] = {}

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_backward(self, batch: dict, step: int) -> dict[str, float]:
        return {}

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}

    def sample_grid(self, model: torch.nn.Module, path: Path, step: int) -> None:
        pass

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        return {}


def run_training(cfg: dict, task: Task, dataset, out_dir: Path, resume: bool = False, accelerator=None,
                 export_only: bool = False) -> dict:
    tc = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    check_keys(tc, set(TRAIN_DEFAULTS), "train")
    out_dir = Path(out_dir)
    if accelerator is None:
        from accelerate import Accelerator

        mp = tc["mixed_precision"]
        if mp not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16'; got {mp!r}")
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if tc["threads"]:
        torch.set_num_threads(int(tc["threads"]))
    if tc["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        io.atomic_write_json(out_dir / "config.json", {"imagine_version": __version__, **cfg})

    model = task.trainable
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    from imagine.train.ema import EMA

    ema = EMA(model, tc["ema_decay"], tc["ema_warmup"]) if tc["ema_decay"] > 0 else None
    model, opt = accelerator.prepare(model, opt)
    batches = GlobalBatches(len(dataset), tc["batch_size"], int(cfg.get("seed", 0)),
                            accelerator.process_index, accelerator.num_processes)
    skipped = SkipCounter(getattr(dataset, "skipped", {}))
    step = 0
    gens = task.generators()
    if resume:
        last = ckpt.latest_checkpoint(out_dir)
        if last is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", out_dir)
        else:
            mods = {"model": accelerator.unwrap_model(model), **task.checkpoint_modules()}
            if ema is not None:
                mods["ema"] = ema
            meta = ckpt.load_checkpoint(last, modules=mods, optimizer=opt, generators=gens)
            for name, o in task.extra_optimizers.items():
                if name in meta.get("extra_optimizers", {}):
                    o.load_state_dict(ckpt.unflatten_optimizer(
                        io.load_tensors(last / f"opt_{name}.safetensors"), meta["extra_optimizers"][name]))
            step = meta["step"]
            batches.position = meta["data_position"]
            skipped.update(meta.get("skipped", {}))
            if main:
                print(f"resumed from {last} at step {step}")

    writer = None
    if main and tc["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard scalars")

    def save(step_now: int):
        if not main:
            return
        mods = {"model": accelerator.unwrap_model(model), **task.checkpoint_modules()}
        if ema is not None:
            mods["ema"] = ema
        extra = {}
        for name, o in task.extra_optimizers.items():
            t, m = ckpt.flatten_optimizer(o.state_dict())
            extra[name] = (t, m)
        path = ckpt.save_checkpoint(out_dir, step_now, modules=mods, optimizer=opt,
                                    state={"data_position": batches.position, "config": cfg,
                                           "skipped": dict(skipped),
                                           "extra_optimizers": {k: v[1] for k, v in extra.items()}},
                                    generators=gens, keep=tc["keep_checkpoints"])
        for name, (t, _) in extra.items():
            io.save_tensors(path / f"opt_{name}.safetensors", t)

    total = int(tc["max_steps"])
    if export_only:
        if step == 0:
            raise ValueError(f"--export-only: no checkpoint in {out_dir}/checkpoints to export")
        total = step
    bar = tqdm(total=total, initial=step, disable=not (main and tc["progress"]), desc=f"train {task.name}",
               dynamic_ncols=True)
    t_start, losses, history = time.time(), [], []
    deadline = t_start + 60 * float(tc["max_minutes"]) if tc["max_minutes"] else None
    model.train()
    while step < total:
        for g in opt.param_groups:
            g["lr"] = tc["lr"] * lr_factor(step, tc["warmup_steps"], total, tc["lr_schedule"], tc["min_lr_ratio"])
        logs: dict[str, float] = {}
        opt.zero_grad(set_to_none=True)
        for micro in range(tc["grad_accum"]):
            idx = batches.next()
            batch = collate([dataset[i] for i in idx], skipped)
            if batch is None:
                continue
            with accelerator.autocast():
                loss, parts = task.loss(batch, step)
            accelerator.backward(loss / tc["grad_accum"])
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / tc["grad_accum"]
        if tc["grad_clip"]:
            logs["grad_norm"] = float(accelerator.clip_grad_norm_(params, tc["grad_clip"]))
        opt.step()
        logs.update(task.after_backward(batch, step))
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        step += 1
        losses.append(logs.get("loss", float("nan")))
        bar.update(1)
        if step % tc["log_every"] == 0 or step == total:
            mean_loss = sum(losses[-tc["log_every"]:]) / len(losses[-tc["log_every"]:])
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            history.append({"step": step, "loss": mean_loss, **{k: v for k, v in logs.items() if k != "loss"}})
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
                for k, v in logs.items():
                    if k != "loss":
                        writer.add_scalar(f"train/{k}", v, step)
            if main:
                with open(out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
        eval_model = ema.model if ema is not None else accelerator.unwrap_model(model)
        if main and tc["eval_every"] and step % tc["eval_every"] == 0:
            metrics = task.evaluate(eval_model, step)
            if metrics:
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(f"eval/{k}", v, step)
        if main and tc["sample_every"] and step % tc["sample_every"] == 0:
            task.sample_grid(eval_model, out_dir / "samples" / f"step-{step:08d}.png", step)
        stop_now = deadline is not None and time.time() > deadline
        if step % tc["checkpoint_every"] == 0 or step == total or stop_now:
            save(step)
        if stop_now:
            if main:
                print(f"train.max_minutes reached at step {step}: checkpoint written; continue with --resume")
            break
    bar.close()
    accelerator.wait_for_everyone()
    result = {"step": step, "seconds": time.time() - t_start, "skipped": dict(skipped), "history": history}
    if main:
        final = ema.model if ema is not None else accelerator.unwrap_model(model)
        metrics = task.evaluate(final, step)
        result["eval"] = metrics
        if step >= total:
            task.export(final, out_dir / "model")
            result["model"] = str(out_dir / "model")
        print(f"skipped records: {skipped.report()}")
        if metrics:
            print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if writer is not None:
        writer.close()
    return result
