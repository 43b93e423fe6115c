"""SDXL's refiner: a second denoiser for the last, low-noise steps of one run (Podell et al. 2023, sec. 2.5).

SDXL trains a refinement model on the first 200 (discrete) noise levels only, and samples with it where the base
model leaves off: an ensemble of expert denoisers (Balaji et al. 2022, eDiff-I) over one sampling run. The refiner
has its own text encoder (the OpenCLIP ViT-bigG tower alone, 1280 wide) and conditioning (size codes ending with
an aesthetic score: `TextToImagePipeline.size_conditioning`).

`Handoff` is that run's model: the base for the steps i of n with i / n < switch, the refiner from there on, as
AUTOMATIC1111's "Refiner, switch at" (default 0.8) swaps the model under the sampler: the sampler's state (a
multistep method's history) carries over. diffusers runs the two as two pipelines, the base to `denoising_end`
and the refiner from `denoising_start` on the base's latents; with a one-step sampler (Euler, DDIM) and a switch
where both rules cut at the same step, the two give the same image (tests/test_refiner.py). diffusers cuts at a
timestep, (1 - switch) x 1000, and A1111 at a fraction of the steps, which differ on a schedule that is not
uniform in t (Karras); imagine follows A1111.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PREFIX = "refiner_"  # the refiner's conditioning travels in the run's cond dicts under these keys
SWITCH = 0.8  # AUTOMATIC1111's default "switch at"


def check_switch(switch) -> float:
    """The fraction of the steps after which the refiner takes over: in (0, 1)."""
    try:
        value = float(switch)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(switch, bool) or not 0 < value < 1:
        raise ValueError(f"refiner_switch must be a number in (0, 1), the fraction of the steps the base model runs "
                         f"(AUTOMATIC1111's 'switch at', default {SWITCH}); got {switch!r}")
    return value


def with_refiner(cond, refiner_cond):
    """One conditioning for the run: the base's keys, and the refiner's under PREFIX (either may change with the
    step: a StepConditioning, imagine.guidance)."""
    from imagine.guidance import StepConditioning, cond_at

    if cond is None:
        return None
    if isinstance(cond, StepConditioning) or isinstance(refiner_cond, StepConditioning):
        return StepConditioning(lambda i: with_refiner(cond_at(cond, i), cond_at(refiner_cond, i)))
    return {**cond, **{PREFIX + k: v for k, v in (refiner_cond or {}).items()}}


class Handoff(nn.Module):
    """`first` for the steps i of n with i / n < `switch`, `second` from there on, each with its own conditioning
    (the keys under PREFIX are the second's). The sampler's denoiser tells the step through `at_step`, as it tells
    ControlNets; a model inside that follows the step (ControlNets) is told too."""

    takes_guidance_half = True

    def __init__(self, first, second, switch: float):
        super().__init__()
        self.first, self.second, self.switch = first, second, check_switch(switch)
        self.shares_guidance_batch = all(bool(getattr(m, "shares_guidance_batch", False)) for m in (first, second))
        self.config = getattr(first, "config", None)
        self.step: tuple[int, int] | None = None

    def at_step(self, i: int, n: int) -> None:
        self.step = (i, n)
        for m in (self.first, self.second):
            if hasattr(m, "at_step"):
                m.at_step(i, n)

    def refines(self) -> bool:
        """Whether the current step is the refiner's."""
        i, n = self.step or (0, 1)
        return i / n >= self.switch

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance_half: str | None = None, **cond) -> torch.Tensor:
        late = self.refines()
        model = self.second if late else self.first
        own = ({k[len(PREFIX):]: v for k, v in cond.items() if k.startswith(PREFIX)} if late
               else {k: v for k, v in cond.items() if not k.startswith(PREFIX)})
        if guidance_half is not None and getattr(model, "takes_guidance_half", False):
            own["guidance_half"] = guidance_half
        return model(x, t, **own)
