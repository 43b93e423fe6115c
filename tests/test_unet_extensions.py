"""imagine's two U-Net extensions (not in SD): the 2-D position code in the attention blocks and the
trained context refiner over frozen text states. Both start at zero, so a model trained without them
resumes unchanged; both must still learn from that start."""

import math

import pytest
import torch

from imagine.models import io
from imagine.models.attention import POSITION_FREQUENCIES, position_code
from imagine.models.unet import UNet2DConditionModel, UNetConfig, new_parameter

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2)
EXT = dict(attention_position_embedding=True, context_refiner_layers=2, context_refiner_heads=4)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 7, 24, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return x, ctx, mask


def _plain_and_extended():
    torch.manual_seed(0)
    plain = UNet2DConditionModel(UNetConfig(**BASE)).eval()
    ext = UNet2DConditionModel(UNetConfig(**BASE, **EXT)).eval()
    return plain, ext


def test_position_code_closed_form():
    """Row-major tokens; u = (j + 1/2) / w * 2 - 1 and v likewise; sin and cos of (pi/2) 2^k u, v."""
    code = position_code(2, 4)
    assert code.shape == (8, 4 * POSITION_FREQUENCIES)
    for token in range(8):
        i, j = divmod(token, 4)
        u, v = (j + 0.5) / 4 * 2 - 1, (i + 0.5) / 2 * 2 - 1
        want = []
        for c in (u, v):
            for f in (math.sin, math.cos):
                want += [f(math.pi / 2 * 2 ** k * c) for k in range(POSITION_FREQUENCIES)]
        assert torch.allclose(code[token], torch.tensor(want), atol=1e-6), token
    # Normalised coordinates: the left and right halves get mirrored first sines at any width.
    for w in (4, 16):
        first = position_code(1, w)[:, 0]
        assert (first[: w // 2] < 0).all() and (first[w // 2:] > 0).all()
        assert torch.allclose(first, -first.flip(0), atol=1e-6)


def test_extended_model_loaded_from_plain_weights_gives_the_plain_output():
    plain, ext = _plain_and_extended()
    with pytest.raises(ValueError, match="missing keys: context_refiner"):
        io.load_state_into(ext, plain.state_dict(), "plain.safetensors")
    kept = io.load_state_into(ext, plain.state_dict(), "plain.safetensors", may_lack=new_parameter)
    assert kept and all("pos_proj" in k or k.startswith("context_refiner.") for k in kept)
    assert any("pos_proj" in k for k in kept) and any(k.startswith("context_refiner.") for k in kept)
    x, ctx, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, 500, ctx, mask), ext(x, 500, ctx, mask))
    # A key that is not an extension's may not be missing.
    state = plain.state_dict()
    del state["conv_in.weight"]
    with pytest.raises(ValueError, match="missing keys: conv_in.weight"):
        io.load_state_into(ext, state, "broken.safetensors", may_lack=new_parameter)


def test_zero_started_extensions_get_gradients_and_then_change_the_output():
    _, ext = _plain_and_extended()
    ext.train()
    x, ctx, mask = _inputs()
    ext(x, 500, ctx, mask).square().mean().backward()
    for name in ("down_blocks.0.attentions.0.pos_proj.weight", "mid_block.attentions.0.pos_proj.weight",
                 "context_refiner.proj_out.weight"):
        grad = dict(ext.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name
    ext.eval()
    with torch.no_grad():
        before = ext(x, 500, ctx, mask)
        for m in ext.modules():
            if hasattr(m, "pos_proj") and m.pos_proj is not None:
                m.pos_proj.weight.normal_(0, 0.5)
        after_pos = ext(x, 500, ctx, mask)
        ext.context_refiner.proj_out.weight.normal_(0, 0.5)
        after_both = ext(x, 500, ctx, mask)
    assert (after_pos - before).abs().max() > 1e-3
    assert (after_both - after_pos).abs().max() > 1e-3


def test_refiner_ignores_masked_tokens():
    """With the refiner trained (non-zero), a masked token's content still changes nothing."""
    _, ext = _plain_and_extended()
    with torch.no_grad():
        ext.context_refiner.proj_out.weight.normal_(0, 0.5)
        x, ctx, mask = _inputs()
        other = ctx.clone()
        other[1, 4:] = torch.randn(3, 24) * 10
        a, b = ext(x, 500, ctx, mask), ext(x, 500, other, mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_config_round_trip_and_sd_configs_stay_diffusers_shaped(tmp_path):
    _, ext = _plain_and_extended()
    ext.save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert back.config.attention_position_embedding and back.config.context_refiner_layers == 2
    x, ctx, mask = _inputs(1)
    with torch.no_grad():
        assert torch.equal(back(x, 10, ctx, mask), ext(x, 10, ctx, mask))
    sd = UNetConfig.sd15().to_dict()
    assert not {"attention_position_embedding", "context_refiner_layers", "context_refiner_heads"} & set(sd)
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        UNetConfig(**BASE, context_refiner_layers=1, context_refiner_heads=5)
    with pytest.raises(ValueError, match="context_refiner_layers must be an integer"):
        UNetConfig(**BASE, context_refiner_layers=-1)
