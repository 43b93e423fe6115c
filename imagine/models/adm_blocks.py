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
  Without text the same block is the self-attention of the DDPM / ADM mid block (diffusers' UNetMidBlock2D, in the
  text-free UNet2DModel of Karlo's super-resolution stages).

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

    `heads` = channels // head_dim (diffusers' attention_head_dim is each head's width in these blocks).

    Without text (`context_dim` None) it is the plain self-attention over the map of the DDPM / ADM mid block
    (diffusers' UNetMidBlock2D: Attention with residual_connection): out = (x + W_O softmax(Q K^T / sqrt(d)) V) / r,
    r = `rescale_output_factor`, with the group norm left out where `groups` is None (diffusers builds none for an
    AdaGN U-Net's mid attention unless attn_norm_num_groups asks), of epsilon `eps`."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int | None, groups: int | None,
                 only_cross_attention: bool = False, cross_attention_norm: bool = False, eps: float = 1e-5,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.only_cross_attention = heads, only_cross_attention
        self.rescale_output_factor = rescale_output_factor
        if context_dim is None and (only_cross_attention or cross_attention_norm):
            raise ValueError("AddedKVAttention: only_cross_attention and cross_attention_norm need a text "
                             "(context_dim)")
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        # (diffusers' cross_attention_norm_num_groups: 32, whatever the U-Net's norm_num_groups)
        self.norm_cross = nn.GroupNorm(32, context_dim, eps=1e-5) if cross_attention_norm else None
        self.to_q = nn.Linear(channels, inner)
        if not only_cross_attention:
            self.to_k = nn.Linear(channels, inner)
            self.to_v = nn.Linear(channels, inner)
        if context_dim is not None:
            self.add_k_proj = nn.Linear(context_dim, inner)
            self.add_v_proj = nn.Linear(context_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W]; context [k B, L, context_dim] (k copies of a guidance batch share x), None for the
        text-free block; mask None or the text's keep-mask [k B, 1, 1, L] (`key_padding_mask`): the map's own tokens
        are always attended to. (A row whose mask keeps no token reaches here keeping them all, `key_padding_mask`'s
        rule; diffusers' -10000 bias would leave that row the map's tokens alone.)"""
        b, c, h, w = x.shape
        text = context is not None and hasattr(self, "add_k_proj")
        if context is not None and not text:
            raise ValueError("this attention reads no text (context_dim None); pass context=None")
        rows = context.shape[0] if text else b
        tokens = x if self.group_norm is None else group_norm(self.group_norm, x)
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, HW, C]
        q = expand_batch(split_heads(self.to_q(tokens), self.heads), rows)
        k = v = None
        if text:
            if self.norm_cross is not None:  # GroupNorm over (width, tokens): [B, L, D] -> [B, D, L] and back
                context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
            k = split_heads(self.add_k_proj(context), self.heads)
            v = split_heads(self.add_v_proj(context), self.heads)
        elif hasattr(self, "add_k_proj"):
            raise ValueError("this attention reads the text: pass context [B, L, context_dim]")
        if not self.only_cross_attention:
            k_map = expand_batch(split_heads(self.to_k(tokens), self.heads), rows)
            v_map = expand_batch(split_heads(self.to_v(tokens), self.heads), rows)
            k = k_map if k is None else torch.cat([k, k_map], dim=2)
            v = v_map if v is None else torch.cat([v, v_map], dim=2)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], h * w)], dim=-1)
        out = self.to_out[1](self.to_out[0](_attend(q, k, v, mask if text else None)))  # [rows, HW, C]
        out = expand_batch(x, rows) + out.transpose(1, 2).reshape(rows, c, h, w)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor
