"""Imagen's training: the objective in continuous time (imagine.diffusion.continuous_training_loss) against
imagen-pytorch's Imagen.p_losses on the same Unet, images, times and noise (eps, v and x_0 targets, with and without
min-SNR-gamma); and `imagine train imagen` (imagine/train/imagen_task.py): a base stage and a super-resolution stage on
top of it train, resume to the same weights, export cascade folders that sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import imagen_peer
from imagine.diffusion import continuous_training_loss

TEXT_DIM = 16

# (one xdist worker takes the module: base_run, the stage its tests read, trained once and not on each worker)
pytestmark = pytest.mark.xdist_group("imagen_train_s31")


def _peer_imagen(ip, objective, min_snr_gamma, schedule="cosine"):
    torch.manual_seed(0)
    unet = ip.Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, text_embed_dim=TEXT_DIM, attn_heads=2,
                   attn_dim_head=8, layer_attns=(False, True), layer_cross_attns=(False, True))
    imagen = ip.Imagen(unets=(unet,), image_sizes=(8,), text_embed_dim=TEXT_DIM, timesteps=10, cond_drop_prob=0.0,
                       pred_objectives=objective, noise_schedules=schedule,
                       min_snr_loss_weight=min_snr_gamma is not None, min_snr_gamma=min_snr_gamma or 5)
    with torch.no_grad():  # (its zero-initialised output layers would make every prediction 0)
        for p in imagen.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return imagen.eval()


# (without min-SNR the peer still weights a v or x_0 loss by SNR / (SNR + 1) or SNR, its eps-equivalent weights; imagine
# weights them 1, as diffusers' training scripts and its own discrete loss do: compared where the two agree)
@pytest.mark.parametrize("objective,ours,min_snr_gamma", [("noise", "epsilon", None), ("noise", "epsilon", 5.0),
                                                          ("v", "v_prediction", 5.0), ("x_start", "sample", 5.0)])
def test_loss_equals_imagen_pytorch_p_losses(objective, ours, min_snr_gamma):
    ip = imagen_peer.load()
    imagen = _peer_imagen(ip, objective, min_snr_gamma, schedule="cosine" if objective != "x_start" else "linear")
    unet, scheduler = imagen.unets[0], imagen.noise_schedulers[0]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 8, 8, generator=g)                       # the peer's [0, 1] input
    times = torch.tensor([0.03, 0.5, 0.97])
    noise = torch.randn(3, 3, 8, 8, generator=g)
    text = torch.randn(3, 5, TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        expected = imagen.p_losses(unet, images, times, noise_scheduler=scheduler, text_embeds=text, text_mask=mask,
                                   noise=noise, pred_objective=objective,
                                   min_snr_gamma=imagen.min_snr_gamma[0])
        got = continuous_training_loss(lambda x, lam, **c: unet(x, lam, **c), images * 2 - 1,
                                       scheduler.get_condition(times), noise, ours,
                                       cond={"text_embeds": text, "text_mask": mask}, min_snr_gamma=min_snr_gamma)
    assert expected > 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (float(got), float(expected))


def test_loss_refuses_bad_shapes():
    model = lambda x, lam: x  # noqa: E731
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="log_snr must have shape \\[2\\]"):
        continuous_training_loss(model, x0, torch.zeros(3), torch.zeros_like(x0), "epsilon")
    with pytest.raises(ValueError, match="noise shape"):
        continuous_training_loss(model, x0, torch.zeros(2), torch.zeros(2, 3, 4, 5), "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        continuous_training_loss(model, x0, torch.zeros(2), torch.zeros_like(x0), "noise")


# -- `imagine train imagen`: one stage of a cascade ----------------------------------------------------------------
TINY_BASE = {"dim": 16, "dim_mults": [1, 2], "num_resnet_blocks": 1, "layer_attns": [False, True],
             "layer_cross_attns": [False, True], "attn_heads": 2, "attn_dim_head": 8, "max_text_len": 8}
TINY_SR = {**TINY_BASE, "layer_attns": [False, False], "memory_efficient": True}


def stage_config(image_size: int, previous=None, model=TINY_BASE, **train):
    return {
        "seed": 0,
        "data": {"type": "shapes", "length": 64, "seed": 1, "resolution": 64},
        "text_encoder": {"type": "minilm", "max_length": 8},
        # (each batch's captions encoded as it comes: the shapes' 3553 captions encoded up front take 15 s of each
        # run's start on one thread; a resumed run sees the same batches, so the same states, either way)
        "cache_text": False,
        "model": model,
        "imagen": {"image_size": image_size, **({"previous": str(previous)} if previous else {})},
        "sample": {"prompts": ["a red circle", "two blue squares"], "steps": 4, "guidance_scale": 3.0},
        "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "warmup_steps": 1, "checkpoint_every": 3,
                  "log_every": 2, "progress": False, "tensorboard": False, "deterministic": True, "threads": 1,
                  "sample_every": 6, **train},
    }


def train(tmp_path, name: str, cfg: dict, *extra: str) -> Path:
    import argparse

    import yaml

    from imagine.train.cli import add_arguments, run

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args(["imagen", "--config", str(path), "--output", str(tmp_path / name), *extra]))
    return tmp_path / name


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("imagen"), "base", stage_config(16))


def test_a_base_stage_trains_exports_and_samples(base_run):
    from imagine.pipelines.imagen import ImagenPipeline

    log = [json.loads(line) for line in (base_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in log)
    assert (base_run / "samples" / "step-00000006.png").is_file()
    pipe = ImagenPipeline.from_pretrained(base_run / "model")
    assert pipe.image_sizes == (16,) and pipe.noise_schedules == ("cosine",) and pipe.defaults == {
        "steps": 4, "guidance_scale": 3.0}
    # the exported unet is the checkpoint's EMA (what the grids sample with), in the folder's own format
    from imagine.models import io

    ema = io.load_tensors(base_run / "checkpoints" / "step-00000006" / "ema.safetensors")  # (the EMA's "model." keys)
    unet = pipe.unets[0].state_dict()
    assert {f"model.{k}" for k in unet} <= set(ema) and all(torch.equal(ema[f"model.{k}"], unet[k]) for k in unet)
    # one seed, one picture, whatever the batch
    pictures = pipe.sample(["a red circle", "two blue squares"], seeds=[5, 6], cond_scale=3.0, steps=4,
                           progress=False)
    alone = pipe.sample(["two blue squares"], seeds=[6], cond_scale=3.0, steps=4, progress=False)
    assert pictures.shape == (2, 3, 16, 16) and torch.allclose(pictures[1:], alone, atol=1e-5)


def same_exported_stage(run_a: Path, run_b: Path) -> bool:
    """The two runs' exported top stages hold the same weights, bit for bit."""
    from imagine.models import io

    a, b = (io.load_tensors(r / "model" / "unet_1" / "diffusion_pytorch_model.safetensors") for r in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_stage_ends_with_the_weights_of_an_unbroken_run(base_run, tmp_path):
    resumed = train(tmp_path, "resumed", stage_config(16), "--resume-from",
                    str(base_run / "checkpoints" / "step-00000003"))
    assert same_exported_stage(base_run, resumed)


def test_a_super_resolution_stage_samples_through_the_cascade_below(base_run, tmp_path):
    from imagine.pipelines.imagen import ImagenPipeline

    sr = train(tmp_path, "sr", stage_config(32, previous=base_run / "model", model=TINY_SR))
    pipe = ImagenPipeline.from_pretrained(sr / "model")
    base = ImagenPipeline.from_pretrained(base_run / "model")
    assert pipe.image_sizes == (16, 32) and pipe.unets[1].config.lowres_cond and not pipe.unets[0].config.lowres_cond
    a, b = pipe.unets[0].state_dict(), base.unets[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the stage below is carried over unchanged
    big = pipe.sample(["a red circle"], seeds=[2], cond_scale=3.0, steps=4, progress=False)
    small = pipe.sample(["a red circle"], seeds=[2], cond_scale=3.0, steps=4, progress=False, stop_at_unet_number=1)
    assert big.shape == (1, 3, 32, 16 * 2) and torch.allclose(small, base.sample(
        ["a red circle"], seeds=[2], cond_scale=3.0, steps=4, progress=False), atol=1e-6)


def test_the_stage_pictures_are_the_data_averaged_down_and_resized_back():
    from imagine.train.imagen_task import ImagenTask

    class Below:  # the cascade below a 16 px stage: 8 px
        image_sizes, unets, text_embed_dim = (8,), [], 384

    task = ImagenTask.__new__(ImagenTask)
    task.d = {"imagen": {"image_size": 16, "resize_mode": "nearest"}}
    task.previous = Below()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    x0, low = task.pictures(images)
    # closed forms: the mean over each 4x4 block; the 8 px picture's 8x8 blocks, each pixel repeated twice each way
    assert torch.allclose(x0, images.unflatten(2, (16, 4)).unflatten(4, (16, 4)).mean((3, 5)), atol=1e-6)
    small = images.unflatten(2, (8, 8)).unflatten(4, (8, 8)).mean((3, 5))
    assert torch.allclose(low, small.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)


@pytest.mark.parametrize("change,message", [
    ({"imagen": {"image_size": 128}}, "larger than the data's pictures"),
    ({"imagen": {"image_size": 16, "previous": 3}}, "imagen.previous must be the folder"),
    ({"imagen": {"image_size": 16, "noise_schedule": "sigmoid"}}, "unknown imagen.noise_schedule"),
    ({"imagen": {"image_size": 16, "typo": 1}}, "typo"),
    ({"model": {**TINY_BASE, "lowres_cond": True}}, "lowres_cond is set by the stage"),
    ({"model": {**TINY_BASE, "channels_typo": 3}}, "channels_typo"),
    ({"prediction_type": "noise"}, "unknown prediction_type"),
    ({"sample": {"prompts": [""]}}, "sample.prompts"),
])
def test_bad_stage_configs_are_refused_by_name(change, message):
    from imagine.train.imagen_task import check_imagen_config

    with pytest.raises(ValueError, match=message):
        check_imagen_config({**stage_config(16), **change})


def test_a_stage_must_be_larger_than_the_cascade_below(base_run):
    from imagine.train.imagen_task import ImagenTask

    with pytest.raises(ValueError, match="must be larger than the size of the cascade below \\(16"):
        ImagenTask(stage_config(16, previous=base_run / "model", model=TINY_SR))


def test_shapes_eval_judges_a_cascade_on_the_64px_canvas(base_run):
    import argparse

    from PIL import Image

    from imagine.evaluation import ImagenShapes, add_arguments
    from imagine.pipelines.imagen import ImagenPipeline

    p = argparse.ArgumentParser()
    add_arguments(p)
    shapes = ImagenShapes(p.parse_args(["--model", str(base_run / "model")]))
    got = shapes(["a red circle", "two blue squares"], [3, 4], steps=3, guidance_scale=2.0)
    own = ImagenPipeline.from_pretrained(base_run / "model").sample(
        ["a red circle", "two blue squares"], seeds=[3, 4], steps=3, cond_scale=2.0, output_type="pil", progress=False)
    assert [g.size for g in got] == [(64, 64)] * 2 and own[0].size == (16, 16)  # (16 px pictures, judged at 64)
    assert all(g.tobytes() == o.resize((64, 64), Image.BICUBIC).tobytes() for g, o in zip(got, own))
    with pytest.raises(ValueError, match="--final-step: not for an Imagen cascade"):
        ImagenShapes(p.parse_args(["--model", str(base_run / "model"), "--sampler", "ddim", "--final-step", "heun"]))
    with pytest.raises(ValueError, match="--sweep schedules"):
        ImagenShapes(p.parse_args(["--model", str(base_run / "model"), "--sweep", "schedules"]))


def test_the_latent_pipeline_refuses_a_cascade_folder_naming_what_runs_it(base_run):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    with pytest.raises(ValueError, match="is an Imagen cascade .*imagine generate --model FOLDER"):
        TextToImagePipeline.from_pretrained(base_run / "model")
