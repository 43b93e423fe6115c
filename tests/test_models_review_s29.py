"""Fixes from a review of the VAE, ControlNet and attention models against diffusers' configs (each checked against
diffusers on the same tiny random weights, or against diffusers' own signature / modules):

- a ControlNet's config.json read as diffusers' ControlNetModel reads it: the U-Net keys it does not take
  (center_input_sample, time_embedding_dim, time_cond_proj_dim, conv_in_kernel, ...) are ignored, not honoured
  or refused, and imagine writes none of them;
- class_embed_type 'simple_projection', for which diffusers' ControlNetModel builds no class embedding, is
  refused by name;
- a control picture of the wrong size is told the factor the ControlNet's own picture encoder has; an unsupported
  mid block is told what a ControlNet takes.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from test_model_review_fixes import TWO, _inputs, _randomised, _rel  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.models.controlnet import ControlNetConfig, ControlNetModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EMBEDDING = dict(conditioning_embedding_out_channels=(4, 8, 8, 16))  # x8, as _inputs' 64-pixel control for 8 latents


def _diffusers_keys() -> set[str]:
    return set(inspect.signature(diffusers.ControlNetModel.__init__).parameters) - {"self"}


# ---------------------------------------------------------------------------------------------
# 1. U-Net keys diffusers' ControlNetModel does not take
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [dict(center_input_sample=True), dict(time_embedding_dim=40),
                                   dict(time_cond_proj_dim=8), dict(conv_in_kernel=7, dropout=0.1)],
                         ids=["center_input_sample", "time_embedding_dim", "time_cond_proj_dim", "conv_in_kernel"])
def test_controlnet_folder_with_unet_only_keys_runs_as_diffusers(tmp_path, extra):
    """diffusers' ControlNetModel.from_pretrained ignores config keys its __init__ does not take (a config copied
    from a U-Net's); imagine centred the input, built another time embedding or a guidance-code layer the weights
    do not have, or refused the folder."""
    assert not set(extra) & _diffusers_keys()
    ref = _randomised(diffusers.ControlNetModel(**TWO, **EMBEDDING))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **extra}))
    again = diffusers.ControlNetModel.from_pretrained(tmp_path).eval()
    ours = ControlNetModel.from_pretrained(tmp_path)
    x, t, ctx, _, _, control = _inputs()
    with torch.no_grad():
        rd, rm = again(x, t, ctx, control, conditioning_scale=0.7, return_dict=False)
        od, om = ours(x, t, ctx, control, scale=0.7)
    assert max(_rel(a, b) for a, b in zip([*od, om], [*rd, rm])) < 1e-5


def test_controlnet_config_json_holds_only_diffusers_controlnet_keys(tmp_path):
    """What imagine writes is what diffusers' ControlNetModel takes (it warns of any other key), and reads back
    the same model in both."""
    ours = ControlNetModel(ControlNetConfig(**TWO, **EMBEDDING, transformer_layers_per_block=(1, 2),
                                            use_linear_projection=True))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {k for k in cfg if not k.startswith("_")} <= _diffusers_keys()
    ref = diffusers.ControlNetModel.from_pretrained(tmp_path).eval()
    _randomised(ours)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, ctx, _, _, control = _inputs()
    with torch.no_grad():
        rd, rm = ref(x, t, ctx, control, return_dict=False)
        od, om = ours(x, t, ctx, control)
    assert max(_rel(a, b) for a, b in zip([*od, om], [*rd, rm])) < 1e-5
    # a ControlNet made from a U-Net's config (as a new ControlNet is): its U-Net-only keys are left out
    from imagine.models.unet import UNetConfig
    unet_cfg = UNetConfig(**TWO, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), time_cond_proj_dim=8,
                          center_input_sample=True).to_dict()
    net = ControlNetModel({**unet_cfg, **EMBEDDING})
    assert not net.config.center_input_sample and net.config.time_cond_proj_dim is None
    assert {k for k in net.config.to_dict()} <= _diffusers_keys()


def test_controlnet_config_refuses_unet_only_settings_given_directly():
    for k, v in (("center_input_sample", True), ("time_embedding_dim", 40), ("time_cond_proj_dim", 8)):
        with pytest.raises(ValueError, match=f"{k}={v!r} is a U-Net setting diffusers' ControlNetModel does not have"):
            ControlNetConfig(**TWO, **{k: v})


# ---------------------------------------------------------------------------------------------
# 2. class_embed_type 'simple_projection'
# ---------------------------------------------------------------------------------------------
def test_controlnet_simple_projection_class_embedding_is_refused_by_name():
    """diffusers' ControlNetModel builds no class embedding for it (and so ignores class labels); imagine built
    one, whose weights no ControlNet file has."""
    cfg = dict(TWO, **EMBEDDING, class_embed_type="simple_projection", projection_class_embeddings_input_dim=6)
    assert diffusers.ControlNetModel(**cfg).class_embedding is None
    for build in (lambda: ControlNetModel(dict(cfg)), lambda: ControlNetConfig(**cfg)):
        with pytest.raises(ValueError, match="class_embed_type 'simple_projection'.*valid: None, 'timestep', "
                                             "'identity', 'projection'"):
            build()


# ---------------------------------------------------------------------------------------------
# 3. error messages that name what is valid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("widths", [(4, 8), (4, 8, 16)])
def test_wrong_size_control_picture_is_told_the_encoders_factor(widths):
    """The picture encoder halves the size once per width after the first: x2 for two widths, x4 for three
    (diffusers' ControlNetConditioningEmbedding on a 64-pixel picture says so); the message said x8 always."""
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    factor = 64 // ControlNetConditioningEmbedding(16, block_out_channels=widths)(torch.zeros(1, 3, 64, 64)).shape[-1]
    ours = ControlNetModel(dict(TWO, conditioning_embedding_out_channels=widths)).eval()
    x, t, ctx, *_ = _inputs()
    with pytest.raises(ValueError, match=rf"the latents' times {factor}\)"):
        with torch.no_grad():
            ours(x, t, ctx, torch.rand(2, 3, 24, 24))
    with torch.no_grad():
        ours(x, t, ctx, torch.rand(2, 3, 8 * factor, 8 * factor))  # (the size it names runs)


def test_controlnet_mid_block_error_names_what_a_controlnet_takes():
    """diffusers' UNetMidBlock2D ControlNet is not implemented: refused, naming the one mid block a ControlNet may
    have here (the U-Net's message offered None, which a ControlNet refuses too)."""
    with pytest.raises(ValueError) as e:
        ControlNetConfig(**TWO, mid_block_type="UNetMidBlock2D")
    assert ("ControlNet config: unsupported mid_block_type 'UNetMidBlock2D'; valid: 'UNetMidBlock2DCrossAttn'"
            in str(e.value))
    assert "or None" not in str(e.value)


def test_controlnet_from_a_unet_config_object_is_that_unets_copy():
    """ControlNetModel(unet.config) is the copy diffusers' ControlNetModel.from_unet makes of that U-Net (the same
    modules and config); it built a default SD 1.x-size ControlNet, whatever the config given."""
    from imagine.models.unet import UNetConfig

    unet_ref = _randomised(diffusers.UNet2DConditionModel(**TWO, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    ref = diffusers.ControlNetModel.from_unet(unet_ref).eval()
    _randomised(ref, seed=3)
    ours = ControlNetModel(UNetConfig.from_dict(dict(unet_ref.config))).eval()
    assert ours.config.block_out_channels == tuple(ref.config.block_out_channels)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, _, _, control = _inputs()
    with torch.no_grad():
        rd, rm = ref(x, t, ctx, control, return_dict=False)
        od, om = ours(x, t, ctx, control)
    assert max(_rel(a, b) for a, b in zip([*od, om], [*rd, rm])) < 1e-5
    with pytest.raises(TypeError, match="ControlNetModel takes a ControlNetConfig, a UNetConfig or a config dict; "
                                        "got str"):
        ControlNetModel("sd15")
