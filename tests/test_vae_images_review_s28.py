"""Session 28's review of the KL autoencoder (`imagine.models.vae`, `imagine.loading.vae`) and the picture helpers
(`imagine.images`), held against diffusers on the same weights (AutoencoderKL, its DiagonalGaussianDistribution and
tiling, VaeImageProcessor) and against AUTOMATIC1111's arithmetic restated:

- the posterior is sampled as diffusers' `latent_dist.sample(generator)` draws it, bit for bit, with one generator, a
  list of one, or one per image (a list failed before); posterior noise of another shape is refused (a broadcast
  would have given every image one image's noise);
- odd latent sizes, images of the factor but not of 8, batch against single, slicing, three levels with GroupNorms
  that are not the identity, configs without quant convs or with shift / per-channel statistics: diffusers' numbers;
- the tiled decode: every pixel is a weighted mean of the tiles over it (a pixel-local decoder gives the whole decode
  back at any size, tile and overlap), and a tile and overlap it cannot use are refused (a negative overlap left
  gaps, NaN);
- to_pil is diffusers' postprocess to the bit (not A1111's truncation), from_pil diffusers' and A1111's input;
- fit_picture of a palette or 1-bit picture (a palette mask came out all black under crop or fill).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagine.images import fit_picture, from_pil, grid, to_pil
from imagine.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(levels: int = 2, perturb: bool = True, **extra):
    cfg = dict(block_out_channels=(32, 64, 64)[:levels], layers_per_block=1, latent_channels=4, norm_num_groups=8)
    cfg.update(extra)
    torch.manual_seed(0)
    n = len(cfg["block_out_channels"])
    ref = diffusers.AutoencoderKL(**cfg, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n).eval()
    if perturb:  # (GroupNorm scales and shifts away from 1 and 0, so that a mix-up of norms shows)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    ours = AutoencoderKL(VAEConfig(**{k: v for k, v in cfg.items() if k != "force_upcast"})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------------------------
# the posterior's draws
# ------------------------------------------------------------------------------------------------------------------
def test_posterior_samples_are_diffusers_draws_bit_for_bit():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(3, 8, 5, 7)
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)
    assert torch.equal(ours.kl(), theirs.kl())
    for gens in (torch.Generator().manual_seed(3), [torch.Generator().manual_seed(3)],
                 [torch.Generator().manual_seed(s) for s in (4, 5, 6)]):
        twin = [copy.deepcopy(g) for g in gens] if isinstance(gens, list) else copy.deepcopy(gens)
        got, want = ours.sample(gens), theirs.sample(twin)
        assert torch.equal(got, want)
    # one generator per image: each image's draw is the one it gets alone
    alone = DiagonalGaussian(moments[1:2]).sample(torch.Generator().manual_seed(5))
    per_image = ours.sample([torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    assert torch.equal(per_image[1:2], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ours.sample([torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="the posterior's shape"):
        ours.sample(noise=torch.randn(1, 4, 5, 7))  # (broadcast, it gave all three images one noise)
    noise = torch.randn(3, 4, 5, 7)
    assert torch.equal(ours.sample(noise=noise), ours.mean + ours.std * noise)


def test_encode_sample_through_the_model_matches_diffusers():
    ref, ours = _pair()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        q = ours.encode(x)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        theirs = DiagonalGaussianDistribution(torch.cat([q.mean, q.logvar], dim=1))
        assert _rel(q.mean, ref.encode(x).latent_dist.mean) < 1e-5
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        assert torch.equal(q.sample(gens), theirs.sample([torch.Generator().manual_seed(s) for s in (1, 2)]))
        z, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(9))
        want = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(9)).sample
        assert _rel(z, want) < 1e-4


# ------------------------------------------------------------------------------------------------------------------
# the model against diffusers' on the same weights
# ------------------------------------------------------------------------------------------------------------------
def test_three_levels_odd_sizes_batch_and_slicing_match_diffusers():
    ref, ours = _pair(levels=3)
    with torch.no_grad():
        z = torch.randn(2, 4, 7, 9)  # (odd latent sides: the decoder doubles them, 28 x 36)
        want = ref.decode(z).sample
        got = ours.decode(z)
        assert got.shape == want.shape == (2, 3, 28, 36) and _rel(got, want) < 1e-5
        assert _rel(ours.decode(z[1:]), want[1:]) < 1e-5  # (an image alone: its batch's image to rounding)
        x = torch.rand(3, 3, 36, 44) * 2 - 1  # (multiples of the factor 4, not of 8)
        q = ours.encode(x)
        assert _rel(q.mean, ref.encode(x).latent_dist.mean) < 1e-5
        assert _rel(q.logvar, ref.encode(x).latent_dist.logvar) < 1e-5
        ref.enable_slicing()  # (diffusers' one image at a time)
        assert _rel(q.mean, ref.encode(x).latent_dist.mean) < 1e-5
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-5
        # a side that is not a multiple of the factor is refused (diffusers drops the last row / column silently)
        with pytest.raises(ValueError, match="multiples of 4"):
            ours.encode(torch.zeros(1, 3, 35, 44))


@pytest.mark.parametrize("extra", [
    dict(use_quant_conv=False, use_post_quant_conv=False, latent_channels=16, shift_factor=0.1159,
         scaling_factor=0.3611),  # (SD3 / Flux style)
    dict(mid_block_add_attention=False, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
         scaling_factor=0.5),  # (Playground v2.5 style)
    dict(force_upcast=True, scaling_factor=0.13025),  # (SDXL's)
])
def test_configs_saved_by_diffusers_load_with_their_latent_space(tmp_path, extra):
    from imagine.loading.vae import load_vae

    ref, _ = _pair(**extra)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path)  # (a model folder: its vae/)
    c = ref.config
    assert ours.config.scaling_factor == c.scaling_factor and ours.config.shift_factor == c.shift_factor
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        assert _rel(ours.encode(x).mean, ref.encode(x).latent_dist.mean) < 1e-5
        z = ref.encode(x).latent_dist.mean
        # the latent the diffusion model sees, by the formulas diffusers' pipelines use
        if c.latents_mean is not None:
            mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(c.latents_std).view(1, -1, 1, 1)
            want = (z - mean) * c.scaling_factor / std
        else:
            want = (z - (c.shift_factor or 0.0)) * c.scaling_factor
        latent = ours.to_latent(z)
        assert torch.allclose(latent, want, rtol=1e-6, atol=1e-6)
        assert torch.allclose(ours.from_latent(latent), z, rtol=1e-5, atol=1e-5)
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-5


# ------------------------------------------------------------------------------------------------------------------
# the tiled decode
# ------------------------------------------------------------------------------------------------------------------
def test_tiles_blend_to_the_whole_decode_for_a_pixel_local_decoder():
    """With a decoder that maps each latent pixel to its own f x f block (nearest upsampling), the tiles agree where
    they overlap, so a blend whose weights add up to 1 at every pixel gives the whole decode back: checked over odd
    sizes, a tile larger than the latent, the last tile moved back to the edge, and overlaps from 0 up."""
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32, 32), norm_num_groups=8)).eval()
    f = vae.config.downsampling_factor
    vae.decode = lambda z: F.interpolate(z[:, :3], scale_factor=f, mode="nearest")
    for h, w, tile, overlap in itertools.product((1, 5, 17, 23, 40), (3, 16, 31), (4, 8, 16), (0, 1, 3, 7)):
        if overlap >= tile:
            continue
        z = torch.randn(2, 4, h, w)
        got = vae.tiled_decode(z, tile, overlap)
        assert got.shape == (2, 3, h * f, w * f)
        assert torch.allclose(got, vae.decode(z), atol=1e-5), (h, w, tile, overlap)


def test_tiled_decode_of_a_real_vae():
    ref, ours = _pair()
    z = torch.randn(1, 4, 20, 12)
    with torch.no_grad():
        whole = ours.decode(z)
        assert torch.equal(ours.tiled_decode(z, tile=20, overlap=4), whole)  # (one tile: the decode itself)
        tiled = ours.tiled_decode(z, tile=8, overlap=4)
        assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
        ref.enable_tiling()  # (diffusers' tiles of 8 latents, a quarter shared)
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 16, 8, 0.25
        theirs = ref.decode(z).sample
        # (neither is the whole decode: each tile has its own GroupNorm statistics)
        assert 0 < _rel(tiled, whole) < 1 and 0 < _rel(theirs, whole) < 1
        assert ours.decode_latent(ours.to_latent(z), tile=8, overlap=4).shape == whole.shape
    for tile, overlap in ((8, -1), (0, 0), (8, 8), (8, 2.5), (True, 0)):
        with pytest.raises(ValueError, match="tile"):
            ours.tiled_decode(z, tile=tile, overlap=overlap)


# ------------------------------------------------------------------------------------------------------------------
# pictures <-> tensors
# ------------------------------------------------------------------------------------------------------------------
def _half_level_values() -> torch.Tensor:
    """float32 values at and a few ulps around each 8-bit level's rounding boundary, and beyond [-1, 1]."""
    out = []
    for k in range(255):
        t = torch.tensor((k + 0.5) / 127.5 - 1, dtype=torch.float32)
        up = down = t
        out.append(t)
        for _ in range(6):
            up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
            out += [up, down]
    out += [torch.tensor(v) for v in (-1.5, -1.0, 1.0, 1.25)]
    x = torch.stack(out)
    return x[: len(x) // 3 * 3].view(3, 1, -1)


def test_to_pil_is_diffusers_postprocess_bit_for_bit_not_a1111_truncation():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor()
    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(3, 64, 48, generator=g) * 2.4 - 1.2, _half_level_values()):
        ours = np.asarray(to_pil(x))
        assert np.array_equal(ours, np.asarray(proc.postprocess(x[None], output_type="pil")[0]))
        a1111 = (255. * np.moveaxis(torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).numpy(), 0, 2)).astype(np.uint8)
        diff = ours.astype(int) - a1111
        assert diff.min() >= 0 and diff.max() <= 1 and diff.any()  # (A1111 truncates: never above, often 1 below)
    grey = to_pil(torch.zeros(1, 4, 4))
    assert grey.mode == "L" and grey.getextrema() == (128, 128)  # (127.5 rounds half to even: 128)


def test_from_pil_is_diffusers_and_a1111_input_bit_for_bit():
    from diffusers.image_processor import VaeImageProcessor

    a = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    ours = from_pil(im)
    assert torch.equal(ours, VaeImageProcessor().preprocess(im)[0])
    a1111 = 2. * np.moveaxis(np.array(im).astype(np.float32) / 255.0, 2, 0) - 1.  # (img2img, images_tensor_to_samples)
    assert torch.equal(ours, torch.from_numpy(a1111))
    assert np.array_equal(np.asarray(to_pil(ours)), a)  # (every level back to itself)


# ------------------------------------------------------------------------------------------------------------------
# fitting pictures of every mode; grids
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill"])
def test_fit_picture_of_palette_and_one_bit_pictures(mode):
    """A black-and-white palette mask (as many tools save masks) fitted as its RGB picture is, so its white part
    stays white (crop and fill gave an all-black picture: the new canvas has no palette of its own), and resized
    by Lanczos (Pillow resizes palette and 1-bit pictures by nearest neighbour whatever filter is asked)."""
    grey = Image.new("L", (40, 20), 0)
    grey.paste(255, (10, 5, 30, 15))
    palette = grey.quantize(2)
    got = fit_picture(palette, 30, 30, mode)
    assert got.tobytes() == fit_picture(grey.convert("RGB"), 30, 30, mode).tobytes()
    assert got.convert("L").getextrema() == (0, 255)
    got = fit_picture(grey.convert("1"), 30, 30, mode)
    assert got.mode == "L" and got.tobytes() == fit_picture(grey.convert("1").convert("L"), 30, 30, mode).tobytes()
    p = palette.copy()
    p.info["transparency"] = 1  # (a palette picture with a transparent entry, as a PNG's tRNS gives it)
    got = fit_picture(p, 30, 30, mode)
    assert got.mode == "RGBA" and got.tobytes() == fit_picture(p.convert("RGBA"), 30, 30, mode).tobytes()
    assert fit_picture(palette, 40, 20, mode) is palette  # (its own size: as it is)


def test_grid_arguments():
    pics = [Image.new("RGB", (4, 3), (i * 40, 0, 0)) for i in range(5)]
    g = grid(pics, cols=2, pad=1)
    assert g.size == (2 * 4 + 3, 3 * 3 + 4) and g.getpixel((1 + 4 + 1, 1)) == (40, 0, 0)
    for cols, pad in ((0, 2), (-1, 2), (2, -1), (2.0, 2)):
        with pytest.raises(ValueError, match="cols must be"):
            grid(pics, cols=cols, pad=pad)
