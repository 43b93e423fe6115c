"""The hashes AUTOMATIC1111 writes into its infotexts, by which it, its readers and model sites (Civitai's "AutoV2"
and "AutoV3") know a picture's files: "Model hash" (the checkpoint file's sha256, its first 10 hex digits, A1111's
`shorthash`), "Lora hashes" (a LoRA's: for a .safetensors file the `sshs_model_hash` kohya-ss writes into its
metadata where there is one, which AUTOMATIC1111 takes before hashing anything (extensions-builtin/Lora/network.py,
NetworkOnDisk), else the sha256 of what follows its header, kohya-ss's and the additional-networks extension's
"addnet" hash, so that editing the metadata keeps it; else the file's; 12 digits) and "TI hashes" (an embedding
file's sha256, 12 digits).

A checkpoint is gigabytes, a second or more of hashing each: the full hashes are kept in a cache file (as A1111's
cache.json), keyed by the file's resolved path and checked against its size and modification time, so that a file
is hashed once until it changes. The cache lives in $IMAGINE_CACHE_DIR, else $XDG_CACHE_HOME/imagine, else
~/.cache/imagine; a cache that cannot be read is rebuilt, one that cannot be written is passed over (the hash is
still right). A diffusers folder has no A1111 hash (A1111 loads single files only): None.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MODEL_HASH_DIGITS = 10  # A1111's checkpoint shorthash
NETWORK_HASH_DIGITS = 12  # its LoRA and embedding shorthash
_BLOCK = 1 << 20


def cache_dir() -> Path:
    if os.environ.get("IMAGINE_CACHE_DIR"):
        return Path(os.environ["IMAGINE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagine"


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


_read: tuple = (None, {})  # (the cache file's path, size and modification time when read; what it held)


def _read_cache() -> dict:
    """The cache (a copy), read again only when the file changed: a listing of many checkpoints asks it once each."""
    global _read
    path = _cache_file()
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if _read[0] != key:
            data = json.loads(path.read_text(encoding="utf-8"))
            _read = (key, data if isinstance(data, dict) else {})
    except (OSError, ValueError):
        return {}
    return dict(_read[1])


def _write_cache(data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


def file_sha256(path: str | os.PathLike, addnet: bool = False) -> str:
    """The sha256 (64 hex digits) of the file, or with `addnet` of what follows a safetensors header (its 8-byte
    length and JSON), kept in the cache while the file's size and modification time stay."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{'addnet:' if addnet else ''}{path}"
    held = cached_sha256(path, addnet)
    if held is not None:
        return held
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if addnet:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    cache = _read_cache()  # (another process may have added to it meanwhile)
    # (files gone since are forgotten: the cache holds the files there are)
    cache = {k: v for k, v in cache.items() if Path(k.removeprefix("addnet:")).exists()}
    cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": h.hexdigest()}
    _write_cache(cache)
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike, addnet: bool = False) -> str | None:
    """file_sha256's value if the cache holds it for the file as it is now, else None (nothing is hashed: a listing
    of checkpoints shows the hashes known, as A1111's does, and a file is hashed when it loads)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    held = _read_cache().get(f"{'addnet:' if addnet else ''}{path}")
    if isinstance(held, dict) and held.get("size") == stat.st_size and held.get("mtime") == stat.st_mtime:
        return str(held["sha256"])
    return None


def model_hash(source: str | os.PathLike | None) -> str | None:
    """A1111's "Model hash" of a checkpoint file; None for a folder or no file."""
    if not source or not Path(source).is_file():
        return None
    return file_sha256(source)[:MODEL_HASH_DIGITS]


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA shorthash: a .safetensors file's `sshs_model_hash` metadata, else its addnet hash; the file's
    sha256 otherwise (A1111 tells the kinds apart by the suffix)."""
    safetensors = Path(path).suffix.lower() == ".safetensors"
    if safetensors and (held := safetensors_metadata(path).get("sshs_model_hash")):
        return held[:NETWORK_HASH_DIGITS]
    return file_sha256(path, addnet=safetensors)[:NETWORK_HASH_DIGITS]


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (its string values), {} when it has none or the file's
    header does not read as one (A1111's read_metadata_from_safetensors, which then hashes the file)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 1024 * 1024:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def embedding_hash(path: str | os.PathLike) -> str:
    """A1111's embedding shorthash: the file's sha256."""
    return file_sha256(path)[:NETWORK_HASH_DIGITS]
