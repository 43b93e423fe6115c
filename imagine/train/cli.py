"""Train a VAE, a text-conditioned diffusion model or a stage of an Imagen cascade from a YAML config
(docs/training.md).

`imagine train vae|diffusion|imagen --config run.yaml [--set key=value ...] [--resume]`.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
from pathlib import Path

import torch

from imagine.train.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["vae", "diffusion", "imagen", "upscaler"],
                   help="which model to train: the KL autoencoder, the latent (or pixel) diffusion U-Net, one stage "
                        "of an Imagen cascade (an Efficient U-Net; imagen.previous names the stages below), or an "
                        "upscaler model (Real-ESRGAN's compact net or an RRDBNet, on pictures made smaller)")
    p.add_argument("--config", "-c", metavar="YAML",
                   help="the run's YAML config (see configs/ and docs/training.md); without it every value is the "
                        "built-in default (the shapes data) and --set's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable; VALUE is read as YAML)")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="run folder (checkpoints, samples, logs, and the trained model in model/); default: the "
                        "config's output, else runs/vae, runs/diffusion or runs/imagen. A fresh run refuses a folder "
                        "that holds checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (none yet: start afresh, with a warning)")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint folder (checkpoints/step-NNNNNNNN, e.g. one committed to carry "
                        "a run across machines; a run folder, its checkpoints/ or their 'latest' file: the latest), "
                        "writing to --output")
    p.add_argument("--export-only", action="store_true",
                   help="write model/ from the latest checkpoint (or --resume-from's; EMA weights) without training "
                        "further")


class _Part(torch.utils.data.Subset):
    """Part of a map-style dataset, drawn as the dataset draws (its flips by epoch: data.ImageFolderDataset.draw)."""

    def draw(self, i: int, epoch: int) -> dict:
        get = getattr(self.dataset, "draw", None)
        return get(self.indices[i], epoch) if get is not None else self.dataset[self.indices[i]]


def _heldout_split(dataset, n_eval: int):
    """Hold out the last `n_eval` records (for PSNR); the rest is trained on."""
    n = len(dataset)
    n_eval = min(n_eval, max(1, n // 10)) if n > 1 and n_eval > 0 else 0
    train = _Part(dataset, range(n - n_eval))
    train.skipped = getattr(dataset, "skipped", {})
    return train, _Part(dataset, range(n - n_eval, n))


def _heldout_shards(data_cfg: dict, n_eval: int):
    """A WebDataset stream's held-out images: data.eval_urls if given, else the last shard (when
    there are several); the rest is trained on."""
    from imagine.train.data import WebDatasetShards, build_dataset

    dataset = build_dataset(data_cfg, require_captions=False)
    res, flip = dataset.resolution, False
    if data_cfg.get("eval_urls"):
        eval_ds = WebDatasetShards(data_cfg["eval_urls"], res, flip, require_captions=False)
    elif len(dataset.urls) > 1:
        eval_ds = WebDatasetShards(dataset.urls[-1:], res, flip, require_captions=False)
        dataset = build_dataset({**data_cfg, "urls": dataset.urls[:-1]}, require_captions=False)
    else:
        print("one WebDataset shard and no data.eval_urls: no held-out images, so no PSNR")
        return dataset, []
    return dataset, list(itertools.islice(iter(eval_ds), n_eval))


def _stack_images(ds, what: str = "held-out") -> torch.Tensor | None:
    """The pictures of `ds` stacked; records the data skips (a corrupt image) left out, counted in a warning."""
    items = list(ds) if isinstance(ds, list) else [ds[i] for i in range(len(ds))]
    imgs = [it["image"] for it in items if "image" in it]
    reasons = collections.Counter(it.get("skip", "records without an image") for it in items if "image" not in it)
    if reasons:
        logging.getLogger(__name__).warning(
            "%d of the %d %s record(s) skipped (%s)%s", sum(reasons.values()), len(items), what,
            ", ".join(f"{n} {why}" for why, n in reasons.items()),
            "" if imgs else ": no held-out pictures, so no PSNR is measured" if what == "held-out" else "")
    return torch.stack(imgs) if imgs else None


def _checkpoint_given(path: str) -> Path:
    """--resume-from's folder: a checkpoint (it holds state.json), or the latest of a run folder, of its checkpoints/
    folder or of their 'latest' file; anything else refused before the data and the model are built."""
    from imagine.train.checkpoint import latest_checkpoint

    given = Path(path)
    if (given / "state.json").is_file():
        return given
    for run in (given, given.parent if given.name == "checkpoints" else None,
                given.parent.parent if given.name == "latest" and given.is_file() else None):
        if run is not None and (given.is_dir() or given.is_file()):
            found = latest_checkpoint(run)
            if found is not None:
                return found
    what = "not found" if not given.exists() else "not a checkpoint folder (no state.json)"
    raise FileNotFoundError(f"--resume-from {path}: {what}; give a checkpoints/step-NNNNNNNN folder, or a run folder "
                            "with checkpoints")


def run(args) -> dict:
    from imagine.train.checkpoint import latest_checkpoint
    from imagine.train.data import build_dataset, check_data_config
    from imagine.train.loop import check_run, run_training

    if args.config is not None and Path(args.config).is_dir():
        raise ValueError(f"--config {args.config} is a folder; give the run's YAML file (see configs/)")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.output or cfg.get("output") or f"runs/{args.what}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{'--output' if args.output else 'output'} {out} is a file; the run folder must be a folder "
                         "(new or existing)")
    resume = _checkpoint_given(args.resume_from) if args.resume_from else (args.resume or args.export_only)
    if args.export_only and not args.resume_from and latest_checkpoint(out) is None:
        raise ValueError(f"--export-only: no checkpoint in {out}/checkpoints to export (give the run's --output, or "
                         "--resume-from a checkpoint)")
    # Every section checked before the data and the model are built.
    check_run(cfg, out, resume, args.export_only)
    if args.what == "vae":
        from imagine.train.vae_task import check_vae_config

        check_vae_config(cfg)
    elif args.what == "upscaler":
        from imagine.train.upscaler_task import check_upscaler_config

        check_upscaler_config(cfg)
    elif args.what == "imagen":
        from imagine.train.imagen_task import check_imagen_config

        check_imagen_config(cfg)
    else:
        from imagine.train.diffusion_task import check_diffusion_config

        check_diffusion_config(cfg)
    data_cfg = cfg.setdefault("data", {"type": "shapes"})
    check_data_config(data_cfg)
    n_eval = int(data_cfg.get("eval_count", 64))
    if args.what in ("vae", "upscaler"):
        from imagine.train.vae_task import VAETask

        if data_cfg.get("type") == "webdataset":
            dataset, eval_ds = _heldout_shards(data_cfg, n_eval)
        elif data_cfg.get("type", "shapes") == "shapes":
            dataset = build_dataset(data_cfg, require_captions=False)
            eval_ds = build_dataset({**data_cfg, "length": n_eval, "seed": int(data_cfg.get("seed", 0)) + 7919}) \
                if n_eval else []
        else:
            dataset, eval_ds = _heldout_split(build_dataset(data_cfg, require_captions=False), n_eval)
        eval_images = _stack_images(eval_ds)

        def training_images():
            """Training images for model.scaling_factor auto when none are held out: the first
            data.eval_count (64 if 0) records of the data (of a stream: from its start)."""
            n = n_eval or 64
            if hasattr(dataset, "__len__"):
                items = [dataset[i] for i in range(min(n, len(dataset)))]
                return _stack_images(items, "training")
            return _stack_images(list(itertools.islice(iter(dataset), n)), "training")

        if args.what == "upscaler":
            from imagine.train.upscaler_task import UpscalerTask

            lows = [it["low"] for it in (eval_ds if isinstance(eval_ds, list) else
                                         [eval_ds[i] for i in range(len(eval_ds))]) if "low" in it]
            task = UpscalerTask(cfg, eval_images, torch.stack(lows) if lows and len(lows) == len(eval_images)
                                else None)
        else:
            task = VAETask(cfg, eval_images, scale_images=training_images if eval_images is None else None)
    else:
        dataset = build_dataset(data_cfg)
        if args.what == "imagen":
            from imagine.train.imagen_task import ImagenTask

            task = ImagenTask(cfg)
        else:
            from imagine.train.diffusion_task import DiffusionTask

            # Latents are cached by record index for map-style datasets; a stream is encoded as it comes.
            task = DiffusionTask(cfg, dataset_len=len(dataset) if hasattr(dataset, "__len__") else None)
        if task.d["cache_text"]:
            # Every caption the data can hold, encoded up front in a fixed order (a resumed run
            # then sees exactly the states an uninterrupted one saw).
            if data_cfg.get("type", "shapes") == "shapes":
                from imagine.data.shapes import all_captions

                task.precompute_text(all_captions("train") + [""])
            elif hasattr(dataset, "captions"):
                task.precompute_text(dataset.captions() + [""])
    result = run_training(cfg, task, dataset, out, resume=resume, export_only=args.export_only)
    return result
