"""Where a seed's noise comes from: AUTOMATIC1111's random number generator sources ("CPU", and "NV", the draws of an
NVIDIA GPU made on any machine: imagine.philox) and its eta noise seed delta (ENSD).

Checked: Philox4x32-10 against Random123's known-answer vectors (the ones its reference distribution ships, which
TensorFlow's and others' tests use too); the normal draws against the first draws A1111's rng_philox documents for seed 0
(numbers printed from a CUDA card; A1111's own float64 Box-Muller gives ours bit for bit); the draws are standard normal
and successive ones independent. Then runs of k-diffusion's samplers as A1111 makes them (its ImageRNG restated:
each image's first draw, then generators made anew from seed + ENSD; its torchsde trees drawing through randn_local),
cpu and NV, ENSD 0 and 31337, against sample(rng=, seed_delta=); the pipeline, the CLI and the A1111 API follow, with
A1111's infotext fields; under A1111's strength rules image to image starts from the seed's first draw, as A1111's.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_k_diffusion import A1111, CONFIGS, CompVisModel, a1111_sigmas, kd  # noqa: F401 (kd: the fixture)
from test_loading import save_diffusers_folder
from test_samplers_parity import SEEDS, SHAPE, make_model

from imagine.philox import PhiloxGenerator, philox4x32_10
from imagine.samplers import a1111_settings
from imagine.sampling import ImageNoiseStream, PerSampleNoise, make_generators, posterior_generators, sample
from imagine.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# A1111's modules/rng_philox.py docstring: Generator(seed=0).randn(shape=(3, 4))
A1111_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]


@pytest.mark.parametrize("counter, key, want", PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    out = philox4x32_10(np.array(counter, dtype=np.uint64)[:, None], np.array(key, dtype=np.uint64)[:, None])
    assert tuple(int(w) for w in out[:, 0]) == want


def test_draws_are_the_documented_ones_and_move_on():
    g = PhiloxGenerator(0)
    first = g.randn((3, 4))
    assert first.dtype == torch.float32
    # (the documented figures are a CUDA card's float32 sincos/log; a few float32 ulps from the float64 transform)
    assert torch.allclose(first.double(), torch.tensor(A1111_SEED_0, dtype=torch.float64), atol=5e-7, rtol=0)
    second = g.randn((3, 4))
    assert not torch.equal(first, second)  # (the offset moved on)
    assert torch.equal(PhiloxGenerator(0).randn((12,)), first.flatten())  # element i is counter i, whatever the shape
    assert torch.equal(PhiloxGenerator(0).randn((2,)), first.flatten()[:2])
    # the seed's high word is the key's second word
    assert not torch.equal(PhiloxGenerator(2**32).randn((3, 4)), first)
    assert not torch.equal(PhiloxGenerator(2**32 + 7).randn((3, 4)), PhiloxGenerator(7).randn((3, 4)))
    for bad in (-1, 2**64, 1.5, True, "7"):
        with pytest.raises(ValueError, match=r"a Philox seed is an int in \[0, 2\^64 - 1\]"):
            PhiloxGenerator(bad)


def test_draws_are_standard_normal_and_independent():
    from scipy import stats

    g = PhiloxGenerator(12345)
    a, b = g.randn((1 << 16,)).double(), g.randn((1 << 16,)).double()
    for x in (a, b):
        assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02  # (offset 0 against offset 1)
    c = PhiloxGenerator(12346).randn((1 << 16,)).double()
    assert abs(float(torch.corrcoef(torch.stack([a, c]))[0, 1])) < 0.02  # (neighbouring seeds)


class A1111ImageRNG:
    """A1111's ImageRNG (modules/rng.py), restated for one image shape: a generator per image seed (torch's CPU one,
    or its rng_philox.Generator for "NV": imagine.philox, checked above); next() draws one tensor from each; the first
    call, `first()`, makes the generators anew from seed + eta_noise_seed_delta when that is set."""

    def __init__(self, seeds, source: str, ensd: int):
        self.seeds, self.source, self.ensd = list(seeds), source, ensd
        self.gens, self.is_first = [self._generator(s) for s in self.seeds], True

    def _generator(self, seed):
        return PhiloxGenerator(seed) if self.source == "NV" else torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        xs = torch.stack([g.randn(SHAPE[1:]) if self.source == "NV" else torch.randn(SHAPE[1:], generator=g)
                          for g in self.gens])
        if self.is_first and self.ensd:
            self.gens = [self._generator(s + self.ensd) for s in self.seeds]
        self.is_first = False
        return xs


def a1111_randn_local(seed, size, source):
    """A1111's replacement of torchsde's draws (replace_torchsde_browinan: devices.randn_local over its source)."""
    if source == "NV":
        return PhiloxGenerator(int(seed)).randn(size)
    return torch.randn(size, generator=torch.Generator().manual_seed(int(seed)))


def test_image_streams_are_a1111s():
    for rng, source in (("cpu", "CPU"), ("nv", "NV")):
        for delta in (0, 31337):
            ours = make_generators(2, [7, 8], rng=rng, seed_delta=delta)
            theirs = A1111ImageRNG([7, 8], source, delta)
            noise = PerSampleNoise(ours)
            for k in range(3):  # (the first draw is the start noise: A1111's first())
                got = noise.draw_start((2, *SHAPE[1:])) if k == 0 else noise.draw((2, *SHAPE[1:]))
                assert torch.equal(got, theirs.next()), (rng, delta)
    plain = make_generators(2, [7, 8])  # (the default: torch.Generators, as before)
    assert all(isinstance(g, torch.Generator) for g in plain)
    # a draw before the start noise (diffusers' VAE posterior) comes from the seed's stream; the delta counts from
    # the start noise on
    before = make_generators(1, [7], seed_delta=31337)
    noise = PerSampleNoise(before)
    first, start, after = noise.draw((1, 2)), noise.draw_start((1, 2)), noise.draw((1, 2))
    assert torch.equal(torch.cat([first, start]), torch.randn((2, 2), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(after, torch.randn((1, 2), generator=torch.Generator().manual_seed(7 + 31337)))
    # the VAE posterior's streams under A1111's rules are none of the images' (cpu or nv)
    for seed in (0, 5, 2**32 - 1):
        post = PerSampleNoise(posterior_generators([seed])).draw((1, 4, 8, 8))
        for rng in ("cpu", "nv"):
            own = PerSampleNoise(make_generators(1, [seed], rng=rng, seed_delta=1)).draw((1, 4, 8, 8))
            assert abs(float(torch.corrcoef(torch.stack([post.flatten(), own.flatten()]))[0, 1])) < 0.2
    stream = ImageNoiseStream(7)
    assert torch.equal(torch.cat([stream.randn((2, 3)), stream.randn((2, 3))]),
                       torch.randn((4, 3), generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="rng must be one of 'cpu', 'nv'"):
        make_generators(1, [7], rng="gpu")
    with pytest.raises(ValueError, match=r"ENSD\) must be an int >= 0"):
        make_generators(1, [7], seed_delta=-1)
    with pytest.raises(ValueError, match="give seeds, not generators"):
        make_generators(1, generator=torch.Generator(), rng="nv")


def run_a1111(kd, label, steps, source, ensd, monkeypatch):
    """A1111's txt2img with k-diffusion sampler `label` (test_k_diffusion.py's run) over its ImageRNG: x_T the images'
    first draws, ancestral noise next()'s, and under "NV" the Brownian trees' draws Philox's."""
    import torchsde._brownian.brownian_interval as interval

    funcname, kwargs, automatic, discard, brownian = A1111[label]
    denoiser = kd.external.CompVisDenoiser(CompVisModel(CONFIGS[0]))
    sigmas = a1111_sigmas(kd, denoiser, automatic or "uniform", steps + 1 if discard else steps)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    rng = A1111ImageRNG(SEEDS, source, ensd)
    x = rng.next() * sigmas[0]
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(interval, "_randn", lambda size, dtype, device, seed:
                  a1111_randn_local(seed, size, source).to(device=device, dtype=dtype))
        if brownian:
            noise = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
        else:
            def noise(sigma, sigma_next):
                return rng.next()
        return getattr(kd.sampling, funcname)(denoiser, x, sigmas, extra_args={"cond": None}, disable=True,
                                              noise_sampler=noise, **kwargs)


@pytest.mark.parametrize("label", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 3M SDE"])
def test_sources_and_ensd_equal_a1111s(kd, label, monkeypatch):
    cfg = CONFIGS[0]
    runs = {}
    for rng, source in (("cpu", "CPU"), ("nv", "NV")):
        for delta in (0, 31337):
            theirs = run_a1111(kd, label, 6, source, delta, monkeypatch)
            ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=6,
                          seeds=SEEDS, progress=False, rng=rng, seed_delta=delta, **a1111_settings(label))
            err = (ours.float() - theirs).abs().max().item()
            assert err < 1e-4, f"{label}, {source}, ENSD {delta}: max |ours - A1111's| = {err:.2e}"
            runs[rng, delta] = ours
    assert (runs["nv", 0] - runs["cpu", 0]).abs().max() > 0.1  # (the sources differ)
    moved = (runs["cpu", 31337] - runs["cpu", 0]).abs().max()
    # (the ENSD moves the ancestral samplers' noise after the start; the SDE ones draw theirs from the seeds' trees)
    assert (moved > 0.1) == (not A1111[label][4]), (label, float(moved))


def test_tree_draws_stay_torchsdes_outside_nv_runs():
    """The NV trees' draws are routed per thread: a cpu tree built after an NV one draws torchsde's own again."""
    from imagine.brownian import BrownianTreeNoise

    before = BrownianTreeNoise([3], (2, 2), 0.1, 10.0)(10.0, 1.0)
    nv = BrownianTreeNoise([3], (2, 2), 0.1, 10.0, rng="nv")(10.0, 1.0)
    after = BrownianTreeNoise([3], (2, 2), 0.1, 10.0)(10.0, 1.0)
    assert torch.equal(before, after) and not torch.equal(before, nv)


# -- the pipeline, the CLI and the A1111 API --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    save_diffusers_folder(folder, "sd1", scheduler="ddim")
    return TextToImagePipeline.from_pretrained(folder)


KW = dict(steps=4, height=16, width=16, progress=False, guidance_scale=5.0)


def test_pipeline_batches_and_records_them(pipe):
    nv = pipe.generate(["a red circle"] * 2, seed=5, rng="nv", noise_seed_delta=31337, sampler="euler_a",
                       output_type="latent", **KW)
    assert nv.parameters["rng"] == "nv" and nv.parameters["noise_seed_delta"] == 31337
    for i in range(2):  # (each image its own stream: the same at any batch size)
        alone = pipe.generate("a red circle", seed=5 + i, rng="nv", noise_seed_delta=31337, sampler="euler_a",
                              output_type="latent", **KW)
        assert torch.allclose(nv.latents[i:i + 1], alone.latents, atol=1e-5, rtol=0)
    cpu = pipe.generate("a red circle", seed=5, sampler="euler_a", output_type="latent", **KW)
    assert "rng" not in cpu.parameters and (cpu.latents - nv.latents[:1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="rng must be one of"):
        pipe.generate("a red circle", seed=5, rng="cuda", **KW)


def test_a1111_img2img_starts_from_the_seeds_first_draw(pipe):
    """Under A1111's rules the image's stream gives its start noise first (A1111's ImageRNG.first) and the VAE's
    posterior comes from a stream of its own: the run equals one from those latents (init_latents, no encoding), ENSD
    and all; diffusers' rule keeps diffusers' order (the posterior first), which such a run does not equal."""
    picture = Image.new("RGB", (16, 16), (200, 40, 40))
    kw = {**KW, "strength": 0.6, "seed": 5, "output_type": "latent", "noise_seed_delta": 31337}
    latents = pipe.encode_images([picture], 16, 16, posterior_generators([5]))
    for label in ("Euler a", "DDIM"):
        settings = a1111_settings(label)
        res = pipe.generate("a red circle", init_image=picture, **kw, **settings)
        same = pipe.generate("a red circle", init_latents=latents, **kw, **settings)
        assert torch.equal(res.latents, same.latents), label
    diffusers = pipe.generate("a red circle", init_image=picture, sampler="euler", **kw)
    from_latents = pipe.generate("a red circle", init_latents=pipe.encode_images([picture], 16, 16,
                                                                                 make_generators(1, [5])),
                                 sampler="euler", **kw)
    assert (diffusers.latents - from_latents.latents).abs().max() > 0.1


@pytest.mark.parametrize("rule", ["diffusers", "a1111"])
def test_the_delta_leaves_the_start_noise_alone(pipe, rule):
    """ENSD moves only the draws after the start noise: a deterministic sampler's image to image, inpainting (both
    masked contents) and hires. fix (Lanczos: a VAE round trip) do not change with it, under either strength rule
    (under diffusers' the VAE posterior is drawn before the start noise, from the seed's stream); an ancestral one
    does."""
    picture = Image.new("RGB", (16, 16), (200, 40, 40))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    kw = {**KW, "seed": 5, "output_type": "latent", "strength_rule": rule}
    runs = {"img2img": dict(init_image=picture, strength=0.6),
            "inpainting": dict(init_image=picture, mask_image=mask, strength=0.7),
            "latent noise": dict(init_image=picture, mask_image=mask, strength=0.7, masked_content="latent_noise")}
    for sampler, moves in (("euler", False), ("euler_a", True)):
        for name, run in runs.items():
            plain = pipe.generate("a red circle", sampler=sampler, **kw, **run).latents
            delta = pipe.generate("a red circle", sampler=sampler, noise_seed_delta=31337, **kw, **run).latents
            assert (float((plain - delta).abs().max()) > 0.05) == moves, (rule, sampler, name)
    hires = dict(hires_scale=1.5, hires_strength=0.6, hires_upscaler="lanczos", sampler="euler", seed=5,
                 strength_rule=rule, **{k: v for k, v in KW.items()})
    assert torch.equal(pipe.generate_hires("a red circle", output_type="latent", **hires).latents,
                       pipe.generate_hires("a red circle", output_type="latent", noise_seed_delta=31337,
                                           **hires).latents)


def test_the_cli_and_the_a1111_api_follow(pipe, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    out = tmp_path / "nv.png"
    code = main(["generate", "--model", pipe.c.source, "a red circle", "--seed", "5", "--rng", "nv", "--ensd", "31337",
                 "--steps", "4", "--sampler", "euler_a", "--guidance-scale", "5", "--height", "16", "--width", "16",
                 "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    want = pipe.generate("a red circle", seed=5, rng="nv", noise_seed_delta=31337, sampler="euler_a", **KW).images[0]
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes()
    assert "RNG: NV, ENSD: 31337" in img.text["parameters"]

    api = {**a1111_settings("Euler a"), "emphasis": True, "long_prompts": True, "prompt_editing": True,
           "composable": True}
    want = pipe.generate("a red circle", seed=5, rng="nv", noise_seed_delta=31337, **KW, **api).images[0]
    body = {"prompt": "a red circle", "steps": 4, "cfg_scale": 5, "width": 16, "height": 16, "seed": 5,
            "sampler_name": "Euler a"}
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        options = httpx.get(f"{srv.url}/sdapi/v1/options", timeout=30).json()
        assert (options["randn_source"], options["eta_noise_seed_delta"]) == ("GPU", 0)  # (A1111's defaults)
        overrides = {"randn_source": "NV", "eta_noise_seed_delta": 31337, "sd_vae": "Automatic"}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": overrides}, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.convert("RGB").tobytes()
        info = json.loads(r.json()["info"])
        assert "RNG: NV, ENSD: 31337" in info["infotexts"][0]
        assert "override_settings.sd_vae" in info["ignored_fields"] and "override_settings" not in info["ignored_fields"]
        # the server's options serve every request that does not override them
        assert httpx.post(f"{srv.url}/sdapi/v1/options", json={"randn_source": "NV", "eta_noise_seed_delta": 31337},
                          timeout=30).status_code == 200
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert got.tobytes() == want.convert("RGB").tobytes()
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {"randn_source": "GPU",
                                                                                          "eta_noise_seed_delta": 0}},
                       timeout=120)
        info = json.loads(r.json()["info"])
        assert "RNG: CPU" in info["infotexts"][0] and "ENSD" not in info["infotexts"][0]
        for bad, says in (({"randn_source": "cuda"}, "randn_source must be one of GPU, CPU, NV"),
                          ({"eta_noise_seed_delta": -3}, "eta_noise_seed_delta must be an integer >= 0")):
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": bad}, timeout=60)
            assert r.status_code == 422 and says in r.text, r.text
            r = httpx.post(f"{srv.url}/sdapi/v1/options", json=bad, timeout=60)  # (refused, not stored)
            assert r.status_code == 422 and says in r.text and r.json()["field"] == "options", r.text
        assert httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120).status_code == 200
