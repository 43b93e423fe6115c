"""Upscaler models (imagine.upscalers, imagine.models.esrgan) against spandrel, the loader ComfyUI and AUTOMATIC1111 run
them through, on the same weights in every file layout in use; the tiled runs against ComfyUI's and A1111's code
restated here from their sources (comfy/utils.py tiled_scale_multidim; modules/images.py split_grid/combine_grid,
modules/upscaler_utils.py upscale_pil_patch, modules/upscaler.py Upscaler.upscale); a closed form (a compact net with
zero weights is nearest-neighbour upsampling); bad files."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import spandrel_peer
from imagine.upscalers import (a1111_resize, a1111_tiled, a1111_upscale, load_upscale_model, tiled_scale,
                               upscale_image, upscale_model_from_state, upscale_pictures)


def _randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # (small weights: 23 dense blocks of random 3x3s would blow up otherwise)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def spandrel_esrgan(scale=4, blocks=2, features=16, plus=False, shuffle=None, seed=0):
    """A random ESRGAN in spandrel's own network (ESRGAN's original "model.N" layout): its state dict."""
    spandrel = spandrel_peer.load()
    arch = spandrel.MAIN_REGISTRY.get("ESRGAN").architecture
    esrgan = type(arch).__module__
    net_cls = __import__(esrgan, fromlist=["ESRGAN"]).ESRGAN
    net = net_cls(in_nc=3 * (shuffle or 1) ** 2, out_nc=3, num_filters=features, num_blocks=blocks,
                  scale=scale * (shuffle or 1), plus=plus, shuffle_factor=shuffle)
    return {k: v.clone() for k, v in _randomize(net, seed).state_dict().items()}


def to_real_esrgan(old: dict) -> dict:
    """ESRGAN's "model.N" names -> Real-ESRGAN's (BasicSR's RRDBNet), written here from the two layouts."""
    convs = sorted({int(m[1]) for k in old if (m := re.fullmatch(r"model\.(\d+)\.weight", k))} - {0})
    *ups, hr, last = convs
    blocks = max(int(m[1]) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    new = {}
    for k, v in old.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(\w+)", k):
            new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(\w+)", k):
            assert int(m[1]) == blocks
            new[f"conv_body.{m[2]}"] = v
        elif m := re.fullmatch(r"model\.(\d+)\.(\w+)", k):
            n = int(m[1])
            name = ("conv_first" if n == 0 else "conv_hr" if n == hr else "conv_last" if n == last
                    else f"conv_up{ups.index(n) + 1}")
            new[f"{name}.{m[2]}"] = v
        else:
            raise AssertionError(k)
    return new


def to_bsrgan(new: dict) -> dict:
    """Real-ESRGAN's names -> BSRGAN/RealSR's (RRDB_trunk, trunk_conv, upconvN, HRconv)."""
    out = {}
    for k, v in new.items():
        k = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", k)
        k = k.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        out[re.sub(r"^conv_up(\d)\.", r"upconv\1.", k)] = v
    return out


def spandrel_compact(scale=4, convs=3, features=8, seed=0):
    spandrel = spandrel_peer.load()
    module = type(spandrel.MAIN_REGISTRY.get("Compact").architecture).__module__
    net = __import__(module, fromlist=["Compact"]).Compact(num_in_ch=3, num_out_ch=3, num_feat=features,
                                                             num_conv=convs, upscale=scale)
    return {k: v.clone() for k, v in _randomize(net, seed).state_dict().items()}


def peer(state: dict):
    """spandrel's model descriptor for `state` (its loader finds the architecture from the keys, as ours does)."""
    return spandrel_peer.load().ModelLoader().load_from_state_dict(state).eval()


def pictures(b, h, w, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


LAYOUTS = {
    "esrgan_x4": lambda: spandrel_esrgan(4),
    "esrgan_x2": lambda: spandrel_esrgan(2, seed=3),
    "esrgan_x1": lambda: spandrel_esrgan(1, seed=4),
    "esrgan_plus_x4": lambda: spandrel_esrgan(4, plus=True, seed=5),
    "real_esrgan_x4": lambda: to_real_esrgan(spandrel_esrgan(4, seed=6)),
    "real_esrgan_x2_unshuffle": lambda: to_real_esrgan(spandrel_esrgan(2, shuffle=2, seed=7)),
    "bsrgan_x4": lambda: to_bsrgan(to_real_esrgan(spandrel_esrgan(4, seed=8))),
    "real_esrgan_params_ema": lambda: {"params_ema": to_real_esrgan(spandrel_esrgan(4, seed=9))},
    "compact_x4": lambda: spandrel_compact(4),
    "compact_x2": lambda: spandrel_compact(2, convs=2, seed=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_and_runs_as_spandrel_runs_it(layout):
    state = LAYOUTS[layout]()
    ours = upscale_model_from_state(state)
    theirs = peer(state)
    assert ours.scale == theirs.scale
    for h, w in ((13, 10), (8, 8), (3, 5)):  # (odd sizes: the unshuffle model pads, as spandrel pads)
        x = pictures(1, h, w)
        got, want = ours(x), theirs(x.clone())
        assert got.shape == want.shape == (1, 3, h * ours.scale, w * ours.scale)
        assert torch.allclose(got, want, atol=2e-6), (layout, (got - want).abs().max())


def test_a_file_on_disk_in_both_formats(tmp_path):
    from safetensors.torch import save_file

    state = to_real_esrgan(spandrel_esrgan(4, seed=11))
    torch.save({"params_ema": state}, tmp_path / "RealESRGAN_x4plus.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "4x-Sharp.safetensors")
    a, b = load_upscale_model(tmp_path / "RealESRGAN_x4plus.pth"), load_upscale_model(tmp_path / "4x-Sharp.safetensors")
    assert (a.name, a.a1111_name, a.architecture, a.scale) == ("RealESRGAN_x4plus", "R-ESRGAN 4x+", "ESRGAN", 4)
    assert (b.name, b.a1111_name) == ("4x-Sharp", "4x-Sharp")
    x = pictures(2, 6, 7)
    assert torch.equal(a(x), b(x))


def test_a_compact_net_with_zero_weights_is_nearest_upsampling():
    # (SRVGGNetCompact adds its output to the nearest-upsampled input: zero weights leave that alone)
    state = {k: torch.zeros_like(v) for k, v in spandrel_compact(4).items()}
    x = pictures(2, 5, 6)
    assert torch.equal(upscale_model_from_state(state)(x), x.repeat_interleave(4, 2).repeat_interleave(4, 3))


# ------------------------------------------------------------------------------------------------
# ComfyUI's tiling, restated from comfy/utils.py tiled_scale_multidim (2 dimensions, one scale)
# ------------------------------------------------------------------------------------------------
def comfyui_tiled_scale(samples, function, tile, overlap, upscale_amount):
    out_shape = [round(n * upscale_amount) for n in samples.shape[2:]]
    output = torch.empty([samples.shape[0], 3] + out_shape)
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile for d in range(2)):
            output[b:b + 1] = function(s)
            continue
        out = torch.zeros([1, 3] + out_shape)
        out_div = torch.zeros([1, 3] + out_shape)
        positions = [range(0, s.shape[d + 2] - overlap, tile - overlap) if s.shape[d + 2] > tile else [0]
                     for d in range(2)]
        for py in positions[0]:
            for px in positions[1]:
                s_in, at = s, []
                for d, p in enumerate((py, px)):
                    pos = max(0, min(s.shape[d + 2] - overlap, p))
                    s_in = s_in.narrow(d + 2, pos, min(tile, s.shape[d + 2] - pos))
                    at.append(round(pos * upscale_amount))
                ps = function(s_in)
                mask = torch.ones_like(ps)
                feather = round(overlap * upscale_amount)
                for d in (2, 3):
                    if feather >= mask.shape[d]:
                        continue
                    for t in range(feather):
                        a = (t + 1) / feather
                        mask.narrow(d, t, 1).mul_(a)
                        mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
                o = out.narrow(2, at[0], mask.shape[2]).narrow(3, at[1], mask.shape[3])
                o_d = out_div.narrow(2, at[0], mask.shape[2]).narrow(3, at[1], mask.shape[3])
                o.add_(ps * mask)
                o_d.add_(mask)
        output[b:b + 1] = out / out_div
    return output


@pytest.mark.parametrize("size", [(37, 29), (16, 40), (12, 12)])
def test_tiles_as_comfyui_upscale_image_using_model(size):
    state = to_real_esrgan(spandrel_esrgan(2, seed=12))
    model, theirs = upscale_model_from_state(state), peer(state)
    x = pictures(2, *size, seed=13)
    want = torch.clamp(comfyui_tiled_scale(x, theirs, 16, 4, theirs.scale), 0, 1)
    got = upscale_pictures(model, x, tile=16, overlap=4)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-6), (got - want).abs().max()
    # (a seam would show where tiles meet: the blend makes the tiled run close to the whole one on a smooth net)
    assert tiled_scale(x, model, 2, 16, 4).shape == (2, 3, 2 * size[0], 2 * size[1])


def test_tiled_scale_counts_its_tiles():
    seen = []
    model = upscale_model_from_state(spandrel_compact(2, convs=1))
    upscale_pictures(model, pictures(2, 30, 20), tile=16, overlap=4, progress=lambda d, t: seen.append((d, t)))
    # (rows start at 0, 12 (range(0, 26, 12)) and 24; columns at 0, 12: 6 tiles a picture)
    assert seen == [(i, 12) for i in range(1, 13)]


# ------------------------------------------------------------------------------------------------
# AUTOMATIC1111's tiling, restated from modules/images.py and modules/upscaler_utils.py
# ------------------------------------------------------------------------------------------------
def a1111_split_grid(image, tile_w, tile_h, overlap):
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    tiles = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        line = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            line.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        tiles.append([y, tile_h, line])
    return tiles


def a1111_combine_grid(tiles, tile_h, image_w, image_h, overlap):
    def mask(r):
        return Image.fromarray((r * 255 / overlap).astype(np.uint8), "L")

    mask_w = mask(np.arange(overlap, dtype=np.float32).reshape((1, overlap)).repeat(tile_h, axis=0))
    mask_h = mask(np.arange(overlap, dtype=np.float32).reshape((overlap, 1)).repeat(image_w, axis=1))
    combined = Image.new("RGB", (image_w, image_h))
    for y, h, row in tiles:
        line = Image.new("RGB", (image_w, h))
        for x, w, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            line.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            line.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, line.width, overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, line.width, h)), (0, y + overlap))
    return combined


def a1111_patch(descriptor, img):
    arr = np.array(img.convert("RGB"))[:, :, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(arr, (2, 0, 1))) / 255).unsqueeze(0).float()
    with torch.inference_mode():
        out = descriptor(t).squeeze(0)
        arr = 255.0 * np.moveaxis(out.float().clamp_(0, 1).numpy(), 0, 2)
    return Image.fromarray(arr.round().astype(np.uint8)[:, :, ::-1], "RGB")


def a1111_upscale_with_model(descriptor, img, tile, overlap):
    grid = a1111_split_grid(img, tile, tile, overlap)
    new, s = [], 1
    for y, h, row in grid:
        line = []
        for x, w, t in row:
            out = a1111_patch(descriptor, t)
            s = out.width // t.width
            line.append([x * s, w * s, out])
        new.append([y * s, h * s, line])
    return a1111_combine_grid(new, tile * s, img.width * s, img.height * s, overlap * s)


def picture(w, h, seed=5):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(40, 33), (12, 9), (24, 24)])
def test_tiles_as_a1111_upscale_with_model(size):
    state = to_real_esrgan(spandrel_esrgan(2, seed=14))
    model, theirs = upscale_model_from_state(state), peer(state)
    img = picture(*size)
    got = a1111_tiled(model, img, tile=16, overlap=4)
    want = a1111_upscale_with_model(theirs, img, 16, 4)
    assert got.size == want.size == (2 * size[0], 2 * size[1])
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


def a1111_upscaler_upscale(img, scale, do_upscale):
    dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
    for i in range(3):
        if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = (img.width, img.height)
        img = do_upscale(img)
        if shape == (img.width, img.height):
            break
    if img.width != dest_w or img.height != dest_h:
        img = img.resize((int(dest_w), int(dest_h)), resample=Image.LANCZOS)
    return img


def test_a1111_upscaler_runs_the_model_until_large_enough_then_lanczos():
    state = spandrel_compact(2, convs=1, seed=15)
    model, theirs = upscale_model_from_state(state), peer(state)
    img = picture(20, 14)
    for scale in (3, 2, 1.3, 5):  # (x2 twice then down; once; once then down; three times then down)
        got = a1111_upscale(img, scale, model, tile=16, overlap=4)
        want = a1111_upscaler_upscale(img, scale, lambda im: a1111_upscale_with_model(theirs, im, 16, 4))
        assert got.size == want.size == (int(20 * scale // 8 * 8), int(14 * scale // 8 * 8))
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
        assert diff.max() <= 1, (scale, diff.max())
    lanczos = lambda im: im.resize((int(im.width * 2.5), int(im.height * 2.5)), Image.LANCZOS)  # noqa: E731
    assert np.array_equal(np.asarray(a1111_upscale(img, 2.5, "Lanczos")),
                          np.asarray(a1111_upscaler_upscale(img, 2.5, lanczos)))
    assert a1111_upscale(img, 2, "None") is img
    assert a1111_resize(img, 64, 40, model).size == (64, 40)


def test_upscale_image_reaches_the_size_asked():
    model = upscale_model_from_state(spandrel_compact(2, convs=1, seed=16))
    img = picture(10, 7)
    assert upscale_image(model, img).size == (20, 14)
    assert upscale_image(model, img, scale=3).size == (30, 21)  # (two passes, then Lanczos down)
    assert upscale_image(model, img, size=(25, 9)).size == (25, 9)
    # (at its own scale it is the model's tiled run rounded to 8 bits)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    want = (upscale_pictures(model, x)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(upscale_image(model, img)), want)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="upscaler model not found"):
        load_upscale_model(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="is a folder"):
        load_upscale_model(tmp_path)
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd.ckpt")
    with pytest.raises(ValueError, match="not an upscaler model this program reads .* expected 'conv_first.weight'"):
        load_upscale_model(tmp_path / "sd.ckpt")
    state = to_real_esrgan(spandrel_esrgan(4, seed=17))
    state["conv_hr.weight"] = state["conv_hr.weight"][:, :8]
    with pytest.raises(ValueError, match=r"conv_hr.weight is \(16, 8, 3, 3\), not \(16, 16, 3, 3\)"):
        upscale_model_from_state(state)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "sd.ckpt").read_bytes()[:50])
    with pytest.raises(ValueError, match="cut.pth"):
        load_upscale_model(tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="tile must be 0"):
        upscale_pictures(upscale_model_from_state(spandrel_compact(2, convs=1)), pictures(1, 4, 4), tile=8, overlap=8)


def test_the_fast_precision_is_close_and_the_copies_are_shared():
    model = upscale_model_from_state(to_real_esrgan(spandrel_esrgan(4, seed=18)))
    x = pictures(1, 9, 11)
    exact, fast = model(x), model.with_precision("fast")(x)
    assert model.with_precision("exact") is model and model.with_precision("fast").net is model.net
    assert (fast - exact).abs().max() < 0.02  # (bf16 where the CPU has it; float32 otherwise)
    with pytest.raises(ValueError, match="precision must be 'exact' or 'fast'"):
        model.with_precision("half")


def test_the_upscale_command(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from imagine.testing import run_cli

    torch.save({"params_ema": spandrel_compact(2, convs=1, seed=19)}, tmp_path / "realesr-animevideov3.pth")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20")
    picture(10, 7).save(tmp_path / "a.png", pnginfo=info)
    picture(6, 6, seed=9).save(tmp_path / "b.png")

    monkeypatch.chdir(tmp_path)

    def imagine(*a):
        return run_cli("upscale", *a)

    r = imagine("a.png", "--model", "R-ESRGAN AnimeVideo", "--upscaler-dir", ".", "--size", "25x9")
    assert r.returncode == 0, r.stderr
    out = Image.open(tmp_path / "a-upscaled.png")
    assert out.size == (25, 9) and out.info["parameters"] == "a cat\nSteps: 20"
    assert out.info["postprocessing"] == "Postprocess upscale to: 25x9, Postprocess upscaler: R-ESRGAN AnimeVideo"
    model = load_upscale_model(tmp_path / "realesr-animevideov3.pth")
    assert np.array_equal(np.asarray(out), np.asarray(upscale_image(model, picture(10, 7), size=(25, 9))))
    r = imagine("a.png", "b.png", "-m", "realesr-animevideov3.pth", "--tiling", "a1111", "-o", "big")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "big" / "b-upscaled.png")),
                          np.asarray(a1111_upscale(picture(6, 6, seed=9), 2, model)))
    for args, message in ((("a.png", "-m", "nope"), "no such upscaler model"),
                          (("a.png", "-m", "realesr-animevideov3.pth", "--size", "9"), "--size must be WIDTHxHEIGHT"),
                          (("c.png", "-m", "realesr-animevideov3.pth"), "picture not found: c.png"),
                          (("a.png", "b.png", "-m", "realesr-animevideov3.pth", "-o", "one.png"), "give a folder")):
        r = imagine(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_a_folder_of_pictures_with_a_broken_one(tmp_path):
    """(session 38) A folder given as IMAGE: its pictures (not its subfolders'), each into FOLDER/upscaled/ (or -o);
    a file that is not a picture is skipped and named, the rest written, and the exit code says so (1)."""
    from imagine.testing import run_cli
    from imagine.upscalers import EMBEDDED_UPSCALER

    photos = tmp_path / "photos"
    (photos / "deeper").mkdir(parents=True)
    picture(8, 6, seed=1).save(photos / "one.png")
    picture(5, 7, seed=2).save(photos / "two.jpg", quality=95)
    picture(4, 4, seed=3).save(photos / "deeper" / "not-read.png")
    (photos / "broken.png").write_bytes(b"not a picture")
    (photos / "notes.txt").write_text("left alone")
    r = run_cli("upscale", photos)
    assert r.returncode == 1 and "skipped" in r.stderr and "broken.png" in r.stderr, r.stderr
    assert "1 of 3 pictures skipped" in r.stderr
    made = sorted(p.name for p in (photos / "upscaled").iterdir())
    assert made == ["one-upscaled.png", "two-upscaled.png"]
    model = load_upscale_model(EMBEDDED_UPSCALER)
    want = upscale_image(model, Image.open(photos / "one.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(photos / "upscaled" / "one-upscaled.png")), np.asarray(want))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("upscale", empty)
    assert r.returncode == 2 and "a folder with no pictures in it" in r.stderr, r.stderr


def test_the_bench_runs_both_sides_on_the_same_weights(tmp_path):
    import json
    import subprocess
    import sys

    # (in a process of its own: the bench collects garbage and trims the heap before each timed call, which takes
    # seconds each in a test worker's heap of thousands of tests: 27 s in the suite against 7 alone)
    r = subprocess.run([sys.executable, "-m", "imagine.cli", "bench", "upscale", "--models", "tiny,tiny_swinir",
                        "--tile", "16", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for model in json.loads((tmp_path / "b.json").read_text())["models"]:
        sides = model["sides"]
        assert sides["imagine_exact"]["rel_diff_vs_spandrel"] < 1e-5, model["model"]
        assert sides["imagine_fast"]["rel_diff_vs_spandrel"] < 0.05, model["model"]


def test_an_a1111_models_folder_is_read_through_its_upscaler_subfolders(tmp_path):
    """(session 38) --upscaler-dir pointed at A1111's whole models/ folder: its ESRGAN, RealESRGAN, SwinIR, DAT
    subfolders are read, its Stable-diffusion checkpoints and LoRAs are not listed as upscalers; a plain folder is read
    whole, subfolders too."""
    from imagine.upscalers import find_upscalers

    models = tmp_path / "models"
    for sub, name in (("ESRGAN", "4x-UltraSharp.pth"), ("RealESRGAN", "RealESRGAN_x4plus.pth"),
                      ("SwinIR", "SwinIR_4x.pth"), ("DAT", "DAT_x2.pth"), ("Stable-diffusion", "sd15.safetensors"),
                      ("Lora", "style.safetensors")):
        (models / sub).mkdir(parents=True)
        (models / sub / name).write_bytes(b"")
    assert sorted(find_upscalers(models)) == ["4x-UltraSharp", "DAT_x2", "RealESRGAN_x4plus", "SwinIR_4x"]
    assert sorted(find_upscalers(models / "Stable-diffusion")) == ["sd15"]  # (a folder of its own: read whole)
    plain = tmp_path / "mine"
    (plain / "deeper").mkdir(parents=True)
    (plain / "a.pth").write_bytes(b"")
    (plain / "deeper" / "b.safetensors").write_bytes(b"")
    assert sorted(find_upscalers(plain)) == ["a", "b"]
