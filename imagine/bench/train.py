"""Training throughput against a plain diffusers training step: `imagine bench train`.

The same U-Net (ours, and diffusers' UNet2DConditionModel given a copy of its weights) trains on
the same pre-made batch (latents and text states made once, so data loading decides nothing):

  imagine step     the step of our trainer (imagine/train/loop.py): DiffusionTask.loss under
                   accelerator.autocast() (caption dropout from the text cache, t and eps drawn
                   for the global batch, q_sample, the U-Net through the prepared module, MSE),
                   accelerator.backward, gradient clipping at 1.0, AdamW.
  diffusers step   the body of diffusers' examples/text_to_image/train_text_to_image.py minus data
                   loading and the frozen encoders: randn_like noise, randint timesteps,
                   DDPMScheduler.add_noise, unet(...).sample, F.mse_loss, accelerator.backward,
                   clip_grad_norm_(1.0), AdamW, lr_scheduler.step, zero_grad.
  imagine loop     run_training itself for a few steps over an in-memory dataset of the same
                   latents: batching, logging, the EMA update and one checkpoint at the end.
  imagine compiled (with --compile) the imagine step with the prepared U-Net through
                   torch.compile, as `train.compile: true` runs it; the compile falls in the
                   untimed warm-up steps.

Both steps go through one accelerate Accelerator with the precision under test (fp32: "no"; bf16:
autocast to bfloat16, as `train.mixed_precision: bf16`). accelerate allows one precision a
process, so a round is one subprocess per precision, the precisions alternating from round to
round; within a round the sides alternate, their order reversed every round, so that the load of
a shared machine falls on all alike. The figure is the median over rounds of samples per CPU
second (one thread: the time the process ran, not the time it waited for a core) and per wall
second. Weights are random (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # configs/shapes-ldm.yaml's U-Net on the shapes VAE's 4x16x16 latents, MiniLM states (32 x 384).
    "shapes": {"batch": 32, "latent": 16, "text_len": 32, "model": {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128, 192],
        "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"] * 3,
        "up_block_types": ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": [2, 4, 6], "cross_attention_dim": 384,
        "norm_num_groups": 32}},
    # SD 1.5's layout at a quarter of its channels (so 16 norm groups) on 32x32 latents, CLIP-shaped states.
    "small": {"batch": 8, "latent": 32, "text_len": 77, "model": {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": [80, 160, 320, 320],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 16}},
}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
SIDES = ("imagine_step", "diffusers_step", "imagine_loop")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="shapes", help=f"comma-separated: {', '.join(MODELS)} (default: shapes)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 for shapes, 8 for small)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each side runs once a round")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before each round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--compile", action="store_true",
                   help="also time the imagine step compiled with torch.compile (train.compile: true)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # model:precision:round, in a subprocess


# ---------------------------------------------------------------------------------------------
# One precision, in its own process
# ---------------------------------------------------------------------------------------------
class _CachedStatesOnly:
    """The text encoder of a run whose states are all in the text cache: only its width is read."""

    def __init__(self, dim: int):
        self.dim = dim

    def encode(self, captions):
        raise RuntimeError(f"bench: captions {captions[:3]} are not in the text cache")


class _LatentSet(torch.utils.data.Dataset):
    """Pre-made latents with captions, as the trainer's datasets answer (latents in "image"; the
    task has no VAE, so they are x_0 as they are)."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"image": self.latents[i], "caption": f"caption {i}", "index": i}


def _task_config(spec: dict, seed: int, mp: str, threads: int, steps: int, batch: int) -> dict:
    return {
        "seed": seed, "data": {"resolution": spec["latent"]},
        "schedule": {"kind": "scaled_linear", "num_train_timesteps": 1000}, "prediction_type": "epsilon",
        "caption_dropout": 0.1, "cache_text": True, "model": spec["model"],
        "train": {"batch_size": batch, "lr": 1e-4, "weight_decay": 1e-2, "max_steps": steps, "warmup_steps": 0,
                  "lr_schedule": "constant", "grad_clip": 1.0, "mixed_precision": mp, "checkpoint_every": 10 ** 9,
                  "log_every": 1, "progress": False, "tensorboard": False, "threads": threads,
                  "keep_checkpoints": 1},
    }


def _make_task(cfg: dict, states: torch.Tensor, empty: torch.Tensor):
    from imagine.train.diffusion_task import DiffusionTask

    task = DiffusionTask(cfg, text_encoder=_CachedStatesOnly(states.shape[-1]))
    task.text_cache = {f"caption {i}": (states[i], None) for i in range(len(states))}
    task.text_cache[""] = (empty, None)
    return task


def worker(model: str, precision: str, first_round: int, args) -> dict:
    import diffusers
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from imagine.train.loop import run_training

    torch.set_num_threads(args.threads)
    spec = MODELS[model]
    B = args.batch or spec["batch"]
    mp = PRECISIONS[precision]
    acc = Accelerator(mixed_precision=mp, cpu=True)
    cfg = _task_config(spec, 0, mp, args.threads, args.steps, B)

    g = torch.Generator().manual_seed(1)
    c = spec["model"]
    latents = torch.randn(B, c["in_channels"], spec["latent"], spec["latent"], generator=g)
    states = torch.randn(B, spec["text_len"], c["cross_attention_dim"], generator=g)
    empty = torch.randn(spec["text_len"], c["cross_attention_dim"], generator=g)

    batch = {"image": latents, "caption": [f"caption {i}" for i in range(B)], "index": torch.arange(B),
             "slot": torch.arange(B), "global_batch": B}

    def our_step(compiled: bool):
        """run_training's step (imagine/train/loop.py), for one micro-batch, on a task of its own."""
        task = _make_task(cfg, states, empty)
        params = [p for p in task.trainable.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
        model, opt = acc.prepare(task.step_module(), opt)
        task.bind(torch.compile(model) if compiled else model, acc)

        def step_fn(step: int) -> float:
            opt.zero_grad(set_to_none=True)
            with acc.autocast():
                loss, _ = task.loss(batch, step)
            acc.backward(loss)
            acc.clip_grad_norm_(params, 1.0)
            opt.step()
            return float(loss.detach())
        return task.trainable, step_fn

    # Ours: the trainer's task and step.
    ours, imagine_step = our_step(compiled=False)
    n_params = sum(p.numel() for p in ours.parameters())
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in ours.config.to_dict().items()
                                            if k != "num_attention_heads"})
    ref.load_state_dict(ours.state_dict(), strict=True)   # the same weights, diffusers' parameter names
    ref.train()

    # Theirs: train_text_to_image.py's step.
    noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                              beta_schedule="scaled_linear")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=ref_opt)
    ref_model, ref_opt, lr_scheduler = acc.prepare(ref, ref_opt, lr_scheduler)

    def diffusers_step(step: int) -> float:
        with acc.accumulate(ref_model):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,)).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            pred = ref_model(noisy, timesteps, states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(ref_model.parameters(), 1.0)
            ref_opt.step()
            lr_scheduler.step()
            ref_opt.zero_grad()
        return float(loss.detach())

    steps_fn = {"imagine_step": imagine_step, "diffusers_step": diffusers_step}
    if args.compile:
        steps_fn["imagine_compiled"] = our_step(compiled=True)[1]
    sides = _sides(args)
    tmp = tempfile.TemporaryDirectory(prefix="imagine-bench-train-")

    def imagine_loop(r: int, steps: int) -> tuple[float, float]:
        # The whole trainer: a fresh task (same weights: same seed) over the same latents.
        loop_task = _make_task(cfg, states, empty)
        run_cfg = {**cfg, "train": {**cfg["train"], "max_steps": steps}}
        t0, c0 = time.perf_counter(), time.process_time()
        run_training(run_cfg, loop_task, _LatentSet(latents), Path(tmp.name) / f"round{r}-{steps}", accelerator=acc)
        return time.perf_counter() - t0, time.process_time() - c0

    for name, fn in steps_fn.items():
        for i in range(args.warmup):
            fn(i)
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(first_round, first_round + args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            if side == "imagine_loop":
                # Setup, the final checkpoint and the export cost the same in a run of 1 step and
                # one of 1 + steps; the difference is what `steps` steps of the loop cost.
                w1, c1 = imagine_loop(r, 1)
                wn, cn = imagine_loop(r, 1 + args.steps)
                dw, dc = wn - w1, cn - c1
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    steps_fn[side](args.warmup + r * args.steps + i)
                dw, dc = time.perf_counter() - t0, time.process_time() - c0
            wall[side].append(args.steps * B / dw)
            cpu[side].append(args.steps * B / dc)
            print(f"  [{model} {precision}] round {r + 1}: {side:15s} {cpu[side][-1]:7.1f} samples per CPU second, "
                  f"{wall[side][-1]:7.1f} per wall second", file=sys.stderr, flush=True)
    tmp.cleanup()
    return {"model": model, "precision": precision, "batch": B, "params": n_params,
            "latent": [c["in_channels"], spec["latent"], spec["latent"]], "text": [spec["text_len"],
                                                                                   c["cross_attention_dim"]],
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
            "all_cpu": cpu, "all_wall": wall}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _sides(args) -> tuple[str, ...]:
    return SIDES + (("imagine_compiled",) if getattr(args, "compile", False) else ())


def _check(args) -> tuple[list[str], list[str]]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; valid: {', '.join(PRECISIONS)}")
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.batch is not None and args.batch < 1:
        raise ValueError("--batch must be at least 1")
    return models, precisions


def run(args) -> int:
    if args.worker:
        model, precision, first = args.worker.split(":")
        print(json.dumps(worker(model, precision, int(first), args)))
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError("imagine bench train compares against diffusers: pip install diffusers") from e
    models, precisions = _check(args)
    # A round is one subprocess per precision (accelerate fixes the precision for the life of a
    # process), the precisions alternating too, so that fp32 and bf16 see the same machine load.
    results = []
    for model in models:
        print(f"{model}: {args.rounds} rounds of {args.steps} steps per side, {args.threads} thread(s); "
              f"precisions {', '.join(precisions)}", flush=True)
        merged: dict[str, dict] = {}
        for r in range(args.rounds):
            for precision in (precisions if r % 2 == 0 else precisions[::-1]):
                cmd = [sys.executable, "-m", "imagine.bench.train", "--worker", f"{model}:{precision}:{r}",
                       "--rounds", "1", "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads)] + (["--batch", str(args.batch)] if args.batch else []) \
                    + (["--compile"] if args.compile else [])
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"bench worker {model}:{precision} failed (exit {proc.returncode})")
                one = json.loads(proc.stdout.strip().splitlines()[-1])
                if precision not in merged:
                    merged[precision] = {**one, "rounds": 0, "all_cpu": {s: [] for s in _sides(args)},
                                         "all_wall": {s: [] for s in _sides(args)}}
                m = merged[precision]
                m["rounds"] += 1
                for s in _sides(args):
                    m["all_cpu"][s] += one["all_cpu"][s]
                    m["all_wall"][s] += one["all_wall"][s]
        for precision in precisions:
            m = merged[precision]
            m["samples_per_cpu_s"] = {s: statistics.median(v) for s, v in m["all_cpu"].items()}
            m["samples_per_s"] = {s: statistics.median(v) for s, v in m["all_wall"].items()}
            results.append(m)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "cpus": os.cpu_count(),
                                               "load_avg": os.getloadavg()}, indent=2))
    return 0


def table(results: list[dict]) -> str:
    """Markdown: samples per CPU second (and per wall second) per side, ours against diffusers,
    and bf16 against fp32. With one thread on a shared machine, CPU time is the steadier measure:
    it does not count the time the scheduler gave to other processes."""
    by = {(r["model"], r["precision"]): r for r in results}
    compiled = any("imagine_compiled" in r["samples_per_cpu_s"] for r in results)
    lines = ["| model | batch | precision | imagine step | diffusers step | imagine / diffusers | imagine loop |"
             + (" imagine compiled | compiled / diffusers |" if compiled else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if compiled else "")]
    for r in results:
        s, w = r["samples_per_cpu_s"], r["samples_per_s"]
        row = (f"| {r['model']} ({r['params'] / 1e6:.1f} M) | {r['batch']} | {r['precision']} | "
               f"{s['imagine_step']:.3g} ({w['imagine_step']:.3g}) | "
               f"{s['diffusers_step']:.3g} ({w['diffusers_step']:.3g}) | "
               f"{s['imagine_step'] / s['diffusers_step']:.2f}x ({w['imagine_step'] / w['diffusers_step']:.2f}x) | "
               f"{s['imagine_loop']:.3g} ({w['imagine_loop']:.3g}) |")
        if compiled:
            c, cw = s.get("imagine_compiled"), w.get("imagine_compiled")
            row += (f" {c:.3g} ({cw:.3g}) | {c / s['diffusers_step']:.2f}x ({cw / w['diffusers_step']:.2f}x) |"
                    if c else " - | - |")
        lines.append(row)
    lines.append("")
    lines.append("samples per CPU second (in brackets: per wall-clock second), median over rounds")
    for (model, precision), r in by.items():
        if precision == "bf16" and (model, "fp32") in by:
            f, b = by[(model, "fp32")]["samples_per_cpu_s"], r["samples_per_cpu_s"]
            lines.append(f"{model}: bf16 / fp32 = {b['imagine_step'] / f['imagine_step']:.2f}x (imagine step), "
                         f"{b['diffusers_step'] / f['diffusers_step']:.2f}x (diffusers step), "
                         f"{b['imagine_loop'] / f['imagine_loop']:.2f}x (imagine loop)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="imagine bench train", description=__doc__.strip().splitlines()[0])
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
