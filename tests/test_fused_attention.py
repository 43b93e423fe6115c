"""The bf16 attention kernel (imagine/models/fused_attention.py) against float64 attention computed
from the same bf16 inputs: its error must be SDPA's (the same numerics: float32 scores and sums, the
weights rounded to bf16), on SD's shapes and on awkward ones (odd head widths, key counts that are not
a multiple of 16, query counts that are not a multiple of the block). Runs where the CPU has
AVX512-BF16 (the kernel's instructions); skipped elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from imagine.models import fused_attention, native

needs_kernel = pytest.mark.skipif(not fused_attention.wanted(),
                                  reason="needs a CPU with AVX512-BF16 and no AMX (or IMAGINE_FUSED_ATTENTION=1)")


def _heads(t, h):
    return t.unflatten(-1, (h, -1)).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D], a strided view


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@needs_kernel
@pytest.mark.parametrize("b, h, n, m, d, amp", [
    (2, 8, 600, 600, 40, 1.0),  # SD 1.5's top level, fewer tokens
    (2, 8, 600, 600, 40, 4.0),  # peaked softmax
    (2, 8, 256, 77, 40, 2.0),  # cross-attention over CLIP's 77 tokens
    (2, 8, 130, 130, 80, 2.0),
    (2, 8, 64, 64, 160, 2.0),
    (2, 5, 100, 50, 64, 4.0),  # SD 2.x's head width
    (1, 1, 300, 300, 512, 0.2),  # the VAE's single-head attention
    (1, 3, 37, 21, 7, 2.0),  # odd width, 21 keys, 37 queries
    (1, 2, 5, 1, 3, 1.0),  # one key
])
def test_kernel_matches_float64_as_closely_as_sdpa(b, h, n, m, d, amp):
    op = fused_attention.kernel()
    assert op is not None, "the kernel is wanted on this CPU but could not be built"
    g = torch.Generator().manual_seed(n * m + d)
    q = _heads((torch.randn(b, n, h * d, generator=g) * amp).bfloat16(), h)
    k = _heads((torch.randn(b, m, h * d, generator=g) * amp).bfloat16(), h)
    v = _heads(torch.randn(b, m, h * d, generator=g).bfloat16(), h)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2).flatten(2)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    with torch.inference_mode():
        ours = fused_attention.attention(q, k, v)
    assert ours.shape == (b, n, h * d) and ours.dtype == torch.bfloat16 and ours.is_contiguous()
    assert _rel(ours, want) <= 1.1 * _rel(sdpa, want) + 2e-4
    assert _rel(ours, want) < 5e-3


@needs_kernel
def test_large_scores_neither_overflow_nor_lose_the_maximum():
    """Scores of several hundred: exp of (score - row max) must not overflow, and a row whose mass sits on
    one key must give that key's value."""
    g = torch.Generator().manual_seed(0)
    q = _heads((torch.randn(1, 40, 64, generator=g) * 30).bfloat16(), 1)
    k = _heads((torch.randn(1, 70, 64, generator=g) * 30).bfloat16(), 1)
    v = _heads(torch.randn(1, 70, 64, generator=g).bfloat16(), 1)
    with torch.inference_mode():
        ours = fused_attention.attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2).flatten(2)
    assert torch.isfinite(ours).all()
    assert _rel(ours, want) < 5e-3


@needs_kernel
@pytest.mark.parametrize("m", [21, 37, 64])
def test_the_row_maximum_ignores_the_padding_keys(m):
    """All scores far below zero (about -300, spread by tens) over a key count that is or is not a multiple of
    16: the padded keys' zero scores must not count as the row's maximum, or every weight would fall to
    the exponential's floor and the softmax would come out flat."""
    g = torch.Generator().manual_seed(m)
    u = torch.ones(16)
    k = u + 0.5 * torch.randn(1, m, 16, generator=g)  # keys along u, queries against it
    q = -75 * u + 0.1 * torch.randn(1, 9, 16, generator=g)
    k = _heads(k.bfloat16(), 1)
    q = _heads(q.bfloat16(), 1)
    v = _heads(torch.randn(1, m, 16, generator=g).bfloat16(), 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4
    assert scores.max() < -150 and scores.max(-1).values.sub(scores.min(-1).values).min() > 5
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2).flatten(2)
    flat = v.double().mean(2).expand(1, 9, 16)  # what a flattened softmax would give
    with torch.inference_mode():
        ours = fused_attention.attention(q, k, v)
    assert _rel(ours, want) < 1e-2 and _rel(flat, want) > 0.1


@needs_kernel
def test_where_it_does_not_apply_the_callers_use_sdpa(monkeypatch):
    q = k = v = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    assert fused_attention.attention(q.float(), k.float(), v.float()) is None  # float32
    assert fused_attention.attention(q, k[:, :1], v[:, :1]) is None  # heads differ
    qg = q.clone().requires_grad_()
    assert fused_attention.attention(qg, k, v) is None  # a gradient to carry
    with torch.no_grad():
        assert fused_attention.attention(qg, k, v) is not None
    monkeypatch.setenv(fused_attention.ENV, "0")
    assert fused_attention.attention(q, k, v) is None


@needs_kernel
def test_attention_layer_in_bf16_agrees_with_its_sdpa_path(monkeypatch):
    """The U-Net's Attention layer (self and cross) in bf16: the kernel's answer against the same layer
    on SDPA (IMAGINE_FUSED_ATTENTION=0), both against the float32 layer."""
    from imagine.models.attention import Attention

    torch.manual_seed(0)
    layers = [Attention(320, None, heads=8, dim_head=40), Attention(320, 768, heads=8, dim_head=40)]
    x = torch.randn(2, 300, 320)
    ctx = torch.randn(2, 77, 768)
    with torch.inference_mode():
        for layer, c in zip(layers, (None, ctx)):
            exact = layer(x, c).double()
            fast = layer.bfloat16()
            cb = None if c is None else c.bfloat16()
            ours = fast(x.bfloat16(), cb)
            monkeypatch.setenv(fused_attention.ENV, "0")
            sdpa = fast(x.bfloat16(), cb)
            monkeypatch.delenv(fused_attention.ENV)
            assert not torch.equal(ours, sdpa)  # the kernel ran
            assert _rel(ours, exact) <= 1.1 * _rel(sdpa, exact) + 2e-4


@needs_kernel
def test_vae_attention_in_bf16_agrees_with_float32():
    from imagine.models.vae import SpatialSelfAttention

    torch.manual_seed(0)
    layer = SpatialSelfAttention(64, 32)
    x = torch.randn(1, 64, 12, 12)
    with torch.inference_mode():
        exact = layer(x).double()
        ours = layer.bfloat16()(x.bfloat16())
    assert _rel(ours, exact) < 1e-2


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    """No compiler: one warning, None (the callers use SDPA), and no second attempt."""
    calls = []

    def broken():
        calls.append(1)
        raise OSError("no compiler here")

    fresh = native.Kernel("imagine_never_built", "attention_bf16.cpp", (), what="the bf16 attention kernel",
                          fallback="SDPA", env=fused_attention.ENV)  # not built yet in this process
    monkeypatch.setattr(fresh, "build", broken)
    monkeypatch.setattr(fused_attention, "KERNEL", fresh)
    monkeypatch.setattr(fused_attention, "wanted", lambda: True)  # on any CPU: the build is what fails
    monkeypatch.setattr(fused_attention, "_op", None)
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
        assert fused_attention.attention(q, q, q) is None
    assert fused_attention.attention(q, q, q) is None and calls == [1]
