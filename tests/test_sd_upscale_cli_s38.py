"""imagine generate --sd-upscale: A1111's "SD upscale" img2img script (scripts/sd_upscale.py) from the command line,
against the script restated: the picture through Upscaler.upscale, split_grid's tiles (tests/test_upscalers_s37's
restatement of A1111's code), each tile through plain image to image with the script's seed (batch j of --batch-size
tiles from the seed of batch j - 1 plus 1; tile i of it seed + i), put back with combine_grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagine.cli import main
from test_upscalers_s37 import a1111_combine_grid, a1111_split_grid

RUN = ["--steps", "3", "--sampler", "euler", "--guidance-scale", "4", "--strength", "0.6", "-q"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from imagine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("batch", [1, 2])
def test_sd_upscale_is_a1111s_script(tiny, tmp_path, batch):
    src = tmp_path / "src.png"
    picture(20, 12).save(src)
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(tiny), "--init-image", str(src), "--sd-upscale", "2",
                 "--width", "16", "--height", "16", "--sd-upscale-overlap", "4", "--seed", "11",
                 "--batch-size", str(batch), "-o", str(out), *RUN]) == 0
    made = Image.open(out)
    assert made.size == (40, 24)
    assert "SD upscale overlap: 4, SD upscale upscaler: Lanczos" in made.info["parameters"]
    # the script restated: Upscaler.upscale's Lanczos (int(20 x 2) x int(12 x 2), already a multiple of 8)
    big = Image.open(src).convert("RGB").resize((40, 24), Image.LANCZOS)
    grid = a1111_split_grid(big, 16, 16, 4)
    tiles = [t for _, _, row in grid for _, _, t in row]
    seeds, s = [], 11
    for j in range(0, len(tiles), batch):
        seeds += [s + i for i in range(len(tiles[j:j + batch]))]
        s += 1  # (p.seed = processed.seed + 1)
    done = []
    for k, (tile, seed) in enumerate(zip(tiles, seeds)):
        tile.save(tmp_path / f"t{k}.png")
        assert main(["generate", "a red circle", "--model", str(tiny), "--init-image", str(tmp_path / f"t{k}.png"),
                     "--width", "16", "--height", "16", "--seed", str(seed), "-o", str(tmp_path / f"r{k}.png"),
                     *RUN]) == 0
        done.append(Image.open(tmp_path / f"r{k}.png").convert("RGB"))
    it = iter(done)
    want = a1111_combine_grid([[y, h, [[x, w, next(it)] for x, w, _ in row]] for y, h, row in grid], 16, 40, 24, 4)
    d = np.abs(np.asarray(made.convert("RGB"), int) - np.asarray(want, int))
    assert len(tiles) == 6 and d.max() == 0, d.max()


def test_none_redraws_the_picture_as_it_is_and_a_model_enlarges_it(tiny, tmp_path):
    from imagine.upscalers import EMBEDDED_UPSCALER

    src = tmp_path / "src.png"
    picture(24, 16, seed=1).save(src)
    out = tmp_path / "none.png"
    assert main(["generate", "x", "--model", str(tiny), "--init-image", str(src), "--sd-upscale", "2",
                 "--sd-upscale-upscaler", "none", "--width", "16", "--height", "16", "--seed", "1", "-o", str(out),
                 *RUN]) == 0
    assert Image.open(out).size == (24, 16)  # (A1111's script: the "None" upscaler leaves the picture's size)
    out = tmp_path / "model.png"
    assert main(["generate", "x", "--model", str(tiny), "--init-image", str(src), "--sd-upscale", "2",
                 "--sd-upscale-upscaler", str(EMBEDDED_UPSCALER), "--width", "16", "--height", "16", "--seed", "1",
                 "-o", str(out), *RUN]) == 0
    made = Image.open(out)
    assert made.size == (48, 32) and "SD upscale upscaler: upscaler-shapes-x4" in made.info["parameters"]


def test_bad_sd_upscale_flags_are_named(tiny, tmp_path, capsys):
    src = tmp_path / "src.png"
    picture(20, 12).save(src)
    base = ["generate", "x", "--model", str(tiny), "-q"]
    for extra, message in ((["--sd-upscale", "2"], "give it with --init-image"),
                           (["--init-image", str(src), "--sd-upscale-overlap", "8"], "is for --sd-upscale"),
                           (["--init-image", str(src), "--sd-upscale", "9"], "(0, 8]"),
                           (["--init-image", str(src), "--sd-upscale", "2", "--sd-upscale-upscaler", "R-ESRGAN 4x+"],
                            "unknown upscaler 'R-ESRGAN 4x+'"),
                           (["--init-image", str(src), "--sd-upscale", "2", "--width", "16", "--height", "16",
                             "--sd-upscale-overlap", "16"], "less than a tile's side"),
                           (["--init-image", str(src), "--sd-upscale", "2", "--mask", str(src)],
                            "--mask and --sd-upscale")):
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_an_sd_upscale_infotext_gives_its_overlap_and_upscaler(tiny, tmp_path, capsys):
    """A picture A1111's script made carries its tiles' Size, "SD upscale overlap" and "SD upscale upscaler" (not its
    scale): with --sd-upscale and --init-image they apply (the run equals one given them as flags); without, a note."""
    from imagine.commands.generate import infotext_defaults
    from imagine.images import parse_a1111_parameters

    text = ("a red circle\nSteps: 3, Sampler: Euler, CFG scale: 4, Seed: 11, Size: 16x16, Denoising strength: 0.6, "
            "SD upscale overlap: 4, SD upscale upscaler: Nearest")
    fields = parse_a1111_parameters(text)
    read = infotext_defaults(fields, init_image=True, sd_upscale=True)
    assert (read["sd_upscale_overlap"], read["sd_upscale_upscaler"], read["width"], read["height"]) == (4, "Nearest",
                                                                                                        16, 16)
    other = infotext_defaults(fields, init_image=True)
    assert "sd_upscale_overlap" not in other and any("give --init-image and --sd-upscale S" in n
                                                     for n in other["_infotext_notes"])
    missing = infotext_defaults(parse_a1111_parameters(text.replace("Nearest", "4x-Nope")), init_image=True,
                                sd_upscale=True)
    assert "sd_upscale_upscaler" not in missing and any("SD upscale upscaler: 4x-Nope" in n
                                                       for n in missing["_infotext_notes"])
    src, info = tmp_path / "src.png", tmp_path / "made.png"
    picture(20, 12).save(src)
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    picture(8, 8).save(info, pnginfo=meta)
    made = {}
    for name, extra in (("read", []), ("given", ["--sd-upscale-upscaler", "nearest", "--sd-upscale-overlap", "4"]),
                        ("lanczos", ["--sd-upscale-upscaler", "lanczos"])):
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--model", str(tiny), "--infotext", str(info), "--init-image", str(src),
                     "--sd-upscale", "2", *extra, "-o", str(out), "-q"]) == 0
        made[name] = np.asarray(Image.open(out))
    assert made["read"].shape == (24, 40, 3) and np.array_equal(made["read"], made["given"])
    assert not np.array_equal(made["read"], made["lanczos"])  # (the infotext's upscaler did apply)
