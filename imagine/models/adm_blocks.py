"""The pieces of the ADM / GLIDE U-Net that the latent-diffusion U-Net does not have.

DeepFloyd IF (the Imagen-style pixel cascade, Saharia et al. 2022) and Karlo's unCLIP decoder (Ramesh et al.
2022, after GLIDE) build their U-Nets from these; diffusers calls their levels ResnetDownsampleBlock2D,
SimpleCrossAttnDownBlock2D, ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D and UNetMidBlock2DSimpleCrossAttn.

- BigGAN residual resampling (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs" (ADM), sec. 3, after Brock
  et al. 2019): a level changes resolution inside a residual block, both of whose paths are resampled after the
  first norm and activation (`resample`: 2x2 average pooling down, nearest-neighbour up). `ResnetBlock(resample=)`
  in `imagine.models.unet`, which also holds ADM's adaptive group norm (AdaGN, `time_scale_shift`).
- GLIDE's text conditioning (Nichol et al. 2022, sec. 2.3 and appendix): the text tokens, projected to every
  attention layer's width, are appended to that layer's keys and values, so one attention reads both the
  feature map and the text (`AddedKVAttention`; diffusers' Attention with `added_kv_proj_dim` and
  AttnAddedKVProcessor). The pooled text enters the time embedding (`imagine.models.embeddings.TextTimeEmbedding`).

Parameter names follow diffusers, so its weights load with load_state_dict(strict=True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models.attention import _attend, expand_batch, split_heads
from imagine.models.group_norm import group_norm

RESAMPLE_MODES = (None, "up", "down")


def resample(x: torch.Tensor, mode: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """ADM's parameter-free resampling inside a residual block: "down" 2x2 average pooling, "up" nearest x2, or
    to `size` (the skip's size on the way up, where an odd map was pooled). An odd map's last row or column is
    averaged alone (ceil mode), as the stride-2 convolution of the other blocks keeps it; diffusers' blocks take
    only sizes divisible by 2^(levels - 1), where the two agree."""
    if mode == "down":
        return F.avg_pool2d(x, 2, ceil_mode=True)
    if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="nearest")


class AddedKVAttention(nn.Module):
    """GLIDE's attention block (Nichol et al. 2022, sec. 2.3): self-attention over the feature map whose keys and
    values also hold the projected text tokens,

        K = [c W_K'; h W_K],  V = [c W_V'; h W_V],  Q = h W_Q,   h = GN(x) as tokens,  c = the text states,
        out = x + W_O softmax(Q K^T / sqrt(d)) V

    (diffusers' Attention with added_kv_proj_dim; AttnAddedKVProcessor puts the text first). With
    `only_cross_attention` the keys and values are the text's alone. With `cross_attention_norm` (DeepFloyd
    IF's) the text is group-normalised over its width and tokens first (`norm_cross`).

    `heads` = channels // head_dim (diffusers' attention_head_dim is each head's width in these blocks)."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, groups: int,
                 only_cross_attention: bool = False, cross_attention_norm: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.only_cross_attention = heads, only_cross_attention
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        # (diffusers' cross_attention_norm_num_groups: 32, whatever the U-Net's norm_num_groups)
        self.norm_cross = nn.GroupNorm(32, context_dim, eps=1e-5) if cross_attention_norm else None
        self.to_q = nn.Linear(channels, inner)
        if not only_cross_attention:
            self.to_k = nn.Linear(channels, inner)
            self.to_v = nn.Linear(channels, inner)
        self.add_k_proj = nn.Linear(context_dim, inner)
        self.add_v_proj = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W]; context [k B, L, context_dim] (k copies of a guidance batch share x); mask None or the
        text's keep-mask [k B, 1, 1, L] (`key_padding_mask`): the map's own tokens are always attended to. (A row
        whose mask keeps no token reaches here keeping them all, `key_padding_mask`'s rule; diffusers' -10000 bias
        would leave that row the map's tokens alone.)"""
        b, c, h, w = x.shape
        rows = context.shape[0]
        tokens = group_norm(self.group_norm, x).flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.norm_cross is not None:  # GroupNorm over (width, tokens): [B, L, D] -> [B, D, L] and back
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        q = expand_batch(split_heads(self.to_q(tokens), self.heads), rows)
        k = split_heads(self.add_k_proj(context), self.heads)
        v = split_heads(self.add_v_proj(context), self.heads)
        if not self.only_cross_attention:
            k = torch.cat([k, expand_batch(split_heads(self.to_k(tokens), self.heads), rows)], dim=2)
            v = torch.cat([v, expand_batch(split_heads(self.to_v(tokens), self.heads), rows)], dim=2)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], h * w)], dim=-1)
        out = self.to_out[1](self.to_out[0](_attend(q, k, v, mask)))  # [rows, HW, C]
        return expand_batch(x, rows) + out.transpose(1, 2).reshape(rows, c, h, w)
