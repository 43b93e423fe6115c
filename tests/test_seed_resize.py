"""AUTOMATIC1111's "resize seed from width/height" (`seed_resize_from_h` / `_w`; `imagine.sampling.start_noise`):
the start noise is this size's own noise from each image's generator, with the noise the seed gives at the first
size put in its middle at A1111's offsets; checked against torch's own draws, through the pipeline (both passes
of the hires. fix), the CLI and the A1111 API."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_inpainting_api import API, BODY, KW, _image, plain  # noqa: F401, E402

from imagine import sampling  # noqa: E402
from imagine.sampling import make_generators, start_noise, variation_noise  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_start_noise_is_a1111s_with_torchs_draws():
    """Growing (4x4 into 6x8: rows 1-4, columns 2-5), cutting (5x5 into 3x3: its middle) and an odd margin (3x3
    into 4x4: the extra row and column at the end), per image with its own seed; the generators then continue
    after one draw at this size; with variation seeds the seed's noise is moved towards theirs at the first size."""
    seeds = [7, 8]
    for size, first, (rows, cols), (src_rows, src_cols) in (
            ((6, 8), (4, 4), (slice(1, 5), slice(2, 6)), (slice(0, 4), slice(0, 4))),
            ((3, 3), (5, 5), (slice(0, 3), slice(0, 3)), (slice(1, 4), slice(1, 4))),
            ((4, 4), (3, 3), (slice(0, 3), slice(0, 3)), (slice(0, 3), slice(0, 3)))):
        gens = make_generators(2, seeds)
        got = start_noise((2, 4, *size), gens, seeds, first_size=first)
        for i, s in enumerate(seeds):
            want = _randn(s, (1, 4, *size))[0]
            want[:, rows, cols] = _randn(s, (1, 4, *first))[0][:, src_rows, src_cols]
            assert torch.equal(got[i], want)
            fresh = torch.Generator().manual_seed(s)
            torch.randn((1, 4, *size), generator=fresh)
            assert torch.equal(torch.randn(3, generator=gens[i]), torch.randn(3, generator=fresh))
    gens = make_generators(1, [7])
    got = start_noise((1, 4, 6, 8), gens, [7], [99], 0.3, first_size=(4, 4))
    moved = variation_noise(0.3, _randn(7, (1, 4, 4, 4))[0], _randn(99, (1, 4, 4, 4))[0])
    assert torch.equal(got[0, :, 1:5, 2:6], moved)
    assert torch.equal(got[0, :, 0], _randn(7, (1, 4, 6, 8))[0, :, 0])
    # the same size (or none) is the plain noise, and the variation alone is A1111's as before
    assert torch.equal(start_noise((1, 4, 4, 4), make_generators(1, [7]), [7], first_size=(4, 4)),
                       _randn(7, (1, 4, 4, 4)))


@pytest.fixture
def spy(monkeypatch):
    calls = []

    def recorded(*args, **kwargs):
        out = start_noise(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(sampling, "start_noise", recorded)
    return calls


def test_the_pipeline_starts_from_the_resized_seeds_noise(plain, spy):  # noqa: F811
    """A 48x32 image with seed_resize_from 32x32 starts from noise whose middle is the 32x32 run's own start noise;
    the first size equal to the run's changes nothing; both hires. passes resize; the parameters and infotext carry
    A1111's "Seed resize from: WxH"; a value out of range is an error."""
    from imagine.images import a1111_parameters

    pipe = plain.pipe
    run = dict(seed=3, progress=False, output_type="latent", **KW)
    big = pipe.generate("a red circle", height=32, width=48, seed_resize_from_h=32, seed_resize_from_w=32, **run)
    noise, f, c = spy.pop(), pipe.scale, pipe.latent_channels
    own = _randn(3, (1, c, 32 // f, 48 // f))
    own[..., 8 // f:40 // f] = _randn(3, (1, c, 32 // f, 32 // f))  # the 32x32 run's start noise, in the middle
    assert torch.equal(noise, own)
    assert big.parameters["seed_resize_from"] == "32x32"
    assert "Seed resize from: 32x32" in a1111_parameters({**big.parameters, "prompt": "a"})
    same = pipe.generate("a red circle", height=32, width=32, seed_resize_from_h=32, seed_resize_from_w=32, **run)
    assert not spy and torch.equal(same.latents, pipe.generate("a red circle", height=32, width=32, **run).latents)
    pipe.generate_hires("a red circle", hires_scale=2, height=16, width=16, seed_resize_from_h=24,
                        seed_resize_from_w=24, **run)
    assert [tuple(n.shape[-2:]) for n in spy] == [(16 // f, 16 // f), (32 // f, 32 // f)]
    assert torch.equal(spy[1][..., 4 // f:28 // f, 4 // f:28 // f], _randn(3, (1, c, 24 // f, 24 // f)))
    with pytest.raises(ValueError, match="seed_resize_from_w must be a whole number of pixels"):
        pipe.generate("a", seed_resize_from_h=32, seed_resize_from_w=10**6, **run)


def test_a1111_api_and_cli_seed_resize(plain, tmp_path, capsys):  # noqa: F811
    import httpx

    from imagine.cli import main

    pipe = plain.pipe
    r = httpx.post(f"{plain.url}/sdapi/v1/txt2img", json={**BODY, "seed": 4, "width": 48, "height": 32,
                                                          "seed_resize_from_w": 24, "seed_resize_from_h": 40},
                   timeout=120)
    assert r.status_code == 200, r.text
    want = pipe.generate("a red circle", seed=4, width=48, height=32, seed_resize_from_w=24, seed_resize_from_h=40,
                         emphasis=True, progress=False, **API).images[0]
    assert _image(r.json()["images"][0]).tobytes() == want.tobytes()
    info = json.loads(r.json()["info"])
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (24, 40)
    assert "Seed resize from: 24x40" in info["infotexts"][0]
    plain_image = pipe.generate("a red circle", seed=4, width=48, height=32, emphasis=True, progress=False,
                                **API).images[0]
    assert want.tobytes() != plain_image.tobytes()
    r = httpx.post(f"{plain.url}/sdapi/v1/txt2img", json={**BODY, "seed_resize_from_h": 10**5, "seed_resize_from_w": 8},
                   timeout=120)
    assert r.status_code == 422 and "seed_resize_from_h" in r.text

    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(pipe.c.source), "a red circle", "--seed", "4", "--width", "48",
                 "--height", "32", "--seed-resize-from", "24x40", "--steps", "4", "--sampler", "euler",
                 "--guidance-scale", "5", "-o", str(out)]) == 0
    want = pipe.generate("a red circle", seed=4, width=48, height=32, seed_resize_from_w=24, seed_resize_from_h=40,
                         progress=False, **KW).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert main(["generate", "--model", str(pipe.c.source), "a", "--seed-resize-from", "24", "-o", str(out)]) != 0
    assert "--seed-resize-from must be WIDTHxHEIGHT" in capsys.readouterr().err
