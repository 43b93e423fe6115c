"""ComfyUI nodes of session 40: LatentInterpolate (comfy_extras/nodes_latent.py), held to its code restated here at
batch 1 and to closed forms (ratio 1 is samples1, ratio 0 samples2 at samples1's size, two vectors of one direction
keep it with their lengths mixed, two of one length give the normalized mean at that length)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")


def comfyui_latent_interpolate(s1: torch.Tensor, s2: torch.Tensor, ratio: float) -> torch.Tensor:
    """ComfyUI's op as written (s2 already at s1's shape): norms over channels without keepdim, which broadcast
    against [B, C, H, W] as [1, B, H, W], so the right numbers at batch 1."""
    m1 = torch.linalg.vector_norm(s1, dim=(1))
    m2 = torch.linalg.vector_norm(s2, dim=(1))
    s1 = torch.nan_to_num(s1 / m1)
    s2 = torch.nan_to_num(s2 / m2)
    t = (s1 * ratio + s2 * (1.0 - ratio))
    mt = torch.linalg.vector_norm(t, dim=(1))
    st = torch.nan_to_num(t / mt)
    return st * (m1 * ratio + m2 * (1.0 - ratio))


def test_latent_interpolate():
    from imagine.server import comfyui as c

    g = torch.Generator().manual_seed(3)
    a = {"samples": torch.randn(1, 4, 6, 8, generator=g)}
    b = {"samples": torch.randn(1, 4, 3, 4, generator=g)}
    b_big = F.interpolate(b["samples"], size=(6, 8), mode="bilinear")
    for ratio in (0.0, 0.3, 1.0):
        got = c._latent_interpolate(None, a, b, ratio)[0]["samples"]
        assert torch.allclose(got, comfyui_latent_interpolate(a["samples"], b_big, ratio), atol=1e-6), ratio
    assert torch.allclose(c._latent_interpolate(None, a, b, 1.0)[0]["samples"], a["samples"], atol=1e-6)
    assert torch.allclose(c._latent_interpolate(None, a, b, 0.0)[0]["samples"], b_big, atol=1e-6)
    # one direction, lengths 1 and 3: at ratio 0.25 the direction kept, length 0.25 + 0.75 * 3
    u = torch.nn.functional.normalize(torch.randn(1, 4, 2, 2, generator=g), dim=1)
    got = c._latent_interpolate(None, {"samples": u}, {"samples": 3 * u}, 0.25)[0]["samples"]
    assert torch.allclose(got, 2.5 * u, atol=1e-6)
    # one length (2), two directions: at 0.5 the normalized mean at length 2; a zero vector stays zero
    v = torch.nn.functional.normalize(torch.randn(1, 4, 2, 2, generator=g), dim=1)
    got = c._latent_interpolate(None, {"samples": 2 * u}, {"samples": 2 * v}, 0.5)[0]["samples"]
    assert torch.allclose(got, 2 * torch.nn.functional.normalize(u + v, dim=1), atol=1e-6)
    zero = torch.zeros(1, 4, 2, 2)
    assert torch.equal(c._latent_interpolate(None, {"samples": zero}, {"samples": zero}, 0.5)[0]["samples"], zero)
    # a batch: each picture as it is alone (where ComfyUI's [B, H, W] norms would not line up)
    two = {"samples": torch.randn(2, 4, 6, 8, generator=g)}
    got = c._latent_interpolate(None, two, b, 0.3)[0]["samples"]
    for i in range(2):
        want = comfyui_latent_interpolate(two["samples"][i:i + 1], b_big, 0.3)
        assert torch.allclose(got[i:i + 1], want, atol=1e-6), i
    assert c.NODES["LatentInterpolate"].inputs(None)["required"]["ratio"][1]["default"] == 1.0
