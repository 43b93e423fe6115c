"""ElucidatedImagen (imagen-pytorch 2.1.0's Imagen in the terms of Karras et al. 2022, EDM): imagine.edm and
imagine.pipelines.elucidated_imagen against ElucidatedImagen.sample and its training loss on the same weights, and
against the probability-flow ODE's closed form for Gaussian data."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import imagen_peer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ip = imagen_peer.load()

import test_imagen_s31 as s31  # noqa: E402  (its tiny U-Nets, the peer's U-Net behind EfficientUNet's call, texts)
from test_imagen_cli_s31 import folder  # noqa: E402, F401  (its MiniLM-width cascade folder, a fixture)

from imagine import edm  # noqa: E402
from imagine.pipelines.elucidated_imagen import ElucidatedImagenPipeline  # noqa: E402
from imagine.pipelines.imagen import ImagenPipeline  # noqa: E402

STEPS = (32, 24)
# (at these steps the sampler is imagen-pytorch's to float rounding; with churn and guidance together these random
# U-Nets amplify rounding chaotically: a 1e-7 relative change of the U-Net's output moves the picture by 7e-3, so
# churn is compared at guidance 1 and guidance with S_churn 0)


def build(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        imagen = ip.ElucidatedImagenConfig(unets=s31.UNETS, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM,
                                           cond_drop_prob=0.5, num_sample_steps=STEPS, **kw).create()
        s31.spread(imagen, 1)
    return imagen.eval()


def ours_of(imagen, lowres_noise_cond="time", **kw) -> ElucidatedImagenPipeline:
    hp = imagen.hparams
    return ElucidatedImagenPipeline(
        [s31.PeerUNet(u) for u in imagen.unets], image_sizes=imagen.image_sizes, text_embed_dim=s31.TEXT_DIM,
        cond_drop_prob=imagen.cond_drop_prob, lowres_noise_cond=lowres_noise_cond,
        **{k: [getattr(h, k) for h in hp] for k in ("num_sample_steps", "sigma_min", "sigma_max", "sigma_data", "rho",
                                                     "S_churn", "S_tmin", "S_tmax", "S_noise")}, **kw)


def peer_sample(imagen, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return imagen.sample(use_tqdm=False, **kw)


@pytest.fixture(scope="module")
def imagen():
    return build()


@pytest.mark.parametrize("churn,scale", [(80.0, 1.0), (0.0, 3.0)])
def test_cascade_matches_elucidated_sample(churn, scale):
    """Heun (Algorithm 2; with churn, S_churn 80, or without) through both stages, torch's global generator as the peer
    draws; the super-resolution stage told the time as imagen-pytorch's sample tells it (lowres_noise_cond="time")."""
    imagen = build(S_churn=churn)
    embeds, mask = s31.texts()
    theirs = peer_sample(imagen, 5, text_embeds=embeds, text_masks=mask, cond_scale=scale)
    torch.manual_seed(5)
    ours = ours_of(imagen).sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, progress=False)
    print(f"S_churn {churn}, cond_scale {scale}: max abs {float((ours - theirs).abs().max()):.2e}, PSNR "
          f"{s31.psnr(ours, theirs):.1f} dB")
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float(theirs.std()) > 0.05


def test_per_image_seeds_are_the_peers_batch_1(imagen):
    """seeds: image i is the peer's batch-1 picture after torch.manual_seed(seeds[i]), whatever the batch. (With
    S_churn 0 the peer still draws at every step, before the next stage's noise: the S_churn 0 case above.)"""
    embeds, mask = s31.texts()
    both = ours_of(imagen).sample(text_embeds=embeds, text_masks=mask, seeds=[21, 22], progress=False)
    for i, seed in enumerate((21, 22)):
        theirs = peer_sample(imagen, seed, text_embeds=embeds[i:i + 1], text_masks=mask[i:i + 1])
        assert float((both[i:i + 1] - theirs).abs().max()) < 1e-4, i


class Recording:  # (not a torch module: the pipeline runs it as it is, not a copy)
    def __init__(self, unet):
        self.unet, self.self_cond, self.seen = unet, unet.self_cond, []

    def __call__(self, x, noise_cond, **kw):
        if kw.get("lowres_noise_cond") is not None:
            self.seen.append(kw["lowres_noise_cond"].clone())
        return self.unet(x, noise_cond, **kw)


def test_super_resolution_is_told_the_log_snr_it_was_trained_on(imagen):
    """The peer trains a super-resolution U-Net on lowres_noise_schedule.get_condition(t) (the log-SNR) and its
    ElucidatedImagen.sample tells it t: by default the stage is told lambda(0.2) of the linear schedule, the level it
    was trained on; "time" gives the peer's 0.2."""
    embeds, mask = s31.texts()
    lam = float(ip.imagen_pytorch.beta_linear_log_snr(torch.tensor(0.2)))
    assert abs(lam - math.log(1 / math.expm1(1e-4 + 10 * 0.2**2))) < 1e-5
    for mode, want in (("log_snr", lam), ("time", 0.2)):
        pipe = ours_of(imagen, lowres_noise_cond=mode)
        pipe.unets[1] = Recording(pipe.unets[1])
        pipe.sample(text_embeds=embeds, text_masks=mask, seeds=[1, 2], steps=2, progress=False)
        seen = torch.cat(pipe.unets[1].seen)
        assert seen.numel() and torch.allclose(seen, torch.full_like(seen, want), atol=1e-6), (mode, seen)


def test_training_loss_equals_the_peers_forward(imagen):
    """imagine.edm.training_loss at the peer's draws (ln sigma ~ N(P_mean, P_std^2), then the noise) equals
    ElucidatedImagen.forward's loss for the base stage (cond_drop_prob 0: no mask draws)."""
    imagen.cond_drop_prob = 0.0
    try:
        embeds, mask = s31.texts()
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        torch.manual_seed(11)
        theirs = imagen(images, text_embeds=embeds, text_masks=mask, unet_number=1)
        torch.manual_seed(11)
        sigma = edm.training_sigmas(torch.randn(2), -1.2, 1.2)
        noise = torch.randn(2, 3, 8, 8)
        ours = edm.training_loss(s31.PeerUNet(imagen.unets[0]), images * 2 - 1, sigma, noise, 0.5,
                                 cond={"text_embeds": embeds, "text_mask": mask})
    finally:
        imagen.cond_drop_prob = 0.5
    assert abs(float(ours) - float(theirs)) < 1e-5 * float(theirs)
    per_sample = edm.training_loss(s31.PeerUNet(imagen.unets[0]), images * 2 - 1, sigma, noise, 0.5,
                                   cond={"text_embeds": embeds, "text_mask": mask}, reduction="none")
    assert per_sample.shape == (2,) and abs(float(per_sample.mean()) - float(ours)) < 1e-6


def test_coefficients_closed_forms():
    """Table 1: c_skip + c_out^2 / sigma_data^2 = 1 (D of pure noise is the data's scale), c_in^2 (sigma^2 +
    sigma_data^2) = 1, lambda = 1 / c_out^2; c_noise = ln(sigma) / 4."""
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm.coefficients(sigma, 0.5)
    assert torch.allclose(c_skip + c_out**2 / 0.25, torch.ones_like(sigma))
    assert torch.allclose(c_in**2 * (sigma**2 + 0.25), torch.ones_like(sigma))
    assert torch.allclose(edm.loss_weight(sigma, 0.5), c_out**-2)
    assert torch.allclose(edm.c_noise(sigma), sigma.log() / 4)
    plan = edm.edm_plan(6, 0.002, 80.0, 7.0)
    assert float(plan.sigmas[0]) == pytest.approx(80.0, rel=1e-6) and float(plan.sigmas[-2]) == pytest.approx(0.002)
    assert float(plan.sigmas[-1]) == 0 and torch.equal(plan.timesteps, plan.sigmas[:-1])
    assert torch.allclose(plan.alphas_cumprod, 1 / (1 + plan.sigmas**2))


# -- checkpoints and folders -------------------------------------------------------------------------------------
def trainer_checkpoint(imagen) -> dict:
    """What ImagenTrainer.save writes for an ElucidatedImagen built from an ElucidatedImagenConfig."""
    return {"model": imagen.state_dict(), "version": ip.version.__version__, "steps": torch.zeros(2, dtype=torch.long),
            "imagen_type": "elucidated", "imagen_params": imagen._config}


def test_trainer_checkpoint_and_folder(imagen, tmp_path):
    path = tmp_path / "checkpoint.0.pt"
    torch.save(trainer_checkpoint(imagen), path)
    ours = ImagenPipeline.from_imagen_pytorch(path)
    assert isinstance(ours, ElucidatedImagenPipeline) and ours.num_sample_steps == STEPS
    assert ours.lowres_noise_cond == "log_snr" and ours.S_churn == (80.0, 80.0) and ours.sigma_data == (0.5, 0.5)
    embeds, mask = s31.texts()
    theirs = peer_sample(imagen, 7, text_embeds=embeds, text_masks=mask)
    ours.lowres_noise_cond = "time"  # (the peer's)
    torch.manual_seed(7)
    got = ours.sample(text_embeds=embeds, text_masks=mask, progress=False)
    print(f"EfficientUNet from an ElucidatedImagen checkpoint: max abs {float((got - theirs).abs().max()):.2e}, "
          f"PSNR {s31.psnr(got, theirs):.1f} dB")
    assert float((got - theirs).abs().max()) < 1e-4 and s31.psnr(got, theirs) > 100
    ours.save_pretrained(tmp_path / "cascade")
    back = ImagenPipeline.from_pretrained(tmp_path / "cascade")
    assert isinstance(back, ElucidatedImagenPipeline) and back.settings() == ours.settings()
    a = back.sample(text_embeds=embeds, text_masks=mask, cond_scale=3.0, seeds=[1, 2], steps=4, progress=False)
    b = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=3.0, seeds=[1, 2], steps=4, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="imagen_type 'elucidated' cascade; load it with ElucidatedImagenPipeline"):
        s31.ImagenPipeline.from_pretrained.__func__(type("Other", (ImagenPipeline,), {}), tmp_path / "cascade")


def test_refusals(imagen):
    unets = [s31.PeerUNet(u) for u in imagen.unets]
    with pytest.raises(ValueError, match="timesteps is an Imagen"):
        ElucidatedImagenPipeline(unets, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM, timesteps=10)
    with pytest.raises(ValueError, match="sigma_min must be below sigma_max"):
        ElucidatedImagenPipeline(unets, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM, sigma_min=2, sigma_max=1)
    with pytest.raises(ValueError, match="num_sample_steps must be ints >= 2"):
        ElucidatedImagenPipeline(unets, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM, num_sample_steps=[4, 1])
    with pytest.raises(ValueError, match="lowres_noise_cond must be one of"):
        ElucidatedImagenPipeline(unets, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM, lowres_noise_cond="t")
    with pytest.raises(ValueError, match="S_churn must be finite numbers >= 0"):
        ElucidatedImagenPipeline(unets, image_sizes=s31.SIZES, text_embed_dim=s31.TEXT_DIM, S_churn=-1)
    pipe = ours_of(imagen)
    with pytest.raises(ValueError, match="does not run on an ElucidatedImagen stage's noise levels here; valid: heun, euler"):
        pipe.sample(text_embeds=s31.texts()[0], sampler="ddpm", progress=False)
    with pytest.raises(ValueError, match="keys imagine does not know: \\['timesteps'\\]"):
        good = trainer_checkpoint(imagen)
        ImagenPipeline.from_imagen_pytorch({**good, "imagen_params": {**good["imagen_params"], "timesteps": 4}})


# -- samplers over EDM's levels, against the probability-flow ODE's closed form ----------------------------------------
class GaussianDataF:
    """The network whose D is exact for data y ~ N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), given
    as F = (D - c_skip x) / c_out from the preconditioned input c_in x and c_noise = ln(sigma) / 4. Text ignored."""

    mu, s = 0.1, 0.2

    def __call__(self, x_in, noise_cond, **_):
        sigma = (4 * noise_cond.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in = edm.coefficients(sigma, 0.5)
        x = x_in.double() / c_in
        d = self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
        return ((d - c_skip * x) / c_out).to(x_in.dtype)


@pytest.mark.parametrize("sampler,order", [("heun", 2), ("dpm2", 2), ("dpmpp_2m", 2), ("euler", 1)])
def test_samplers_converge_where_the_probability_flow_ode_lands(sampler, order):
    """For Gaussian data the ODE dx/dsigma = (x - D) / sigma keeps z = (x - mu) / sqrt(s^2 + sigma^2) fixed: the start
    x = sigma_max n ends at mu + s z at sigma = 0. With S_churn 0 the solvers converge there at their order (measured,
    max |error| at 16 / 64 steps: Heun 5.7e-2 / 2.8e-3, DPM2 3.2e-2 / 1.6e-3, DPM++ 2M 5.5e-2 / 2.9e-3, Euler
    1.2e-1 / 3.0e-2: 4^order between them); Heun with churn, an SDE sampler, ends elsewhere."""
    f = GaussianDataF()
    text = torch.randn(1, 3, 4)
    from imagine.sampling import PerSampleNoise, make_generators

    n = PerSampleNoise(make_generators(1, [7], None)).draw((1, 3, 8, 8)).double()  # (the stage's first draw)
    expected = f.mu + f.s * (80.0 * n - f.mu) / math.sqrt(f.s**2 + 80.0**2)

    def error(steps, churn=0.0):
        pipe = ElucidatedImagenPipeline([f], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False,
                                        S_churn=churn)
        got = pipe.sample(text_embeds=text, seeds=[7], steps=steps, sampler=sampler, progress=False)
        return float(((got.double() * 2 - 1) - expected).abs().max())

    coarse, fine = error(16), error(64)
    print(f"{sampler}: max error 16 steps {coarse:.2e}, 64 steps {fine:.2e}")
    assert 0.6 * 4**order < coarse / fine < 1.6 * 4**order and fine < 0.05, (sampler, coarse, fine)
    if sampler == "heun":
        assert error(64, churn=80.0) > 10 * fine


# -- `imagine train imagen` with imagen.type elucidated ---------------------------------------------------------------
def elucidated_stage(image_size: int, previous=None, **imagen):
    from test_imagen_train_s31 import TINY_BASE, TINY_SR, stage_config

    cfg = stage_config(image_size, previous, model=TINY_SR if previous else TINY_BASE)
    cfg["imagen"].update({"type": "elucidated", "sigma_min": 0.01, "sigma_max": 40.0, "S_churn": 10.0, **imagen})
    return cfg


# (the tests on it are one xdist group: trained once, not on each worker)
@pytest.fixture(scope="module")
def edm_base(tmp_path_factory):
    from test_imagen_train_s31 import train

    return train(tmp_path_factory.mktemp("edm"), "base", elucidated_stage(16))


@pytest.mark.xdist_group("edm_base")
def test_an_elucidated_stage_trains_resumes_and_exports(edm_base, tmp_path):
    import json

    from test_imagen_train_s31 import same_exported_stage, train

    log = [json.loads(line) for line in (edm_base / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in log)
    assert (edm_base / "samples" / "step-00000006.png").is_file()
    pipe = ImagenPipeline.from_pretrained(edm_base / "model")
    assert isinstance(pipe, ElucidatedImagenPipeline) and pipe.default_sampler == "heun"
    assert pipe.num_sample_steps == (4,) and pipe.sigma_min == (0.01,) and pipe.sigma_max == (40.0,)
    assert pipe.S_churn == (10.0,) and pipe.sigma_data == (0.5,) and pipe.P_mean == (-1.2,)
    pictures = pipe.sample(["a red circle", "two blue squares"], seeds=[5, 6], cond_scale=3.0, progress=False)
    alone = pipe.sample(["two blue squares"], seeds=[6], cond_scale=3.0, progress=False)
    assert pictures.shape == (2, 3, 16, 16) and torch.allclose(pictures[1:], alone, atol=1e-5)
    resumed = train(tmp_path, "resumed", elucidated_stage(16), "--resume-from",
                    str(edm_base / "checkpoints" / "step-00000003"))
    assert same_exported_stage(edm_base, resumed)


@pytest.mark.xdist_group("edm_base")
def test_an_elucidated_super_resolution_stage_on_its_base(edm_base, tmp_path):
    from test_imagen_train_s31 import stage_config, train

    from imagine.train.imagen_task import ImagenTask

    sr = train(tmp_path, "sr", elucidated_stage(32, previous=edm_base / "model", sigma_data=0.4))
    pipe = ImagenPipeline.from_pretrained(sr / "model")
    assert isinstance(pipe, ElucidatedImagenPipeline) and pipe.image_sizes == (16, 32)
    assert pipe.sigma_data == (0.5, 0.4) and pipe.num_sample_steps == (4, 4)
    assert pipe.sample(["a red circle"], seeds=[2], progress=False).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="is imagen type 'elucidated' and this stage 'original'"):
        ImagenTask(stage_config(32, previous=edm_base / "model", model=elucidated_stage(32, edm_base)["model"]))


@pytest.mark.xdist_group("edm_base")
def test_the_stage_draws_its_levels_from_its_lognormal(edm_base):
    """ln(sigma) ~ N(P_mean, P_std^2): the levels the U-Net is told (c_noise = ln(sigma) / 4) over 40 batches of 8."""
    from imagine.train.imagen_task import ImagenTask

    task = ImagenTask(elucidated_stage(16, P_mean=-3.0, P_std=0.5))
    seen = []

    def unet(x, noise_cond, **_):
        seen.append(4 * noise_cond)
        return torch.zeros_like(x)

    task.model = unet
    batch = {"image": torch.zeros(8, 3, 64, 64), "caption": ["a red circle"] * 8}
    for step in range(40):
        loss, _ = task.loss(batch, step)
        assert math.isfinite(float(loss))
    ln_sigma = torch.cat(seen).double()
    assert abs(float(ln_sigma.mean()) + 3.0) < 0.1 and abs(float(ln_sigma.std()) - 0.5) < 0.1


@pytest.mark.parametrize("change,message", [
    ({"prediction_type": "v_prediction", "imagen": {"type": "elucidated"}},
     "prediction_type: not for an ElucidatedImagen stage"),
    ({"imagen": {"type": "elucidated", "noise_schedule": "cosine"}}, "imagen.noise_schedule: not for"),
    ({"imagen": {"type": "elucidated", "sigma_min": 3.0, "sigma_max": 2.0}}, "sigma_min must be below sigma_max"),
    ({"imagen": {"S_churn": 5.0}}, "imagen.S_churn: ElucidatedImagen settings; this stage is imagen.type original"),
    ({"imagen": {"type": "edm"}}, "imagen.type"),
])
def test_bad_elucidated_configs_are_refused_by_name(change, message):
    from test_imagen_train_s31 import stage_config

    from imagine.train.imagen_task import check_imagen_config

    cfg = stage_config(16)
    cfg = {**cfg, **change, "imagen": {**cfg["imagen"], **change.get("imagen", {})}}
    with pytest.raises(ValueError, match=message):
        check_imagen_config(cfg)


def test_imagine_generate_samples_an_elucidated_checkpoint(tmp_path, one_thread):
    """`imagine generate --model CHECKPOINT --text-encoder T5`: Heun with the checkpoint's churn over its
    num_sample_steps by default, the pipeline's picture to the pixel (one thread both sides); --sampler names an EDM
    sampler, an Imagen one is refused naming the valid ones."""
    from test_cascade_if_s29 import T5_DIM, t5, tokenizer
    from test_imagen_cli_s31 import PROMPT, cli, pixels, record

    with torch.random.fork_rng():
        torch.manual_seed(0)
        imagen = ip.ElucidatedImagenConfig(unets=[{**u, "text_embed_dim": T5_DIM} for u in s31.UNETS],
                                           image_sizes=s31.SIZES, text_embed_dim=T5_DIM, cond_drop_prob=0.5,
                                           num_sample_steps=(4, 3)).create()
        s31.spread(imagen, 1)
    path = tmp_path / "checkpoint.7.pt"
    torch.save(trainer_checkpoint(imagen), path)
    t5().save_pretrained(tmp_path / "t5")
    tokenizer().save_pretrained(tmp_path / "t5")
    out = tmp_path / "out.png"
    run = cli("--model", path, "--text-encoder", tmp_path / "t5", PROMPT, "--seed", 3, "--guidance-scale", 2,
              "-o", out)
    assert run.returncode == 0, run.stderr
    ours = ImagenPipeline.from_imagen_pytorch(path, t5_folder=tmp_path / "t5").sample(
        [PROMPT], seeds=[3], cond_scale=2.0, output_type="pil", progress=False)[0]
    assert np.array_equal(pixels(out), pixels(ours)) and pixels(out).std() > 10
    assert record(out) == {"prompt": PROMPT, "seed": 3, "steps": [4, 3], "guidance_scale": 2.0, "sampler": "heun",
                           "model": path.name, "stages": 2, "text_encoder": "t5", "width": 16, "height": 16}
    run = cli("--model", path, "--text-encoder", tmp_path / "t5", PROMPT, "--sampler", "ddpm", "-o", out)
    assert run.returncode != 0 and "valid: heun, euler, euler_a, dpm2, dpmpp_2m, dpmpp_2s_a" in run.stderr


# -- starting at a super-resolution stage (imagen-pytorch's start_at_unet_number / start_image_or_video) -------------
@pytest.mark.parametrize("kind", ["original", "elucidated"])
def test_start_at_the_super_resolution_stage_is_the_peers(kind):
    """A 12 px picture handed to stage 2 (resized to stage 1's 8 px by nearest, then noised and enlarged to 16 px):
    Imagen.sample / ElucidatedImagen.sample(start_at_unet_number=2, start_image_or_video=...) with the global
    generator, and with per-image seeds each the peer's batch-1 picture; PIL pictures as their 8-bit tensor."""
    from PIL import Image

    imagen = s31.build_imagen() if kind == "original" else build()
    ours = s31.ours_of(imagen) if kind == "original" else ours_of(imagen)
    embeds, mask = s31.texts()
    start = (torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(8)) * 255).floor() / 255
    scale = 3.0 if kind == "original" else 1.0  # (the elucidated sampler with churn: guidance 1, as above)
    theirs = peer_sample(imagen, 5, text_embeds=embeds, text_masks=mask, cond_scale=scale, start_at_unet_number=2,
                         start_image_or_video=start)
    torch.manual_seed(5)
    got = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, start_at_unet_number=2,
                      start_image=start, progress=False)
    assert got.shape == theirs.shape == (2, 3, 16, 16) and float((got - theirs).abs().max()) < 1e-4
    pil = [Image.fromarray((row.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for row in start]
    seeded = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, start_at_unet_number=2,
                         start_image=pil, seeds=[21, 22], progress=False)
    for i, seed in enumerate((21, 22)):
        one = peer_sample(imagen, seed, text_embeds=embeds[i:i + 1], text_masks=mask[i:i + 1], cond_scale=scale,
                          start_at_unet_number=2, start_image_or_video=start[i:i + 1])
        assert float((seeded[i:i + 1] - one).abs().max()) < 1e-4, i


def test_start_image_refusals():
    imagen = s31.build_imagen()
    ours, (embeds, mask) = s31.ours_of(imagen), s31.texts()
    kw = dict(text_embeds=embeds, text_masks=mask, progress=False, steps=2)
    with pytest.raises(ValueError, match="start_at_unet_number 2: give start_image"):
        ours.sample(start_at_unet_number=2, **kw)
    with pytest.raises(ValueError, match="start_image: give start_at_unet_number \\(2 to 2\\)"):
        ours.sample(start_image=torch.rand(2, 3, 8, 8), **kw)
    with pytest.raises(ValueError, match="start_at_unet_number must be a unet number from 1 to 1"):
        ours.sample(start_at_unet_number=2, stop_at_unet_number=1, start_image=torch.rand(2, 3, 8, 8), **kw)
    with pytest.raises(ValueError, match="the cascade's stages are square"):
        ours.sample(start_at_unet_number=2, start_image=torch.rand(2, 3, 8, 6), **kw)
    with pytest.raises(ValueError, match="float tensor \\[B, 3, H, W\\] with B = 2 or 1; got torch.float32"):
        ours.sample(start_at_unet_number=2, start_image=torch.rand(3, 3, 8, 8), **kw)


def test_imagine_generate_enlarges_a_start_image(folder, tmp_path, one_thread):
    """`imagine generate --model CASCADE_FOLDER --start-image small.png`: stage 2 on the picture (resized to stage 1's
    8 px), the pipeline's picture to the pixel, recorded; refused for a latent model and for a stage the cascade has
    not."""
    from PIL import Image
    from test_imagen_cli_s31 import PROMPT, cli, pixels, record

    cascade, _ = folder
    small = Image.fromarray((torch.rand(10, 10, 3, generator=torch.Generator().manual_seed(1)) * 255).to(
        torch.uint8).numpy())
    small.save(tmp_path / "small.png")
    out = tmp_path / "big.png"
    run = cli("--model", cascade, PROMPT, "--start-image", tmp_path / "small.png", "--seed", 4, "-o", out)
    assert run.returncode == 0, run.stderr
    want = ImagenPipeline.from_pretrained(cascade).sample([PROMPT], seeds=[4], steps=3, cond_scale=2.0,
                                                          output_type="pil", progress=False, start_at_unet_number=2,
                                                          start_image=small)[0]
    assert np.array_equal(pixels(out), pixels(want)) and pixels(out).shape == (16, 16, 3)
    assert {k: record(out)[k] for k in ("start_image", "start_at_stage", "steps")} == {
        "start_image": "small.png", "start_at_stage": 2, "steps": 3}
    run = cli("--model", cascade, PROMPT, "--start-image", tmp_path / "small.png", "--start-at-stage", 3, "-o", out)
    assert run.returncode != 0 and "has stages 1 to 2" in run.stderr
    run = cli(PROMPT, "--start-image", tmp_path / "small.png", "-o", out)
    assert run.returncode != 0 and "--start-image is for an Imagen cascade" in run.stderr
    # --schedule-type Karras (A1111's label): the stages on Karras-spaced grids, recorded; others refused
    run = cli("--model", cascade, PROMPT, "--schedule-type", "Karras", "--seed", 4, "--sampler", "dpmpp_2m", "-o", out)
    assert run.returncode == 0, run.stderr
    want = ImagenPipeline.from_pretrained(cascade).sample([PROMPT], seeds=[4], steps=3, cond_scale=2.0,
                                                          output_type="pil", progress=False, sampler="dpmpp_2m",
                                                          schedule_type="karras")[0]
    assert np.array_equal(pixels(out), pixels(want)) and record(out)["schedule_type"] == "karras"
    run = cli("--model", cascade, PROMPT, "--schedule-type", "exponential", "-o", out)
    assert run.returncode != 0 and "stages run on uniform or karras levels" in run.stderr
    # --init-image --strength 0.5: image to image at stage 1 (the 10 px picture resized to 8), recorded
    run = cli("--model", cascade, PROMPT, "--init-image", tmp_path / "small.png", "--strength", 0.5, "--seed", 4,
              "--steps", 4, "-o", out)
    assert run.returncode == 0, run.stderr
    want = ImagenPipeline.from_pretrained(cascade).sample([PROMPT], seeds=[4], steps=4, cond_scale=2.0,
                                                          output_type="pil", progress=False, init_image=small,
                                                          strength=0.5)[0]
    assert np.array_equal(pixels(out), pixels(want))
    assert {k: record(out)[k] for k in ("init_image", "strength")} == {"init_image": "small.png", "strength": 0.5}
    run = cli("--model", cascade, PROMPT, "--init-image", tmp_path / "small.png", "--start-image",
              tmp_path / "small.png", "-o", out)
    assert run.returncode != 0 and "give one" in run.stderr


# -- Karras spacing on Imagen's continuous-time grid ----------------------------------------------------------------
def test_karras_times_and_plan():
    """continuous_times_karras: t = 1, then the times whose sigma = exp(-lambda / 2) are eq. 5's levels from 80 down to
    sigma(0) (rho 7), ending at t = 0; the plan's levels are lambda(t) of those float32 times."""
    from imagine.schedules import continuous_plan, continuous_time_of, continuous_times_karras, karras_sigmas, log_snr

    for kind in ("cosine", "linear"):
        t = continuous_times_karras(kind, 8)
        assert t.dtype == torch.float32 and t.shape == (9,) and float(t[0]) == 1 and float(t[-1]) == 0
        assert bool((t[1:] < t[:-1]).all())
        bottom = math.exp(-float(log_snr(kind, torch.tensor(0.0))) / 2)
        want = torch.from_numpy(karras_sigmas(bottom, 80.0, 8, 7.0))
        got = torch.exp(-log_snr(kind, t[1:]).double() / 2)  # (the levels the model reads at the float32 times)
        assert torch.allclose(got, want, rtol=1e-4), (kind, got, want)
        plan = continuous_plan(kind, 8, "karras")
        assert torch.equal(plan.timesteps, t[:-1].double()) and len(plan) == 8
        lam = torch.tensor([-5.0, 0.0, 3.0], dtype=torch.float64)
        assert torch.allclose(log_snr(kind, continuous_time_of(kind, lam)), lam, atol=1e-9)
    with pytest.raises(ValueError, match="spacing must be one of"):
        continuous_plan("cosine", 8, "exponential")


@pytest.mark.parametrize("sampler,factor", [("dpmpp_2m", 3.0), ("unipc", 2.0)])
def test_karras_spacing_brings_few_step_runs_nearer_the_ode(sampler, factor):
    """The probability-flow ODE's closed form for Gaussian data (test_imagen_s31's): at 10 / 20 steps the multistep
    solvers end nearer it on the Karras-spaced grid than on the even one (measured max |error|, DPM++ 2M: 0.132 ->
    0.026 at 10 steps; UniPC: 0.034 -> 0.013 at 20)."""
    from imagine.sampling import PerSampleNoise, make_generators
    from imagine.schedules import alpha_sigma, log_snr

    unet = s31.GaussianDataUnet()
    pipe = ImagenPipeline([unet], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False, timesteps=1000)
    text = torch.randn(1, 3, 4)
    x_T = PerSampleNoise(make_generators(1, [7], None)).draw((1, 3, 8, 8)).double()
    (a_T, s_T), (a_0, s_0) = (alpha_sigma(log_snr("cosine", torch.tensor([t])).double()) for t in (1.0, 0.0))
    z = (x_T - a_T * unet.mu) / (a_T**2 * unet.s**2 + s_T**2).sqrt()
    expected = (a_0 * unet.mu + (a_0**2 * unet.s**2 + s_0**2).sqrt() * z).clamp(-1, 1)
    steps = 10 if sampler == "dpmpp_2m" else 20

    def error(schedule_type):
        got = pipe.sample(text_embeds=text, seeds=[7], steps=steps, sampler=sampler, progress=False,
                          schedule_type=schedule_type)
        return float(((got.double() * 2 - 1) - expected).abs().max())

    even, karras = error(None), error("karras")
    print(f"{sampler} {steps} steps: even grid {even:.3e}, Karras {karras:.3e}")
    assert karras * factor < even
    with pytest.raises(ValueError, match="this cascade's stages run on 'karras' levels"):
        ElucidatedImagenPipeline([GaussianDataF()], image_sizes=[8], text_embed_dim=4).sample(
            text_embeds=text, schedule_type="uniform", progress=False)


@pytest.mark.xdist_group("edm_base")
def test_shapes_eval_runs_an_elucidated_cascade(edm_base):
    import argparse

    from imagine.evaluation import ImagenShapes, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    shapes = ImagenShapes(p.parse_args(["--model", str(edm_base / "model")]))
    assert shapes.defaults["sampler"] == "heun" and shapes.defaults["sigma_schedule"] == "EDM (Karras)"
    got = shapes(["a red circle"], [3], steps=3, guidance_scale=2.0)
    own = ImagenPipeline.from_pretrained(edm_base / "model").sample(["a red circle"], seeds=[3], steps=3,
                                                                    cond_scale=2.0, output_type="pil",
                                                                    progress=False)
    assert got[0].size == (64, 64) and got[0].tobytes() == own[0].resize((64, 64), 3).tobytes()  # (3: bicubic)
    with pytest.raises(ValueError, match="--sweep samplers runs DDPM"):
        ImagenShapes(p.parse_args(["--model", str(edm_base / "model"), "--sweep", "samplers"]))


# -- image to image at stage 1 (SDEdit) --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["original", "elucidated"])
def test_image_to_image_lands_where_the_ode_takes_the_noised_picture(kind):
    """init_image at strength s: the picture x_0 noised to the level abar where the last int(steps s) steps start,
    x = sqrt(abar) x_0 + sqrt(1 - abar) eps (eps the stage's start noise), then those steps. For Gaussian data the
    probability-flow ODE from there ends at alpha_0 mu + sqrt(alpha_0^2 s^2 + sigma_0^2) z, z = (x - sqrt(abar) mu) /
    sqrt(abar s^2 + 1 - abar): an ODE sampler with many steps lands there (DPM++ 2M on Imagen's grid and on EDM's),
    calling the model int(steps s) times."""
    from imagine.sampling import PerSampleNoise, make_generators
    from imagine.schedules import continuous_plan

    calls = []
    if kind == "original":
        base = s31.GaussianDataUnet()
        unet = (lambda *a, **k: calls.append(1) or base(*a, **k))
        pipe = ImagenPipeline([unet], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False, timesteps=1000)
        plan, sampler, steps = continuous_plan("cosine", 400), "dpmpp_2m", 400
    else:
        base = GaussianDataF()
        unet = (lambda *a, **k: calls.append(1) or base(*a, **k))
        pipe = ElucidatedImagenPipeline([unet], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False,
                                        S_churn=0.0)
        plan, sampler, steps = edm.edm_plan(200, 0.002, 80.0, 7.0), "dpmpp_2m", 200
    mu, sd = base.mu, base.s
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # (in [0, 1]: x_0 = 2 x - 1)
    eps = PerSampleNoise(make_generators(1, [7], None)).draw((1, 3, 8, 8)).double()
    text = torch.randn(1, 3, 4)
    for strength in (0.3, 0.7):
        calls.clear()
        got = pipe.sample(text_embeds=text, seeds=[7], steps=steps, sampler=sampler, progress=False,
                          init_image=x0, strength=strength)
        start = len(plan) - int(len(plan) * strength)
        abar, abar_0 = float(plan.alphas_cumprod[start]), float(plan.alphas_cumprod[-1])
        x = math.sqrt(abar) * (2 * x0.double() - 1) + math.sqrt(1 - abar) * eps
        z = (x - math.sqrt(abar) * mu) / math.sqrt(abar * sd**2 + 1 - abar)
        want = (math.sqrt(abar_0) * mu + math.sqrt(abar_0 * sd**2 + 1 - abar_0) * z).clamp(-1, 1)
        err = float(((got.double() * 2 - 1) - want).abs().max())
        print(f"{kind} strength {strength}: max error {err:.2e}, {len(calls)} calls")
        assert err < 1e-3, (strength, err)
        assert len(calls) == int(len(plan) * strength)  # (DPM++ 2M: one call a step)
    with pytest.raises(ValueError, match="strength must be in \\(0, 1\\]"):
        pipe.sample(text_embeds=text, init_image=x0, strength=0.0, progress=False)
    with pytest.raises(ValueError, match="runs none"):
        pipe.sample(text_embeds=text, init_image=x0, strength=0.01, steps=20, sampler=sampler, progress=False)
    with pytest.raises(ValueError, match="init_image is image to image at stage 1"):
        s31.ours_of(s31.build_imagen()).sample(text_embeds=s31.texts()[0], init_image=x0, start_at_unet_number=2,
                                               start_image=x0, progress=False)
