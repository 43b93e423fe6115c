"""Attention and the spatial transformer of the latent-diffusion U-Net.

Rombach et al. 2022 (LDM), sec. 3.3: the U-Net is conditioned on a text encoder's token states
tau(y) [B, L, D] by cross-attention,

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,  Q = phi(z) W_Q,  K = tau(y) W_K,  V = tau(y) W_V   (LDM eq. 3)

inside a transformer block (Vaswani et al. 2017) applied to the feature map flattened to tokens:
pre-LayerNorm self-attention, cross-attention and a GEGLU feed-forward (Shazeer 2020), each
with a residual, between a GroupNorm + projection in and a projection out plus the outer residual
(LDM appendix, "SpatialTransformer").

Module and parameter names follow diffusers (`Transformer2DModel`, `BasicTransformerBlock`,
`Attention`), so their weights load as they are. All attention goes through
torch.nn.functional.scaled_dot_product_attention, one call per layer over all heads, except bf16
attention on CPUs with AVX512-BF16 and no AMX, which runs our kernel (`fused_attention.py`, 2.2x SDPA's
speed there with its numerics).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import fused_attention
from imagine.models.group_norm import group_norm


def key_padding_mask(context_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [B, L] keep-mask (True = attend) -> the boolean mask SDPA broadcasts, [B, 1, 1, L].

    Returns None when every token is kept (no masking work at all). A row with no kept token
    would make the softmax 0/0; such a row attends to all its tokens instead, which is what
    diffusers' additive -10000 bias amounts to in that case."""
    if context_mask is None:
        return None
    keep = context_mask.bool()
    if bool(keep.all()):
        return None
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


def kept_lengths(mask: torch.Tensor) -> list[int] | None:
    """For a [B, 1, 1, L] keep-mask (`key_padding_mask`) whose every row keeps a prefix of the keys (the padding a
    batch of texts of different lengths gets at the end): each row's prefix length; None for any other mask (one per
    query, a causal one, or a float bias)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.dtype != torch.bool:
        return None
    keep = mask[:, 0, 0, :]
    n = keep.sum(dim=1)
    if not torch.equal(torch.arange(keep.shape[1], device=keep.device) < n[:, None], keep):
        return None
    return n.tolist()


def expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x [b, ...] -> [batch, ...] as torch.cat([x] * (batch // b)): the copies of a guidance batch
    that shared x up to here (the U-Net's `forward` on context of k times x's batch)."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x] * (batch // x.shape[0]))


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d] (a view)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads * d]."""
    return t.transpose(1, 2).flatten(2)


POSITION_FREQUENCIES = 4


def position_code(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """A fixed 2-D sinusoidal code of each token's place, [h * w, 4 * POSITION_FREQUENCIES], in
    row-major token order (the order SpatialTransformer flattens a map to).

    The coordinates are normalised to the image, u = (j + 1/2) / w * 2 - 1 in (-1, 1) (v likewise
    for rows), so "left half" means the same code at every resolution; each coordinate is coded as
    sin and cos of (pi / 2) 2^k u for k < POSITION_FREQUENCIES (the Transformer's sinusoids,
    Vaswani et al. 2017 sec. 3.5, on a bounded coordinate). SD's U-Net has no position input: its
    attention is permutation-invariant and only the convolutions' zero padding tells where a token
    is, which a relation like "to the left of" has to know."""
    return _position_code(h, w).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _position_code(h: int, w: int) -> torch.Tensor:
    def axis(n):
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    v, u = torch.meshgrid(axis(h), axis(w), indexing="ij")
    freqs = (torch.pi / 2) * 2.0 ** torch.arange(POSITION_FREQUENCIES, dtype=torch.float64)
    parts = [f(c.reshape(-1, 1) * freqs) for c in (u, v) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def zero_linear(cin: int, cout: int) -> nn.Linear:
    """A linear layer that starts at zero: a new input path added to a trained network leaves its
    output unchanged until training moves it (ControlNet's "zero convolution", Zhang et al. 2023)."""
    layer = nn.Linear(cin, cout)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head attention of `x` [B, N, query_dim] over `context` [B, L, context_dim] (itself
    when None). The scale is 1/sqrt(dim_head) (LDM eq. 3 with d the per-head width).

    `upcast` computes the attention in float32 when the weights are float16/bfloat16: SD 2.1's
    attention logits overflow half precision (diffusers' `upcast_attention`)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.context_dim = context_dim if context_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(self.context_dim, inner, bias=bias)
        self.to_v = nn.Linear(self.context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None or boolean [B, 1, 1, L] (True = attend), as made by `key_padding_mask`."""
        source = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(source), self.heads)
        v = split_heads(self.to_v(source), self.heads)
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        # (not under torch.compile: per-row lengths are data-dependent shapes, which inductor cannot lay out)
        lengths = None if mask is None or torch.compiler.is_compiling() else kept_lengths(mask)
        if lengths is None:
            out = _attend(q, k, v, mask)
        else:  # padding at the end of the keys: each row attends over its own keys, unmasked, so that a text's
            # image does not depend on the longer texts beside it (a masked call runs another kernel, and rounds
            # otherwise; alone, the same row takes this path too)
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1] * v.shape[-1])
            for n in sorted(set(lengths)):
                rows = [i for i, m in enumerate(lengths) if m == n]
                if len(rows) == len(lengths):
                    out = _attend(q, k[:, :, :n], v[:, :, :n], None)
                else:
                    at = torch.tensor(rows, device=q.device)
                    out[at] = _attend(q[at], k[at, :, :n], v[at, :, :n], None)
        out = out.to(dtype)
        return self.to_out[1](self.to_out[0](out))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q over k, v ([B, heads, N, d]) -> [B, N, heads * d]: our fused bf16 kernel where it serves (bf16
    on AVX512-BF16 CPUs, no mask), else SDPA."""
    out = fused_attention.attention(q, k, v) if mask is None else None
    return out if out is not None else merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) * GELU(x V + c) (Shazeer 2020, eq. 5); W and V stored as one `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return value * F.gelu(gate)
        return F.gelu(gate).mul_(value)  # one map fewer to allocate at inference


class GELU(nn.Module):
    """GELU(x W + b), the feed-forward's plain form (Hendrycks & Gimpel 2016; unCLIP's prior), `proj` as diffusers'."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU (or plain GELU, `activation="gelu"`) to `mult` x width, dropout, linear back (`net.0`, `net.1`, `net.2`
    as in diffusers)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation: str = "geglu"):
        super().__init__()
        if activation not in ("geglu", "gelu"):
            raise ValueError(f"feed-forward activation must be 'geglu' or 'gelu'; got {activation!r}")
        act = GEGLU(dim, dim * mult) if activation == "geglu" else GELU(dim, dim * mult)
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    # Rows per chunk at inference: the 4x-wide GEGLU intermediates of a chunk (1024 x 2560 floats for
    # SD 1.5's 64x64 level) stay in reused memory instead of fresh maps of 80 MB, whose pages fault in
    # at every call (measured 1.13x on that level's feed-forward, AVX2 EPYC; no gain on the others).
    chunk_rows = 1024

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or rows < 4 * self.chunk_rows:
            return self._run(x)
        # Each row's output depends on that row only, so the chunks give the unchunked answer (bitwise
        # here: a row's dot products do not depend on how many rows share the matrix product).
        flat = x.reshape(rows, x.shape[-1])
        out = torch.empty(rows, self.net[2].out_features, dtype=x.dtype, device=x.device)
        for r0 in range(0, rows, self.chunk_rows):
            out[r0:r0 + self.chunk_rows] = self._run(flat[r0:r0 + self.chunk_rows])
        return out.view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block over tokens [B, N, dim]:

        x = x + SelfAttn(LN1(x));  x = x + CrossAttn(LN2(x), context);  x = x + FF(LN3(x))

    With `only_cross_attention` the first attention also attends to the context (no self-attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None,
                 only_cross_attention: bool = False, upcast_attention: bool = False, dropout: float = 0.0,
                 attention_bias: bool = False, activation: str = "geglu"):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, context_dim if only_cross_attention else None, heads, dim_head,
                               bias=attention_bias, upcast=upcast_attention, dropout=dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim, heads, dim_head, bias=attention_bias, upcast=upcast_attention,
                                   dropout=dropout)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation=activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, self_mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: over the context's tokens; self_mask: over x's own tokens (both as `key_padding_mask`
        makes them; the U-Net's feature-map tokens are never padded, the text refiner's are)."""
        if self.only_cross_attention:
            # The mask applies to every attention over the context (diffusers passes its
            # encoder_attention_mask only to attn2, so it leaves this one unmasked).
            if context is not None:
                x = expand_batch(x, context.shape[0])
            a = self.attn1(self.norm1(x), context, mask)
        else:
            a = self.attn1(self.norm1(x), None, self_mask)
        x = x + a  # a new tensor: the caller's x is never modified
        if context is not None:  # the copies of a guidance batch part here (self-attention was shared)
            x = expand_batch(x, context.shape[0])
        # At inference the next residual sums go in place into that tensor of our own.
        if self.attn2 is not None:
            a = self.attn2(self.norm2(x), context, mask if context is not None else None)
            x = x + a if torch.is_grad_enabled() else x.add_(a)
        a = self.ff(self.norm3(x))
        return x + a if torch.is_grad_enabled() else x.add_(a)


class SpatialTransformer(nn.Module):
    """A feature map [B, C, H, W] -> tokens [B, HW, inner] -> transformer blocks -> back, plus
    the input (diffusers' `Transformer2DModel` for continuous inputs).

    `use_linear_projection` (SD 2.x) projects in and out with linear layers on the tokens instead of
    1x1 convolutions on the map; the two are the same map, only the weight shapes differ. On a
    channels_last map, flattening to tokens and back costs no copy."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int | None, layers: int = 1,
                 groups: int = 32, use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, dropout: float = 0.0, position_embedding: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        # Not in SD: see `position_code`. Zero-initialised, so a model trained without it is unchanged.
        self.pos_proj = zero_linear(4 * POSITION_FREQUENCIES, inner) if position_embedding else None
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, only_cross_attention, upcast_attention, dropout)
            for _ in range(layers)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        h_map = group_norm(self.norm, x)  # x stays: it is the residual
        if self.use_linear_projection:
            tokens = self.proj_in(h_map.permute(0, 2, 3, 1).reshape(b, h * w, -1))
        else:
            tokens = self.proj_in(h_map).permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.pos_proj is not None:
            tokens = tokens + self.pos_proj(position_code(h, w, tokens.device, tokens.dtype))
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        b = tokens.shape[0]  # k * b after the copies of a guidance batch parted
        if self.use_linear_projection:
            out = self.proj_out(tokens).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        else:
            out = self.proj_out(tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        # x first: the sum keeps x's memory layout (NCHW or channels_last), not the tokens' one.
        return expand_batch(x, out.shape[0]) + out


class ContextRefiner(nn.Module):
    """A trainable transformer over a frozen text encoder's token states, as a residual:

        tau(y) = c + W_out Blocks(c),   c = the frozen encoder's states [B, L, D]

    LDM (Rombach et al. 2022, sec. 3.3) trains its text transformer tau_theta jointly with the U-Net;
    Imagen (Saharia et al. 2022) keeps a large pretrained encoder frozen. With a small frozen encoder
    (MiniLM) the states of "left" and "right" captions barely differ, so a few trained layers on top
    let the U-Net bind each object to its relation. W_out starts at zero: a U-Net trained on the
    bare states starts unchanged. Padded tokens are masked as keys; their own outputs are never
    read, since the U-Net's cross-attention masks them too."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"context refiner: width {dim} cannot be split into {heads} heads")
        self.blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, dim // heads, None) for _ in range(layers)])
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = zero_linear(dim, dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """context [B, L, D]; mask: None or [B, 1, 1, L] from `key_padding_mask`."""
        h = context
        for block in self.blocks:
            h = block(h, self_mask=mask)
        return context + self.proj_out(self.norm_out(h))
