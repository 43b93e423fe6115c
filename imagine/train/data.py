"""Training data: captioned image folders, WebDataset shards and the shapes generator.

- An image folder with captions in `metadata.jsonl` (the Hugging Face `datasets` imagefolder
  convention that diffusers' training scripts use: one JSON object a line with `file_name` and a
  caption column, `text` by default).
- WebDataset tar shards (`*.tar`, samples with an image entry and a `.txt` or `.json` caption),
  for data that does not fit in memory.
- The shapes task of shared/specs/shapes.md (`imagine.data.shapes`).

Images are resized (shorter side) and centre-cropped to the resolution and mapped to [-1, 1];
horizontal flips only when asked, since they change the meaning of "to the left of". A corrupt
image or a record without a caption is skipped and counted, never a crash; an empty dataset or a
caption column that no record has is an error before training starts.
"""

from __future__ import annotations

import io as _io
import json
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SkipCounter(Counter):
    """Counts skipped records by reason; reported at the end of training."""

    def report(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.items())) or "none"


def image_to_tensor(img: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic, antialiased), centre-crop, map to [-1, 1]."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return a.flip(-1) if flip else a


class ImageFolderDataset(torch.utils.data.Dataset):
    """`folder/metadata.jsonl` + images. Records are checked lazily: a corrupt image or a missing
    caption makes __getitem__ return None, which the collate function skips and counts."""

    def __init__(self, folder, resolution: int, caption_column: str = "text", flip: bool = False,
                 seed: int = 0, require_captions: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.folder}")
        meta = self.folder / "metadata.jsonl"
        self.records: list[dict] = []
        self.skipped = SkipCounter()
        if meta.is_file():
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "file_name" not in rec:
                        raise ValueError("no file_name")
                except (json.JSONDecodeError, ValueError):
                    self.skipped["malformed metadata lines"] += 1
                    continue
                self.records.append(rec)
        elif not require_captions:
            self.records = [{"file_name": p.name} for p in sorted(self.folder.iterdir())
                            if p.suffix.lower() in IMAGE_EXTS]
        else:
            raise FileNotFoundError(f"{meta} not found: a captioned image folder needs a metadata.jsonl with "
                                    f"'file_name' and '{caption_column}' on each line")
        if not self.records:
            raise ValueError(f"dataset {self.folder} holds no records (no images listed): nothing to train on")
        if require_captions and not any(caption_column in r for r in self.records):
            cols = sorted({k for r in self.records for k in r} - {"file_name"})
            raise ValueError(f"caption column {caption_column!r} is in no record of {meta}; "
                             f"columns found: {cols or 'none'} (set data.caption_column)")
        self.resolution, self.caption_column, self.flip = resolution, caption_column, flip
        self.require_captions = require_captions
        self.seed = seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        caption = rec.get(self.caption_column)
        if self.require_captions and (not isinstance(caption, str) or not caption.strip()):
            return {"skip": "records without a caption"}
        try:
            with Image.open(self.folder / rec["file_name"]) as img:
                img.load()
                flip = self.flip and random.Random(self.seed * 1_000_003 + i).random() < 0.5
                x = image_to_tensor(img, self.resolution, flip)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return {"skip": "corrupt or unreadable images"}
        return {"image": x, "caption": caption or "", "index": i}


class ShapesTrainDataset(torch.utils.data.Dataset):
    """The shapes generator as a map-style dataset (item i is a function of (seed, i) only)."""

    def __init__(self, length: int, seed: int = 0, resolution: int = 64, split: str = "train"):
        from imagine.data.shapes import ShapesDataset

        if resolution != 64:
            raise ValueError(f"the shapes task renders at 64x64 (shared/specs/shapes.md); got resolution {resolution}")
        self.inner = ShapesDataset(length=length, seed=seed, split=split)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        return {"image": item["image"], "caption": item["caption"], "index": i}


class WebDatasetShards(torch.utils.data.IterableDataset):
    """WebDataset tar shards streamed in order (shards shuffled per epoch with the seed)."""

    def __init__(self, urls: str | list[str], resolution: int, flip: bool = False, seed: int = 0,
                 caption_keys=("txt", "caption", "text")):
        import webdataset as wds  # noqa: F401  (checked here so the error is early and clear)

        self.urls = urls
        self.resolution, self.flip, self.seed, self.caption_keys = resolution, flip, seed, caption_keys
        self.skipped = SkipCounter()
        self.epoch = 0

    def __iter__(self):
        import webdataset as wds

        urls = self.urls
        if isinstance(urls, str):
            urls = list(wds.shardlists.expand_urls(urls))
        rng = random.Random(self.seed + self.epoch)
        urls = list(urls)
        rng.shuffle(urls)
        ds = wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
        for n, sample in enumerate(ds):
            img_key = next((k for k in sample if k.split(".")[-1].lower() in {e[1:] for e in IMAGE_EXTS}), None)
            caption = None
            for k in self.caption_keys:
                if k in sample:
                    caption = sample[k]
                    caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
                    break
            if caption is None and "json" in sample:
                try:
                    caption = json.loads(sample["json"]).get("caption")
                except (ValueError, AttributeError):
                    caption = None
            if img_key is None:
                yield {"skip": "records without an image"}
                continue
            if not caption or not str(caption).strip():
                yield {"skip": "records without a caption"}
                continue
            try:
                with Image.open(_io.BytesIO(sample[img_key])) as img:
                    img.load()
                    flip = self.flip and rng.random() < 0.5
                    yield {"image": image_to_tensor(img, self.resolution, flip), "caption": str(caption), "index": n}
            except (OSError, ValueError, SyntaxError):
                yield {"skip": "corrupt or unreadable images"}
        self.epoch += 1


def build_dataset(cfg: dict, require_captions: bool = True):
    kind = cfg.get("type", "shapes")
    res = int(cfg.get("resolution", 64))
    if kind == "shapes":
        return ShapesTrainDataset(int(cfg.get("length", 100_000)), int(cfg.get("seed", 0)), res,
                                  cfg.get("split", "train"))
    if kind == "imagefolder":
        if "path" not in cfg:
            raise ValueError("data.type imagefolder needs data.path (a folder with metadata.jsonl)")
        return ImageFolderDataset(cfg["path"], res, cfg.get("caption_column", "text"), bool(cfg.get("flip", False)),
                                  int(cfg.get("seed", 0)), require_captions)
    if kind == "webdataset":
        if "urls" not in cfg:
            raise ValueError("data.type webdataset needs data.urls (a brace pattern or a list of .tar shards)")
        return WebDatasetShards(cfg["urls"], res, bool(cfg.get("flip", False)), int(cfg.get("seed", 0)))
    raise ValueError(f"unknown data.type {kind!r}; valid: 'shapes', 'imagefolder', 'webdataset'")


def collate(items: list[dict], skipped: SkipCounter) -> dict | None:
    """Stack the good records, count the skipped ones; None if the whole batch was bad."""
    good = []
    for it in items:
        if "skip" in it:
            skipped[it["skip"]] += 1
        else:
            good.append(it)
    if not good:
        return None
    return {"image": torch.stack([g["image"] for g in good]), "caption": [g["caption"] for g in good],
            "index": torch.tensor([g["index"] for g in good])}


class GlobalBatches:
    """Deterministic global batches of indices over a map-style dataset: epoch e is a permutation
    drawn from (seed, e). The position (batches drawn so far) is all a resume needs; each of
    `world` processes takes its own slice of every global batch (DDP with the same global batch)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("the dataset is empty: nothing to train on")
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of processes {world}")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.position = 0

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        start = self.position * self.batch
        idx = []
        while len(idx) < self.batch:
            epoch, off = divmod(start + len(idx), self.n)
            perm = self._perm(epoch)
            take = min(self.batch - len(idx), self.n - off)
            idx.extend(perm[off:off + take].tolist())
        self.position += 1
        per = self.batch // self.world
        return idx[self.rank * per:(self.rank + 1) * per]
