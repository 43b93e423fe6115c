"""SDXL's refiner: a second denoiser for the last, low-noise steps of one run (Podell et al. 2023, sec. 2.5).

SDXL trains a refinement model on the first 200 (discrete) noise levels only, and samples with it where the base
model leaves off: an ensemble of expert denoisers (Balaji et al. 2022, eDiff-I) over one sampling run. The refiner
has its own text encoder (the OpenCLIP ViT-bigG tower alone, 1280 wide) and conditioning (size codes ending with
an aesthetic score: `TextToImagePipeline.size_conditioning`).

`Handoff` is that run's model: the base while the noise is high, the refiner once the step's timestep t has come
down to where (999 - t) / 1000 >= switch (t <= 199 for the default 0.8): AUTOMATIC1111's rule for its "Refiner,
switch at" (its default since 1.7). Where the model's timestep is fractional (Euler and the other Karras-style
samplers over Karras, exponential or Beta levels; UniPC's continuous time) t is read by the rule of the run
(`HANDOFF_RULES`, which `imagine.sampling.sample` tells the handoff through `at_run`):
- "a1111", A1111's k-diffusion samplers: the discrete level nearest the step's in sigma (its argmin over the model's
  sigma table, held as A1111 holds it; without the run's schedule, t rounded: nearest in log sigma, which differs
  within about 5e-4 of a timestep of the midpoint);
- "a1111_timesteps", its CompVis samplers (DDIM, PLMS, UniPC), whose model wrapper has no sigma table: t truncated
  (int(t): UniPC's t = 199.8 at 20 steps is the refiner's at 0.8);
- "diffusers": the refiner from the first t < round(T - switch x T) (its base runs the timesteps at or above that
  cutoff, `denoising_end`, its refiner the rest, `denoising_start`: Euler Karras at 40 steps has t = 199.515, the
  refiner's).
For whole timesteps and a switch in thousandths the three agree. A1111 swaps the model under the sampler, so the
sampler's state (a multistep method's history) carries over, as here; diffusers runs two pipelines, the base to
`denoising_end` and the refiner from `denoising_start` on the base's latents, which with a one-step sampler (Euler,
DDIM) is the same run (tests/test_refiner.py, tests/test_sampling_review_s28.py).
Image to image and short runs still reach the refiner where a step's level is past the switch (a plan's last
steps are at low noise; but 1 step of trailing spacing is t = 999 alone, the base's). Once it has taken
over it stays, as A1111's swapped weights stay: a Restart sampler's jumps back up to higher noise run the refiner.

A1111's "Refiner switch by sampling steps" (`refiner_switch_by_sample_steps`, its rule before 1.8.0 and its
infotext reader's for older pictures) hands over by the count of model calls instead: at the call k of the run
(from 0) where k / N >= switch, N the run's steps as its sampler counts them (twice the steps for a sampler of two
calls a step, Heun, DPM2, DPM++ SDE, Restart; `sampling.Denoiser.counted_steps`), told through `at_call`.
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "refiner_"  # the refiner's conditioning travels in the run's cond dicts under these keys
SWITCH = 0.8  # AUTOMATIC1111's default "switch at"


def check_switch(switch) -> float:
    """The fraction of the noise levels (of 1000) after which the refiner takes over: in (0, 1] (1: never)."""
    try:
        value = float(switch)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(switch, bool) or not 0 < value <= 1:
        raise ValueError(f"refiner_switch must be a number in (0, 1], where the refiner takes over: the fraction of "
                         f"the noise levels done (AUTOMATIC1111's 'switch at', default {SWITCH}); got {switch!r}")
    return value


HANDOFF_RULES = ("a1111", "a1111_timesteps", "diffusers")  # how a fractional timestep is read: see the module doc


def check_rule(rule) -> str:
    if rule not in HANDOFF_RULES:
        raise ValueError(f"the refiner's handoff rule must be one of {', '.join(map(repr, HANDOFF_RULES))}; got "
                         f"{rule!r}")
    return rule


def refines(t: torch.Tensor, switch: float, rule: str = "a1111", num_train_timesteps: int = 1000,
            nearest=None) -> bool:
    """Whether the refiner denoises at timestep t (the largest of the batch's, as A1111 takes it): AUTOMATIC1111's
    rule, (999 - L) / 1000 >= switch with L the discrete level of t, the nearest ("a1111", its k-diffusion samplers:
    `nearest(t)`, else t rounded) or t truncated ("a1111_timesteps", its CompVis samplers); or diffusers' cutoff
    ("diffusers"): t < round(T - switch x T), T the model's training timesteps."""
    top = float(t.max())
    if check_rule(rule) == "diffusers":
        return top < int(round(num_train_timesteps - switch * num_train_timesteps))
    level = int(top) if rule == "a1111_timesteps" else int(round(top)) if nearest is None else int(nearest(top))
    return (999 - level) / 1000 >= switch


def nearest_level(schedule):
    """t -> the discrete level whose sigma is nearest t's (AUTOMATIC1111's apply_refiner: argmin |sigmas - sigma| over
    its model wrapper's table, float32 as k-diffusion holds it), for a NoiseSchedule."""
    table = torch.from_numpy(schedule._sigma_table(held=True))

    def nearest(t: float) -> int:
        return int(torch.argmin((table - float(schedule.t_to_sigma(t))).abs()))

    return nearest


def with_refiner(cond, refiner_cond):
    """One conditioning for the run: the base's keys, and the refiner's under PREFIX (either may change with the
    step: a StepConditioning, imagine.guidance)."""
    from imagine.composable import ComposedConditioning
    from imagine.guidance import StepConditioning, cond_at

    if cond is None:
        return None
    if isinstance(cond, ComposedConditioning):  # (the refiner's reads the same parts)
        return ComposedConditioning([with_refiner(c, r) for c, r in zip(cond.parts, refiner_cond.parts)], cond.weights)
    if isinstance(cond, StepConditioning) or isinstance(refiner_cond, StepConditioning):
        return StepConditioning(lambda i: with_refiner(cond_at(cond, i), cond_at(refiner_cond, i)))
    return {**cond, **{PREFIX + k: v for k, v in (refiner_cond or {}).items()}}


class Handoff(nn.Module):
    """`first` while the timestep is high, `second` from where `refines(t, switch, rule)`, or with `by_steps` from
    the model call k of N where k / N >= switch (each with its own conditioning: the keys under PREFIX are the
    second's); once the second has run it runs to the end of the run. A model inside that follows the step
    (ControlNets) is told it through `at_step`, as the sampler's denoiser tells it. `used`: whether the second ran
    (in the last run). `rule` (HANDOFF_RULES): how a fractional timestep is read; None: as the sampler's run says
    (`at_run`), else "a1111"."""

    takes_guidance_half = True

    def __init__(self, first, second, switch: float, by_steps: bool = False, rule: str | None = None):
        super().__init__()
        self.first, self.second, self.switch = first, second, check_switch(switch)
        self.shares_guidance_batch = all(bool(getattr(m, "shares_guidance_batch", False)) for m in (first, second))
        self.config = getattr(first, "config", None)
        self.by_steps, self.call = bool(by_steps), None
        self.rule = None if rule is None else check_rule(rule)
        self._run_rule, self._timesteps, self._nearest = "a1111", 1000, None
        self.used = False

    def at_run(self, rule: str = "a1111", num_train_timesteps: int = 1000, schedule=None) -> None:
        """A sampler's run begins (imagine.sampling.sample tells it, before the first model call): the rule it hands
        over by where the handoff was given none, its model's training timesteps and noise schedule (for "a1111":
        the level nearest in sigma, `nearest_level`), and a fresh start: the first model again until the switch,
        whatever an earlier run with this handoff did."""
        self._run_rule, self._timesteps = check_rule(rule), int(num_train_timesteps)
        self._nearest = None if schedule is None else nearest_level(schedule)
        self.used, self.call = False, None

    def at_step(self, i: int, n: int) -> None:
        for m in (self.first, self.second):
            if hasattr(m, "at_step"):
                m.at_step(i, n)

    def at_call(self, k: int, n: int, i: int, steps: int) -> None:
        """The sampler's denoiser: this is model call k (from 0) of a run of n steps as A1111 counts them (its
        total_steps), within step i of its `steps` (its state.sampling_steps); passed on to the models inside."""
        self.call = (k, n)
        for m in (self.first, self.second):
            if hasattr(m, "at_call"):
                m.at_call(k, n, i, steps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance_half: str | None = None, **cond) -> torch.Tensor:
        if self.by_steps and self.call is None:
            raise RuntimeError("a refiner switched by sampling steps needs the sampler's count of model calls "
                               "(imagine.sampling.Denoiser tells it through at_call)")
        late = self.used or (self.call[0] / self.call[1] >= self.switch if self.by_steps
                             else refines(t, self.switch, self.rule or self._run_rule, self._timesteps,
                                          self._nearest))
        self.used |= late
        model = self.second if late else self.first
        own = ({k[len(PREFIX):]: v for k, v in cond.items() if k.startswith(PREFIX)} if late
               else {k: v for k, v in cond.items() if not k.startswith(PREFIX)})
        if guidance_half is not None and getattr(model, "takes_guidance_half", False):
            own["guidance_half"] = guidance_half
        return model(x, t, **own)
