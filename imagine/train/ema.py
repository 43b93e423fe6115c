"""Exponential moving average of the weights (used for sampling, as in DDPM and LDM).

The decay warms up as diffusers' EMAModel's (its default, use_ema_warmup false): 0 at the first
update (the average starts as the weights after the first step, not the random initialisation),
then min(decay, (1 + n) / (10 + n)) after n updates (the schedule of Tensorflow's
ExponentialMovingAverage with num_updates, which LDM's LitEma uses too). Without the warm-up the
decay is `decay` from the first update.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        if not self.warmup:
            return self.decay
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            if d == 0.0:
                ema_params[name].copy_(p.detach())
            else:
                ema_params[name].lerp_(p.detach().to(ema_params[name].device, ema_params[name].dtype), 1.0 - d)
        ema_bufs = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_bufs[name].copy_(b)
