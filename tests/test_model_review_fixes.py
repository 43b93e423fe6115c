"""Fixes from a review of imagine.models, each checked against an independent truth: diffusers' model on the same
tiny random weights, diffusers' own formula, or a closed form.

- the VAE's per-channel latents_mean / latents_std (Playground v2.5's VAE config) scale the latent as diffusers'
  SDXL pipelines do; unknown VAE config keys are named in a warning;
- SDXL's add_embedding (and a ControlNet's "timestep" class embedding) use SiLU whatever act_fn, as diffusers;
- the truncation warning counts and shows the text tokens the encoder actually reads;
- a new ControlNet starts with its zero convolutions at zero; ControlNetConfig builds directly for any number of
  levels and refuses a ControlNet without a mid block;
- the head split is checked only on levels with attention;
- the tiled decode blends in float32 whatever the latent's dtype.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from imagine.models.controlnet import ControlNetConfig, ControlNetModel
from imagine.models.unet import UNet2DConditionModel, UNetConfig
from imagine.models.vae import AutoencoderKL, VAEConfig

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12, attention_head_dim=2,
           norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
TEXT_TIME = dict(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=10 + 24)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.7, 801.25])
    ctx = torch.randn(2, 5, 12, generator=g)
    te = torch.randn(2, 10, generator=g)
    ti = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32.0, 48, 8, 4, 64, 64]])
    control = torch.rand(2, 3, 64, 64, generator=g)
    return x, t, ctx, te, ti, control


# ---------------------------------------------------------------------------------------------
# 1. the VAE's latents_mean / latents_std
# ---------------------------------------------------------------------------------------------
# Playground v2.5's vae/config.json values
PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def test_vae_latents_mean_std_scale_the_latent_as_diffusers_sdxl_pipelines(tmp_path):
    """decode: latent * std / scaling_factor + mean (diffusers' StableDiffusionXLPipeline before vae.decode);
    encode: (z - mean) * scaling_factor / std (StableDiffusionXLImg2ImgPipeline.prepare_latents); the config keeps
    them through config.json, which diffusers' AutoencoderKL reads back alike."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.5, latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD,
                                  force_upcast=False).eval()
    vae = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    assert vae.config.latents_mean == tuple(PLAYGROUND_MEAN) and vae.config.latents_std == tuple(PLAYGROUND_STD)

    mean = torch.tensor(ref.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 4, 1, 1)
    sf = ref.config.scaling_factor
    latent = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    z = latent * std / sf + mean  # diffusers' unscaling
    assert torch.allclose(vae.from_latent(latent), z, rtol=1e-6, atol=1e-6)
    assert torch.allclose(vae.to_latent(z), (z - mean) * sf / std, rtol=1e-6, atol=1e-6)
    assert torch.allclose(vae.to_latent(vae.from_latent(latent)), latent, atol=1e-5)
    with torch.no_grad():  # the whole decode of a scaled latent, against diffusers' decode of its unscaling
        assert _rel(vae.decode_latent(latent), ref.decode(z).sample) < 1e-5

    vae.save_pretrained(tmp_path / "vae")
    again = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert again.config == vae.config
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert list(theirs.config.latents_mean) == PLAYGROUND_MEAN and list(theirs.config.latents_std) == PLAYGROUND_STD


def test_vae_without_latents_stats_keeps_the_plain_scaling():
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=4, scaling_factor=0.25, shift_factor=0.5))
    latent = torch.randn(1, 4, 2, 2)
    assert torch.allclose(vae.from_latent(latent), latent / 0.25 + 0.5)
    assert torch.allclose(vae.to_latent(latent), (latent - 0.5) * 0.25)


def test_vae_latents_stats_are_checked():
    base = dict(block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="latents_mean must list one number per latent channel"):
        VAEConfig(**base, latents_mean=[0.0, 1.0], latents_std=[1.0, 1.0])
    with pytest.raises(ValueError, match="go together"):
        VAEConfig(**base, latents_mean=PLAYGROUND_MEAN)
    with pytest.raises(ValueError, match="latents_std must be positive"):
        VAEConfig(**base, latents_mean=PLAYGROUND_MEAN, latents_std=[1.0, 0.0, 1.0, 1.0])


SDXL_VAE_CONFIG = {  # stabilityai/sdxl-vae's vae/config.json
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.18.0.dev0", "_name_or_path": ".", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True,
}


def test_vae_config_warns_naming_unknown_keys(caplog):
    """Keys that are not fields and not diffusers' bookkeeping are named in a warning; real SD/SDXL configs and a
    whole diffusers AutoencoderKL config (its _use_default_values, force_upcast, ...) load without one."""
    full = dict(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).config)
    with caplog.at_level(logging.WARNING, logger="imagine.models.vae"):
        VAEConfig.from_dict(SDXL_VAE_CONFIG)
        VAEConfig.from_dict(full)
        VAEConfig.from_dict(VAEConfig.sd().to_dict())
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="imagine.models.vae"):
        cfg = VAEConfig.from_dict({**SDXL_VAE_CONFIG, "latent_log_scale": 2.0, "temporal_decoder": True})
    assert cfg.scaling_factor == 0.13025
    assert re.search(r"ignoring keys .*latent_log_scale, temporal_decoder", caplog.text)


# ---------------------------------------------------------------------------------------------
# 2. SiLU in SDXL's add_embedding and the ControlNet's "timestep" class embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_fn", ["gelu", "mish"])
def test_unet_text_time_embedding_uses_silu_as_diffusers(act_fn):
    x, t, ctx, te, ti, _ = _inputs()
    ref = _randomised(diffusers.UNet2DConditionModel(**TWO, **TEXT_TIME, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                                     act_fn=act_fn))
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": te, "time_ids": ti}).sample
        got = ours(x, t, ctx, text_embeds=te, time_ids=ti)
    assert _rel(got, want) < 1e-5


def test_unet_timestep_class_embedding_keeps_act_fn_as_diffusers():
    """(the U-Net's "timestep" class embedding takes the config's act_fn in diffusers: unchanged)"""
    x, t, ctx, *_ = _inputs()
    ref = _randomised(diffusers.UNet2DConditionModel(**TWO, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                                     act_fn="gelu", class_embed_type="timestep"))
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    labels = torch.tensor([5.0, 300.0])
    with torch.no_grad():
        assert _rel(ours(x, t, ctx, class_labels=labels), ref(x, t, ctx, class_labels=labels).sample) < 1e-5


@pytest.mark.parametrize("extra", [TEXT_TIME, dict(class_embed_type="timestep")], ids=["text_time", "timestep"])
def test_controlnet_embeddings_use_silu_as_diffusers(extra):
    x, t, ctx, te, ti, control = _inputs()
    ref = _randomised(diffusers.ControlNetModel(**TWO, **extra, act_fn="gelu", conditioning_embedding_out_channels=(4, 8, 8, 16)))
    ours = ControlNetModel(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    if "addition_embed_type" in extra:
        kw, okw = dict(added_cond_kwargs={"text_embeds": te, "time_ids": ti}), dict(text_embeds=te, time_ids=ti)
    else:
        kw = okw = dict(class_labels=torch.tensor([5.0, 300.0]))
    with torch.no_grad():
        rd, rm = ref(x, t, ctx, control, conditioning_scale=0.7, return_dict=False, **kw)
        od, om = ours(x, t, ctx, control, scale=0.7, **okw)
    assert max(_rel(a, b) for a, b in zip([*od, om], [*rd, rm])) < 1e-5


# ---------------------------------------------------------------------------------------------
# 3. the truncation warning
# ---------------------------------------------------------------------------------------------
WARNING = re.compile(r"prompt truncated to the text encoder's (\d+)-token window: (\d+) of (\d+) text tokens cut "
                     r"\(kept: (.*)\)$")


def _check_warning(enc, prompt: str, caplog) -> tuple[int, int]:
    """The warning's numbers and text against what the encoder reads: the ids tokenize() gives it, and the
    tokenizer's text tokens without the special ones."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagine.models.text_encoders"):
        read = enc.tokenize([prompt])["input_ids"][0].tolist()
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(messages) == 1, messages
    window, cut, total, kept = WARNING.match(messages[0]).groups()
    text = enc.tokenizer([prompt], add_special_tokens=False)["input_ids"][0]
    specials = set(getattr(enc.tokenizer, "all_special_ids", None) or [])
    read_text = [i for i in read if i not in specials] if specials else None
    assert int(window) == enc.max_length == len(read)
    assert int(total) == len(text)
    if read_text is not None:
        assert int(cut) == len(text) - len(read_text)
    assert kept == repr(enc.tokenizer.decode(read, skip_special_tokens=True)[-60:])
    return int(cut), int(total)


def test_clip_truncation_warning_names_what_the_encoder_reads(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    from test_loading import VOCAB, write_clip_tokenizer

    from imagine.models.text_encoders import CLIPTextEncoder

    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"), local_files_only=True)
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      max_position_embeddings=77, num_hidden_layers=2, bos_token_id=VOCAB - 2,
                                      eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    enc = CLIPTextEncoder(transformers.CLIPTextModel(cfg).eval(), tok, 77, "tiny")
    # 'red' is one token: 74 + 4 = 78 text tokens, of which 75 fit beside the start and end tokens
    prompt = " ".join("red" for _ in range(74)) + " blue square circle the"
    assert _check_warning(enc, prompt, caplog) == (3, 78)
    assert caplog.records[0].getMessage().endswith("red blue')")  # (blue is the 75th text token)


def test_minilm_truncation_warning_names_what_the_encoder_reads(caplog):
    from imagine.models.text_encoders import MiniLMTextEncoder

    enc = MiniLMTextEncoder.from_package(max_length=16)
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    # 16 text tokens; [CLS] and [SEP] leave 14 of them in the window
    assert _check_warning(enc, words, caplog) == (2, 16)
    assert caplog.records[0].getMessage().endswith("thirteen fourteen')")


# ---------------------------------------------------------------------------------------------
# 4-6. the ControlNet: zero init, its config built directly, no mid block refused
# ---------------------------------------------------------------------------------------------
def test_new_controlnet_starts_with_zero_convolutions_as_diffusers():
    cfg = dict(TWO, conditioning_embedding_out_channels=(4, 8, 8, 16))
    torch.manual_seed(0)
    ours = ControlNetModel(dict(cfg)).eval()
    ref = diffusers.ControlNetModel(**cfg)
    zero_ours = {n for n, p in ours.named_parameters() if not p.any()}
    zero_ref = {n for n, p in ref.named_parameters() if not p.any()}
    assert zero_ours == zero_ref
    assert {"controlnet_cond_embedding.conv_out.weight", "controlnet_mid_block.bias",
            "controlnet_down_blocks.0.weight"} <= zero_ours
    x, t, ctx, _, _, control = _inputs()
    with torch.no_grad():
        down, mid = ours(x, t, ctx, control)
    assert all(not r.any() for r in [*down, mid])


def test_controlnet_config_built_directly_for_two_levels_matches_diffusers():
    config = ControlNetConfig(**TWO, conditioning_embedding_out_channels=(4, 8, 8, 16))
    assert config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D")
    ref = _randomised(diffusers.ControlNetModel(**TWO, conditioning_embedding_out_channels=(4, 8, 8, 16)))
    ours = ControlNetModel(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, _, _, control = _inputs()
    with torch.no_grad():
        rd, rm = ref(x, t, ctx, control, return_dict=False)
        od, om = ours(x, t, ctx, control)
    assert max(_rel(a, b) for a, b in zip([*od, om], [*rd, rm])) < 1e-5
    three = ControlNetConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=2,
                             down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",))
    assert three.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def test_controlnet_without_mid_block_is_refused():
    for build in (lambda: ControlNetConfig(**TWO, mid_block_type=None),
                  lambda: ControlNetModel(dict(TWO, mid_block_type=None))):
        with pytest.raises(ValueError, match="mid_block_type None; valid: 'UNetMidBlock2DCrossAttn'"):
            build()


# ---------------------------------------------------------------------------------------------
# 7. the head split, on attention levels only
# ---------------------------------------------------------------------------------------------
def test_head_split_is_not_checked_on_levels_without_attention():
    """30 channels do not split into 4 heads, but the first level has no attention: diffusers builds and runs it."""
    cfg = dict(block_out_channels=(30, 32), layers_per_block=1, cross_attention_dim=12, attention_head_dim=4,
               norm_num_groups=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    ref = _randomised(diffusers.UNet2DConditionModel(**cfg))
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, *_ = _inputs()
    with torch.no_grad():
        assert _rel(ours(x, t, ctx), ref(x, t, ctx).sample) < 1e-5


def test_head_split_is_still_checked_where_there_is_attention():
    plain_last = dict(block_out_channels=(32, 30), layers_per_block=1, cross_attention_dim=12, attention_head_dim=4,
                      norm_num_groups=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ValueError, match="30 channels cannot be split into 4 attention heads"):
        UNetConfig(**plain_last)  # (the mid block's attention runs on the last level)
    UNetConfig(**plain_last, mid_block_type=None)  # no mid block: no attention on 30 channels
    with pytest.raises(ValueError, match="30 channels cannot be split into 4 attention heads"):
        UNetConfig(**dict(plain_last, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 30)))


# ---------------------------------------------------------------------------------------------
# 8. the tiled decode's blend in float32
# ---------------------------------------------------------------------------------------------
def test_tiled_decode_blends_bfloat16_tiles_in_float32():
    """With a local 'decoder' (nearest x f upsampling, exact in bf16) every tile holds the full decode's own values,
    so a convex blend must give them back exactly; in bf16 arithmetic the ramps and sums round (up to 1.5 8-bit
    levels off)."""
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4)).eval()
    f = vae.config.downsampling_factor
    vae.decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=f, mode="nearest")
    torch.manual_seed(0)
    z = (torch.rand(1, 4, 64, 64) * 2 - 1).to(torch.bfloat16)
    tiled = vae.tiled_decode(z, 32, 8)
    assert tiled.dtype == torch.bfloat16
    assert torch.equal(tiled, vae.decode(z))
