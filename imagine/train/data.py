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
            # Read as bytes and decoded line by line: a line that is not UTF-8 is one malformed line (skipped,
            # counted, named in a warning), not the end of the run.
            bad_lines = []
            for n, raw in enumerate(meta.read_bytes().splitlines(), 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
                        raise ValueError("no file_name")
                except ValueError:   # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
                    self.skipped["malformed metadata lines"] += 1
                    bad_lines.append(n)
                    continue
                self.records.append(rec)
            if bad_lines:
                log.warning("%s: %d malformed line(s) skipped (not UTF-8, not JSON, or no file_name string): line %s",
                            meta, len(bad_lines), ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else ""))
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

    def captions(self) -> list[str]:
        """The captions of the records that have one (read from metadata.jsonl, no image opened); every one of a
        record's list of captions."""
        return [c for r in self.records for c in caption_choices(r.get(self.caption_column))]

    def __getitem__(self, i):
        return self.draw(i, 0)

    def draw(self, i: int, epoch: int) -> dict:
        """Record i as drawn in epoch `epoch`: its flip (with data.flip) is drawn from (seed, epoch, i), so a
        record is seen both ways over the epochs, the same way on every run and resume."""
        rec = self.records[i]
        choices = caption_choices(rec.get(self.caption_column))
        if self.require_captions and not choices:
            return {"skip": "records without a caption", "index": i}
        # a list of captions (diffusers' train_text_to_image takes one at random): one drawn from (seed, epoch, i)
        caption = choices[0] if len(choices) == 1 else \
            choices[random.Random(f"caption {self.seed} {epoch} {i}").randrange(len(choices))] if choices else ""
        flip = self.flip and flip_draw(self.seed, epoch, i)
        try:
            with Image.open(self.folder / rec["file_name"]) as img:
                img.load()
                x = image_to_tensor(img, self.resolution, flip)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return {"skip": "corrupt or unreadable images", "index": i}
        return {"image": x, "caption": caption or "", "index": i, "flip": flip}


def caption_choices(value) -> list[str]:
    """A record's captions: a string, or a list of strings (the Hugging Face convention diffusers' train_text_to_image
    reads: one is taken at random each time); empty and non-string entries left out."""
    items = value if isinstance(value, list) else [value]
    return [c for c in items if isinstance(c, str) and c.strip()]


def flip_draw(seed: int, draw: int, record: int) -> bool:
    """A fair coin from (seed, draw, record): `draw` is the epoch for a map-style dataset (each record is drawn
    once an epoch), the place in the stream for a WebDataset one. (A str seed is hashed with SHA-512 by
    `random`, the same in every process and Python run.)"""
    return random.Random(f"flip {seed} {draw} {record}").random() < 0.5


class ShapesTrainDataset(torch.utils.data.Dataset):
    """The shapes generator as a map-style dataset (item i is a function of (seed, i) only)."""

    def __init__(self, length: int, seed: int = 0, resolution: int = 64, split: str = "train",
                 family_weights=None, pair_order: str = "any"):
        from imagine.data.shapes import ShapesDataset

        if resolution % 64 or resolution < 64:
            raise ValueError(f"the shapes task renders at 64x64 (shared/specs/shapes.md), or its scenes k times finer "
                             f"for an upscaler (64k: 128, 256, ...); got resolution {resolution}")
        # family_weights (dict family -> weight; default uniform) shifts training toward the
        # families the model finds hard, e.g. relations; pair_order "left_first" names a pair's
        # objects in reading order (imagine.data.shapes.ShapesDataset).
        self.inner = ShapesDataset(length=length, seed=seed, split=split, family_weights=family_weights,
                                   pair_order=pair_order, render_scale=resolution // 64)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        return {"index": i, **{k: item[k] for k in ("image", "caption", "low") if k in item}}


class WebDatasetShards(torch.utils.data.IterableDataset):
    """WebDataset tar shards, streamed: for data that does not fit in memory.

    A sample is the run of consecutive tar members sharing a key (the member's path up to the first
    dot of its base name, the WebDataset convention): an image (`.png`, `.jpg`, ...) and a caption
    in `.txt`, `.caption` or `.text`, or a `.json` with a `caption` field. Epoch e reads the shards
    in an order shuffled from (seed, e) and each shard's samples in their stored order (shards are
    expected to be written shuffled, as img2dataset does), so the stream is a function of the seed
    and a position (epoch, shard, record) is all a resume needs. A corrupt image, a sample without
    an image or a caption, or an unreadable shard is skipped and counted.
    """

    def __init__(self, urls: str | list[str], resolution: int, flip: bool = False, seed: int = 0,
                 caption_keys=("txt", "caption", "text"), require_captions: bool = True, check: int = 64):
        import webdataset as wds

        self.urls = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError(f"data.urls {urls!r} names no shard")
        missing = [u for u in self.urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDataset shard(s) not found: {', '.join(missing[:5])}"
                                    f"{' ...' if len(missing) > 5 else ''}")
        self.resolution, self.flip, self.seed, self.caption_keys = resolution, flip, seed, tuple(caption_keys)
        self.require_captions = require_captions
        self.skipped = SkipCounter()
        self._check_start(check)

    def _check_start(self, n: int) -> None:
        """Refuse, before training, a stream with no sample, or whose first `n` samples have no caption."""
        seen, captioned = 0, 0
        for url in self.urls:
            for raw in self.raw_records(url):
                if "__error__" in raw:
                    continue
                seen += 1
                try:
                    captioned += self.caption_of(raw) is not None
                except UnicodeDecodeError:
                    pass
                if seen >= n:
                    break
            if seen >= n:
                break
        if seen == 0:
            raise ValueError(f"the WebDataset shards {self.urls[:3]}{' ...' if len(self.urls) > 3 else ''} "
                             f"hold no records: nothing to train on")
        if self.require_captions and captioned == 0:
            raise ValueError(f"none of the first {seen} WebDataset samples has a caption; a caption is a "
                             f"{' / '.join('.' + k for k in self.caption_keys)} entry or a .json with a 'caption' field")

    # -- the raw stream --------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.urls)
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    @staticmethod
    def raw_records(url: str):
        """The samples of one shard as {extension: bytes, "__key__": key}, undecoded; a shard that
        cannot be read (to its end) yields one {"__error__": reason} and stops."""
        import tarfile

        import webdataset as wds

        current: dict | None = None
        try:
            with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith(".") or "." not in base:
                        continue
                    dot = name.rfind("/") + 1 + base.index(".")
                    key, ext = name[:dot], name[dot + 1:].lower()
                    data = tar.extractfile(member).read()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key}
                    current[ext] = data
        except (OSError, EOFError, tarfile.TarError) as e:
            current = None
            yield {"__error__": f"{type(e).__name__}: {e}"}
        if current is not None:
            yield current

    def caption_of(self, raw: dict) -> str | None:
        """The sample's caption, None if it has none; UnicodeDecodeError if its caption is not UTF-8 (a record
        to skip, not one to train on a caption mangled to U+FFFD)."""
        for k in self.caption_keys:
            if k in raw:
                c = raw[k].decode("utf-8") if isinstance(raw[k], bytes) else str(raw[k])
                return c if c.strip() else None
        if "json" in raw:
            try:
                c = json.loads(raw["json"].decode("utf-8") if isinstance(raw["json"], bytes) else raw["json"])
                c = c.get("caption")
            except UnicodeDecodeError:  # (a ValueError too: not a caption-less record but one to skip)
                raise
            except (ValueError, AttributeError):
                return None
            return c if isinstance(c, str) and c.strip() else None
        return None

    def decode(self, raw: dict, number: int) -> dict:
        """One raw sample -> a training item, or {"skip": reason}. `number` is the sample's place in
        the stream: it names the item and draws its flip, so a flip does not depend on the process."""
        if "__error__" in raw:
            return {"skip": "unreadable shards"}
        img_key = next((k for k in raw if k in _IMAGE_KEYS), None)
        if img_key is None:
            return {"skip": "records without an image"}
        try:
            caption = self.caption_of(raw)
        except UnicodeDecodeError:
            if self.require_captions:
                return {"skip": "records whose caption is not UTF-8"}
            caption = None   # (a VAE reads the image alone)
        if self.require_captions and caption is None:
            return {"skip": "records without a caption"}
        # `number` counts the stream's records over the epochs, so a record's flip is drawn anew at every read.
        flip = self.flip and flip_draw(self.seed, number, 0)
        try:
            with Image.open(_io.BytesIO(raw[img_key])) as img:
                img.load()
                x = image_to_tensor(img, self.resolution, flip)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return {"skip": "corrupt or unreadable images"}
        return {"image": x, "caption": caption or "", "index": number, "flip": flip}

    def __iter__(self):
        """One epoch (epoch 0's shard order), decoded; skipped samples are counted in `self.skipped`."""
        number = 0
        for url in self.shard_order(0):
            for raw in self.raw_records(url):
                item = self.decode(raw, number)
                number += "__error__" not in raw
                if "skip" in item:
                    self.skipped[item["skip"]] += 1
                else:
                    yield item


_IMAGE_KEYS = {e[1:] for e in IMAGE_EXTS}


# the data section's keys (build_dataset's, and the trainer's held-out images: eval_count, eval_urls)
DATA_KEYS = {"type", "resolution", "seed", "length", "split", "family_weights", "pair_order", "path",
             "caption_column", "flip", "urls", "eval_urls", "eval_count"}


def check_data_config(cfg: dict) -> None:
    """The data section's keys and values (a ValueError naming the key and what is valid), checked before any
    data is read."""
    from imagine.train.config import as_bool, as_choice, as_int, check_keys

    check_keys(cfg, DATA_KEYS, "data")
    as_choice(cfg.get("type", "shapes"), "data.type", ("shapes", "imagefolder", "webdataset"))
    for key, least in (("resolution", 1), ("seed", None), ("length", 1), ("eval_count", 0)):
        if key in cfg:
            as_int(cfg[key], f"data.{key}", least)
    if "flip" in cfg:
        as_bool(cfg["flip"], "data.flip")
    for key in ("path", "caption_column", "split", "pair_order"):
        if key in cfg and not (isinstance(cfg[key], str) and cfg[key]):
            raise ValueError(f"data.{key} must be a non-empty string; got {cfg[key]!r}")
    for key in ("urls", "eval_urls"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, str) and v or isinstance(v, list) and v
                                  and all(isinstance(u, str) and u for u in v)):
            raise ValueError(f"data.{key} must be a brace pattern or a list of shard paths or URLs; got {v!r}")
    if cfg.get("family_weights") is not None and not isinstance(cfg["family_weights"], dict):
        raise ValueError(f"data.family_weights must be a mapping of family to weight; got {cfg['family_weights']!r}")


def build_dataset(cfg: dict, require_captions: bool = True):
    check_data_config(cfg)
    kind = cfg.get("type", "shapes")
    res = int(cfg.get("resolution", 64))
    if kind == "shapes":
        return ShapesTrainDataset(int(cfg.get("length", 100_000)), int(cfg.get("seed", 0)), res,
                                  cfg.get("split", "train"), cfg.get("family_weights"),
                                  cfg.get("pair_order", "any"))
    if kind == "imagefolder":
        if "path" not in cfg:
            raise ValueError("data.type imagefolder needs data.path (a folder with metadata.jsonl)")
        return ImageFolderDataset(cfg["path"], res, cfg.get("caption_column", "text"), bool(cfg.get("flip", False)),
                                  int(cfg.get("seed", 0)), require_captions)
    if kind == "webdataset":
        if "urls" not in cfg:
            raise ValueError("data.type webdataset needs data.urls (a brace pattern or a list of .tar shards)")
        return WebDatasetShards(cfg["urls"], res, bool(cfg.get("flip", False)), int(cfg.get("seed", 0)),
                                require_captions=require_captions)
    raise ValueError(f"unknown data.type {kind!r}; valid: 'shapes', 'imagefolder', 'webdataset'")


def collate(items: list[dict], skipped: SkipCounter) -> dict | None:
    """Stack the good records, count the skipped ones; None if the whole batch was bad. `slot` is
    each record's place in the global batch (what per-sample randomness is drawn by).

    A bad record is counted once, when drawn in epoch 0 (`epoch`, set by the batch readers; absent: counted):
    every epoch draws every record once, and a record bad in one epoch is bad in all, so the counts are of
    records, not of reads, however many epochs a run makes (and they add up across processes, each record
    being drawn by one process an epoch)."""
    good = []
    for k, it in enumerate(items):
        if "skip" in it:
            if it.get("epoch", 0) == 0:
                skipped[it["skip"]] += 1
        else:
            good.append((it.get("slot", k), it))
    if not good:
        return None
    batch = {"image": torch.stack([g["image"] for _, g in good]), "caption": [g["caption"] for _, g in good],
             "index": torch.tensor([g["index"] for _, g in good]), "slot": torch.tensor([s for s, _ in good]),
             "flip": torch.tensor([bool(g.get("flip", False)) for _, g in good])}
    if all("low" in g for _, g in good):  # (the shapes' 64-pixel pictures of scenes drawn finer: an upscaler's inputs)
        batch["low"] = torch.stack([g["low"] for _, g in good])
    return batch


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

    def next_draws(self) -> list[tuple[int, int]]:
        """This process's (epoch, record index) pairs of the next global batch."""
        start = self.position * self.batch
        draws = []
        while len(draws) < self.batch:
            epoch, off = divmod(start + len(draws), self.n)
            perm = self._perm(epoch)
            take = min(self.batch - len(draws), self.n - off)
            draws.extend((epoch, i) for i in perm[off:off + take].tolist())
        self.position += 1
        per = self.batch // self.world
        return draws[self.rank * per:(self.rank + 1) * per]

    def next(self) -> list[int]:
        return [i for _, i in self.next_draws()]

    def take(self, dataset) -> list[dict]:
        """This process's records of the next global batch, each tagged with its slot in it and the epoch it was
        drawn in (a dataset with `draw(i, epoch)` draws its flips from it)."""
        first = self.rank * (self.batch // self.world)
        get = getattr(dataset, "draw", None)
        return [{**(get(i, epoch) if get is not None else dataset[i]), "slot": first + k, "epoch": epoch}
                for k, (epoch, i) in enumerate(self.next_draws())]


class StreamBatches:
    """Global batches read in order from a WebDataset stream. Every process reads the same raw
    stream (tar bytes are cheap next to decoding and training) and decodes only its own slice of
    each global batch, so N processes see the same global batches as one. The position is
    {epoch, shard, record}: a resume skips that many raw records without decoding them."""

    def __init__(self, dataset: WebDatasetShards, batch_size: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of processes {world}")
        self.ds, self.batch, self.rank, self.world = dataset, batch_size, rank, world
        self._pos = {"epoch": 0, "shard": 0, "record": 0, "consumed": 0}
        self._stream = None

    @property
    def position(self) -> dict:
        return dict(self._pos)

    @position.setter
    def position(self, pos) -> None:
        if not isinstance(pos, dict) or not {"epoch", "shard", "record"} <= set(pos):
            raise ValueError(f"a WebDataset run resumes from a position {{epoch, shard, record}}; the checkpoint "
                             f"holds {pos!r} (was it written by a run on another kind of dataset?)")
        self._pos = {"consumed": 0, **{k: int(v) for k, v in pos.items()}}
        self._stream = None

    def _records(self):
        p = self._pos
        while True:
            order = self.ds.shard_order(p["epoch"])
            whole_epoch, read_any = p["shard"] == 0 and p["record"] == 0, False
            while p["shard"] < len(order):
                skip = p["record"]
                for r, raw in enumerate(self.ds.raw_records(order[p["shard"]])):
                    if r < skip:
                        continue
                    read_any = True
                    p["record"], p["consumed"] = r + 1, p["consumed"] + 1
                    yield raw
                p["shard"], p["record"] = p["shard"] + 1, 0
            if whole_epoch and not read_any:
                raise ValueError(f"the WebDataset shards {order[:3]} yielded no record in epoch {p['epoch']}")
            p["epoch"], p["shard"], p["record"] = p["epoch"] + 1, 0, 0

    def take(self, dataset=None) -> list[dict]:
        if self._stream is None:
            self._stream = self._records()
        per = self.batch // self.world
        mine = range(self.rank * per, (self.rank + 1) * per)
        items = []
        for slot in range(self.batch):
            number = self._pos["consumed"]
            raw = next(self._stream)
            if slot in mine:
                items.append({**self.ds.decode(raw, number), "slot": slot, "epoch": self._pos["epoch"]})
        return items


def make_batches(dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The global-batch reader for a dataset: in order from a stream, or permuted from a map-style one."""
    if isinstance(dataset, WebDatasetShards):
        return StreamBatches(dataset, batch_size, rank, world)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise TypeError(f"{type(dataset).__name__} is an iterable dataset the trainer cannot position for resume; "
                        f"use a map-style dataset or WebDatasetShards")
    return GlobalBatches(len(dataset), batch_size, seed, rank, world)
