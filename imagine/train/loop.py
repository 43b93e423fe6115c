"""The training loop shared by the VAE and the diffusion model.

One process or several through Hugging Face accelerate (DDP; `accelerate launch
--num_processes N`, gloo on CPU): the config's `batch_size` is the global batch, each process
takes its slice, so N processes follow the same curve as one. AdamW, linear warm-up then cosine
decay, gradient clipping and accumulation, EMA, bf16 autocast on CPU (fp16/bf16 on GPU), atomic
checkpoints with exact resume, a tqdm bar with loss, it/s and ETA, TensorBoard scalars and a
sample grid every N steps. Ctrl-C (SIGINT) or SIGTERM ends the step under way, writes a checkpoint and stops, as
train.max_minutes does (a second one stops at once); `--resume` continues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imagine import __version__
from imagine.models import io
from imagine.train import checkpoint as ckpt
from imagine.train.config import as_int, check_keys
from imagine.train.data import SkipCounter, collate, make_batches

log = logging.getLogger(__name__)

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "max_steps": 1000,
    "warmup_steps": 100, "lr_schedule": "cosine", "min_lr_ratio": 0.0, "grad_clip": 1.0, "grad_accum": 1,
    "mixed_precision": "no", "ema_decay": 0.9999, "ema_warmup": True, "checkpoint_every": 500,
    "keep_checkpoints": 2, "sample_every": 0, "log_every": 10, "eval_every": 0, "num_workers": 0,
    "deterministic": False, "threads": 0, "progress": True, "tensorboard": True, "max_minutes": 0,
    "compile": False,
}


# the train options' kinds: numbers (a YAML "1e-4" read as a string is taken), counts, switches
_TRAIN_NUMBERS = {"lr": (0.0, False), "weight_decay": (0.0, True), "min_lr_ratio": (0.0, True),
                  "grad_clip": (0.0, True), "ema_decay": (0.0, True), "max_minutes": (0.0, True)}  # (bound, inclusive)
_TRAIN_COUNTS = {"batch_size": 1, "max_steps": 1, "grad_accum": 1, "checkpoint_every": 1, "log_every": 1,
                 "warmup_steps": 0, "keep_checkpoints": 0, "sample_every": 0, "eval_every": 0, "num_workers": 0,
                 "threads": 0}  # (the least value; 0 is "off" or "all" where allowed)
_TRAIN_SWITCHES = ("ema_warmup", "deterministic", "progress", "tensorboard", "compile")


def check_train_options(tc: dict) -> dict:
    """The train section's values checked (a ValueError naming the key and what is valid) and numbers made floats."""
    out = dict(tc)
    for key, (least, inclusive) in _TRAIN_NUMBERS.items():
        v = out[key]
        try:
            if isinstance(v, bool):
                raise ValueError
            v = out[key] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"train.{key} must be a number; got {tc[key]!r}") from None
        if not math.isfinite(v) or not (v >= least if inclusive else v > least):
            raise ValueError(f"train.{key} must be a finite number {'>=' if inclusive else '>'} {least:g}; got "
                             f"{tc[key]!r}")
    for key, least in _TRAIN_COUNTS.items():
        out[key] = as_int(out[key], f"train.{key}", least)   # (YAML's 1e5 taken as 100000, as data's counts)
    for key in _TRAIN_SWITCHES:
        if not isinstance(out[key], bool):
            raise ValueError(f"train.{key} must be true or false; got {out[key]!r}")
    if out["ema_decay"] >= 1 or out["min_lr_ratio"] > 1:
        raise ValueError(f"train.ema_decay must be below 1 and train.min_lr_ratio at most 1; got {out['ema_decay']!r} "
                         f"and {out['min_lr_ratio']!r}")
    betas = out["betas"]
    try:
        betas = out["betas"] = [float(b) for b in betas] if isinstance(betas, (list, tuple)) else None
    except (TypeError, ValueError):
        betas = None
    if not betas or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1) (AdamW's); got {tc['betas']!r}")
    if out["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"unknown train.lr_schedule {out['lr_schedule']!r}; valid: 'cosine', 'constant'")
    from imagine.hardware import resolve_mixed_precision

    mp = resolve_mixed_precision(out["mixed_precision"])   # (a ValueError naming the key and the valid values)
    if mp == "fp16" and not torch.cuda.is_available():
        # accelerate's autocast does nothing for fp16 on a CPU: the run would train in fp32 and say fp16
        raise ValueError("train.mixed_precision fp16 needs a GPU (on a CPU accelerate would run the whole step in "
                         "fp32); use bf16, auto or no")
    return out


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


def rewarm_factor(step: int, since: int | None, warmup: int) -> float:
    """The learning rate's factor while an optimizer whose moments restarted at step `since` warms up again: linear
    over `warmup` steps, as at the start (AdamW's first update is about lr * sign(g) for every weight, whatever
    the gradient's size, so without it a resume from a compact checkpoint jolts every weight by about lr)."""
    if since is None or warmup <= 0 or step < since:
        return 1.0
    return min(1.0, (step - since + 1) / warmup)


def _rewarm_note(tc: dict, step: int) -> str:
    if tc["warmup_steps"] > 0:
        return f"the learning rate warms up again over train.warmup_steps={tc['warmup_steps']} steps from step {step}"
    return "train.warmup_steps is 0, so no warm-up: AdamW's first steps move every weight by about lr"


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run's log.jsonl keeps the lines up to the checkpoint's step: the lines a killed run wrote after
    it (and a line cut by the kill) go, so each step is logged once."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and int(entry["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        io.atomic_write_bytes(path, b"".join(line + b"\n" for line in keep))
        log.info("%s: dropped %d line(s) past step %d (written after the checkpoint resumed from)", path, dropped, step)


def export_atomically(task: "Task", model: torch.nn.Module, folder: Path) -> None:
    """task.export into a temporary folder beside `folder`, then renamed into place: a failure part-way leaves the
    previous `folder` (or none), never a half-written model folder."""
    import shutil

    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    task.export(model, tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


class Task:
    """What differs between the VAE and the diffusion model. The loop owns everything else.

    Under DDP the loss must run through the module the accelerator prepared (its forward is what
    makes the gradients average across processes): the loop hands it to `bind` as `self.model`.
    `step_module()` names that module; by default the trainable network itself.
    """

    name = "task"
    trainable: torch.nn.Module
    extra_optimizers: dict[str, torch.optim.Optimizer] = {}
    model: torch.nn.Module | None = None
    accelerator = None

    def step_module(self) -> torch.nn.Module:
        return self.trainable

    def bind(self, model: torch.nn.Module, accelerator) -> None:
        self.model, self.accelerator = model, accelerator

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

    def new_parameter(self, key: str) -> bool:
        """Whether a checkpoint may lack parameter `key` (see checkpoint.load_checkpoint)."""
        return False

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def resolved_config(self) -> dict:
        """The task's sections with their defaults filled in (stored in every checkpoint beside the config given)."""
        return {}


def global_slots(batch: dict) -> tuple[int, torch.Tensor]:
    """(global batch size, each local sample's slot in the global batch). Per-sample randomness
    (timesteps, noise, caption dropout) is drawn for the whole global batch on every process and
    indexed by slot, so sample j gets the same draws whatever the number of processes."""
    n = len(batch["caption"]) if "caption" in batch else batch["image"].shape[0]
    slot = batch.get("slot")
    if slot is None:
        return n, torch.arange(n)
    return int(batch.get("global_batch", int(slot.max()) + 1)), slot


def _agree(accelerator, flag: bool, how: str) -> bool:
    """The same decision on every process (all: every process says yes; any: one does)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    t = accelerator.reduce(t, "sum")
    return bool(t.item() == accelerator.num_processes) if how == "all" else bool(t.item() > 0)


@contextlib.contextmanager
def stop_signals():
    """While training: SIGINT (Ctrl-C) and SIGTERM set the event this yields instead of killing the run, so the loop
    ends its step and writes a checkpoint; a second signal gets the usual handling (a KeyboardInterrupt, or the end)
    at once. Outside the main thread (where Python takes no handlers) an event that is never set."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        asked.set()
        asked.signal = signal.Signals(signum).name
        for sig, old in previous.items():  # (the next one is handled as before: a second Ctrl-C stops at once)
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield asked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _slice_sizes(accelerator, n: int, has_stand_in: bool) -> list[tuple[int, bool]]:
    """(good records in the slice, has a stand-in record) for each process."""
    if accelerator.num_processes == 1:
        return [(n, has_stand_in)]
    t = torch.tensor([[n, int(has_stand_in)]], dtype=torch.long, device=accelerator.device)
    return [(int(a), bool(b)) for a, b in accelerator.gather(t).tolist()]


def _mean_across(accelerator, logs: dict[str, float], exclude=("grad_norm",)) -> dict[str, float]:
    """Logged values are the global batch's: the mean over processes of the (size-weighted) slice values."""
    if accelerator.num_processes == 1:
        return logs
    keys = sorted(k for k in logs if k not in exclude)
    if keys:
        t = accelerator.reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64,
                                            device=accelerator.device), "mean")
        logs = {**logs, **dict(zip(keys, t.tolist()))}
    return logs


def _sum_across(accelerator, counts: SkipCounter) -> SkipCounter:
    if accelerator.num_processes == 1:
        return SkipCounter(counts)
    import torch.distributed as dist

    gathered = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, dict(counts))
    total = SkipCounter()
    for c in gathered:
        total.update(c)
    return total


def _plain(state: dict) -> dict:
    """A GradScaler's state_dict as JSON (its scale may be a one-element tensor)."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in state.items()}


def _warn_changed(meta: dict, cfg: dict, tc: dict, last: Path) -> None:
    """Warn when the settings the data order and the random draws depend on differ from the checkpoint's: its data
    position counts global batches of its batch size, its permutations and draws come from its seed and data."""
    old_cfg, old_train = meta.get("config"), (meta.get("resolved") or {}).get("train")
    if not isinstance(old_cfg, dict):
        return
    pairs = {"seed": (old_cfg.get("seed", 0), cfg.get("seed", 0))}
    if isinstance(old_train, dict):
        pairs.update({f"train.{k}": (old_train.get(k), tc.get(k)) for k in ("batch_size", "grad_accum")})
    old_data, data = old_cfg.get("data") or {}, cfg.get("data") or {}
    if isinstance(old_data, dict) and isinstance(data, dict):
        pairs.update({f"data.{k}": (old_data.get(k), data.get(k)) for k in sorted(set(old_data) | set(data))
                      if k != "path"})
    changed = [f"{k} {a!r} -> {b!r}" for k, (a, b) in pairs.items() if a != b]
    if changed:
        log.warning("%s was written with other settings (%s): the run goes on from its step, but its data order and "
                    "random draws are not those the run that wrote it would have had", last, "; ".join(changed))


def check_run(cfg: dict, out_dir: Path, resume: bool | Path = False, export_only: bool = False) -> dict:
    """What can be said of a run before its data and model are built: the train section's keys and values (the
    train options with their defaults, numbers made floats, returned; the config's own values made so too), and a
    fresh run into a folder that holds an earlier run's checkpoints (refused: they would mix, and --resume could
    pick either)."""
    check_keys(cfg.get("train", {}), set(TRAIN_DEFAULTS), "train")
    tc = check_train_options({**TRAIN_DEFAULTS, **cfg.get("train", {})})
    cfg["train"] = {k: tc[k] for k in cfg.get("train", {})}  # (YAML's "1e-4" read as the number by every reader)
    earlier = None if resume or export_only else ckpt.latest_checkpoint(Path(out_dir))
    if earlier is not None:
        raise ValueError(f"{out_dir} holds checkpoints of an earlier run (the newest {earlier.name}): --resume "
                         "continues it; give another --output, or remove its checkpoints folder, to start afresh")
    return tc


def run_training(cfg: dict, task: Task, dataset, out_dir: Path, resume: bool | Path = False, accelerator=None,
                 export_only: bool = False) -> dict:
    tc = check_run(cfg, out_dir, resume, export_only)
    out_dir = Path(out_dir)
    if accelerator is None:
        from accelerate import Accelerator

        from imagine.hardware import resolve_mixed_precision

        mp = resolve_mixed_precision(tc["mixed_precision"])
        if tc["mixed_precision"] == "auto":
            print(f"train.mixed_precision auto -> {mp!r} (native bf16 on this machine: "
                  f"{'yes' if mp == 'bf16' else 'no'})", flush=True)
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if tc["threads"]:
        torch.set_num_threads(int(tc["threads"]))
    if tc["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        io.atomic_write_json(out_dir / "config.json", {"imagine_version": __version__, **cfg,
                                                        "resolved": {"train": tc, **task.resolved_config()}})

    net = task.trainable
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])
    from imagine.train.ema import EMA

    # The EMA is only read for samples, evaluation and export, which the main process does.
    ema = EMA(net, tc["ema_decay"], tc["ema_warmup"]) if tc["ema_decay"] > 0 and main else None
    model, opt = accelerator.prepare(task.step_module(), opt)
    if ema is not None:
        ema.to(accelerator.device)   # (beside the weights it follows: prepare placed them on the device)
    scaler = getattr(accelerator, "scaler", None)   # (fp16 on a GPU)
    if tc["compile"]:
        # Only the training forward (and so its backward) runs compiled (inductor): the parameters
        # are the same tensors, so the optimizer, EMA, checkpoints and samples see the plain module.
        # The first steps pay the compile (about a minute on 2 cores); a batch of another size
        # (skipped records) compiles once more.
        model = torch.compile(model)
    task.bind(model, accelerator)
    batches = make_batches(dataset, tc["batch_size"], int(cfg.get("seed", 0)),
                           accelerator.process_index, accelerator.num_processes)
    # Each process counts the records it skips; the counts are summed across processes when
    # saved and reported (what the dataset counted while loading is counted once, by the main).
    skipped = SkipCounter(getattr(dataset, "skipped", {}) if main else {})
    step = 0
    gens = task.generators()
    # optimizer name ("model": the trainable network's AdamW; else task.extra_optimizers') -> the step from which
    # its learning rate warms up again (its moments restarted on a resume), kept in checkpoints
    rewarm: dict[str, int] = {}
    extra_lrs = {name: [g["lr"] for g in o.param_groups] for name, o in task.extra_optimizers.items()}
    if resume:
        if isinstance(resume, Path):
            if not (resume / "state.json").is_file():
                raise FileNotFoundError(f"--resume-from {resume}: not a checkpoint folder (no state.json)")
            last = resume
        else:
            last = ckpt.latest_checkpoint(out_dir)
        if last is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", out_dir)
        else:
            mods = {"model": net, **task.checkpoint_modules()}
            ema_missing = ema is not None and not (last / "ema.safetensors").is_file()
            if ema is not None and not ema_missing:
                mods["ema"] = ema
            meta = ckpt.load_checkpoint(last, modules=mods, optimizer=opt, generators=gens,
                                        may_lack=task.new_parameter)
            for g in opt.param_groups:  # (the config's, as the lr is set at every step; the checkpoint's groups
                # would otherwise keep the old run's)
                g["weight_decay"], g["betas"] = tc["weight_decay"], tuple(tc["betas"])
            if meta["new_parameters"] and main:
                print(f"{len(meta['new_parameters'])} parameters are not in {last} (a model extension switched on "
                      f"since): they start at their initialisation, e.g. {meta['new_parameters'][0]}")
            step = meta["step"]
            if ema_missing:   # (written with train.ema_decay 0): the average starts from the resumed weights
                ema.model.load_state_dict(net.state_dict())
                log.warning("%s has no EMA (ema.safetensors; written with train.ema_decay 0): the EMA starts from "
                            "its weights", last)
            if main:
                _warn_changed(meta, cfg, tc, last)
            # A warm-up restarted at an earlier resume goes on; an optimizer whose moments are not restored
            # (a compact checkpoint: package --compact; new parameters) warms up again from this step.
            rewarm = {k: int(v) for k, v in meta.get("rewarm", {}).items()}
            if not (last / "optimizer.safetensors").is_file() or meta["new_parameters"]:
                rewarm["model"] = step
                if not (last / "optimizer.safetensors").is_file():
                    log.warning("%s has no optimizer state (a compact checkpoint): AdamW's moments start from zero, "
                                "so this run does not continue the one that wrote it exactly; %s (weights, EMA, data "
                                "position and RNG states are restored)", last, _rewarm_note(tc, step))
                else:
                    log.warning("%s: AdamW's moments start from zero; %s", last, _rewarm_note(tc, step))
            for name, o in task.extra_optimizers.items():
                if name in meta.get("extra_optimizers", {}) and (last / f"opt_{name}.safetensors").is_file():
                    o.load_state_dict(ckpt.unflatten_optimizer(
                        io.load_tensors(last / f"opt_{name}.safetensors"), meta["extra_optimizers"][name]))
                elif name in meta.get("extra_optimizers", {}):
                    rewarm[name] = step
                    log.warning("%s has no state for the %s optimizer (a compact checkpoint): its moments start "
                                "from zero; %s", last, name, _rewarm_note(tc, step))
            if scaler is not None and meta.get("grad_scaler"):
                scaler.load_state_dict(meta["grad_scaler"])
            batches.position = meta["data_position"]
            if main:  # (the checkpoint's counts include what the dataset counted while loading)
                skipped = SkipCounter(meta.get("skipped", {}))
            if main:
                print(f"resumed from {last} at step {step}")
    if accelerator.num_processes > 1:
        # Each process reads the checkpoint itself: one that found another (or none) would train
        # on silently, out of step with the rest.
        import torch.distributed as dist

        span = torch.tensor([step, -step], dtype=torch.long, device=accelerator.device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        if int(span[0]) != -int(span[1]):
            raise ValueError(f"the processes start at different steps ({-int(span[1])} to {int(span[0])}): every "
                             f"machine must see the same checkpoint (a shared run folder, or --resume-from a copy)")

    if main and step > 0:
        _truncate_log(out_dir / "log.jsonl", step)
    writer = None
    if main and tc["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter

            # resumed: the events a killed run wrote after its checkpoint are purged (TensorBoard hides the
            # steps from purge_step on), so each step shows once
            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step + 1 if step > 0 else None)
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard scalars")

    def save(step_now: int):
        total_skipped = _sum_across(accelerator, skipped)  # a collective: every process calls save
        if not main:
            return
        mods = {"model": net, **task.checkpoint_modules()}
        if ema is not None:
            mods["ema"] = ema
        extra = {}
        for name, o in task.extra_optimizers.items():
            t, m = ckpt.flatten_optimizer(o.state_dict())
            extra[name] = (t, m)
        ckpt.save_checkpoint(out_dir, step_now, modules=mods, optimizer=opt,
                             state={"data_position": batches.position, "config": cfg,
                                    "resolved": {"train": tc, **task.resolved_config()},
                                    "skipped": dict(total_skipped), "rewarm": dict(rewarm),
                                    "extra_optimizers": {k: v[1] for k, v in extra.items()},
                                    # fp16 on a GPU: the loss scale (else it restarts at 65536 and the first steps
                                    # after a resume are skipped while it falls back)
                                    **({"grad_scaler": _plain(scaler.state_dict())} if scaler is not None else {})},
                             generators=gens, keep=tc["keep_checkpoints"],
                             files={f"opt_{k}": v[0] for k, v in extra.items()})

    last_good: dict | None = None
    empty_limit = math.ceil(len(dataset) / tc["batch_size"]) + 1 if hasattr(dataset, "__len__") else 1000

    def next_batch() -> tuple[dict, float]:
        """This process's slice of the next global batch that has a good record, and its weight.

        The task's loss is its slice's mean and DDP averages over processes, so slice k is
        weighted n_k * N_proc / sum(n): the average is then the mean over the global batch's good
        records, also when bad records left the slices unequal (the weight is 1.0 on one
        process). Every process must run the backward pass (it is where DDP averages), so a
        process whose whole slice was bad runs one record of its last good slice with weight 0.
        """
        nonlocal last_good
        for _ in range(empty_limit):
            batch = collate(batches.take(dataset), skipped)
            n = 0 if batch is None else batch["image"].shape[0]
            sizes = _slice_sizes(accelerator, n, last_good is not None)
            total_good = sum(k for k, _ in sizes)
            if total_good == 0 or any(k == 0 and not stand_in for k, stand_in in sizes):
                continue   # nothing to learn from, or a process with nothing to run: the next batch
            if batch is None:
                batch = {k: v[:1] for k, v in last_good.items()}
            else:
                last_good = batch
            scale = n * len(sizes) / total_good
            return {**batch, "global_batch": int(tc["batch_size"]), "loss_scale": scale}, scale
        raise ValueError(f"{empty_limit} global batches in a row without a readable record "
                         f"(skipped so far: {_sum_across(accelerator, skipped).report()}): is the data all bad?")

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
    with stop_signals() as asked:  # (Ctrl-C, SIGTERM: a checkpoint, then the end; handlers restored whatever happens)
        while step < total:
            for g in opt.param_groups:
                g["lr"] = tc["lr"] * lr_factor(step, tc["warmup_steps"], total, tc["lr_schedule"], tc["min_lr_ratio"]) \
                    * rewarm_factor(step, rewarm.get("model"), tc["warmup_steps"])
            for name, o in task.extra_optimizers.items():
                if name in rewarm:
                    for g, lr in zip(o.param_groups, extra_lrs[name]):
                        g["lr"] = lr * rewarm_factor(step, rewarm[name], tc["warmup_steps"])
            logs: dict[str, float] = {}
            opt.zero_grad(set_to_none=True)
            batch = None
            for micro in range(tc["grad_accum"]):
                batch, scale = next_batch()
                sync = micro == tc["grad_accum"] - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, parts = task.loss(batch, step)
                    accelerator.backward(loss * scale / tc["grad_accum"])
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v * scale / tc["grad_accum"]
            if tc["grad_clip"]:
                logs["grad_norm"] = float(accelerator.clip_grad_norm_(params, tc["grad_clip"]))
            opt.step()
            logs.update(task.after_backward(batch, step))
            logs = _mean_across(accelerator, logs)
            if ema is not None:
                ema.update(net)
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
            eval_model = ema.model if ema is not None else net
            if main and tc["eval_every"] and step % tc["eval_every"] == 0:
                metrics = task.evaluate(eval_model, step)
                if metrics:
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    if writer is not None:
                        for k, v in metrics.items():
                            writer.add_scalar(f"eval/{k}", v, step)
            if main and tc["sample_every"] and step % tc["sample_every"] == 0:
                task.sample_grid(eval_model, out_dir / "samples" / f"step-{step:08d}.png", step)
            if eval_model is net and not net.training:
                model.train()   # (without an EMA, evaluation and samples ran on the trained network itself)
            late = deadline is not None and main and time.time() > deadline
            stop_now = (deadline is not None or accelerator.num_processes > 1 or asked.is_set()) and \
                _agree(accelerator, late or asked.is_set(), "any")
            if step % tc["checkpoint_every"] == 0 or step == total or stop_now:
                save(step)
            if stop_now:
                if main:
                    why = "train.max_minutes reached" if late else \
                        f"stopped ({getattr(asked, 'signal', 'a signal')} here or in another process)"
                    print(f"{why} at step {step}: checkpoint written; continue with --resume", flush=True)
                break
    bar.close()
    skipped = _sum_across(accelerator, skipped)
    accelerator.wait_for_everyone()
    result = {"step": step, "seconds": time.time() - t_start, "skipped": dict(skipped), "history": history}
    if main:
        final = ema.model if ema is not None else net
        metrics = task.evaluate(final, step)
        result["eval"] = metrics
        if step >= total:
            export_atomically(task, final, out_dir / "model")
            result["model"] = str(out_dir / "model")
        print(f"skipped records: {skipped.report()}")
        if metrics:
            print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if writer is not None:
        writer.close()
    return result
