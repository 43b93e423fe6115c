"""The cross-attention U-Net against diffusers' UNet2DConditionModel on the same weights, its
config mapping, its folders and its input checks."""

import json

import pytest
import torch

from imagine.models.embeddings import timestep_embedding
from imagine.models.unet import UNet2DConditionModel, UNetConfig

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")

TWO = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.x-like: 1x1-conv proj_in, attention_head_dim = the number of heads (diffusers' quirk).
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                norm_num_groups=8, **TWO),
    # SD 2.x-like: linear projections, a per-level head count, upcast attention, 3 levels.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24,
                attention_head_dim=(2, 4, 8), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # unCLIP-like: an image embedding projected and added to the time embedding; 2 transformer layers.
    "projection": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=2,
                       norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=12,
                       transformer_layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
                       up_block_types=("CrossAttnUpBlock2D",) * 2),
    # CDM/Imagen super-resolution-like: 7 input channels (latent + low-res image), the noise level
    # as a second timestep, and the less common switches.
    "sr": dict(in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=(1, 2),
               cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, class_embed_type="timestep",
               downsample_padding=0, center_input_sample=True, flip_sin_to_cos=False, freq_shift=1,
               time_embedding_dim=48, mid_block_type=None, mid_block_scale_factor=1.5, act_fn="mish", **TWO),
    "classes": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                    norm_num_groups=8, num_class_embeds=10, only_cross_attention=(True, False), **TWO),
    # only_cross_attention for every level: diffusers' mid block keeps its self-attention regardless.
    "cross_only": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                       norm_num_groups=8, only_cross_attention=True, down_block_types=("CrossAttnDownBlock2D",) * 2,
                       up_block_types=("CrossAttnUpBlock2D",) * 2),
}


def _pair(name):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    # diffusers zero-initialises nothing here, but scale the weights up so every path matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(name, b=2):
    g = torch.Generator().manual_seed(1)
    cfg = CONFIGS[name]
    x = torch.randn(b, cfg.get("in_channels", 4), 16, 16, generator=g)
    t = torch.tensor([3.7, 801.25])[:b]  # fractional, as Karras-sigma samplers produce
    context = torch.randn(b, 7, 24, generator=g)
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[-1, 1:] = False
    labels = {"projection": torch.randn(b, 12, generator=g), "sr": torch.tensor([20.0, 250.5])[:b],
              "classes": torch.tensor([3, 9])[:b]}.get(name)
    return x, t, context, mask, labels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    ref, ours = _pair(name)
    x, t, context, mask, labels = _inputs(name)
    # diffusers gives encoder_attention_mask only to attn2; with only_cross_attention its attn1
    # also reads the context but stays unmasked, so that case is compared without a mask.
    use_mask = name not in ("classes", "cross_only")
    with torch.no_grad():
        expect = ref(x, t, context, class_labels=labels,
                     encoder_attention_mask=mask if use_mask else None).sample
        got = ours(x, t, context, mask if use_mask else None, class_labels=labels)
        unmasked = ours(x, t, context, class_labels=labels)
    assert got.shape == expect.shape == (2, 4, 16, 16)
    assert _rel(got, expect) < 1e-4
    if use_mask:  # the mask is not a no-op on these inputs
        assert _rel(unmasked, expect) > 1e-2


@pytest.mark.parametrize("name,size", [("sd1", (15, 16)), ("sd2", (9, 13)), ("sr", (11, 7)), ("sd2", (1, 3))])
def test_any_map_size_matches_diffusers(name, size):
    """Sizes that are not multiples of the total downsampling (SD at 520 x 512 px: a 65 x 64 latent): each
    stride-2 convolution rounds an odd size, and the upsampler goes back to the skip's size, as diffusers'
    `upsample_size` does (LDM's right-and-bottom padding, "sr", rounds the other way)."""
    ref, ours = _pair(name)
    x, t, context, mask, labels = _inputs(name)
    x = torch.randn(2, x.shape[1], *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = ref(x, t, context, class_labels=labels).sample
        got = ours(x, t, context, class_labels=labels)
    assert got.shape == expect.shape == (2, 4, *size)
    assert _rel(got, expect) < 1e-4


@pytest.mark.parametrize("name", ["sd1", "cross_only"])
def test_masked_tokens_are_as_if_absent(name):
    """Masking the last tokens = dropping them from the context (every attention over the context,
    including attn1 when it is a cross-attention)."""
    _, ours = _pair(name)
    x, t, context, _, _ = _inputs(name)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        assert _rel(ours(x, t, context, mask), ours(x, t, context[:, :4])) < 1e-5


def test_fully_masked_row_matches_diffusers():
    """A context with no kept token: diffusers' -10000 bias then weighs all tokens equally; ours too."""
    ref, ours = _pair("sd1")
    x, t, context, mask, _ = _inputs("sd1")
    mask[1] = False
    with torch.no_grad():
        expect = ref(x, t, context, encoder_attention_mask=mask).sample
        got = ours(x, t, context, mask)
    assert torch.isfinite(got).all()
    assert _rel(got, expect) < 1e-4


def test_channels_last_and_scalar_t_match():
    _, ours = _pair("sd2")
    x, t, context, mask, _ = _inputs("sd2")
    with torch.no_grad():
        base = ours(x, torch.full((2,), 500.0), context, mask)
        for tt in (500.0, 500, torch.tensor(500.0), torch.tensor([500.0])):
            assert _rel(ours(x, tt, context, mask), base) < 1e-6
        fast = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last),
                                                          torch.full((2,), 500.0), context, mask)
    assert _rel(fast, base) < 1e-5


def test_bfloat16_weights_with_float32_inputs():
    """Samplers keep x in fp32; a bf16 model computes in bf16 (attention upcast) and answers in fp32."""
    _, ours = _pair("sd2")
    x, t, context, mask, _ = _inputs("sd2")
    with torch.no_grad():
        expect = ours(x, t, context, mask)
        got = ours.to(torch.bfloat16)(x, t, context, mask)
    assert got.dtype == torch.float32
    assert _rel(got, expect) < 0.05


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 6, flip_sin_to_cos=True, freq_shift=0)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    args = t[:, None] * freqs
    assert torch.allclose(emb, torch.cat([args.cos(), args.sin()], -1), atol=1e-5)
    emb = timestep_embedding(t, 7, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 2), 10000 ** (-2 / 2)])
    args = t[:, None] * freqs
    assert torch.allclose(emb, torch.cat([args.sin(), args.cos(), torch.zeros(3, 1)], -1), atol=1e-5)


# -- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_full_size_configs_have_diffusers_parameters(which):
    cfg = getattr(UNetConfig, which)()
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = diffusers.UNet2DConditionModel.from_config(cfg.to_dict())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    # The released models' sizes (SD 1.5: 859.52M, SD 2.1: 865.91M parameters).
    n = sum(p.numel() for p in ours.parameters())
    assert n == {"sd15": 859_520_964, "sd21": 865_910_724}[which]
    heads = {"sd15": (8, 8, 8, 8), "sd21": (5, 10, 20, 20)}[which]
    assert cfg.heads_per_block == heads
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == heads[0]


def test_config_from_dict():
    d = dict(CONFIGS["sd1"], _class_name="UNet2DConditionModel", _diffusers_version="0.42.1", some_future_key=3,
             mid_block_only_cross_attention=None, addition_embed_type_num_heads=64, dual_cross_attention=False,
             resnet_out_scale_factor=1)
    cfg = UNetConfig.from_dict(d)
    assert cfg.heads_per_block == (4, 4)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())
    # num_attention_heads, when given, is the number of heads; attention_head_dim is then unused.
    assert UNetConfig.from_dict(dict(d, num_attention_heads=(2, 8))).heads_per_block == (2, 8)
    with pytest.raises(ValueError, match="down block type 'AttnDownBlock2D'"):
        UNetConfig.from_dict(dict(d, down_block_types=["AttnDownBlock2D", "DownBlock2D"]))
    with pytest.raises(ValueError, match="mid_block_type"):
        UNetConfig.from_dict(dict(d, mid_block_type="UNetMidBlock2D"))
    with pytest.raises(ValueError, match="unsupported addition_embed_type 'image'; valid: None or 'text_time'"):
        UNetConfig.from_dict(dict(d, addition_embed_type="image"))
    with pytest.raises(ValueError, match="'text_time' needs addition_time_embed_dim and projection_class_embeddings"):
        UNetConfig.from_dict(dict(d, addition_embed_type="text_time"))  # SDXL's, without its sizes
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict(dict(d, resnet_time_scale_shift="ada_group"))
    with pytest.raises(ValueError, match="attention heads"):
        UNetConfig.from_dict(dict(d, attention_head_dim=3))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_dict(dict(d, class_embed_type="projection"))
    with pytest.raises(ValueError, match="same length"):
        UNetConfig.from_dict(dict(d, block_out_channels=(32, 64, 64)))


# -- folders -----------------------------------------------------------------------------------
def test_save_and_load_round_trip_and_diffusers_interchange(tmp_path):
    import imagine

    ref, ours = _pair("sd2")
    x, t, context, mask, _ = _inputs("sd2")
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["_class_name"] == "UNet2DConditionModel"
    assert written["_imagine_version"] == imagine.__version__
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "theirs")  # diffusers' own folder
    from_theirs = UNet2DConditionModel.from_pretrained(tmp_path / "theirs")
    theirs_from_ours = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        expect = ours(x, t, context, mask)
        assert torch.equal(back(x, t, context, mask), expect)
        assert torch.equal(from_theirs(x, t, context, mask), expect)
        assert _rel(theirs_from_ours(x, t, context, encoder_attention_mask=mask).sample, expect) < 1e-4
    assert not back.training
    # model.safetensors is read when that is the file present.
    (tmp_path / "ours" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "ours" / "model.safetensors")
    assert torch.equal(UNet2DConditionModel.from_pretrained(tmp_path / "ours").conv_in.weight, ours.conv_in.weight)


def test_missing_and_corrupt_weights_name_the_path(tmp_path):
    _, ours = _pair("sd1")
    ours.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        UNet2DConditionModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        UNet2DConditionModel.from_pretrained(tmp_path / "missing")


def test_wrong_weights_for_config(tmp_path):
    _, ours = _pair("sd1")
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["cross_attention_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches: .*attn2.to_k.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors():
    _, ours = _pair("sd1")
    x, t, context, mask, _ = _inputs("sd1")
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        ours(torch.randn(2, 3, 16, 16), t, context)
    with pytest.raises(ValueError, match="at least 1"):
        ours(torch.randn(2, 4, 0, 16), t, context)
    with pytest.raises(ValueError, match="cross_attention_dim 24"):
        ours(x, t, torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        ours(x, torch.tensor([1.0, 2.0, 3.0]), context)
    with pytest.raises(ValueError, match="batch mismatch"):
        ours(x, t, context[:1])
    with pytest.raises(ValueError, match="pass context"):
        ours(x, t)
    with pytest.raises(ValueError, match="context_mask"):
        ours(x, t, context, mask[:, :5])
    with pytest.raises(ValueError, match="no class embedding"):
        ours(x, t, context, class_labels=torch.tensor([0, 1]))
    _, proj = _pair("projection")
    with pytest.raises(ValueError, match="needs class_labels"):
        proj(x, t, context)
    with pytest.raises(ValueError, match=r"\[2, 12\]"):
        proj(x, t, context, class_labels=torch.randn(2, 11))
    _, classes = _pair("classes")
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        classes(x, t, context, class_labels=torch.tensor([0, 10]))


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = _pair("sd1")
    x, t, context, mask, _ = _inputs("sd1")
    ours.train()

    def grads():
        ours.zero_grad()
        ours(x, t, context, mask).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in ours.parameters()])

    with torch.no_grad():  # the in-place inference path computes the same function
        inference = ours(x, t, context, mask)
    assert _rel(ours(x, t, context, mask).detach(), inference) < 1e-6
    plain = grads()
    ours.enable_gradient_checkpointing()
    assert _rel(grads(), plain) < 1e-5


def test_feed_forward_in_row_chunks_at_inference_matches_the_whole_product():
    """At inference FeedForward runs long token sequences in chunks of rows (the GEGLU intermediates
    stay in reused memory); each row depends on that row only, so the answer is the unchunked one,
    checked against diffusers' GEGLU formula computed on all rows at once."""
    import torch.nn.functional as F

    from imagine.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(16).eval()
    ff.chunk_rows = 8
    x = torch.randn(3, 21, 16)  # 63 rows: 7 full chunks and one of 7
    value, gate = F.linear(x, ff.net[0].proj.weight, ff.net[0].proj.bias).chunk(2, dim=-1)
    want = F.linear(value * F.gelu(gate), ff.net[2].weight, ff.net[2].bias)
    with torch.no_grad():
        got = ff(x)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    x.requires_grad_(True)
    y = ff(x)  # under autograd: one pass, with gradients
    y.sum().backward()
    assert x.grad is not None and torch.allclose(y.detach(), want, rtol=1e-5, atol=1e-6)
