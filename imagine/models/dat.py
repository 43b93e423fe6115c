"""DAT (Chen et al. 2023, "Dual Aggregation Transformer for Image Super-Resolution"): the transformer upscaler behind
the community's "4xNomos8kDAT", "4x-FaceUpDAT" and others.

Like SwinIR (imagine.models.swinir) it is a first convolution, residual groups of transformer blocks with a
convolution and a skip each, a LayerNorm, a convolution and the long skip, then a reconstruction ("pixelshuffle":
a convolution + LeakyReLU, a convolution and a pixel shuffle per factor 2 or one for 3, a last convolution; or
"pixelshuffledirect"); pictures in [0, 1] with DIV2K's mean subtracted. Its blocks alternate two kinds of
self-attention (sec. 3.2, fig. 3), each followed by a spatial-gate feed-forward network (SGFN, sec. 3.4: a linear
layer and GELU, the hidden features split in two halves, the second normalised and convolved depth-wise 3x3 and
multiplied into the first, a linear layer back):

- spatial window attention (DSTB's): half the channels attend inside H_sp x W_sp rectangles, the other half inside
  W_sp x H_sp ones (split_size, e.g. 8 x 32); the bias of two positions is an MLP of their offset (dynamic position
  bias: a linear layer from the 2 offsets, then LayerNorm-ReLU-linear three times, to one bias per head); some blocks
  (in even groups the 3rd, 7th, ...; in odd ones the 1st, 5th, ...) roll the map by half a rectangle first, with a
  -100 mask between positions the roll brought together, as Swin does. The map is padded with zero queries, keys and
  values to a multiple of the longer side, which take part in the attention (as in the authors' code).
- channel attention (DCTB's): over the channels of each head, the queries and keys L2-normalised over the positions,
  their products scaled by a learned temperature per head, softmax, times the values (a d x d map per head).

Both add a depth-wise 3x3 convolution (with BatchNorm and GELU) of the values and make the two paths gate each other
(the adaptive interaction module, sec. 3.3): the spatial path's output scales the convolution's per position and the
convolution's pooled channels scale the attention's (channel_interaction: average pool, 1x1 to dim / 8, BatchNorm,
GELU, 1x1 back; spatial_interaction: 1x1 to dim / 16, BatchNorm, GELU, 1x1 to one map), in the spatial block the
attention is gated by the channels and the convolution by the positions, in the channel block the other way round.

Parameter names are the authors' (and spandrel's), so their files load as they are. The windows' attention runs
through torch's scaled_dot_product_attention with the bias and the mask as one additive mask.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from imagine.models.swinir import RGB_MEAN, pixelshuffle_upsample, residual_conv, shift_mask


def offsets(h_sp: int, w_sp: int) -> torch.Tensor:
    """((2 h_sp - 1)(2 w_sp - 1), 2): every (dy, dx) offset inside an h_sp x w_sp rectangle, dy major (the MLP's
    input: the files' rpe_biases)."""
    dy, dx = torch.meshgrid(torch.arange(1 - h_sp, h_sp), torch.arange(1 - w_sp, w_sp), indexing="ij")
    return torch.stack([dy.flatten(), dx.flatten()], 1).float()


def offset_index(h_sp: int, w_sp: int) -> torch.Tensor:
    """(n, n) for n = h_sp w_sp: the row of `offsets` for positions i, j of a rectangle, (dy + h_sp - 1) (2 w_sp - 1)
    + dx + w_sp - 1."""
    ys, xs = torch.meshgrid(torch.arange(h_sp), torch.arange(w_sp), indexing="ij")
    c = torch.stack([ys.flatten(), xs.flatten()])
    d = c[:, :, None] - c[:, None, :]
    return (d[0] + h_sp - 1) * (2 * w_sp - 1) + d[1] + w_sp - 1


class DynamicPosBias(nn.Module):
    """The bias of an offset: linear(2 -> d), then (LayerNorm, ReLU, linear) three times, the last to one per head
    (d: a sixteenth of the branch's channels)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.pos_proj = nn.Linear(2, dim)
        self.pos1, self.pos2 = (nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(2))
        self.pos3 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, heads))

    def forward(self, x):
        return self.pos3(self.pos2(self.pos1(self.pos_proj(x))))


class RectangleAttention(nn.Module):
    """Attention inside h_sp x w_sp rectangles over (batch, H, W, C) queries, keys and values (the authors'
    Spatial_Attention; its buffers rpe_biases and relative_position_index are recomputed here, the same)."""

    def __init__(self, dim: int, heads: int, h_sp: int, w_sp: int):
        super().__init__()
        self.heads, self.h_sp, self.w_sp = heads, h_sp, w_sp
        self.pos = DynamicPosBias(dim // 16, heads)  # (the authors' dim // 4, quartered again inside)
        self.register_buffer("rpe_biases", offsets(h_sp, w_sp))
        self.register_buffer("relative_position_index", offset_index(h_sp, w_sp))

    def bias(self) -> torch.Tensor:  # (heads, n, n)
        n = self.h_sp * self.w_sp
        return self.pos(self.rpe_biases)[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, q, k, v, mask: torch.Tensor | None):
        b, h, w, c = q.shape
        hs, ws, heads = self.h_sp, self.w_sp, self.heads

        def windows(t):  # -> (batch * windows, heads, n, c / heads)
            t = t.view(b, h // hs, hs, w // ws, ws, heads, c // heads).permute(0, 1, 3, 5, 2, 4, 6)
            return t.reshape(-1, heads, hs * ws, c // heads)

        add = self.bias().to(q.dtype)[None]
        if mask is not None:  # (windows, n, n) per picture
            add = (add + mask.to(q.dtype)[:, None]).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=add)
        out = out.view(b, h // hs, w // ws, heads, hs, ws, c // heads).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, h, w, c)


def _interactions(dim: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The adaptive interaction module's parts: the values' depth-wise convolution, channel_interaction and
    spatial_interaction (sec. 3.3)."""
    dw = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
    channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8), nn.GELU(),
                            nn.Conv2d(dim // 8, dim, 1))
    spatial = nn.Sequential(nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(),
                            nn.Conv2d(dim // 16, 1, 1))
    return dw, channel, spatial


class SpatialBlockAttention(nn.Module):
    """The spatial window self-attention with its interactions (the authors' Adaptive_Spatial_Attention)."""

    def __init__(self, dim, heads, split, shifted: bool, qkv_bias=True):
        super().__init__()
        self.split, self.shifted = tuple(split), shifted
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList([RectangleAttention(dim // 2, heads // 2, split[0], split[1]),
                                    RectangleAttention(dim // 2, heads // 2, split[1], split[0])])
        self.dwconv, self.channel_interaction, self.spatial_interaction = _interactions(dim)

    def forward(self, x):  # (batch, H, W, C)
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        side = max(self.split)
        ph, pw = -h % side, -w % side
        qp, kp, vp = (F.pad(t, (0, 0, 0, pw, 0, ph)) for t in (q, k, v))  # (zeros after the projection)
        halves = []
        for i, attn in enumerate(self.attns):
            part = [t[..., i * c // 2:(i + 1) * c // 2] for t in (qp, kp, vp)]
            if self.shifted:
                sh, sw = attn.h_sp // 2, attn.w_sp // 2
                part = [torch.roll(t, (-sh, -sw), (1, 2)) for t in part]
                mask = shift_mask(h + ph, w + pw, attn.h_sp, attn.w_sp, sh, sw).to(x.device)
                out = torch.roll(attn(*part, mask), (sh, sw), (1, 2))
            else:
                out = attn(*part, None)
            halves.append(out[:, :h, :w])
        attended = torch.cat(halves, -1)
        conv = self.dwconv(v.permute(0, 3, 1, 2))
        positions = torch.sigmoid(self.spatial_interaction(attended.permute(0, 3, 1, 2)))  # (both from the ungated)
        attended = attended * torch.sigmoid(self.channel_interaction(conv)).permute(0, 2, 3, 1)
        return self.proj(attended + (conv * positions).permute(0, 2, 3, 1))


class ChannelBlockAttention(nn.Module):
    """The channel self-attention with its interactions (the authors' Adaptive_Channel_Attention)."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv, self.channel_interaction, self.spatial_interaction = _interactions(dim)

    def forward(self, x):  # (batch, H, W, C)
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)  # (b, heads, d, N)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        attended = (attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(b, h, w, c)
        conv = self.dwconv(v.reshape(b, c, h, w))
        gate = torch.sigmoid(self.spatial_interaction(conv)).permute(0, 2, 3, 1)
        conv = conv * torch.sigmoid(self.channel_interaction(attended.permute(0, 3, 1, 2)))
        return self.proj(attended * gate + conv.permute(0, 2, 3, 1))


class SGFN(nn.Module):
    """The spatial-gate feed-forward network (sec. 3.4)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden // 2, dim)
        self.sg = nn.Module()
        self.sg.norm = nn.LayerNorm(hidden // 2)
        self.sg.conv = nn.Conv2d(hidden // 2, hidden // 2, 3, 1, 1, groups=hidden // 2)

    def forward(self, x):  # (batch, H, W, C)
        a, g = F.gelu(self.fc1(x)).chunk(2, -1)
        g = self.sg.conv(self.sg.norm(g).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(a * g)


class DATBlock(nn.Module):
    def __init__(self, dim, heads, split, expansion, qkv_bias, group: int, index: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if index % 2 == 0:
            shifted = (group % 2 == 0 and index > 0 and (index - 2) % 4 == 0) or (group % 2 == 1 and index % 4 == 0)
            self.attn = SpatialBlockAttention(dim, heads, split, shifted, qkv_bias)
        else:
            self.attn = ChannelBlockAttention(dim, heads, qkv_bias)
        self.ffn = SGFN(dim, int(dim * expansion))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, dim, depth, heads, split, expansion, qkv_bias, resi_connection, group):
        super().__init__()
        self.blocks = nn.ModuleList(DATBlock(dim, heads, split, expansion, qkv_bias, group, i) for i in range(depth))
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x):  # (batch, H, W, C)
        y = x
        for block in self.blocks:
            y = block(y)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class DAT(nn.Module):
    def __init__(self, in_channels=3, embed_dim=180, split=(8, 32), depths=(6, 6, 6, 6, 6, 6), heads=(6,) * 6,
                 expansion=2.0, qkv_bias=True, scale=4, features=64, resi_connection="1conv", upsampler="pixelshuffle",
                 img_range=1.0):
        super().__init__()
        self.scale, self.upsampler, self.img_range = scale, upsampler, img_range
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_channels == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.before_RG = nn.Sequential(nn.Identity(), nn.LayerNorm(embed_dim))  # (a Rearrange in the authors' code)
        self.layers = nn.ModuleList(ResidualGroup(embed_dim, d, h, split, expansion, qkv_bias, resi_connection, g)
                                    for g, (d, h) in enumerate(zip(depths, heads)))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, features, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = pixelshuffle_upsample(features, scale)
            self.conv_last = nn.Conv2d(features, in_channels, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, scale ** 2 * in_channels, 3, 1, 1),
                                          nn.PixelShuffle(scale))

    def forward(self, x):
        mean = self.mean.to(x.dtype)
        first = self.conv_first((x - mean) * self.img_range)
        y = self.before_RG[1](first.permute(0, 2, 3, 1))
        for layer in self.layers:
            y = layer(y)
        y = self.conv_after_body(self.norm(y).permute(0, 3, 1, 2)) + first
        if self.upsampler == "pixelshuffle":
            y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        else:
            y = self.upsample(y)
        return y / self.img_range + mean
