"""The ADM / GLIDE U-Net family (imagine.models.adm_blocks) against diffusers, on the same tiny random weights.

Tiny diffusers UNet2DConditionModel configs shaped like the released pixel-space cascades:
- DeepFloyd IF stage I (scripts/convert_if.py's config: 3 -> 6 channels, the learned variance; ResnetDownsample and
  SimpleCrossAttn levels, AdaGN "scale_shift", GELU, the T5 states projected by encoder_hid_proj ("text_proj") and
  attention-pooled into the time embedding (addition_embed_type "text"), IF's group-normalised text);
- IF stage II (6 input channels: the noisy picture and the upscaled low-res one; its noise level as a "timestep"
  class embedding; time_embedding_act_fn, resnet_skip_time_act, resnet_out_scale_factor, per-level
  layers_per_block and only_cross_attention, mid_block_only_cross_attention);
- Karlo's unCLIP decoder (class_embed_type "identity": UnCLIPTextProjModel's additive CLIP embedding as
  class_labels; its text tokens as the context, with the text mask UnCLIPPipeline passes as `attention_mask`).
diffusers' random state dict (spread out, so that every norm and bias matters) is loaded into imagine's U-Net with
strict=True; outputs must agree to 1e-4 relative, for a batch and for a guidance batch (x of B rows, the text of 2B).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from imagine.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
SIZE, TOKENS = 16, 7  # (TOKENS differs from every level's map tokens: diffusers pads a text mask by the map's)

IF_STAGE_1 = dict(
    sample_size=SIZE, in_channels=3, out_channels=6, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    cross_attention_dim=32, encoder_hid_dim=48, encoder_hid_dim_type="text_proj", attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=4, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8)
IF_STAGE_2 = dict(
    IF_STAGE_1, in_channels=6, class_embed_type="timestep", layers_per_block=[1, 2, 1],
    down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    only_cross_attention=[False, False, True], mid_block_only_cross_attention=True, time_embedding_act_fn="gelu",
    resnet_skip_time_act=True, resnet_out_scale_factor=1.414)
KARLO_DECODER = dict(
    sample_size=SIZE, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    cross_attention_dim=32, attention_head_dim=16, resnet_time_scale_shift="scale_shift", class_embed_type="identity",
    norm_num_groups=8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def pair(config: dict, seed: int = 0):
    """(diffusers' U-Net with spread-out random weights, imagine's with them loaded strictly)."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = UNet2DConditionModel(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(config: dict, rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, config["in_channels"], SIZE, SIZE, generator=g)
    t = torch.tensor([37, 801][:rows])
    context = torch.randn(rows, TOKENS, config.get("encoder_hid_dim") or config["cross_attention_dim"], generator=g)
    return x, t, context


@pytest.fixture(scope="module")
def if_stage_1():
    return pair(IF_STAGE_1)


@pytest.fixture(scope="module")
def if_stage_2():
    return pair(IF_STAGE_2)


@pytest.fixture(scope="module")
def karlo():
    return pair(KARLO_DECODER)


def test_if_stage_1_matches_diffusers(if_stage_1):
    ref, ours = if_stage_1
    x, t, context = inputs(IF_STAGE_1, 2)
    with torch.no_grad():
        want = ref(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == (2, 6, SIZE, SIZE)
    assert rel_err(got, want) < TOL


def test_if_stage_1_guidance_batch_and_text_mask(if_stage_1):
    """x of one row, the text of two ([uncond; cond], as IFPipeline's torch.cat([x] * 2)); a padded text's mask
    (diffusers' encoder_attention_mask): the padding is no key of any attention layer (the pooled text and the
    text norm read every token, in both)."""
    ref, ours = if_stage_1
    x, t, _ = inputs(IF_STAGE_1, 1)
    _, _, context = inputs(IF_STAGE_1, 2, seed=2)
    keep = torch.ones(2, TOKENS, dtype=torch.bool)
    keep[0, 3:] = False
    with torch.no_grad():
        want = ref(torch.cat([x] * 2), torch.cat([t] * 2), context).sample
        want_masked = ref(torch.cat([x] * 2), torch.cat([t] * 2), context, encoder_attention_mask=keep).sample
        got = ours(x, t, context)
        got_masked = ours(x, t, context, context_mask=keep)
    assert rel_err(got, want) < TOL
    assert rel_err(got_masked, want_masked) < TOL
    assert rel_err(want_masked, want) > 1e-3  # (the mask matters)


def test_if_stage_2_matches_diffusers(if_stage_2):
    """The super-resolution stage: the noisy picture and the upscaled low-res one on channels, the low-res
    picture's noise level as class_labels (IFSuperResolutionPipeline's noise_level)."""
    ref, ours = if_stage_2
    x, t, context = inputs(IF_STAGE_2, 2)
    noise_level = torch.tensor([250, 100])
    with torch.no_grad():
        want = ref(x, t, context, class_labels=noise_level).sample
        got = ours(x, t, context, class_labels=noise_level)
    assert got.shape == (2, 6, SIZE, SIZE)
    assert rel_err(got, want) < TOL


def test_if_stage_2_guidance_batch(if_stage_2):
    ref, ours = if_stage_2
    x, t, _ = inputs(IF_STAGE_2, 1)
    _, _, context = inputs(IF_STAGE_2, 2, seed=3)
    noise_level = torch.tensor([250])
    with torch.no_grad():
        want = ref(torch.cat([x] * 2), torch.cat([t] * 2), context, class_labels=torch.cat([noise_level] * 2)).sample
        got = ours(x, t, context, class_labels=noise_level)
    assert rel_err(got, want) < TOL


def test_karlo_decoder_matches_diffusers(karlo):
    """UnCLIPPipeline's decoder call: class_labels = the additive CLIP time embedding (one per row of the guidance
    batch: the learned unconditional one, then the image's), the text mask with the 4 CLIP tokens kept, passed as
    diffusers' `attention_mask` (the SimpleCrossAttn blocks read it as the text mask)."""
    ref, ours = karlo
    temb = ref.config.block_out_channels[0] * 4
    x, t, _ = inputs(KARLO_DECODER, 1)
    _, _, context = inputs(KARLO_DECODER, 2, seed=4)
    clip_time = torch.randn(2, temb, generator=torch.Generator().manual_seed(5))
    keep = torch.ones(2, TOKENS, dtype=torch.bool)
    keep[:, 5:] = False
    with torch.no_grad():
        want = ref(torch.cat([x] * 2), torch.cat([t] * 2), context, class_labels=clip_time, attention_mask=keep).sample
        got = ours(x, t, context, context_mask=keep, class_labels=clip_time)
        want_1 = ref(x, t, context[1:], class_labels=clip_time[1:]).sample
        got_1 = ours(x, t, context[1:], class_labels=clip_time[1:])
    assert rel_err(got, want) < TOL
    assert rel_err(got_1, want_1) < TOL


def test_per_level_head_widths_follow_diffusers():
    """attention_head_dim per level: diffusers gives up block i the width of down block i (not of its mirrored
    level): here the 64-channel up block's heads are 8 wide, the down block's and the mid block's 16."""
    ref, ours = pair(dict(KARLO_DECODER, attention_head_dim=[8, 16]))
    assert (ours.up_blocks[0].attentions[0].heads, ours.down_blocks[1].attentions[0].heads) == (8, 4)
    x, t, context = inputs(KARLO_DECODER, 2)
    labels = torch.randn(2, 128)
    with torch.no_grad():
        assert rel_err(ours(x, t, context, class_labels=labels), ref(x, t, context, class_labels=labels).sample) < TOL


def test_ldm_levels_with_adagn_and_mixed_with_adm_levels():
    """resnet_time_scale_shift reaches every residual block, LDM's levels' too (diffusers passes it to all), and
    the two families mix in one U-Net (LDM's spatial transformers read attention_head_dim as the number of heads,
    GLIDE's attention as each head's width)."""
    config = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D", "ResnetUpsampleBlock2D"],
                  cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                  norm_num_groups=8)
    ref, ours = pair(config)
    x, t, context = inputs(config, 2)
    with torch.no_grad():
        assert rel_err(ours(x, t, context), ref(x, t, context).sample) < TOL


def test_folder_round_trip_loads_in_diffusers(if_stage_2, tmp_path):
    """imagine's save_pretrained writes a config diffusers builds the same network from."""
    _, ours = if_stage_2
    ours.save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    x, t, context = inputs(IF_STAGE_2, 1)
    with torch.no_grad():
        want = back(x, t, context, class_labels=torch.tensor([20])).sample
        assert rel_err(ours(x, t, context, class_labels=torch.tensor([20])), want) < TOL
        assert rel_err(again(x, t, context, class_labels=torch.tensor([20])), want) < TOL


def test_odd_sizes_run(if_stage_1):
    """diffusers' ADM blocks take only sizes divisible by 2^(levels - 1); here the pooled odd map keeps its last
    row and column and the upsampling returns to the skip's size, as in the LDM blocks."""
    _, ours = if_stage_1
    _, t, context = inputs(IF_STAGE_1, 1)
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 15, 17), t, context)
    assert out.shape == (1, 6, 15, 17) and torch.isfinite(out).all()


def test_training_path_matches_inference(if_stage_2):
    """The autograd path (no in-place updates) and gradient checkpointing give the same output."""
    _, ours = if_stage_2
    x, t, context = inputs(IF_STAGE_2, 2)
    labels = torch.tensor([250, 100])
    with torch.no_grad():
        want = ours(x, t, context, class_labels=labels)
    ours.enable_gradient_checkpointing(True).train()
    try:
        got = ours(x, t, context.requires_grad_(), class_labels=labels)
        got.square().mean().backward()
    finally:
        ours.enable_gradient_checkpointing(False).eval().zero_grad(set_to_none=True)
    assert rel_err(got.detach(), want) < 1e-5
    assert context.grad is not None and torch.isfinite(context.grad).all()


def test_fast_copy_runs(if_stage_1):
    """The fast mode's copy of an IF-shaped U-Net (bf16 weights, packed linears and convolutions, where the CPU has
    native bf16; else the float32 copy) runs its guidance batch within 30 dB PSNR of float32 (measured on a
    Zen 4: 47.9 dB, 1.8e-2 max relative, the same as a plain bf16 cast of it and as a tiny SD U-Net's)."""
    from imagine.pipelines.text_to_image import fast_copy

    _, ours = if_stage_1
    x, t, _ = inputs(IF_STAGE_1, 1)
    _, _, context = inputs(IF_STAGE_1, 2, seed=2)
    with torch.no_grad():
        want = ours(x, t, context)
        got = fast_copy(ours)(x, t, context)
    psnr = 10 * torch.log10(want.abs().max() ** 2 / (got - want).square().mean())
    assert got.dtype == torch.float32 and got.shape == want.shape and psnr > 30


@pytest.mark.parametrize("change, words", [
    (dict(resnet_time_scale_shift="ada_group"), ["resnet_time_scale_shift", "'scale_shift'"]),
    (dict(encoder_hid_dim_type="image_proj"), ["encoder_hid_dim_type", "'text_proj'"]),
    (dict(encoder_hid_dim=None), ["encoder_hid_dim", "text_proj"]),
    (dict(cross_attention_norm="layer_norm"), ["cross_attention_norm", "'group_norm'"]),
    (dict(addition_embed_type="image"), ["addition_embed_type", "'text'"]),
    (dict(addition_embed_type_num_heads=5), ["addition_embed_type_num_heads", "48"]),
    (dict(mid_block_type="UNetMidBlock2D"), ["mid_block_type", "UNetMidBlock2DSimpleCrossAttn"]),
    (dict(down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
     ["AttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
    (dict(resnet_skip_time_act=True, up_block_types=["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
     ["resnet_skip_time_act"]),
    (dict(attention_head_dim=128), ["attention_head_dim", "128"]),
    (dict(attention_head_dim=[8, 24, 24]), ["64 channels", "24 wide"]),
    (dict(num_attention_heads=4), ["num_attention_heads", "width"]),
    (dict(time_embedding_act_fn="tanh"), ["tanh", "gelu"]),
    (dict(time_embedding_type="fourier"), ["time_embedding_type", "positional"]),
    (dict(resnet_out_scale_factor=0), ["resnet_out_scale_factor", "positive"]),
])
def test_unsupported_settings_are_refused_by_name(change, words):
    with pytest.raises(ValueError) as e:
        UNetConfig.from_dict(dict(IF_STAGE_1, **change))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_wrong_context_width_names_encoder_hid_dim(if_stage_1):
    _, ours = if_stage_1
    x, t, _ = inputs(IF_STAGE_1, 1)
    with pytest.raises(ValueError, match="encoder_hid_dim 48"):
        ours(x, t, torch.randn(1, TOKENS, 32))
