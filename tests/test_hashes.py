"""AUTOMATIC1111's file hashes in infotexts (imagine.loading.hashes): "Model hash" is the first 10 hex digits of the
checkpoint file's sha256 (its shorthash, Civitai's AutoV2), "Lora hashes" the first 12 of the sha256 of a
.safetensors LoRA's tensor bytes after its header (kohya-ss's addnet hash, Civitai's AutoV3), "TI hashes" the first
12 of an embedding file's sha256; each checked here against hashlib over the bytes, and FIPS 180-2's "abc" vector.
The cache is kept while a file's size and time stay. A replay's notes leave out a model, LoRA or embedding loaded
again (a renamed checkpoint by its hash) and name a model hash the file loaded does not have."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from imagine.cli import main
from imagine.loading import hashes

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--steps", "2", "--seed", "3", "--height", "32", "--width", "32", "-q"]


def test_the_hashes_are_sha256_of_the_files_bytes(tmp_path):
    abc = tmp_path / "abc.bin"
    abc.write_bytes(b"abc")
    assert hashes.file_sha256(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hashes.model_hash(abc) == "ba7816bf8f" and hashes.embedding_hash(abc) == "ba7816bf8f01"
    assert hashes.model_hash(tmp_path) is None  # (a folder: A1111 has no hash for it)
    header = b'{"__metadata__":{"a":"b"}}'
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(len(header).to_bytes(8, "little") + header + b"tensor bytes")
    assert hashes.lora_hash(lora) == hashlib.sha256(b"tensor bytes").hexdigest()[:12]
    pt = tmp_path / "style.pt"
    pt.write_bytes(b"abc")
    assert hashes.lora_hash(pt) == "ba7816bf8f01"  # (not a safetensors file: the file's own sha256)


def test_the_cache_holds_while_the_file_stays_and_a_bad_cache_is_rebuilt(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc")
    first = hashes.file_sha256(f)
    stat = f.stat()
    f.write_bytes(b"xyz")  # (same size; the time put back: the cache answers)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.file_sha256(f) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # (a newer time: hashed again)
    assert hashes.file_sha256(f) == hashlib.sha256(b"xyz").hexdigest()
    (hashes.cache_dir() / "hashes.json").write_text("{not json", encoding="utf-8")
    assert hashes.file_sha256(f) == hashlib.sha256(b"xyz").hexdigest()
    assert json.loads((hashes.cache_dir() / "hashes.json").read_text(encoding="utf-8"))


def test_files_gone_leave_the_cache_and_cached_sha256_hashes_nothing(tmp_path):
    """A file deleted since it was hashed is dropped at the next write (the cache does not grow without end);
    cached_sha256 answers only what the cache holds for the file as it is."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    assert hashes.cached_sha256(a) is None  # (not hashed yet: nothing is read)
    hashes.file_sha256(a)
    assert hashes.cached_sha256(a) == hashlib.sha256(b"a").hexdigest()
    a.unlink()
    hashes.file_sha256(b)
    held = json.loads((hashes.cache_dir() / "hashes.json").read_text(encoding="utf-8"))
    assert str(b.resolve()) in held and str(a.resolve()) not in held
    b.write_bytes(b"bb")  # (changed: not the cached value)
    assert hashes.cached_sha256(b) is None


def test_a_single_files_picture_carries_a1111s_hashes_and_a_replay_knows_its_files(tmp_path, capsys):
    from safetensors.torch import save_file
    from test_loading import write_single_file
    from test_lora import _kohya_lora
    from test_textual_inversion import _vectors, _write

    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    lora = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(lora))
    emb = _write("diffusers.bin", _vectors(2), tmp_path / "emb", "<style>")
    data = lora.read_bytes()
    lora_digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    model_digest = hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    out = tmp_path / "x.png"
    flags = ["--lora", f"{lora}:0.5", "--embedding", f"{emb}:mystyle"]
    assert main(["generate", "--model", str(single), *flags, "a red circle, mystyle", "-o", str(out), *RUN]) == 0
    text = Image.open(out).text["parameters"]
    assert f"Model hash: {model_digest}, Model: tiny-sd," in text
    assert f'Lora hashes: "style: {lora_digest}"' in text
    ti_digest = hashlib.sha256(emb.read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "mystyle: {ti_digest}"' in text
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(single), *flags, "--infotext", str(out), "-o", str(again), "-q"]) == 0
    assert "not applied" not in capsys.readouterr().err
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    # an A1111 infotext of another name but this file's hash: the model loaded again; another hash is named
    renamed = tmp_path / "a1111.txt"
    renamed.write_text(f"a red circle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, "
                       f"Model hash: {model_digest}, Model: sd15-renamed, RNG: CPU", encoding="utf-8")
    assert main(["generate", "--model", str(single), "--infotext", str(renamed), "-o", str(again), "-q"]) == 0
    assert "not applied" not in capsys.readouterr().err
    renamed.write_text(renamed.read_text().replace(model_digest, "0123456789").replace("sd15-renamed", "tiny-sd"))
    assert main(["generate", "--model", str(single), "--infotext", str(renamed), "-o", str(again), "-q"]) == 0
    assert "not applied: Model hash: 0123456789" in capsys.readouterr().err


def test_a_lora_file_moved_after_it_loaded_changes_nothing(tmp_path):
    """The hashes are found as the files load: a LoRA moved (or gone) afterwards leaves the runs as they were, with
    its hash (generate failed after sampling, stat-ing the old path)."""
    from safetensors.torch import save_file
    from test_loading import write_single_file
    from test_lora import _kohya_lora

    from imagine.pipelines.text_to_image import TextToImagePipeline

    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    lora = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(lora))
    digest = hashes.lora_hash(lora)
    pipe = TextToImagePipeline.from_pretrained(single)
    pipe.load_lora(lora)
    lora.rename(tmp_path / "moved.safetensors")
    res = pipe.generate("a red circle", steps=1, height=32, width=32, progress=False, output_type="latent")
    assert res.parameters["lora_hashes"] == f"style: {digest}"


def test_the_a1111_api_writes_the_same_hashes(tmp_path):
    """The server's "Model hash" (its sd-models hash, its checkpoint title) is the file's sha256 as A1111's, the one
    the CLI writes (it was a fingerprint of the file's ends), and its infotexts carry the run's Lora hashes."""
    from fastapi.testclient import TestClient
    from safetensors.torch import save_file
    from test_loading import write_single_file
    from test_lora import _kohya_lora

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import ServerConfig, create_app

    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    lora = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(lora))
    pipe = TextToImagePipeline.from_pretrained(single)
    pipe.load_lora(lora)
    digest = hashlib.sha256(single.read_bytes()).hexdigest()
    with TestClient(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 32, "height": 32})
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert f"Model hash: {digest[:10]}, Model: tiny-sd" in infotext
        assert f'Lora hashes: "style: {hashes.lora_hash(lora)}"' in infotext
        assert c.get("/sdapi/v1/sd-models").json()[0]["sha256"] == digest
