"""Training data: WebDataset shards (bad samples skipped and counted, resumable global batches),
flips only when asked, resize and centre-crop against pictures whose answer is known by construction."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from imagine.models import io
from imagine.train.data import (ImageFolderDataset, SkipCounter, StreamBatches, WebDatasetShards, build_dataset,
                                collate, image_to_tensor)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def asymmetric(size: int = 8, seed: int = 0) -> Image.Image:
    """A picture that differs from its mirror image: a coloured bar in the left half."""
    g = torch.Generator().manual_seed(seed)
    a = torch.full((size, size, 3), 255, dtype=torch.uint8)
    a[:, : size // 2] = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
    return Image.fromarray(a.numpy())


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 5, bad: bool = True) -> list[str]:
    """Shards written with webdataset's TarWriter. Good samples have a .png and a .txt caption
    "picture {k}" (k counts good samples from 0 over all shards); every shard but the last also
    holds, when `bad`, a corrupt .png, a sample without caption, one without an image, and a good
    sample whose caption sits in a .json."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, k = [], 0
    for s in range(n_shards):
        url = str(folder / f"shard-{s:04d}.tar")
        with wds.TarWriter(url) as w:
            for j in range(per_shard):
                w.write({"__key__": f"{s:04d}-{j:04d}", "png": asymmetric(8, k), "txt": f"picture {k}"})
                k += 1
            if bad and s < n_shards - 1:
                w.write({"__key__": f"{s:04d}-corrupt", "png": b"this is not a png", "txt": "broken"})
                w.write({"__key__": f"{s:04d}-nocaption", "png": asymmetric(8, 99)})
                w.write({"__key__": f"{s:04d}-noimage", "txt": "a caption without its picture"})
                w.write({"__key__": f"{s:04d}-json", "png": asymmetric(8, k), "json": {"caption": f"picture {k}"}})
                k += 1
        urls.append(url)
    return urls


def test_webdataset_reads_good_samples_and_counts_bad_ones(tmp_path):
    urls = write_shards(tmp_path / "shards")
    ds = WebDatasetShards(urls, 8)
    items = list(ds)
    # Shard 0: 5 good + the .json one; shard 1: 5 good. Epoch 0 reads the shards in a seeded order.
    assert sorted(it["caption"] for it in items) == sorted(f"picture {k}" for k in range(11))
    assert ds.skipped == {"corrupt or unreadable images": 1, "records without a caption": 1,
                          "records without an image": 1}
    for it in items:
        k = int(it["caption"].split()[1])
        assert torch.equal(it["image"], image_to_tensor(asymmetric(8, k), 8))
    # The brace notation of WebDataset urls names the same shards.
    braces = WebDatasetShards(str(tmp_path / "shards" / "shard-{0000..0001}.tar"), 8)
    assert braces.urls == urls


def test_webdataset_refuses_empty_or_captionless_shards(tmp_path):
    empty = tmp_path / "empty.tar"
    with wds.TarWriter(str(empty)):
        pass
    with pytest.raises(ValueError, match="hold no records"):
        WebDatasetShards([str(empty)], 8)
    captionless = tmp_path / "nocap.tar"
    with wds.TarWriter(str(captionless)) as w:
        for j in range(3):
            w.write({"__key__": f"{j}", "png": asymmetric(8, j)})
    with pytest.raises(ValueError, match="has a caption"):
        WebDatasetShards([str(captionless)], 8)
    assert len(list(WebDatasetShards([str(captionless)], 8, require_captions=False))) == 3   # fine for a VAE
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetShards([str(tmp_path / "missing.tar")], 8)


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path / "shards", bad=False)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2 + 100])   # cut in the middle of a member
    ds = WebDatasetShards(urls, 8)
    items = list(ds)
    assert 5 <= len(items) < 10
    assert ds.skipped == {"unreadable shards": 1}


def test_flips_only_when_asked(tmp_path):
    urls = write_shards(tmp_path / "shards", bad=False)
    plain = {it["caption"]: it["image"] for it in WebDatasetShards(urls, 8)}
    for it in plain.values():
        assert not torch.equal(it, it.flip(-1))   # the pictures are asymmetric, so a flip shows
    flipped = {it["caption"]: it["image"] for it in WebDatasetShards(urls, 8, flip=True)}
    n_flipped = sum(torch.equal(flipped[c], plain[c].flip(-1)) for c in plain)
    assert all(torch.equal(flipped[c], plain[c]) or torch.equal(flipped[c], plain[c].flip(-1)) for c in plain)
    assert 0 < n_flipped < len(plain)
    # Seeded: the same samples are flipped on every read.
    again = {it["caption"]: it["image"] for it in WebDatasetShards(urls, 8, flip=True)}
    assert all(torch.equal(again[c], flipped[c]) for c in plain)

    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i in range(10):
        asymmetric(8, i).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    plain = [ImageFolderDataset(folder, 8)[i]["image"] for i in range(10)]
    flipped = [ImageFolderDataset(folder, 8, flip=True)[i]["image"] for i in range(10)]
    assert not all(torch.equal(p, q) for p, q in zip(plain, flipped))
    assert all(torch.equal(p, q) or torch.equal(p.flip(-1), q) for p, q in zip(plain, flipped))


def thirds(w: int, h: int, vertical: bool) -> Image.Image:
    """Three bands red | green | blue across the long side."""
    img = Image.new("RGB", (w, h))
    n = (h if vertical else w) // 3
    for b, colour in enumerate((RED, GREEN, BLUE)):
        box = (0, b * n, w, (b + 1) * n) if vertical else (b * n, 0, (b + 1) * n, h)
        img.paste(colour, box)
    return img


@pytest.mark.parametrize("w,h", [(60, 10), (10, 60)])
def test_resize_shorter_side_and_centre_crop(w, h):
    # 60x10 -> shorter side to 8 gives 48x8, whose centre 8 columns (20..27) lie inside the green
    # band (16..31) at least 4 pixels from its edges, farther than the bicubic kernel reaches.
    x = image_to_tensor(thirds(w, h, vertical=h > w), 8)
    assert x.shape == (3, 8, 8)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    assert torch.allclose(x, green, atol=2 / 255)
    # A square picture of the right size passes unchanged (only mapped to [-1, 1]).
    img = asymmetric(8, 3)
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(image_to_tensor(img, 8), expected)


def test_stream_batches_resume_and_split_across_processes(tmp_path):
    urls = write_shards(tmp_path / "shards")
    ds = WebDatasetShards(urls, 8)
    one = StreamBatches(ds, batch_size=4)
    batches = [[(it.get("caption"), it.get("skip")) for it in one.take()] for _ in range(9)]   # over 3 epochs
    # Every epoch holds the same 14 raw samples (11 good, 3 bad); the shard order is reshuffled.
    captions = [c for b in batches for c, _ in b]
    assert captions[:14].count(None) == 3 and sorted(filter(None, captions[:14])) == sorted(
        filter(None, captions[14:28]))
    # A reader placed at a saved position continues the stream exactly.
    ref = StreamBatches(ds, batch_size=4)
    for _ in range(5):
        ref.take()
    resumed = StreamBatches(ds, batch_size=4)
    resumed.position = json.loads(json.dumps(ref.position))   # as stored in state.json
    assert [(it.get("caption"), it.get("skip")) for it in resumed.take()] == batches[5]
    # Two processes split each global batch by slot and see together what one process sees.
    r0, r1 = StreamBatches(ds, 4, rank=0, world=2), StreamBatches(ds, 4, rank=1, world=2)
    for b in batches[:4]:
        halves = r0.take() + r1.take()
        assert [it["slot"] for it in halves] == [0, 1, 2, 3]
        assert [(it.get("caption"), it.get("skip")) for it in halves] == b
    skipped = SkipCounter()
    batch = collate(StreamBatches(ds, 14).take(), skipped)
    assert batch["image"].shape == (11, 3, 8, 8) and sum(skipped.values()) == 3
    with pytest.raises(ValueError, match="position"):
        StreamBatches(ds, 4).position = 12


TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}


def train_vae(cfg_dir: Path, urls: list[str], out: Path, max_steps: int, resume: bool = False) -> dict:
    import yaml

    from imagine.train.cli import add_arguments, run

    cfg = {"seed": 0, "data": {"type": "webdataset", "urls": urls, "resolution": 8, "eval_count": 4},
           "model": TINY_VAE, "loss": {"reconstruction": "l1", "kl_weight": 1e-6},
           "train": {"batch_size": 4, "lr": 2e-3, "max_steps": max_steps, "warmup_steps": 1,
                     "lr_schedule": "constant", "checkpoint_every": 3, "log_every": 1, "progress": False,
                     "tensorboard": False, "deterministic": True, "threads": 1}}
    path = cfg_dir / "vae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(["vae", "--config", str(path), "--output", str(out)] + (["--resume"] if resume else [])))


def test_vae_trains_on_shards_and_resumes_exactly(tmp_path):
    # Three shards: the last is held out for PSNR; the stream of the other two (18 raw samples,
    # 4 of them bad for a VAE) is read by 8 steps of 4, so the resume point (step 3) sits mid-epoch
    # and mid-shard, and the run crosses into epoch 1.
    urls = write_shards(tmp_path / "shards", n_shards=3)
    straight = train_vae(tmp_path, urls, tmp_path / "straight", 8)
    assert "psnr" in straight["eval"]
    # Epoch 0 is read whole (2 corrupt images, 2 samples without one); a VAE needs no caption.
    sk = straight["skipped"]
    assert set(sk) == {"corrupt or unreadable images", "records without an image"}, sk
    assert sk["corrupt or unreadable images"] >= 2 and sk["records without an image"] >= 2, sk
    train_vae(tmp_path, urls, tmp_path / "split", 3)   # stops at step 3 with a checkpoint
    resumed = train_vae(tmp_path, urls, tmp_path / "split", 8, resume=True)
    assert resumed["skipped"] == straight["skipped"]
    a = io.load_tensors(tmp_path / "straight" / "model" / "diffusion_pytorch_model.safetensors")
    b = io.load_tensors(tmp_path / "split" / "model" / "diffusion_pytorch_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_shapes_family_weights_reach_the_training_data():
    """data.family_weights draws families in the given proportions (0 = never); the items stay
    functions of (seed, index): the same index gives the same scene."""
    from collections import Counter

    from imagine.data.judge import parse_caption

    ds = build_dataset({"type": "shapes", "length": 1200, "seed": 1,
                        "family_weights": {"single": 0.0, "sized": 0.0, "pair": 1.0, "relation": 3.0, "count": 0.0}})
    fams = Counter(ds.inner.scene(i)[0].family for i in range(1200))
    assert set(fams) == {"pair", "relation"}
    assert 0.70 < fams["relation"] / 1200 < 0.80  # 3/4, within ~4 binomial standard deviations
    again = build_dataset({"type": "shapes", "length": 1200, "seed": 1,
                           "family_weights": {"single": 0.0, "sized": 0.0, "pair": 1.0, "relation": 3.0, "count": 0.0}})
    assert again[7]["caption"] == ds[7]["caption"] and torch.equal(again[7]["image"], ds[7]["image"])
    assert parse_caption(ds.inner.scene(7)[0].caption)["family"] == ds.inner.scene(7)[0].family
    with pytest.raises(ValueError, match="family_weights names families not in use"):
        build_dataset({"type": "shapes", "length": 10, "family_weights": {"triangles": 1.0}})


def test_shapes_pair_order_left_first_names_the_left_object_first():
    """data.pair_order left_first: every pair image has the first-named object on the left (by
    centre), is the exact mirror image of the "any" layout whenever it differs from it, and still
    satisfies its caption by the judge; other families and the held-out split are untouched."""
    import numpy as np

    from imagine.data.judge import detect_objects, judge_objects
    from imagine.data.shapes import is_heldout, render_array

    fams = {"single": 1.0, "sized": 0.0, "pair": 3.0, "relation": 1.0, "count": 0.0}
    left = build_dataset({"type": "shapes", "length": 300, "seed": 3, "family_weights": fams, "pair_order": "left_first"})
    free = build_dataset({"type": "shapes", "length": 300, "seed": 3, "family_weights": fams})
    mirrored = pairs = 0
    for i in range(300):
        (a, cap_a), (b, cap_b) = left.inner.scene(i), free.inner.scene(i)
        assert cap_a == cap_b and a.family == b.family
        if a.family != "pair":
            assert a.objects == b.objects
            continue
        pairs += 1
        assert a.objects[0].centre[0] <= a.objects[1].centre[0]
        assert not is_heldout(a.objects[0], a.objects[1])
        img = render_array(a)
        if a.objects != b.objects:
            mirrored += 1
            assert np.array_equal(img, render_array(b)[:, ::-1])
        assert judge_objects(detect_objects(img), a.caption), a.caption
    assert pairs > 120 and 0.3 < mirrored / pairs < 0.7   # about half the random layouts get mirrored
    with pytest.raises(ValueError, match="unknown pair_order 'sideways'; valid: any, left_first"):
        build_dataset({"type": "shapes", "length": 10, "pair_order": "sideways"})
