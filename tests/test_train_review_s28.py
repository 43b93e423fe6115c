"""Session 28's review of `imagine train` against what a user of diffusers' train_text_to_image.py (and kohya's
sd-scripts) expects. Each check has an independent truth: diffusers' own DDPMScheduler, compute_snr and EMAModel,
the previous objective (imagine.diffusion.training_loss) bit for bit, an uninterrupted run bit for bit, statistics
of the noise a run drew, a checkpoint that must load after a kill mid-write."""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from imagine.models import io
from imagine.testing import make_image_folder
from imagine.train.cli import add_arguments, run

TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 8, "norm_num_groups": 8}
TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}
QUIET = {"progress": False, "tensorboard": False, "deterministic": True, "threads": 1}


class _Text:
    """A text encoder stand-in: fixed states per caption (the objective does not care what they are)."""
    dim = 8

    def encode(self, captions):
        from imagine.models.text_encoders import TextEncoding

        states = torch.stack([torch.full((4, 8), float(len(c))) for c in captions])
        return TextEncoding(states, None, states[:, 0])


def task_of(T=100, **d):
    from imagine.train.diffusion_task import DiffusionTask

    cfg = {"seed": 3, "schedule": {"kind": "linear", "num_train_timesteps": T}, "prediction_type": "epsilon",
           "caption_dropout": 0.0, "model": dict(TINY_UNET), **d}
    return DiffusionTask(cfg, text_encoder=_Text())


def batch_of(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "caption": [f"c{i}" for i in range(n)],
            "index": torch.arange(n), "slot": torch.arange(n), "global_batch": n}


class Probe:
    """A model that records x_t and t and answers `answer(x_t, t)` (zeros by default)."""

    def __init__(self, answer=None):
        self.answer, self.seen = answer, []

    def __call__(self, x_t, t, **cond):
        self.seen.append((x_t.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x_t) if self.answer is None else self.answer(x_t, t)


def ddpm(T=100):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def implied_noise(sched, x0, x_t, t):
    """The noise x_t was made with, from diffusers' alphas_cumprod: x_t = sqrt(abar) x0 + sqrt(1 - abar) n."""
    abar = sched.alphas_cumprod.double()[t.long()].reshape(-1, 1, 1, 1)
    return (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()


# -- 1. the objective ----------------------------------------------------------------------------------------------
def test_with_no_offset_or_perturbation_the_loss_is_the_previous_objective_bit_for_bit():
    """The loss now written out in the task (to keep x_t's noise and the target's apart) is training_loss's
    arithmetic: the same t and noise give the same loss, bit for bit, for every prediction type and min-SNR."""
    from imagine.diffusion import training_loss

    for pt in ("epsilon", "v_prediction", "sample"):
        for gamma in (None, 5.0):
            task = task_of(prediction_type=pt, min_snr_gamma=gamma)
            gen_state = task.gen.get_state()
            b = batch_of(4)
            ours, _ = task.loss(b, 0)
            task.gen.set_state(gen_state)
            t = torch.randint(0, 100, (4,), generator=task.gen)
            noise = torch.randn((4, 3, 16, 16), generator=task.gen)
            cond = task.encode_text(b["caption"])
            before = training_loss(task.trainable, b["image"], cond, task.schedule, pt, t=t, noise=noise,
                                   min_snr_gamma=gamma)
            assert torch.equal(ours, before), (pt, gamma)


def test_v_prediction_target_is_diffusers_velocity_with_the_offset_noise():
    """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022) for the very noise x_t was made with, the offset included
    (diffusers: target = get_velocity(latents, noise, t) after noise += offset * randn(B, C, 1, 1)): a model that
    answers diffusers' velocity of the noise implied by x_t has a loss of zero (to float rounding: under 1e-8)."""
    sched = ddpm()
    b = batch_of(6)
    x0 = b["image"]

    def velocity(x_t, t):
        n = implied_noise(sched, x0, x_t, t).float()
        return sched.get_velocity(x0, n, t.long())

    task = task_of(prediction_type="v_prediction", noise_offset=0.3)
    task.model = Probe(velocity)
    loss, _ = task.loss(b, 0)
    assert float(loss) < 1e-8
    # and an epsilon model that answers the implied noise is exact too: the target is the offset noise itself
    task = task_of(noise_offset=0.3)
    task.model = Probe(lambda x_t, t: implied_noise(sched, x0, x_t, t).float())
    loss, _ = task.loss(b, 0)
    assert float(loss) < 1e-8


def test_noise_offset_adds_a_per_channel_constant_of_that_size():
    """diffusers' --noise_offset: noise += offset * randn(B, C, 1, 1). The per-channel spatial mean of the noise
    is then N(0, 1/HW + offset^2); without it N(0, 1/HW)."""
    sched = ddpm()
    b = batch_of(64)
    for offset, want in ((0.0, 1 / 256), (0.5, 1 / 256 + 0.25)):
        task = task_of(noise_offset=offset)
        task.model = probe = Probe()
        task.loss(b, 0)
        x_t, t = probe.seen[0]
        n = implied_noise(sched, b["image"], x_t, t)
        var = float(n.mean(dim=(2, 3)).pow(2).mean())
        assert want * 0.7 < var < want * 1.3, (offset, var, want)


def test_input_perturbation_perturbs_x_t_but_not_the_target():
    """diffusers' --input_perturbation (Ning et al. 2023): x_t = add_noise(x0, noise + g * randn, t), the target
    stays `noise`. A model that answers the noise x_t was made with then misses the target by g * randn: its loss
    is about g^2 (and exactly 0 without the perturbation)."""
    sched = ddpm()
    b = batch_of(32)
    answer = lambda x_t, t: implied_noise(sched, b["image"], x_t, t).float()  # noqa: E731
    task = task_of(input_perturbation=0.0)
    task.model = Probe(answer)
    assert float(task.loss(b, 0)[0]) < 1e-8
    task = task_of(input_perturbation=0.5)
    task.model = probe = Probe(answer)
    loss = float(task.loss(b, 0)[0])
    assert 0.25 * 0.9 < loss < 0.25 * 1.1, loss
    # the zero model's loss is the target's mean square: about 1 (the unperturbed noise), not 1 + g^2
    x_t, t = probe.seen[0]
    assert float(implied_noise(sched, b["image"], x_t, t).pow(2).mean()) == pytest.approx(1.25, rel=0.05)
    task = task_of(input_perturbation=0.5)
    task.model = Probe()
    assert float(task.loss(b, 0)[0]) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers(pt):
    """Per sample, the weighted loss over the plain one is diffusers' (and Hang et al.'s) weight:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, with SNR from compute_snr."""
    from diffusers.training_utils import compute_snr

    sched = ddpm()
    sched.config.prediction_type = pt
    for seed in range(6):
        b = batch_of(1, seed=seed)
        plain, weighted = task_of(prediction_type=pt), task_of(prediction_type=pt, min_snr_gamma=2.0)
        plain.gen.manual_seed(seed)
        weighted.gen.manual_seed(seed)
        probe = Probe()
        plain.model, weighted.model = Probe(), probe
        ratio = float(weighted.loss(b, 0)[0]) / float(plain.loss(b, 0)[0])
        t = probe.seen[0][1].long()
        snr = compute_snr(sched, t)
        w = torch.minimum(snr, torch.full_like(snr, 2.0)) / (snr if pt == "epsilon" else snr + 1)
        assert ratio == pytest.approx(float(w), rel=1e-5), (seed, int(t))


def test_offset_and_perturbation_are_checked_and_zero_snr_epsilon_warns():
    from imagine.train.diffusion_task import check_diffusion_config

    for key in ("noise_offset", "input_perturbation"):
        with pytest.raises(ValueError, match=key):
            check_diffusion_config({key: -0.1})
        with pytest.raises(ValueError, match=key):
            check_diffusion_config({key: "lots"})
    with pytest.warns(UserWarning, match="v_prediction"):
        check_diffusion_config({"schedule": {"kind": "linear", "zero_terminal_snr": True}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_diffusion_config({"schedule": {"kind": "linear", "zero_terminal_snr": True},
                                "prediction_type": "v_prediction"})


# -- 2. the EMA ------------------------------------------------------------------------------------------------------
def test_ema_follows_diffusers_ema_model():
    """diffusers' EMAModel (train_text_to_image's, default arguments): decay 0 at the first update (the average
    starts as the weights after step 1), then min(decay, (1 + n) / (10 + n))."""
    from diffusers.training_utils import EMAModel

    from imagine.train.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ours, theirs = EMA(net, 0.9), EMAModel(net.parameters(), decay=0.9)
    for k in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update(net)
        theirs.step(net.parameters())
        for a, b in zip(ours.model.parameters(), theirs.shadow_params):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), k
    assert ours.current_decay() == pytest.approx(theirs.get_decay(theirs.optimization_step + 1))   # 31/40


# -- 3. the loop and its checks --------------------------------------------------------------------------------------
def train(what, cfg: dict, out: Path, tmp_path: Path, *extra):
    import yaml

    path = tmp_path / f"{what}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args([what, "--config", str(path), "--output", str(out), *map(str, extra)]))


def diffusion_config(data, **train_opts):
    return {"seed": 0, "data": {"type": "imagefolder", "path": str(data), "resolution": 16},
            "text_encoder": {"type": "minilm", "max_length": 8},
            "schedule": {"kind": "linear", "num_train_timesteps": 100}, "prediction_type": "v_prediction",
            "min_snr_gamma": 5.0, "noise_offset": 0.1, "input_perturbation": 0.1,
            "model": {**TINY_UNET, "cross_attention_dim": 384},
            "train": {"batch_size": 4, "lr": 2e-3, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2,
                      "log_every": 1, **QUIET, **train_opts}}


def test_offset_and_perturbation_runs_resume_bit_identical(tmp_path):
    """The new draws come from the task's generators, which checkpoints keep: 2 steps + resume to 4 ends with the
    weights, EMA and optimizer of 4 steps straight."""
    data = make_image_folder(tmp_path / "data", n=10)
    train("diffusion", diffusion_config(data), tmp_path / "a", tmp_path)
    train("diffusion", diffusion_config(data, max_steps=2), tmp_path / "b", tmp_path)
    train("diffusion", diffusion_config(data), tmp_path / "b", tmp_path, "--resume")
    for name in ("model", "ema", "optimizer"):
        a, b = (io.load_tensors(r / "checkpoints" / "step-00000004" / f"{name}.safetensors")
                for r in (tmp_path / "a", tmp_path / "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["resolved"]["noise_offset"] == 0.1 and state["resolved"]["input_perturbation"] == 0.1
    assert state["imagine_version"] and state["config"]["noise_offset"] == 0.1


def test_mixed_precision_and_counts_are_checked_before_the_data(tmp_path):
    """A mixed_precision accelerate does not know, or fp16 on a CPU (where accelerate's autocast does nothing and
    the run would train in fp32 under an fp16 label), is refused before the data is read (the folder does not
    exist here); counts take YAML's 1e1."""
    from imagine.train.loop import check_run

    cfg = diffusion_config(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="mixed_precision"):
        train("diffusion", cfg, tmp_path / "r", tmp_path, "--set", "train.mixed_precision=fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            train("diffusion", cfg, tmp_path / "r", tmp_path, "--set", "train.mixed_precision=fp16")
    tc = check_run({"train": {"max_steps": 1e1, "batch_size": 8.0}}, tmp_path / "r")
    assert tc["max_steps"] == 10 and isinstance(tc["max_steps"], int) and tc["batch_size"] == 8
    with pytest.raises(ValueError, match="train.max_steps"):
        check_run({"train": {"max_steps": 2.5}}, tmp_path / "r")


def test_list_captions_are_drawn_one_at_a_time(tmp_path):
    """A caption column holding a list of captions (the Hugging Face convention diffusers' train_text_to_image
    reads, taking one at random) is trained on, not skipped as caption-less: one caption a draw, from (seed,
    epoch, record), all of them over the epochs, the same in every run."""
    from imagine.train.data import ImageFolderDataset

    root = make_image_folder(tmp_path / "data", n=3)
    lines = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines()]
    lines[0]["text"] = ["first", "second", "", 7]
    lines[1]["text"] = []
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = ImageFolderDataset(root, 16)
    assert sorted(ds.captions()) == sorted(["first", "second", lines[2]["text"]])
    drawn = [ds.draw(0, e)["caption"] for e in range(40)]
    assert set(drawn) == {"first", "second"}
    assert drawn == [ImageFolderDataset(root, 16).draw(0, e)["caption"] for e in range(40)]
    assert ds.draw(1, 0)["skip"] == "records without a caption"


def test_a_checkpoint_rewritten_at_its_step_survives_a_kill_while_the_old_one_goes(tmp_path, monkeypatch):
    """A run resumed from an earlier checkpoint writes a step that exists again. The old folder is renamed away
    before the new one takes its name, so a kill while the old one is being deleted leaves a complete
    checkpoint (before: the old step folder was deleted in place, and a kill part-way left it with its
    state.json but without its weights, which `latest` still named)."""
    from imagine.train import checkpoint as ckpt

    net = torch.nn.Linear(3, 3)
    kw = dict(optimizer=None, state={"data_position": 0}, generators={})
    ckpt.save_checkpoint(tmp_path, 2, modules={"model": net}, **kw)
    with torch.no_grad():
        net.weight.add_(1)
    real = ckpt.shutil.rmtree

    def killed_midway(path, *a, **k):
        files = sorted(Path(path).glob("*.safetensors"))
        if files:
            files[0].unlink()       # one file gone, then the kill
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, modules={"model": net}, **kw)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    last = ckpt.latest_checkpoint(tmp_path)
    back = torch.nn.Linear(3, 3)
    ckpt.load_checkpoint(last, modules={"model": back})
    assert torch.equal(back.weight, net.weight)   # the new checkpoint, whole
    ckpt.save_checkpoint(tmp_path, 3, modules={"model": net}, **kw)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))   # the leftover is cleaned up


def vae_config(data, **train_opts):
    return {"seed": 0, "data": {"type": "imagefolder", "path": str(data), "resolution": 16, "eval_count": 2},
            "model": dict(TINY_VAE), "loss": {"reconstruction": "l1", "kl_weight": 1e-6},
            "train": {"batch_size": 4, "lr": 2e-3, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2,
                      "log_every": 1, **QUIET, **train_opts}}


def test_resume_without_an_ema_and_with_changed_settings(tmp_path, caplog):
    """A checkpoint written with ema_decay 0 resumed with an EMA starts the average from its weights (before: the
    resume stopped on the missing ema.safetensors); a batch size or seed other than the checkpoint's is named in a
    warning (its data position counts global batches of the old size)."""
    from imagine.train.ema import EMA

    data = make_image_folder(tmp_path / "data", n=12)
    train("vae", vae_config(data, ema_decay=0.0, max_steps=2), tmp_path / "r", tmp_path)
    with caplog.at_level(logging.WARNING):
        train("vae", {**vae_config(data, ema_decay=0.9, batch_size=2), "seed": 1}, tmp_path / "r", tmp_path,
              "--resume")
    said = caplog.text
    assert "no EMA" in said and "train.batch_size 4 -> 2" in said and "seed 0 -> 1" in said
    ema = io.load_tensors(tmp_path / "r" / "checkpoints" / "step-00000004" / "ema.safetensors")
    assert int(ema["num_updates"]) == 2
    # a plain resume says nothing of changed settings
    caplog.clear()
    train("vae", {**vae_config(data, ema_decay=0.9, batch_size=2, max_steps=6), "seed": 1}, tmp_path / "r", tmp_path,
          "--resume")
    assert "other settings" not in caplog.text
    assert EMA  # (imported for the reader: imagine.train.ema)


def test_training_mode_comes_back_after_evaluation_without_an_ema(tmp_path, monkeypatch):
    """Without an EMA, evaluation runs on the trained network itself and switches it to eval mode (VAETask.evaluate);
    the steps after it must train in training mode again."""
    from imagine.train import vae_task

    modes = []
    real = vae_task.VAETask.loss

    def loss(self, batch, step):
        modes.append(self.trainable.training)
        return real(self, batch, step)

    monkeypatch.setattr(vae_task.VAETask, "loss", loss)
    data = make_image_folder(tmp_path / "data", n=12)
    train("vae", vae_config(data, ema_decay=0.0, eval_every=1), tmp_path / "r", tmp_path)
    assert modes == [True] * 4


def test_the_discriminator_steps_on_every_micro_batch(tmp_path, monkeypatch):
    """With train.grad_accum, the PatchGAN learns from all the step's micro-batches, as the autoencoder does
    (before: only the last one's): its after-step pass sees grad_accum x batch_size real images a step."""
    from imagine.train import vae_task

    seen = []
    real = vae_task.VAETask.after_backward

    def after(self, batch, step):
        calls = []
        fwd = self.disc.forward
        self.disc.forward = lambda x: (calls.append(x.shape[0]), fwd(x))[1]
        try:
            return real(self, batch, step)
        finally:
            del self.disc.forward
            seen.append(sum(calls))

    monkeypatch.setattr(vae_task.VAETask, "after_backward", after)
    data = make_image_folder(tmp_path / "data", n=20)
    cfg = vae_config(data, grad_accum=3, max_steps=2)
    cfg["loss"].update(discriminator=True, disc_start=0, disc_layers=1)
    train("vae", cfg, tmp_path / "r", tmp_path)
    assert seen == [2 * 3 * 4] * 2   # real and fake, 3 micro-batches of 4, each step
