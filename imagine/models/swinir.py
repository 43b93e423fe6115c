"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"): the transformer upscaler
AUTOMATIC1111 ships as "SwinIR 4x" and ComfyUI runs through spandrel.

The network (sec. 3.1, fig. 2): a 3x3 convolution makes shallow features F0 (eq. 1); a stack of residual Swin
Transformer blocks (RSTB) and a convolution make deep features, added to F0 (eqs. 2-3, the long skip); a
reconstruction module makes the picture (eq. 4). An RSTB (eq. 5-6) is a run of Swin Transformer layers over the
feature map's tokens, a convolution, and a skip around them. A Swin Transformer layer (Liu et al. 2021, "Swin
Transformer", sec. 3.2; SwinIR eq. 7-8) is

    X = MSA(LN(X)) + X,      X = MLP(LN(X)) + X,

with the attention computed inside non-overlapping M x M windows, softmax(Q K^T / sqrt(d) + B) V, B a learned
relative position bias indexed by the offset of the two positions (Swin eq. 4); every other layer shifts the
windows by M / 2 (a cyclic roll of the map, with a mask of -100 keeping apart the positions that the roll brought
together), so information crosses the windows. The MLP is two linear layers with GELU between.

Reconstruction, by the file's kind: "pixelshuffle" (classical SR: a convolution + LeakyReLU, then a convolution and
a pixel shuffle per factor 2, or one for 3, and a last convolution), "pixelshuffledirect" (lightweight SR: one
convolution and a pixel shuffle), "nearest+conv" (real-world SR, the "SwinIR 4x" GAN model: nearest x2 then a
convolution + LeakyReLU 0.2 per factor 2, then two convolutions), or none (denoising and JPEG artifact removal: the
picture plus a convolution's residual). Inputs are pictures in [0, 1] with the training set's mean subtracted
(DIV2K's RGB mean for 3 channels) and multiplied by `img_range` (255 for the JPEG models, whose window is 7; else 1).
The picture is padded to a multiple of the window by reflection (and of the pixel unshuffle some community files
start with) and cut back after.

The parameter names are those of the authors' network_swinir.py, so its released files (and the community's, through
spandrel's detection rules) load as they are. Here the feature map stays (batch, height, width, channels) through
the transformer layers and the window attention runs through torch's scaled_dot_product_attention with the bias and
the mask as one additive mask; the shift masks are built per feature-map size and cached (the files also carry the
mask for their training size, `attn_mask`, which equals it and is not needed).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, which SwinIR subtracts from 3-channel pictures
SHIFT_MASK = -100.0  # the value the authors add between positions of different regions in a shifted window


def relative_position_index(window: int) -> torch.Tensor:
    """(M^2, M^2): for positions i, j of an M x M window, the row of the bias table for their offset
    (dy + M - 1) * (2M - 1) + (dx + M - 1) (Swin sec. 3.2, "relative position bias")."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, M^2)
    d = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return d[0] * (2 * window - 1) + d[1]


@functools.lru_cache(maxsize=32)
def shift_mask(height: int, width: int, win_h: int, win_w: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """(windows, n, n) for win_h x win_w windows (n = win_h win_w): 0 between positions of the same region of the
    rolled map, SHIFT_MASK between others. After a roll by -shift, the last `shift` rows (columns) came from the top
    (left): each side splits into [0, size - win), [size - win, size - shift), [size - shift, size), and a position's
    region is its pair of parts. Swin's square windows (win_h = win_w = M, shift M / 2) and DAT's rectangles."""
    def parts(n, win, shift):
        p = torch.zeros(n, dtype=torch.long)
        p[n - win:n - shift] = 1
        p[n - shift:] = 2
        return p

    region = (parts(height, win_h, shift_h)[:, None] * 3 + parts(width, win_w, shift_w)[None, :]).float()
    r = region.view(height // win_h, win_h, width // win_w, win_w).transpose(1, 2).reshape(-1, win_h * win_w)
    return torch.where(r[:, None, :] != r[:, :, None], SHIFT_MASK, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def windows(x: torch.Tensor, m: int) -> torch.Tensor:
    """A (batch, H, W, C) map as its m x m windows: (batch, windows, m^2, C), windows row by row."""
    b, h, w, c = x.shape
    return x.view(b, h // m, m, w // m, m, c).transpose(2, 3).reshape(b, -1, m * m, c)


def unwindows(x: torch.Tensor, m: int, h: int, w: int) -> torch.Tensor:
    """`windows`' inverse: (batch, windows, m^2, C) -> (batch, h, w, C)."""
    b, c = x.shape[0], x.shape[-1]
    return x.view(b, h // m, w // m, m, m, c).transpose(2, 3).reshape(b, h, w, c)


def pixelshuffle_upsample(features: int, scale: int) -> nn.Sequential:
    """The "pixelshuffle" reconstruction's upsampling (SwinIR's, HAT's, DAT's `upsample`): a 3x3 convolution to 4x the
    features and a pixel shuffle by 2 per factor of 2, or one to 9x and a shuffle by 3 for scale 3."""
    steps = [(4, 2)] * (scale.bit_length() - 1) if scale & (scale - 1) == 0 else [(9, 3)]
    return nn.Sequential(*[m for k, s in steps
                           for m in (nn.Conv2d(features, k * features, 3, 1, 1), nn.PixelShuffle(s))])


class WindowAttention(nn.Module):
    """Multi-head self-attention inside M x M windows with a relative position bias (Swin eq. 4). `own_index`: the
    bias index is this module's buffer (SwinIR's files carry it per block); else the network passes it (HAT's)."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool = True, own_index: bool = True):
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        if own_index:  # (a buffer in the authors' network, so their files carry it; it is recomputed here, the same)
            self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def bias(self, index: torch.Tensor | None = None) -> torch.Tensor:
        n = self.window ** 2
        index = self.relative_position_index if index is None else index
        return self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, windows, M^2, C); mask: (windows, M^2, M^2) or None; index: the bias index where not own."""
        b, w, n, c = x.shape
        q, k, v = self.qkv(x).view(b, w, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        add = self.bias(index).to(q.dtype)[None]  # (1, heads, n, n)
        if mask is not None:
            add = add + mask.to(q.dtype)[:, None]  # (windows, heads, n, n)
        out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                             attn_mask=add.expand(b, -1, -1, -1, -1).flatten(0, 1)
                                             if add.shape[0] > 1 else add)
        return self.proj(out.view(b, w, self.heads, n, -1).transpose(2, 3).reshape(b, w, n, c))


class SwinLayer(nn.Module):
    """A Swin Transformer layer (SwinIR eq. 7-8) on a (batch, H, W, C) map whose sides are multiples of the window;
    `shift` > 0 for the shifted-window layers."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        m, s = self.window, self.shift
        y = self.norm1(x)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = unwindows(self.attn(windows(y, m), shift_mask(h, w, m, m, s, s).to(x.device) if s else None), m, h, w)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    """The Swin layers of an RSTB (the authors' BasicLayer: `blocks`)."""

    def __init__(self, dim, depth, heads, window, mlp_ratio, shifts=True):
        super().__init__()
        self.blocks = nn.ModuleList(SwinLayer(dim, heads, window, window // 2 if i % 2 and shifts else 0, mlp_ratio)
                                    for i in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The convolution closing an RSTB and the deep features: "1conv" (3x3) or "3conv" (3x3 to dim / 4, LeakyReLU 0.2,
    1x1, LeakyReLU, 3x3 back: the real-world models' lighter one)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2, True), nn.Conv2d(dim // 4, dim, 3, 1, 1))


class RSTB(nn.Module):
    """Residual Swin Transformer Block (SwinIR eq. 5-6): F_out = Conv(Swin layers(F_in)) + F_in."""

    def __init__(self, dim, depth, heads, window, mlp_ratio, resi_connection, shifts=True):
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, heads, window, mlp_ratio, shifts)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x):  # (batch, H, W, C)
        y = self.residual_group(x).permute(0, 3, 1, 2)
        return self.conv(y).permute(0, 2, 3, 1) + x


class PatchEmbed(nn.Module):
    """The authors' tokenizer at patch size 1: the map as tokens, with a LayerNorm where the file has one."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x):  # (batch, C, H, W) -> (batch, H, W, C)
        x = x.permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class SwinIR(nn.Module):
    """SwinIR (fig. 2). `depths` / `heads`: per RSTB; `upsampler`: "pixelshuffle", "pixelshuffledirect",
    "nearest+conv" or "" (same size out); `scale`: the network's upsampling (of the unshuffled map when
    `unshuffle` > 1); `img_size`: the training crop, which only decides whether the windows shrink to fit it."""

    def __init__(self, in_channels=3, out_channels=3, embed_dim=96, depths=(6, 6, 6, 6), heads=(6, 6, 6, 6),
                 window=8, mlp_ratio=2.0, upsampler="", scale=1, features=64, resi_connection="1conv",
                 img_range=1.0, patch_norm=True, img_size=64, unshuffle=1):
        super().__init__()
        shifts = img_size > window  # (the authors shrink the window to a training crop no larger, unshifted)
        window = min(window, img_size)
        self.window, self.upsampler, self.scale, self.unshuffle = window, upsampler, scale, unshuffle
        self.img_range = img_range
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_channels == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.conv_first = nn.Conv2d(in_channels * unshuffle ** 2, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.layers = nn.ModuleList(RSTB(embed_dim, d, h, window, mlp_ratio, resi_connection, shifts)
                                    for d, h in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        def before_upsample():
            return nn.Sequential(nn.Conv2d(embed_dim, features, 3, 1, 1), nn.LeakyReLU(inplace=True))

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = before_upsample()
            self.upsample = pixelshuffle_upsample(features, scale)
            self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, scale ** 2 * out_channels, 3, 1, 1),
                                          nn.PixelShuffle(scale))
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = before_upsample()
            for i in range(1, int(math.log2(scale)) + 1):
                setattr(self, f"conv_up{i}", nn.Conv2d(features, features, 3, 1, 1))
            self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
            self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_channels, 3, 1, 1)

    @property
    def picture_scale(self) -> int:
        """How much larger the pictures come out (the network's scale over its pixel unshuffle)."""
        return self.scale // self.unshuffle if self.upsampler else 1

    def deep_features(self, x: torch.Tensor) -> torch.Tensor:
        """eq. 2-3: the RSTBs over the shallow features, a LayerNorm, a convolution, the long skip."""
        y = self.patch_embed(x)
        for layer in self.layers:
            y = layer(y)
        return self.conv_after_body(self.norm(y).permute(0, 3, 1, 2)) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = self.window * self.unshuffle
        pad_h, pad_w = -h % multiple, -w % multiple
        if pad_h or pad_w:  # (reflection, as the authors' check_image_size)
            x = F.pad(x, (0, pad_w, 0, pad_h), "reflect")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        first = self.conv_first(x)
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(self.deep_features(first))))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(self.deep_features(first))
        elif self.upsampler == "nearest+conv":
            y = self.conv_before_upsample(self.deep_features(first))
            for i in range(1, int(math.log2(self.scale)) + 1):
                y = F.leaky_relu(getattr(self, f"conv_up{i}")(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        else:
            out = x + self.conv_last(self.deep_features(first))
        s = self.picture_scale
        return (out / self.img_range + mean)[..., :h * s, :w * s]
