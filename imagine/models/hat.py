"""HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer"): the transformer upscaler
behind "Real_HAT_GAN_SRx4", "4xNomos8kSCHAT-L" and others.

SwinIR's frame (imagine.models.swinir: first convolution, residual groups with a convolution and a skip, LayerNorm,
convolution, long skip, "pixelshuffle" reconstruction, DIV2K's mean subtracted, the picture reflected to a multiple of
the window and cut back), with two changes (sec. 3.2, fig. 4):

- the hybrid attention block (HAB, eq. 3-4): beside the (shifted) window attention runs a channel attention block
  (CAB: a 3x3 convolution narrowing by `compress`, GELU, a 3x3 back, then squeeze-and-excitation: average pool, 1x1
  narrowing by `squeeze`, ReLU, 1x1 back, sigmoid, times the features), added at a small weight alpha = 0.01:
  X_N = LN(X), X_M = (S)W-MSA(X_N) + alpha CAB(X_N) + X, Y = MLP(LN(X_M)) + X_M.
- each group ends with an overlapping cross-attention block (OCAB, eq. 5): the queries from M x M windows, the keys
  and values from larger M_o x M_o windows centred on them (M_o = (1 + gamma) M, cut by unfold with zero padding), a
  relative position bias between the two windows' positions, then a projection, the skip and an MLP.

Parameter names are the authors' (and spandrel's); the files' position index buffers (`relative_position_index_SA`,
`_OCA`) are recomputed. Attention runs through torch's scaled_dot_product_attention with the bias (and the shift mask)
as one additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models.swinir import (RGB_MEAN, Mlp, WindowAttention, pixelshuffle_upsample, relative_position_index,
                                   shift_mask, unwindows, windows)


def overlap_position_index(window: int, overlap: int) -> torch.Tensor:
    """(M^2, M_o^2): for query position i of an M x M window and key position j of the M_o x M_o window around it
    (each in its own window's coordinates), the bias table's row for their offset as the authors index it: each
    coordinate's j - i shifted by M - M_o + 1, rows of M + M_o - 1. The shift does not make every index positive (it
    runs from -(M_o - M) - ...); torch reads a negative row from the table's end, so the map from offsets to rows is
    one to one all the same, and files are trained with it."""
    def grid(n):
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        return torch.stack([ys.flatten(), xs.flatten()])

    d = grid(overlap)[:, None, :] - grid(window)[:, :, None] + (window - overlap + 1)
    return d[0] * (window + overlap - 1) + d[1]


class ChannelAttentionBlock(nn.Module):
    """CAB (the authors' `conv_block.cab`: convolution, GELU, convolution, squeeze-and-excitation)."""

    def __init__(self, dim: int, hidden: int, squeezed: int):
        super().__init__()
        excite = nn.Module()
        excite.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeezed, 1), nn.ReLU(),
                                         nn.Conv2d(squeezed, dim, 1), nn.Sigmoid())
        self.cab = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 3, 1, 1), excite)

    def forward(self, x):
        y = self.cab[2](self.cab[1](self.cab[0](x)))
        return y * self.cab[3].attention(y)


class HAB(nn.Module):
    """The hybrid attention block (eq. 3-4) on a (batch, H, W, C) map whose sides are multiples of the window."""

    def __init__(self, dim, heads, window, shift, mlp_hidden, cab_hidden, squeezed, qkv_bias, conv_scale=0.01):
        super().__init__()
        self.window, self.shift, self.conv_scale = window, shift, conv_scale
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias, own_index=False)  # (HAT's index: the network's)
        self.conv_block = ChannelAttentionBlock(dim, cab_hidden, squeezed)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x, bias_index):
        b, h, w, c = x.shape
        m, s = self.window, self.shift
        y = self.norm1(x)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = unwindows(self.attn(windows(y, m), shift_mask(h, w, m, m, s, s).to(x.device) if s else None, bias_index),
                      m, h, w)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y + conv * self.conv_scale
        return x + self.mlp(self.norm2(x))


class OCAB(nn.Module):
    """The overlapping cross-attention block (eq. 5)."""

    def __init__(self, dim, heads, window, overlap, mlp_hidden, qkv_bias):
        super().__init__()
        self.window, self.overlap, self.heads = window, overlap, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window + overlap - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x, bias_index):  # (batch, H, W, C)
        b, h, w, c = x.shape
        m, mo, heads, d = self.window, self.overlap, self.heads, c // self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        q = windows(q, m).view(b, -1, m * m, heads, d).transpose(2, 3).flatten(0, 1)  # (b nw, heads, m^2, d)

        def around(t):  # the M_o x M_o windows centred on the M x M ones, zero outside the map
            cols = F.unfold(t.permute(0, 3, 1, 2), mo, padding=(mo - m) // 2, stride=m)  # (b, c mo^2, nw)
            return cols.view(b, heads, d, mo * mo, -1).permute(0, 4, 1, 3, 2).flatten(0, 1)  # (b nw, heads, mo^2, d)

        bias = self.relative_position_bias_table[bias_index.view(-1)].view(m * m, mo * mo, -1).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, around(k), around(v), attn_mask=bias.to(q.dtype)[None])
        out = unwindows(out.view(b, -1, heads, m * m, d).transpose(2, 3).reshape(b, -1, m * m, c), m, h, w)
        x = self.proj(out) + x
        return x + self.mlp(self.norm2(x))


class AttentionBlocks(nn.Module):
    """A group's blocks (the authors' AttenBlocks: `blocks`, then `overlap_attn`)."""

    def __init__(self, dim, depth, heads, window, shifts, overlap, mlp_hidden, cab_hidden, squeezed, ocab_hidden,
                 qkv_bias):
        super().__init__()
        self.blocks = nn.ModuleList(HAB(dim, heads, window, window // 2 if i % 2 and shifts else 0, mlp_hidden,
                                        cab_hidden, squeezed, qkv_bias) for i in range(depth))
        self.overlap_attn = OCAB(dim, heads, window, overlap, ocab_hidden, qkv_bias)


class RHAG(nn.Module):
    """A residual hybrid attention group: the blocks, a convolution (or none: "identity"), the group's skip."""

    def __init__(self, dim, depth, heads, window, shifts, overlap, mlp_hidden, cab_hidden, squeezed, ocab_hidden,
                 qkv_bias, resi_connection):
        super().__init__()
        self.residual_group = AttentionBlocks(dim, depth, heads, window, shifts, overlap, mlp_hidden, cab_hidden,
                                              squeezed, ocab_hidden, qkv_bias)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if resi_connection == "1conv" else nn.Identity()

    def forward(self, x, index_sa, index_oca):
        y = x
        for block in self.residual_group.blocks:
            y = block(y, index_sa)
        y = self.residual_group.overlap_attn(y, index_oca)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class HAT(nn.Module):
    def __init__(self, in_channels=3, embed_dim=180, depths=(6,) * 6, heads=(6,) * 6, window=16, overlap=24,
                 mlp_hidden=360, cab_hidden=60, squeezed=6, ocab_hidden=360, qkv_bias=True, scale=4, features=64,
                 resi_connection="1conv", patch_norm=True, img_size=64, img_range=1.0):
        super().__init__()
        self.scale, self.img_range = scale, img_range
        shifts = img_size > window  # (the authors shrink the window to a training crop no larger, unshifted)
        self.window = window = min(window, img_size)
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_channels == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("relative_position_index_SA", relative_position_index(window))
        self.register_buffer("relative_position_index_OCA", overlap_position_index(window, overlap))
        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(embed_dim) if patch_norm else None
        self.layers = nn.ModuleList(RHAG(embed_dim, d, h, window, shifts, overlap, mlp_hidden, cab_hidden, squeezed,
                                         ocab_hidden, qkv_bias, resi_connection) for d, h in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1) if resi_connection == "1conv" \
            else nn.Identity()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, features, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = pixelshuffle_upsample(features, scale)
        self.conv_last = nn.Conv2d(features, in_channels, 3, 1, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        pad_h, pad_w = -h % self.window, -w % self.window
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), "reflect")
        first = self.conv_first(x)
        y = first.permute(0, 2, 3, 1)
        if self.patch_embed.norm is not None:
            y = self.patch_embed.norm(y)
        for layer in self.layers:
            y = layer(y, self.relative_position_index_SA, self.relative_position_index_OCA)
        y = self.conv_after_body(self.norm(y).permute(0, 3, 1, 2)) + first
        y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        return (y / self.img_range + mean)[..., :h * self.scale, :w * self.scale]
