"""RealPLKSR (Lee et al. 2024, "Partial Large Kernel CNNs for Efficient Super-Resolution", sec. 3, in the form the
community trains for real-world pictures: "4xNomosWebPhoto_RealPLKSR", "4x-PBRify_RPLKSRd" and others).

The network: a 3x3 convolution makes features; n blocks each mix channels with a doubled convolutional channel mixer
(3x3 to 2 dim, Mish, 3x3 back: DCCM), convolve the first quarter of the channels with one large kernel (17x17 or so:
the partial large kernel, PLK, sec. 3.2), gate the features by a sigmoid of a 3x3 convolution of them (element-wise
attention, EA), refine with a 1x1 convolution and normalise (GroupNorm of 4 groups, or a channel LayerNorm before the
mixer in the "layer_norm" variant), plus the block's input; a 3x3 convolution makes out * s^2 channels, to which the
input is added repeated s^2 times channel by channel (the nearest-neighbour picture, so the net learns the residual),
and a pixel shuffle lays them out s times larger. Pictures go in and come out in [0, 1] as they are.

Parameter names are the community's (neosr / spandrel: `feats.N...`). Files with DySample's learned upsampler
(`to_img.init_pos`) are not read here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (batch, C, H, W) map, eps 1e-6 (RealPLKSR's "layer_norm" variant)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - mean) / torch.sqrt(var + self.eps) + self.bias[:, None, None]


class PartialLargeKernel(nn.Module):
    """The large-kernel convolution over the first `channels` channels only; the rest pass as they are."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, kernel, 1, kernel // 2)

    def forward(self, x):
        return torch.cat([self.conv(x[:, :self.channels]), x[:, self.channels:]], 1)


class ElementwiseAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.f(x)


class PLKBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, split_ratio: float, attention: bool, layer_norm: bool, groups: int = 4):
        super().__init__()
        self.layer_norm = ChannelLayerNorm(dim) if layer_norm else nn.Identity()
        self.channel_mixer = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 1, 1), nn.Mish(),
                                           nn.Conv2d(2 * dim, dim, 3, 1, 1))
        self.lk = PartialLargeKernel(int(dim * split_ratio), kernel)
        self.attn = ElementwiseAttention(dim) if attention else nn.Identity()
        self.refine = nn.Conv2d(dim, dim, 1)
        self.norm = nn.Identity() if layer_norm else nn.GroupNorm(groups, dim)

    def forward(self, x):
        y = self.lk(self.channel_mixer(self.layer_norm(x)))
        return self.norm(self.refine(self.attn(y))) + x


class RealPLKSR(nn.Module):
    def __init__(self, dim: int = 64, blocks: int = 28, scale: int = 4, kernel: int = 17, split_ratio: float = 0.25,
                 attention: bool = True, layer_norm: bool = False):
        super().__init__()
        self.scale = scale
        self.feats = nn.Sequential(nn.Conv2d(3, dim, 3, 1, 1),
                                   *[PLKBlock(dim, kernel, split_ratio, attention, layer_norm) for _ in range(blocks)],
                                   nn.Identity(),  # (a Dropout2d in training: its place in the names kept)
                                   nn.Conv2d(dim, 3 * scale ** 2, 3, 1, 1))

    def forward(self, x):
        return F.pixel_shuffle(self.feats(x) + x.repeat_interleave(self.scale ** 2, 1), self.scale)
