"""Imagen's Efficient U-Net (imagine.models.efficient_unet) against imagen-pytorch 2.1.0's Unet on the same weights.

Every peer model has all its parameters moved by small random values first: imagen-pytorch zero-initialises the final
convolution (and the pixel-shuffle bias), with which every output would be 0 and compare equal trivially."""

from __future__ import annotations

import json

import pytest
import torch

import imagen_peer
from imagine.models.efficient_unet import (PRESETS, EfficientUNet, EfficientUNetConfig, unet_config_from_imagen,
                                           unet_state_from_imagen)

# max |ours - peer| / max |peer|, float32 (the sums' order differs: 1.04e-5 seen once on an AVX2-only CPU, session 39;
# a wrong weight or layer is off by 1e-2 or more)
RTOL = 3e-5
TINY = dict(dim=16, text_embed_dim=16, attn_heads=2, attn_dim_head=8, max_text_len=8, attn_pool_num_latents=4)

CONFIGS = {
    # the base model's shape: attention and cross-attention on the lower levels, attention in the middle
    "base": dict(dim_mults=(1, 2, 3), num_resnet_blocks=2, layer_attns=(False, True, True),
                 layer_cross_attns=(False, True, True), attend_at_middle=True),
    # the super-resolution Efficient U-Net: downsampling first, more blocks at the low resolution, cross-attention
    # at the lowest level only, the low-resolution picture and its noise level
    "sr": dict(dim_mults=(1, 2, 4), lowres_cond=True, memory_efficient=True, num_resnet_blocks=(1, 1, 2),
               layer_attns=(False, False, True), layer_cross_attns=(False, False, True), layer_attns_depth=2),
    # every switch away from its default
    "toggles": dict(dim_mults=(1, 2), init_cross_embed=False, pixel_shuffle_upsample=False,
                    use_global_context_attn=False, final_resnet_block=False, scale_skip_connection=False,
                    init_conv_to_final_conv_residual=True, attn_pool_text=False, layer_attns_add_text_cond=False,
                    self_cond=True, attend_at_middle=False, init_conv_kernel_size=5, final_conv_kernel_size=1),
    "toggles_sr": dict(dim_mults=(1, 2), lowres_cond=True, memory_efficient=True, self_cond=True, cond_dim=24,
                       num_time_tokens=3, learned_sinu_pos_emb_dim=8, channels=4, channels_out=6,
                       init_conv_to_final_conv_residual=True, layer_mid_attns_depth=2, ff_mult=3.0,
                       init_cross_embed_kernel_sizes=(1, 3), layer_attns=(True, False),
                       layer_cross_attns=(True, False)),
}


@pytest.fixture(scope="module")
def ip():
    return imagen_peer.load()


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def peer_and_ours(ip, name: str, seed: int = 0):
    kwargs = {**TINY, **CONFIGS[name]}
    torch.manual_seed(seed)
    peer = perturbed(ip.Unet(**kwargs), seed + 1)
    ours = EfficientUNet(EfficientUNetConfig(**kwargs)).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours


def inputs(config: EfficientUNetConfig, batch: int = 3, size: int = 16, text_len: int = 6, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = config.channels
    x = torch.randn(batch, c, size, size, generator=g)
    mask = torch.arange(text_len)[None, :] < torch.tensor([text_len, 2, 4][:batch])[:, None]  # padding at the end
    out = dict(x=x, noise_cond=torch.randn(batch, generator=g) * 3,
               text_embeds=torch.randn(batch, text_len, config.text_embed_dim, generator=g), text_mask=mask)
    if config.lowres_cond:
        out.update(lowres_cond_img=torch.randn(x.shape, generator=g), lowres_noise_cond=torch.randn(batch, generator=g))
    if config.self_cond:
        out["self_cond"] = torch.randn(x.shape, generator=g)
    return out


def run_peer(peer, a: dict, cond_drop_prob: float = 0.0) -> torch.Tensor:
    with torch.no_grad():
        return peer(a["x"], a["noise_cond"], text_embeds=a.get("text_embeds"), text_mask=a.get("text_mask"),
                    lowres_cond_img=a.get("lowres_cond_img"), lowres_noise_times=a.get("lowres_noise_cond"),
                    self_cond=a.get("self_cond"), cond_drop_prob=cond_drop_prob)


def run_ours(ours, a: dict, text_dropped=None) -> torch.Tensor:
    with torch.no_grad():
        return ours(a["x"], a["noise_cond"], **{k: v for k, v in a.items() if k not in ("x", "noise_cond")},
                    text_dropped=text_dropped)


def relative(ours: torch.Tensor, peer: torch.Tensor) -> float:
    return ((ours - peer).abs().max() / peer.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_imagen_pytorch(ip, name):
    """Conditional, unconditional (the null text, cond_drop_prob=1) and one batch holding both, against the peer."""
    peer, ours = peer_and_ours(ip, name)
    a = inputs(ours.config)
    cond, uncond = run_peer(peer, a), run_peer(peer, a, cond_drop_prob=1.0)
    assert cond.shape == (3, ours.channels_out, 16, 16)
    assert (cond - uncond).abs().max() > 1e-3  # the text changes the output
    assert relative(run_ours(ours, a), cond) < RTOL
    assert relative(run_ours(ours, a, torch.ones(3, dtype=torch.bool)), uncond) < RTOL
    mixed = run_ours(ours, a, torch.tensor([False, True, False]))
    assert relative(mixed[[0, 2]], cond[[0, 2]]) < RTOL and relative(mixed[1:2], uncond[1:2]) < RTOL


def test_text_without_mask_and_longer_than_max_text_len(ip):
    """Tokens past max_text_len are cut; with no mask the padding up to max_text_len stays zeros, as the peer has it."""
    peer, ours = peer_and_ours(ip, "base", seed=3)
    for text_len in (3, 11):  # (max_text_len 8)
        a = inputs(ours.config, text_len=text_len, seed=text_len)
        a["text_mask"] = None
        assert relative(run_ours(ours, a), run_peer(peer, a)) < RTOL
        a["text_mask"] = torch.arange(text_len)[None] < torch.tensor([1, 9, text_len])[:, None]
        assert relative(run_ours(ours, a), run_peer(peer, a)) < RTOL


def test_text_free_unet(ip):
    """cond_on_text=False: the time tokens alone condition the cross-attention."""
    kwargs = {**TINY, "dim_mults": (1, 2), "cond_on_text": False, "text_embed_dim": None}
    torch.manual_seed(4)
    peer = perturbed(ip.Unet(**kwargs), 5)
    ours = EfficientUNet(kwargs).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([-4.0, 6.0])
    with torch.no_grad():
        assert relative(ours(x, t), peer(x, t)) < RTOL
    with pytest.raises(ValueError, match="reads no text"):
        ours(x, t, text_embeds=torch.randn(2, 3, 16))


def test_imagen_checkpoint(ip, tmp_path):
    """An ImagenTrainer-style checkpoint (Imagen state dict under "model", EMA under "ema", the ImagenConfig under
    "imagen_params"): each unet built as Imagen casts it (the second a super-resolution one) gives its outputs."""
    from ema_pytorch import EMA

    unet = {**TINY, "dim_mults": (1, 2), "layer_attns": (False, True), "layer_cross_attns": (False, True)}
    torch.manual_seed(6)
    imagen = ip.ImagenConfig(unets=[unet, {**unet, "memory_efficient": True}], image_sizes=[8, 16],
                             text_embed_dim=16).create()
    perturbed(imagen, 7)
    ema = torch.nn.ModuleList([EMA(u) for u in imagen.unets])
    perturbed(ema, 8)
    checkpoint = {"model": imagen.state_dict(), "ema": ema.state_dict(), "imagen_params": imagen._config}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    for index, size in ((0, 8), (1, 16)):
        for use_ema, peer in ((False, imagen.unets[index]), (True, ema[index].ema_model.eval())):
            ours = EfficientUNet.from_imagen_checkpoint(tmp_path / "checkpoint.pt" if index else checkpoint, index,
                                                        ema=use_ema)
            assert ours.config.lowres_cond == (index == 1) and ours.config.text_embed_dim == 16
            a = inputs(ours.config, batch=2, size=size, seed=index)
            assert relative(run_ours(ours, a), run_peer(peer, a)) < RTOL
    with pytest.raises(ValueError, match=r"out of range: this Imagen has 2 unets"):
        unet_config_from_imagen(imagen._config, 2)
    with pytest.raises(ValueError, match=r"no weights under 'unets.5.'.*holds unets 0, 1"):
        unet_state_from_imagen(checkpoint["model"], 5)
    with pytest.raises(ValueError, match="not one whose width imagine knows"):
        unet_config_from_imagen({"unets": [unet], "text_encoder_name": "my/t5"}, 0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_the_peers_parameters(ip, preset):
    """BaseUnet64, SRUnet256, SRUnet1024 (built on the meta device): the same parameter names and shapes."""
    with torch.device("meta"):
        peer = getattr(ip, preset)(text_embed_dim=32)
        ours = EfficientUNet(getattr(EfficientUNetConfig, {"BaseUnet64": "base_unet64", "SRUnet256": "sr_unet256",
                                                            "SRUnet1024": "sr_unet1024"}[preset])(text_embed_dim=32))
    shapes = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    assert ours.config.to_dict() == EfficientUNetConfig.from_dict(
        {k: v for k, v in peer._locals.items() if k != "kwargs" and k != "args"}).to_dict()


def test_round_trip_through_folder(ip, tmp_path):
    peer, ours = peer_and_ours(ip, "sr", seed=9)
    ours.save_pretrained(tmp_path / "unet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["_class_name"] == "EfficientUNet" and "_imagine_version" in saved
    assert saved["num_resnet_blocks"] == [1, 1, 2] and saved["memory_efficient"] is True
    loaded = EfficientUNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == ours.config and not loaded.training
    a = inputs(ours.config, seed=10)
    # (to float rounding: two runs may take other kernels, e.g. as the memory other processes leave changes; 1.09e-6
    # seen on an AVX2-only CPU, session 39; the weights themselves are checked equal below)
    assert relative(run_ours(loaded, a), run_ours(ours, a)) < 5e-6
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), ours.state_dict().values()))


# -- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown keys \['colour'\]"),
    ({"use_linear_attn": (False, True)}, "use_linear_attn=.* is not supported; valid: False"),
    ({"use_linear_cross_attn": True}, "use_linear_cross_attn=True is not supported"),
    ({"cross_embed_downsample": True}, "cross_embed_downsample=True is not supported"),
    ({"combine_upsample_fmaps": True}, "combine_upsample_fmaps=True is not supported"),
    ({"cond_images_channels": -1}, "cond_images_channels must be a whole number, 0 .no conditioning picture. or more"),
    ({"resize_mode": "sideways"}, "resize_mode 'sideways' is not one of"),
    ({"num_resnet_blocks": (1, 2, 3)}, "num_resnet_blocks lists 3 values for 2 levels"),
    ({"text_embed_dim": None}, "cond_on_text needs text_embed_dim"),
    ({"init_cross_embed_kernel_sizes": (2, 4)}, "must be odd"),
    ({"attn_heads": 0}, "attn_heads must be a positive integer"),
    ({"dim": None}, "dim must be a positive integer"),
])
def test_config_refusals(change, message):
    with pytest.raises(ValueError, match=message):
        EfficientUNetConfig.from_dict({**TINY, "dim_mults": (1, 2), **change})


def test_config_needs_dim_and_refuses_a_null_unet():
    with pytest.raises(ValueError, match="dim must be given"):
        EfficientUNetConfig.from_dict({"dim_mults": [1, 2]})
    with pytest.raises(ValueError, match="NullUnet"):
        EfficientUNetConfig.from_dict({"is_null": True})
    with pytest.raises(TypeError, match="EfficientUNetConfig or a dict"):
        EfficientUNet(["dim", 16])


def test_weights_of_another_config_are_named(ip):
    peer, _ = peer_and_ours(ip, "base")
    other = EfficientUNet({**TINY, **CONFIGS["base"], "num_resnet_blocks": 1})
    with pytest.raises(ValueError, match=r"unexpected keys: downs\.0\.2\.1\..*"):
        other.load_state(peer.state_dict(), "the peer")
    state = {k: v for k, v in peer.state_dict().items() if not k.startswith("mid_attn.")}
    _, ours = peer_and_ours(ip, "base")
    with pytest.raises(ValueError, match=r"missing keys: mid_attn\.layers\.0"):
        ours.load_state(state, "the peer")


def test_input_refusals(ip):
    _, ours = peer_and_ours(ip, "sr")
    a = inputs(ours.config)
    cases = [
        ({"x": a["x"][:, :2]}, r"x must be a picture tensor \[B, 3, H, W\]"),
        ({"x": torch.randn(3, 3, 12, 12), "lowres_cond_img": torch.randn(3, 3, 12, 12)},
         "sides must be multiples of 8"),
        ({"lowres_cond_img": None}, "lowres_cond_img .* must be a picture tensor of x.s shape .*got NoneType"),
        ({"lowres_noise_cond": None}, "needs lowres_noise_cond"),
        ({"noise_cond": torch.zeros(2)}, r"noise_cond must be a real number or a tensor \[B\] = \[3\]"),
        ({"text_embeds": torch.randn(3, 6, 5)}, r"text_embeds must be \[B, L, 16\]"),
        ({"text_mask": a["text_mask"].float()}, "text_mask must be a bool tensor"),
        ({"text_embeds": None}, "text_mask and text_dropped need text_embeds"),
    ]
    for change, message in cases:
        b = {**a, **change}
        with pytest.raises(ValueError, match=message):
            run_ours(ours, b)
    with pytest.raises(ValueError, match=r"text_dropped must be None or a bool tensor \[B\]"):
        run_ours(ours, a, text_dropped=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="not self-conditioned"):
        run_ours(ours, {**a, "self_cond": a["x"]})
    _, base = peer_and_ours(ip, "base")
    with pytest.raises(ValueError, match="takes no low-resolution picture"):
        run_ours(base, inputs(ours.config))
