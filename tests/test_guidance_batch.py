"""The U-Net's guidance batch: x of B rows with context of k*B rows is the call on cat([x] * k), with
the layers before the copies part (conv_in, the first residual block, the first self-attention) run
once on B rows."""

from __future__ import annotations

import pytest
import torch

from imagine.guidance import guided_model_output
from imagine.models.unet import UNet2DConditionModel, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(**kw) -> UNet2DConditionModel:
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
               attention_head_dim=4, norm_num_groups=8)
    cfg.update(kw)
    unet = UNet2DConditionModel(UNetConfig(**cfg)).eval().requires_grad_(False)
    for p in unet.parameters():  # no zero-initialised output layers: every path must matter
        p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs(b=2, k=2, length=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 999
    ctx = torch.randn(k * b, length, 24, generator=g)
    mask = torch.ones(k * b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, ctx, mask


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("variant", ["plain", "only_cross", "linear_projection"])
def test_guidance_batch_equals_the_repeated_batch(k, variant):
    kw = {"only_cross": dict(only_cross_attention=True), "linear_projection": dict(use_linear_projection=True),
          "plain": {}}[variant]
    unet = _unet(**kw)
    x, t, ctx, mask = _inputs(k=k)
    shared = unet(x, t, context=ctx, context_mask=mask)
    full = unet(torch.cat([x] * k), torch.cat([t] * k), context=ctx, context_mask=mask)
    assert shared.shape == full.shape == (k * 2, 4, 8, 8)
    assert _rel(shared, full) < 1e-5


def test_the_shared_layers_run_once_on_B_rows():
    unet = _unet()
    rows = {}

    def record(name):
        def hook(module, args):
            rows[name] = args[0].shape[0]
        return hook

    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    unet.conv_in.register_forward_pre_hook(record("conv_in"))
    unet.down_blocks[0].resnets[0].conv2.register_forward_pre_hook(record("resnet"))
    block.attn1.register_forward_pre_hook(record("self-attention"))
    block.attn2.register_forward_pre_hook(record("cross-attention"))
    unet.conv_out.register_forward_pre_hook(record("conv_out"))
    x, t, ctx, mask = _inputs(b=3)
    out = unet(x, t, context=ctx, context_mask=mask)
    assert rows == {"conv_in": 3, "resnet": 3, "self-attention": 3, "cross-attention": 6, "conv_out": 6}
    assert out.shape[0] == 6


def test_per_copy_class_embeddings_part_the_copies_at_the_first_residual_block():
    unet = _unet(class_embed_type="projection", projection_class_embeddings_input_dim=5)
    x, t, ctx, mask = _inputs()
    labels = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    full = unet(torch.cat([x, x]), torch.cat([t, t]), context=ctx, context_mask=mask, class_labels=labels)
    assert _rel(unet(x, t, context=ctx, context_mask=mask, class_labels=labels), full) < 1e-5
    # shared labels (B rows) are the same embedding for both copies
    same = unet(torch.cat([x, x]), torch.cat([t, t]), context=ctx, context_mask=mask,
                class_labels=torch.cat([labels[:2], labels[:2]]))
    assert _rel(unet(x, t, context=ctx, context_mask=mask, class_labels=labels[:2]), same) < 1e-5


def test_guided_output_uses_the_guidance_batch_and_matches_the_concatenated_call():
    unet = _unet()
    x, t, ctx, mask = _inputs()
    cond = {"context": ctx[2:], "context_mask": mask[2:]}
    uncond = {"context": ctx[:2], "context_mask": mask[:2]}
    seen = []
    unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    shared = guided_model_output(unet, x, t, cond, uncond, scale=5.0)
    plain = guided_model_output(lambda *a, **kw: unet(*a, **kw), x, t, cond, uncond, scale=5.0)  # no attribute
    assert seen == [2, 4]
    assert _rel(shared, plain) < 1e-5


def test_a_context_batch_that_is_not_a_multiple_is_refused():
    unet = _unet()
    x, t, ctx, mask = _inputs(b=2, k=2)
    with pytest.raises(ValueError, match="k times as many for a guidance batch"):
        unet(x, t, context=ctx[:3])
    assert not UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), norm_num_groups=8,
                                               down_block_types=("DownBlock2D", "DownBlock2D"),
                                               up_block_types=("UpBlock2D", "UpBlock2D"),
                                               mid_block_type=None)).shares_guidance_batch
