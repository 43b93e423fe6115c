"""Image super-resolution networks that people keep as "upscalers": ESRGAN's RRDBNet and Real-ESRGAN's compact VGG net.

RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks", sec. 3.1, fig. 4):
a first convolution, a trunk of Residual-in-Residual Dense Blocks (RRDB) with a convolution after it and a skip
around the whole trunk, then nearest-neighbour upsampling by 2 followed by a convolution (and LeakyReLU 0.2) per
factor of 2, and two convolutions on the large features. An RRDB holds three dense blocks of five convolutions each
(every convolution reads all the block's earlier features; growth channels gc = 32), and both the dense blocks and the
RRDB scale their residual by beta = 0.2 before adding it (sec. 3.1, "residual scaling"). Real-ESRGAN (Wang et al.
2021, sec. 3.3) keeps the network and, for its x2 and x1 models, first folds the picture into channels with a pixel
unshuffle (so the x2 model is an x4 network on a quarter-size, 12-channel input). ESRGAN+ (Rakotonirina and
Rasoanaivo 2020) adds a 1x1 convolution from a dense block's input to its second layer and a skip from the second to
the fourth.

SRVGGNetCompact (Real-ESRGAN's "realesr-general-x4v3" and "realesr-animevideov3"): convolutions with PReLU at the
low resolution only, the last one making out * s^2 channels that a pixel shuffle lays out at s times the size, added
to the input upsampled by nearest neighbour (the network learns the residual).

The parameter names are those of Real-ESRGAN's (BasicSR's) RRDBNet and SRVGGNetCompact, so their files load as they
are; the older layouts (ESRGAN's "model.N" sequence, BSRGAN's "RRDB_trunk") are renamed to these in
`imagine.upscalers.esrgan_state`. Inputs and outputs are pictures in [0, 1], (batch, channels, height, width).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BETA = 0.2  # the residual scaling of the dense blocks and of the RRDB (ESRGAN sec. 3.1)
LEAKY_SLOPE = 0.2


class DenseBlock(nn.Module):
    """A residual dense block of five 3x3 convolutions (ESRGAN fig. 4): convolution k reads the block's input and the
    k - 1 outputs before it, concatenated; the fifth makes the block's residual, scaled by BETA. `plus`: ESRGAN+'s
    extra paths (a 1x1 convolution from the input to the second output, the second output added to the fourth)."""

    def __init__(self, features: int, growth: int = 32, plus: bool = False):
        super().__init__()
        self.conv1x1 = nn.Conv2d(features, growth, 1, bias=False) if plus else None
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(features + (i - 1) * growth, growth, 3, 1, 1))
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, LEAKY_SLOPE)  # noqa: E731
        x1 = act(self.conv1(x))
        x2 = act(self.conv2(torch.cat((x, x1), 1)))
        if self.conv1x1 is not None:
            x2 = x2 + self.conv1x1(x)
        x3 = act(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = act(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        if self.conv1x1 is not None:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * BETA + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, their result scaled by BETA and added to the input."""

    def __init__(self, features: int, growth: int = 32, plus: bool = False):
        super().__init__()
        self.rdb1 = DenseBlock(features, growth, plus)
        self.rdb2 = DenseBlock(features, growth, plus)
        self.rdb3 = DenseBlock(features, growth, plus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * BETA + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. `scale`: the network's own upsampling, a power of 2 (one nearest x2 + convolution each);
    `unshuffle`: Real-ESRGAN's pixel-unshuffle factor (2 or 4, else None), which folds the picture into
    in_channels * unshuffle^2 channels first, so the picture grows by scale / unshuffle."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, blocks: int = 23,
                 growth: int = 32, scale: int = 4, plus: bool = False, unshuffle: int | None = None):
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"RRDBNet's upsampling must be a power of 2 (x2 steps); got {scale}")
        self.scale, self.unshuffle = scale, unshuffle
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "features": features,
                       "blocks": blocks, "growth": growth, "scale": scale, "plus": plus, "unshuffle": unshuffle}
        self.conv_first = nn.Conv2d(in_channels * (unshuffle or 1) ** 2, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth, plus) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for i in range(1, int(math.log2(scale)) + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(features, features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    @property
    def picture_scale(self) -> int:
        return self.scale // (self.unshuffle or 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle:  # (sizes a multiple of the factor: `imagine.upscalers.UpscaleModel` pads them)
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))  # (the skip around the whole trunk)
        for i in range(1, int(math.log2(self.scale)) + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))


class CompactSRNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: `convs` 3x3 convolutions of `features` channels with PReLU after each (and
    after the first), a last convolution to out * scale^2 channels, a pixel shuffle, plus the input upsampled by
    nearest neighbour. `body` holds them in order (convolution, PReLU, ..., convolution) as its files name them."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, convs: int = 16,
                 scale: int = 4):
        super().__init__()
        self.scale = self.picture_scale = scale
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "features": features,
                       "convs": convs, "scale": scale}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")
