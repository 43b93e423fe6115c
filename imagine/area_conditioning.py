"""Area and mask conditioning, as ComfyUI composes a side of the guidance (its samplers.calc_cond_batch).

A side (the prompt's, or the negative's) is a list of conditionings, each with its own text encoding, predicting over
an area of the latents (the sample cropped to it; its edges feathered over 8 cells wherever they lie inside the
picture), under a mask, at a strength, and only between two noise levels. The side's prediction is the weighted
average of its entries' per cell,

    o(x) = sum_k w_k o_k(x_k) / sum_k w_k,     w_k = strength_k mask_k feather_k  (0 outside entry k's area),

a cell no entry covers giving 0 (ComfyUI's count starts at 1e-37). Averaging the networks' outputs (eps or v) is
averaging their x_0, which ComfyUI averages: x_0 is linear in the output at a given x. This is the fusion of
MultiDiffusion (Bar-Tal et al. 2023, eq. 5: overlapping predictions averaged per pixel) with ComfyUI's weights; it is
what its ConditioningCombine, ConditioningSetArea(Percentage, Strength), ConditioningSetMask and
ConditioningSetTimestepRange build, and `imagine.guidance.guided_model_output` runs it when the conditioning is an
`AreaConditioning`. Before the first call the areas and masks are resolved to the latents' size
(`AreaConditioning.resolve`) and, as ComfyUI's process_conds does, each side gets for every area entry of the other
side that it has no entry of the same area for a copy of that entry with its own smallest covering text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

FEATHER = 8  # cells over which an area's inner edges fade in (ComfyUI's rr)


@dataclass
class AreaEntry:
    """One conditioning of a side: `cond` the model's keyword tensors (the text's encodings) for the batch; `area`
    (h, w, y, x) in latent cells, or ("percentage", h, w, y, x) as fractions of the latents' size; `mask` [1 or B, H,
    W] at any size (resized bilinearly to the latents'), times `mask_strength`; `bounds`: the area set to the mask's
    bounding box (at least 8 cells a side); `levels` (high, low): the noise levels sigma between which it acts."""

    cond: dict
    area: tuple | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0
    bounds: bool = False
    levels: tuple[float, float] | None = None


@dataclass
class AreaConditioning:
    """A side of the guidance as a list of `AreaEntry`. The sampler's denoiser tells it each call's noise level
    (`at_level`), which the entries' `levels` are read against."""

    entries: list[AreaEntry]
    sigma: float | None = None
    _resolved: list[AreaEntry] | None = field(default=None, repr=False)

    def at_level(self, sigma: float) -> None:
        self.sigma = sigma

    def resolve(self, shape: tuple[int, int], other: "AreaConditioning | None") -> list[AreaEntry]:
        """The entries with areas in cells and masks at the latents' size `shape` (h, w), completed against the
        other side's (ComfyUI's resolve_areas_and_cond_masks_multidim and create_cond_with_same_area_if_none);
        computed once a run."""
        if self._resolved is None:
            mine = [_resolved(e, shape) for e in self.entries]
            theirs = [] if other is None else [_resolved(e, shape) for e in other.entries]
            for e in theirs:
                _same_area(mine, e)
            self._resolved = mine
        return self._resolved


def _resolved(e: AreaEntry, shape: tuple[int, int]) -> AreaEntry:
    h, w = shape
    area = e.area
    if area is not None and area[0] == "percentage":
        ah, aw, ay, ax = area[1:]
        area = (max(1, round(ah * h)), max(1, round(aw * w)), round(ay * h), round(ax * w))
    mask = e.mask
    if mask is not None:
        mask = mask.float()
        if mask.ndim == 2:
            mask = mask[None]
        if tuple(mask.shape[1:]) != (h, w):
            mask = torch.nn.functional.interpolate(mask[:, None], size=(h, w), mode="bilinear",
                                                   align_corners=False)[:, 0]
        if e.bounds:  # (its set_area_to_bounds: the box of the mask's nonzero cells, at least 8 a side)
            nonzero = torch.nonzero(mask.abs().amax(dim=0))
            if len(nonzero) == 0:
                area = (8, 8, 0, 0)
            else:
                (y0, x0), (y1, x1) = nonzero.min(dim=0).values.tolist(), nonzero.max(dim=0).values.tolist()
                area = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
    return replace(e, area=None if area is None else tuple(int(v) for v in area), mask=mask)


def _same_area(conds: list[AreaEntry], c: AreaEntry) -> None:
    """ComfyUI's create_cond_with_same_area_if_none: where `c` has an area that no entry of `conds` has, a copy of
    c with the text of the smallest entry of `conds` covering it (one with no area covers everything) is added."""
    if c.area is None:
        return

    def inside(a, b):  # a within b
        return a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3] and a[2] >= b[2] and a[3] >= b[3]

    smallest = None
    for x in conds:
        if x.area is not None:
            if inside(c.area, x.area) and (smallest is None or smallest.area is None
                                           or math.prod(smallest.area[:2]) > math.prod(x.area[:2])):
                smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or smallest.area == c.area:
        return
    conds.append(replace(c, cond=smallest.cond))


def _weights(e: AreaEntry, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """Entry e's crop of x and its weights there (ComfyUI's get_area_and_mult)."""
    area, h, w = e.area, x.shape[2], x.shape[3]
    crop = x if area is None else x[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
    if e.mask is not None:
        m = e.mask.to(x)
        if area is not None:
            m = m[:, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
        m = (m * e.mask_strength)[:, None]
        mult = m.repeat(crop.shape[0] // m.shape[0], crop.shape[1], 1, 1) * e.strength
    else:
        mult = torch.ones_like(crop) * e.strength
    # (the inner edges fade in over 8 cells: the first rows after an offset, the last before an end)
    if area is not None:
        ramp = torch.arange(1, FEATHER + 1, dtype=mult.dtype, device=mult.device) / FEATHER
        for dim, (size, start, full) in ((2, (area[0], area[2], h)), (3, (area[1], area[3], w))):
            if (start != 0 or size + start < full) and mult.shape[dim] < FEATHER:
                raise ValueError(f"an area {mult.shape[dim]} cells across with an edge inside the picture: its edges "
                                 f"fade in over {FEATHER} cells (ComfyUI fails on it too); make it at least "
                                 f"{FEATHER} cells ({FEATHER * 8} pixels at SD's factor) or let it reach the border")
            if start != 0:
                mult.narrow(dim, 0, FEATHER).mul_(ramp.view([-1 if d == dim else 1 for d in range(4)]))
            if size + start < full:
                mult.narrow(dim, size - FEATHER, FEATHER).mul_(ramp.flip(0).view([-1 if d == dim else 1
                                                                                 for d in range(4)]))
    return crop, mult


def side_output(model, x: torch.Tensor, t: torch.Tensor, side: AreaConditioning,
                other: AreaConditioning | None) -> torch.Tensor:
    """The side's prediction at (x, t): its entries' outputs averaged per cell by their weights."""
    out = torch.zeros_like(x)
    count = torch.full_like(x, 1e-37)
    sigma = side.sigma
    for e in side.resolve(tuple(x.shape[2:]), other):
        if e.levels is not None and sigma is not None and not e.levels[1] <= sigma <= e.levels[0]:
            continue  # (its timestep_start / timestep_end)
        crop, mult = _weights(e, x)
        o = model(crop, t, **e.cond)[:, : x.shape[1]]
        if e.area is None:
            out += o * mult
            count += mult
        else:
            a = e.area
            out[:, :, a[2]:a[2] + a[0], a[3]:a[3] + a[1]] += o * mult
            count[:, :, a[2]:a[2] + a[0], a[3]:a[3] + a[1]] += mult
    return out / count


def check_entries(side: AreaConditioning, batch: int, name: str) -> None:
    from imagine.guidance import check_cond

    for e in side.entries:
        check_cond(e.cond, batch, name)
        if e.area is not None and e.area[0] != "percentage" and any(v < 0 for v in e.area):
            raise ValueError(f"{name}: an area's size and place must be >= 0; got {e.area}")
