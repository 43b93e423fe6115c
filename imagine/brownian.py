"""Brownian-tree noise for the SDE samplers: each sample's noise is one Brownian path W(sigma) over the noise levels.

A stochastic solver of the reverse SDE adds sigma-scaled increments of a Wiener process. Drawing each step's noise
fresh is one valid discretization; drawing them as increments of one fixed path W, z = (W(sigma_next) - W(sigma)) /
sqrt(|sigma_next - sigma|), is another with two properties the first lacks: the increments a step takes inside itself
(DPM++ SDE's midpoint and full step both start at sigma) are correlated exactly as Brownian motion says, and a run with
more steps samples the same path more finely, so its image converges as the steps grow (the solution of the SDE for
that path) instead of changing with every step count.

The path is a virtual Brownian tree (Li et al. 2020, "Scalable gradients for stochastic differential equations",
sec. 4; the Brownian interval of Kidger et al. 2021): W at a query time is found by bisecting [sigma_min, sigma_max]
with Brownian-bridge draws whose seeds derive from the tree's seed, so no path is stored and the same seed gives the
same W at any query order. torchsde's `BrownianTree` is that tree; k-diffusion's `BrownianTreeNoiseSampler`, which
AUTOMATIC1111 ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"), ComfyUI and diffusers' DPMSolverSDEScheduler use, makes
the tree over the run's positive noise levels (float32, on the CPU); A1111 gives it the images' seeds, one tree per
image (ComfyUI, and diffusers unless given a list, one seed and one tree for the batch: the same at batch 1). This
module builds A1111's trees: for the same seeds and noise levels, the noise it draws on a CPU, at any batch size.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Sequence

import torch


def _f32(value: float) -> float:
    # the peers hold sigma in float32 tensors; the tree reads its times as Python floats of those
    return float(torch.tensor(float(value), dtype=torch.float32))


class BrownianTreeNoise:
    """One Brownian path per sample over [sigma_min, sigma_max]; `noise(sigma, sigma_next)` is the batch's normalized
    increment (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) [B, *shape], standard normal for each step.

    seeds: one int per sample (A1111 seeds each image's tree with the image's seed). shape: one sample's shape.
    rng: "cpu" (torchsde's draws, torch's CPU generator) or "nv": the tree's draws made as an NVIDIA GPU makes them
    (imagine.philox), as A1111 draws them under its "NV" source (it routes torchsde's draws through its own)."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], sigma_min: float, sigma_max: float,
                 rng: str = "cpu"):
        try:
            import torchsde
        except ImportError as e:  # a dependency of imagine; this names it if an install left it out
            raise ImportError("the Brownian-tree noise of the SDE samplers needs torchsde (pip install torchsde), or "
                              "sampler option sde_noise='independent' (a fresh normal draw per step)") from e
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("BrownianTreeNoise needs one seed per sample; got none")
        lo, hi = _f32(sigma_min), _f32(sigma_max)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"a Brownian tree spans 0 < sigma_min < sigma_max < inf; got {sigma_min}, {sigma_max}")
        if rng not in ("cpu", "nv"):
            raise ValueError(f"a Brownian tree's rng is 'cpu' or 'nv'; got {rng!r}")
        self.sigma_min, self.sigma_max, self.rng = lo, hi, rng
        w0 = torch.zeros(tuple(shape), dtype=torch.float32)
        with _tree_draws(rng):
            self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = _f32(sigma), _f32(sigma_next)
        if a == b:
            raise ValueError(f"a Brownian increment needs two different noise levels; got {sigma!r} and "
                             f"{sigma_next!r}, which are one level in float32 (the peers' precision)")
        lo, hi = min(a, b), max(a, b)
        # (a level the float32 rounding of a log/exp round trip moved past an end by an ulp or two)
        if lo < self.sigma_min * (1 - 1e-6) or hi > self.sigma_max * (1 + 1e-6):
            raise ValueError(f"noise levels {sigma:g} -> {sigma_next:g} fall outside the Brownian tree's range "
                             f"[{self.sigma_min:g}, {self.sigma_max:g}]")
        sign = 1.0 if b > a else -1.0  # W(b) - W(a) from the tree's W(hi) - W(lo)
        # (a level an ulp outside is read at the end, as torchsde clamps it; the scale below keeps the asked levels')
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to 6 decimals (its tol) and warns that a query at an end lies outside
            # them, then clamps it: k-diffusion's trees, A1111's, do the same, so that is their increment too
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            with _tree_draws(self.rng):
                w = torch.stack([tree(max(lo, self.sigma_min), min(hi, self.sigma_max)) for tree in self.trees])
        # (the scale in float32, as k-diffusion divides by its float32 tensors' sqrt)
        return w * (sign / float(torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)) ** 0.5)


_source = threading.local()  # the rng the trees being built or queried on this thread draw with


@contextlib.contextmanager
def _tree_draws(rng: str):
    """torchsde draws every tree node with its module's `_randn(size, dtype, device, seed)`, a CPU generator seeded
    so; under "nv" those draws are Philox's (A1111 replaces that function with its own randn_local for the same
    reason). The replacement is put in once and reads this thread's rng, so other trees keep torchsde's draws."""
    if rng == "cpu":
        yield
        return
    import torchsde._brownian.brownian_interval as interval

    if not getattr(interval._randn, "_imagine_rng", False):
        own = interval._randn

        def _randn(size, dtype, device, seed):
            if getattr(_source, "rng", "cpu") == "nv":
                from imagine.philox import PhiloxGenerator

                return PhiloxGenerator(int(seed)).randn(size).to(device=device, dtype=dtype)
            return own(size, dtype, device, seed)

        _randn._imagine_rng = True
        interval._randn = _randn
    before, _source.rng = getattr(_source, "rng", "cpu"), rng
    try:
        yield
    finally:
        _source.rng = before


def tree_seeds(batch: int, seeds=None, generators=None) -> list[int]:
    """The seeds of a batch's Brownian trees: the samples' own seeds (an int s for s, s+1, ..., as
    sampling.make_generators reads it), or else one draw in [0, 2^63 - 1) from each sample's generator (a single
    generator draws them all; None: torch's global generator), the range k-diffusion draws an unseeded tree's from."""
    if seeds is not None:
        out = [seeds + i for i in range(batch)] if isinstance(seeds, int) else list(seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in out):
            raise TypeError(f"tree seeds must be ints; got {seeds!r}")
        if len(out) != batch:
            raise ValueError(f"{len(out)} tree seeds for a batch of {batch}: give one per sample")
        return out
    gens = generators if isinstance(generators, (list, tuple)) else [generators] * batch
    return [int(torch.randint(0, 2**63 - 1, (), generator=g, device=g.device if g is not None else None))
            for g in gens]
