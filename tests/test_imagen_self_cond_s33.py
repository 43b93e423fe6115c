"""Self-conditioning in training (session 33; Chen et al. 2022, "Analog Bits", sec. 3.3): a self-conditioned U-Net is
sampled with the previous step's x_0 estimate as `self_cond`, so it is trained, half the time, on its own estimate
made first without gradient (imagen-pytorch's p_losses and ElucidatedImagen.forward).

Truths: imagen-pytorch 2.1.0's losses on the same U-Net, images, levels and noise, its Python `random()` drawn to take
the self-conditioned pass (noise objective; for v and x_0 imagen-pytorch gives the U-Net the raw prediction as its
estimate and overwrites the x_0 its target is made of, so there the x_0 handed over is checked against eq. (v) of
Salimans & Ho 2022 instead); and the trainer's draw, about half of the batches."""

from __future__ import annotations

import random

import pytest
import torch

import imagen_peer
import test_imagen_s31 as s31
from imagine import edm
from imagine.diffusion import continuous_training_loss
from imagine.schedules import alpha_sigma

TEXT_DIM = 16
SELF_COND_DRAW = 1  # random.seed(1): random() = 0.134 < 0.5, the peers take the self-conditioned pass


def _perturbed(module):
    with torch.no_grad():  # (zero-initialised output layers would make every prediction 0)
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 8, 8, generator=g)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    text = torch.randn(3, 5, TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return images, noise, text, mask


def test_self_conditioned_loss_equals_imagen_pytorchs():
    ip = imagen_peer.load()
    torch.manual_seed(0)
    unet = ip.Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, text_embed_dim=TEXT_DIM, attn_heads=2,
                   attn_dim_head=8, layer_attns=(False, True), layer_cross_attns=(False, True), self_cond=True)
    imagen = _perturbed(ip.Imagen(unets=(unet,), image_sizes=(8,), text_embed_dim=TEXT_DIM, timesteps=10,
                                  cond_drop_prob=0.0, pred_objectives="noise"))
    unet, scheduler = imagen.unets[0], imagen.noise_schedulers[0]
    images, noise, text, mask = _inputs()
    times = torch.tensor([0.03, 0.5, 0.97])
    random.seed(SELF_COND_DRAW)
    assert random.random() < 0.5
    random.seed(SELF_COND_DRAW)
    with torch.no_grad():
        theirs = imagen.p_losses(unet, images, times, noise_scheduler=scheduler, text_embeds=text, text_mask=mask,
                                 noise=noise, pred_objective="noise", min_snr_gamma=None)
        kw = dict(cond={"text_embeds": text, "text_mask": mask})
        ours, plain = (continuous_training_loss(lambda x, lam, **c: unet(x, lam, **c), images * 2 - 1,
                                                scheduler.get_condition(times), noise, "epsilon", self_condition=sc,
                                                **kw) for sc in (True, False))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0), (float(ours), float(theirs))
    assert abs(float(plain) - float(ours)) > 1e-3 * float(ours)  # (the estimate handed over changes the output)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_the_estimate_handed_over_is_x0_without_gradient(prediction_type):
    """The first pass's output read as its prediction type says (eps: (x - sigma eps) / alpha; v: alpha x - sigma v;
    x_0 as it is), given as self_cond to the second pass, the only one the gradient flows through."""
    net = torch.nn.Conv2d(3, 3, 1)
    seen = []

    def model(x, lam, self_cond=None):
        seen.append(self_cond)
        return net(x) + (0 if self_cond is None else 0.5 * self_cond)

    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    lam = torch.tensor([-2.0, 3.0])
    loss = continuous_training_loss(model, x0, lam, noise, prediction_type, self_condition=True)
    loss.backward()
    alpha, sigma = (v.view(-1, 1, 1, 1).float() for v in alpha_sigma(lam.double()))
    x_t = alpha * x0 + sigma * noise
    first = net(x_t).detach()
    want = {"epsilon": (x_t - sigma * first) / alpha, "v_prediction": alpha * x_t - sigma * first,
            "sample": first}[prediction_type]
    assert seen[0] is None and torch.allclose(seen[1], want, atol=1e-5) and not seen[1].requires_grad
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0


def test_elucidated_self_conditioned_loss_equals_imagen_pytorchs():
    ip = imagen_peer.load()
    torch.manual_seed(0)
    unet = ip.Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, text_embed_dim=TEXT_DIM, attn_heads=2,
                   attn_dim_head=8, layer_attns=(False, True), layer_cross_attns=(False, True), self_cond=True)
    imagen = _perturbed(ip.ElucidatedImagen(unets=(unet,), image_sizes=(8,), text_embed_dim=TEXT_DIM,
                                            cond_drop_prob=0.0))
    images, _, text, mask = _inputs()
    random.seed(SELF_COND_DRAW)
    torch.manual_seed(11)
    with torch.no_grad():
        imagen.train()  # (its forward asserts nothing of the mode; the U-Net has no dropout)
        theirs = imagen(images, text_embeds=text, text_masks=mask, unet_number=1)
    torch.manual_seed(11)  # its draws: ln sigma ~ N(P_mean, P_std^2), then the noise
    sigma = edm.training_sigmas(torch.randn(3), -1.2, 1.2)
    noise = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ours, plain = (edm.training_loss(s31.PeerUNet(imagen.unets[0]), images * 2 - 1, sigma, noise, 0.5,
                                         cond={"text_embeds": text, "text_mask": mask}, self_condition=sc)
                       for sc in (True, False))
    assert abs(float(ours) - float(theirs)) < 1e-5 * float(theirs), (float(ours), float(theirs))
    assert abs(float(plain) - float(ours)) > 1e-3 * float(ours)


def test_the_trainer_self_conditions_about_half_the_batches():
    """`imagine train imagen` with model.self_cond: one draw per batch from the task's stream; the U-Net runs twice on
    those batches (the second with an estimate), once on the others; a U-Net without self_cond always once."""
    from test_imagen_train_s31 import TINY_BASE, stage_config

    from imagine.train.imagen_task import ImagenTask

    def calls_per_batch(model: dict) -> list[int]:
        task = ImagenTask(stage_config(16, model=model))
        task.model = None
        given: list = []
        task.trainable.register_forward_pre_hook(lambda m, a, kw: given.append(kw.get("self_cond")),
                                                 with_kwargs=True)
        counts = []
        batch = {"caption": ["a red circle", "two blue squares"], "image": torch.rand(2, 3, 64, 64) * 2 - 1}
        for step in range(12):
            before = len(given)
            task.loss(batch, step)
            counts.append(len(given) - before)
            if counts[-1] == 2:
                assert given[-2] is None and given[-1] is not None and given[-1].shape == (2, 3, 16, 16)
        return counts

    counts = calls_per_batch({**TINY_BASE, "self_cond": True})
    assert set(counts) == {1, 2} and 3 <= counts.count(2) <= 9, counts
    assert set(calls_per_batch(TINY_BASE)) == {1}
