"""Imagen's training objective in continuous time (imagine.diffusion.continuous_training_loss) against imagen-pytorch's
Imagen.p_losses on the same Unet, images, times and noise: eps, v and x_0 targets, with and without min-SNR-gamma."""

from __future__ import annotations

import pytest
import torch

import imagen_peer
from imagine.diffusion import continuous_training_loss

TEXT_DIM = 16


def _peer_imagen(ip, objective, min_snr_gamma, schedule="cosine"):
    torch.manual_seed(0)
    unet = ip.Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, text_embed_dim=TEXT_DIM, attn_heads=2,
                   attn_dim_head=8, layer_attns=(False, True), layer_cross_attns=(False, True))
    imagen = ip.Imagen(unets=(unet,), image_sizes=(8,), text_embed_dim=TEXT_DIM, timesteps=10, cond_drop_prob=0.0,
                       pred_objectives=objective, noise_schedules=schedule, min_snr_loss_weight=min_snr_gamma is not None,
                       min_snr_gamma=min_snr_gamma or 5)
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
