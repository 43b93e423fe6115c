"""SPAN (Wan et al. 2024, "Swift Parameter-free Attention Network for Efficient Super-Resolution"): a small, fast
upscaler (the community's "4x-ClearRealityV1", "2x-ModernSpanimationV1" and others are SPAN files).

The network (sec. 3, fig. 2): a convolution makes features; six Swift Parameter-free Attention Blocks (SPAB) follow,
each three convolutions with SiLU between, whose output H gates the block's input and itself with a parameter-free
attention, (H + x) * (sigmoid(H) - 0.5) (eq. 4-6: a symmetric activation, so the map is its own attention); a
convolution after the sixth; a 1x1 convolution over the concatenated features of the first convolution, of the last
block's end, of the first block and of the last block's first convolution; a convolution and a pixel shuffle make
the picture. Pictures go in with DIV2K's mean subtracted, times 255 (the files' "no_norm" buffer says they go in
as they are), and come out as they are.

Each convolution is trained as Conv3XC (sec. 3.2, structural re-parameterisation): a 1x1 widening by 2, a 3x3 and a 1x1
back, plus a 1x1 skip; for inference they collapse into one 3x3 convolution (`eval_conv`), since their composition
is linear: W = W3 . W2 . W1 (with W1 and W3 1x1) and the skip's 1x1 weight added to the 3x3's centre, the biases
carried through the same maps. The files carry all of them; the 3x3 is rebuilt from the branches once when a file is
loaded (`Conv3XC.fuse`), where the authors' code rebuilds it at every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMG_RANGE = 255.0


class Conv3XC(nn.Module):
    """The re-parameterisable 3x3 convolution: branches `conv` (1x1 -> 3x3 -> 1x1, widened by `gain`) and `sk` (1x1),
    run as `eval_conv`, their sum collapsed into one 3x3 (`fuse`)."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2):
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    @torch.no_grad()
    def fuse(self) -> None:
        """eval_conv := the branches as one 3x3: W[o, i] = sum_{m, n} W3[o, m] W2[m, n] W1[n, i] (+ the skip at the
        centre), b = W3 (sum_{n, taps} W2[., n] b1[n] + b2) + b3 (+ the skip's bias)."""
        c1, c2, c3 = self.conv
        w1, w3 = c1.weight[:, :, 0, 0], c3.weight[:, :, 0, 0]
        w = torch.einsum("om,mnyx,ni->oiyx", w3, c2.weight, w1)
        w[:, :, 1, 1] += self.sk.weight[:, :, 0, 0]
        b2 = c2.weight.sum((2, 3)) @ c1.bias + c2.bias
        self.eval_conv.weight.copy_(w)
        self.eval_conv.bias.copy_(w3 @ b2 + c3.bias + self.sk.bias)

    def forward(self, x):
        return self.eval_conv(x)


class SPAB(nn.Module):
    """A Swift Parameter-free Attention Block (eq. 4-6). Returns the block's output and its first convolution's
    output after the SiLU (the last block's is one of the concatenated features)."""

    def __init__(self, features: int):
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = (Conv3XC(features, features) for _ in range(3))

    def forward(self, x):
        first = F.silu(self.c1_r(x))
        h = self.c3_r(F.silu(self.c2_r(first)))
        return (h + x) * (torch.sigmoid(h) - 0.5), first


class SPAN(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 48, scale: int = 4,
                 norm: bool = True):
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        if not norm:  # (the files say so with this buffer)
            self.register_buffer("no_norm", torch.zeros(1))
        self.norm = norm
        self.conv_1 = Conv3XC(in_channels, features)
        for i in range(1, 7):
            setattr(self, f"block_{i}", SPAB(features))
        self.conv_cat = nn.Conv2d(4 * features, features, 1)
        self.conv_2 = Conv3XC(features, features)
        self.upsampler = nn.Sequential(nn.Conv2d(features, out_channels * scale ** 2, 3, padding=1),
                                       nn.PixelShuffle(scale))

    def fuse(self) -> None:
        for m in self.modules():
            if isinstance(m, Conv3XC):
                m.fuse()

    def forward(self, x):
        if self.norm:
            x = (x - self.mean.to(x.dtype)) * IMG_RANGE
        feature = self.conv_1(x)
        b1, _ = self.block_1(feature)
        y = b1
        for i in range(2, 6):
            y, _ = getattr(self, f"block_{i}")(y)
        b6, first6 = self.block_6(y)
        return self.upsampler(self.conv_cat(torch.cat([feature, self.conv_2(b6), b1, first6], 1)))
