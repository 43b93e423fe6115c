"""The KL autoencoder against diffusers' AutoencoderKL on the same weights, and its closed forms."""

import math

import pytest
import torch

from imagine.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=3, norm_num_groups=16,
         scaling_factor=0.5),
]


def _pair(cfg):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg, down_block_types=("DownEncoderBlock2D",) * len(cfg["block_out_channels"]),
                                  up_block_types=("UpDecoderBlock2D",) * len(cfg["block_out_channels"])).eval()
    ours = AutoencoderKL(VAEConfig(**cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_encode_decode_match_diffusers(cfg):
    ref, ours = _pair(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d_ref = ref.encode(x).latent_dist
        d_ours = ours.encode(x)
        assert _rel(d_ours.mean, d_ref.mean) < 1e-4
        assert _rel(d_ours.logvar, d_ref.logvar) < 1e-4
        z = torch.randn_like(d_ref.mean)
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-4


def test_tiled_decode_close_to_full():
    # Convolutions only (no mid attention), so tiles with enough overlap reproduce the full decode
    # away from the receptive-field seams, and the blend keeps the rest close.
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, mid_block_add_attention=False)).eval()
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.tiled_decode(z, tile=16, overlap=8)
    assert tiled.shape == full.shape
    # GroupNorm statistics differ per tile, so not exact; but far closer than a random image.
    assert (tiled - full).abs().mean() < 0.25 * full.abs().mean()


def test_large_latents_decode_whole_as_diffusers_unless_memory_is_short(monkeypatch):
    """decode_latents decodes a large latent (SDXL's 128 x 128 at 1024 pixels) whole, as diffusers' pipelines do, where
    it fits in half the memory available, in 64-latent tiles where it does not; one image at a time, so that an
    image's pixels do not depend on its batch."""
    from imagine.models import winograd
    from imagine.pipelines.text_to_image import decode_bytes, decode_latents

    cfg = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    ref, ours = _pair(cfg)
    z = torch.randn(2, 4, 100, 72)
    with torch.no_grad():
        want = ref.decode(z / ours.config.scaling_factor).sample.clamp(-1, 1)
        one = decode_bytes(ours, z[:1])
        for free, tiled in ((4 * one, False), (3 * one, False), (one, True)):
            monkeypatch.setattr(winograd, "_available_bytes", lambda free=free: free)
            got = decode_latents(ours, z, "exact")
            assert got.shape == want.shape
            if tiled:  # (each tile its own GroupNorm statistics: close, not equal)
                assert 1e-3 < _rel(got, want) < 0.5
                tiles = torch.cat([ours.tiled_decode(z[i:i + 1] / ours.config.scaling_factor, 64) for i in range(2)])
                assert _rel(got, tiles.clamp(-1, 1)) < 1e-4  # (exact_copy's packed weights: rounding apart)
            else:
                assert _rel(got, want) < 1e-4
            for i in range(2):  # (bit for bit the image decoded alone)
                assert torch.equal(got[i:i + 1], decode_latents(ours, z[i:i + 1], "exact"))


def test_kl_closed_form():
    mean = torch.tensor([[[[0.5]], [[-1.0]]]])
    logvar = torch.tensor([[[[math.log(2.0)]], [[0.0]]]])
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(m, s^2) || N(0,1)) = 0.5 (m^2 + s^2 - 1 - log s^2)
    expected = 0.5 * (0.25 + 2.0 - 1 - math.log(2.0)) + 0.5 * 1.0
    assert q.kl().item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([q.sample(g) for _ in range(20000)])
    assert draws[:, 0, 0].mean().item() == pytest.approx(0.5, abs=0.03)
    assert draws[:, 0, 0].var().item() == pytest.approx(2.0, rel=0.05)


def test_save_load_roundtrip_and_errors(tmp_path):
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), norm_num_groups=8))
    vae.save_pretrained(tmp_path / "vae")
    back = AutoencoderKL.from_pretrained(tmp_path / "vae")
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    # A truncated weights file gets an error naming the file.
    w = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        AutoencoderKL.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 31, 32))
