"""Imagen's conditioning pictures (imagen-pytorch's cond_images: a U-Net with cond_images_channels > 0 reads a picture,
e.g. a segmentation map or a sketch, resized to its size and put before its input's channels) against imagen-pytorch
2.1.0 on the same weights: the Efficient U-Net's output (1e-5 relative, the picture at another size than x's), and
Imagen.sample's pictures through a two-stage cascade with guidance (EfficientUNets loaded from a trainer checkpoint,
test_imagen_s31's bound for them)."""

from __future__ import annotations

import os

import pytest
import torch

import imagen_peer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ip = imagen_peer.load()

from test_efficient_unet_s31 import TINY, inputs, perturbed, relative  # noqa: E402
from test_imagen_s31 import (SIZES, TEXT_DIM, TIMESTEPS, UNETS, peer_sample, psnr, spread, texts,  # noqa: E402
                             trainer_checkpoint)

from imagine.models.efficient_unet import EfficientUNet, EfficientUNetConfig  # noqa: E402
from imagine.pipelines.imagen import ImagenPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _cond(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra, size", [
    (dict(dim_mults=(1, 2), cond_images_channels=2), 8),  # (resized up to x's 16 px)
    (dict(dim_mults=(1, 2), cond_images_channels=1, lowres_cond=True, self_cond=True, resize_mode="bilinear"), 32),
])
def test_unet_reads_cond_images_as_imagen_pytorch(extra, size):
    kwargs = {**TINY, **extra}
    torch.manual_seed(0)
    peer = perturbed(ip.Unet(**kwargs), 1)
    ours = EfficientUNet(EfficientUNetConfig(**kwargs)).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    a = inputs(ours.config)
    cond = _cond(3, kwargs["cond_images_channels"], size, 4)
    with torch.no_grad():
        theirs = peer(a["x"], a["noise_cond"], text_embeds=a["text_embeds"], text_mask=a["text_mask"],
                      lowres_cond_img=a.get("lowres_cond_img"), lowres_noise_times=a.get("lowres_noise_cond"),
                      self_cond=a.get("self_cond"), cond_images=cond, cond_drop_prob=0.0)
        got = ours(a["x"], a["noise_cond"], **{k: v for k, v in a.items() if k not in ("x", "noise_cond")},
                   cond_images=cond)
        other = ours(a["x"], a["noise_cond"], **{k: v for k, v in a.items() if k not in ("x", "noise_cond")},
                     cond_images=_cond(3, kwargs["cond_images_channels"], size, 5))
    assert relative(got, theirs) < 1e-5
    assert float((other - got).abs().max()) > 1e-2 * float(got.abs().max())  # (the picture is read)
    with pytest.raises(ValueError, match="reads a conditioning picture.*cond_images must be a tensor"):
        ours(a["x"], a["noise_cond"], **{k: v for k, v in a.items() if k not in ("x", "noise_cond")})
    with pytest.raises(ValueError, match=r"\[B, \d, H, W\] with B = 3"):
        ours(a["x"], a["noise_cond"], **{k: v for k, v in a.items() if k not in ("x", "noise_cond")},
             cond_images=_cond(3, 5, size, 4))


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        imagen = ip.ImagenConfig(unets=[{**u, "cond_images_channels": 3} for u in UNETS], image_sizes=SIZES,
                                 timesteps=TIMESTEPS, text_embed_dim=TEXT_DIM, cond_drop_prob=0.5).create()
        spread(imagen, 1)
    imagen.eval()
    path = tmp_path_factory.mktemp("imagen") / "checkpoint.0.pt"
    torch.save(trainer_checkpoint(imagen), path)
    return imagen, ImagenPipeline.from_imagen_pytorch(path)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cascade_with_cond_images_is_imagen_sample(cascade, scale):
    imagen, ours = cascade
    embeds, mask = texts()
    cond = _cond(2, 3, 12, 6)  # (resized by each stage: 12 -> 8, 12 -> 16)
    theirs = peer_sample(imagen, 5, text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=cond)
    torch.manual_seed(5)
    got = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=cond, progress=False)
    assert float((got - theirs).abs().max()) < 5e-4 and psnr(got, theirs) > 80  # (test_imagen_s31's bound)
    torch.manual_seed(5)
    other = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=_cond(2, 3, 12, 7),
                        progress=False)
    assert psnr(got, other) < 40  # (the picture steers the cascade)
    # one picture for the batch; uint8 pictures are imagen-pytorch's cast to [0, 1]; PIL pictures too
    one = (cond[:1] * 255).round().to(torch.uint8)
    torch.manual_seed(5)
    a = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=one, progress=False)
    torch.manual_seed(5)
    b = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=one.float() / 255,
                    progress=False)
    assert torch.equal(a, b)
    from PIL import Image

    picture = Image.fromarray(one[0].permute(1, 2, 0).numpy())
    torch.manual_seed(5)
    c = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, cond_images=picture, progress=False)
    assert torch.equal(a, c)


def test_cond_images_are_checked(cascade):
    imagen, ours = cascade
    embeds, mask = texts()
    kw = dict(text_embeds=embeds, text_masks=mask, progress=False)
    with pytest.raises(ValueError, match="stage 1's U-Net reads a conditioning picture.*give cond_images"):
        ours.sample(**kw)
    with pytest.raises(ValueError, match=r"C = 3 \(the U-Nets' cond_images_channels\)"):
        ours.sample(cond_images=_cond(2, 1, 8, 1), **kw)
    with pytest.raises(ValueError, match="B = 2 or 1"):
        ours.sample(cond_images=_cond(3, 3, 8, 1), **kw)
    plain = ImagenPipeline.from_imagen_pytorch(trainer_checkpoint(
        ip.ImagenConfig(unets=UNETS, image_sizes=SIZES, timesteps=TIMESTEPS, text_embed_dim=TEXT_DIM,
                        cond_drop_prob=0.5).create()))
    with pytest.raises(ValueError, match="no stage run here reads a conditioning picture"):
        plain.sample(cond_images=_cond(2, 3, 8, 1), **kw)


def test_training_refuses_a_stage_with_cond_images(tmp_path, capsys):
    """imagine train imagen has no conditioning pictures in its data: a config asking for them is refused by name."""
    import yaml

    from imagine.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "run"), "data": {"type": "shapes", "length": 8},
                                      "imagen": {"image_size": 32}, "model": {"dim": 16, "cond_images_channels": 3},
                                      "train": {"max_steps": 1}}))
    assert main(["train", "imagen", "--config", str(config)]) != 0
    assert "model.cond_images_channels: a stage that reads conditioning pictures" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
