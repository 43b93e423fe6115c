"""imagine.area_conditioning on a model whose output is known in closed form: a side's prediction is its entries'
per-cell weighted average, an area's inner edges fade in over 8 cells, a cell no entry covers is 0, and bad areas
are refused with a message."""

import pytest
import torch

from imagine.area_conditioning import AreaConditioning, AreaEntry, side_output
from imagine.guidance import area_guidance


def model(x, t, c):
    # (each entry's output is its constant c everywhere, whatever the crop)
    return torch.ones_like(x) * c.view(-1, 1, 1, 1)


def c(v):
    return {"c": torch.tensor([float(v)])}


def test_full_entries_average_by_strength():
    x = torch.zeros(1, 2, 16, 16)
    side = AreaConditioning([AreaEntry(c(1.0), strength=1.0), AreaEntry(c(4.0), strength=3.0)])
    out = side_output(model, x, torch.zeros(1), side, None)
    assert torch.allclose(out, torch.full_like(x, (1 * 1 + 3 * 4) / 4))


def test_an_area_fades_in_at_its_inner_edges_and_leaves_the_rest_to_the_others():
    x = torch.zeros(1, 1, 32, 32)
    side = AreaConditioning([AreaEntry(c(0.0)), AreaEntry(c(8.0), area=(16, 16, 8, 0))])  # rows 8-23, columns 0-15
    out = side_output(model, x, torch.zeros(1), side, None)[0, 0]
    assert torch.all(out[:8] == 0) and torch.all(out[:, 16:] == 0)  # (outside the area: the full entry alone)
    # inside: weight w of the area against 1 of the full entry: 8 w / (1 + w); w = (k + 1) / 8 over the first rows
    for k in range(8):
        w = (k + 1) / 8
        assert torch.allclose(out[8 + k, 0], torch.tensor(8 * w / (1 + w)))  # (its left edge is the border: no fade)
        assert torch.allclose(out[23 - k, 0], torch.tensor(8 * w / (1 + w)))
    nothing = side_output(model, x, torch.zeros(1), AreaConditioning([AreaEntry(c(8.0), area=(8, 8, 0, 0))]), None)
    assert float(nothing[0, 0, 20, 20]) == 0  # (a cell no entry covers: 0)


def test_levels_and_the_unconditional_side():
    x = torch.zeros(1, 1, 8, 8)
    cond = AreaConditioning([AreaEntry(c(2.0), levels=(10.0, 5.0)), AreaEntry(c(6.0), levels=(5.0, 0.0))])
    uncond = AreaConditioning([AreaEntry(c(1.0))])
    for sigma, want in ((8.0, 2.0), (3.0, 6.0), (5.0, 4.0)):  # (both act at 5, the level they share)
        cond.at_level(sigma)
        out = area_guidance(model, x, torch.zeros(1), cond, uncond, 3.0)
        assert torch.allclose(out, torch.full_like(x, 1 + 3 * (want - 1))), sigma
    assert torch.allclose(area_guidance(model, x, torch.zeros(1), cond, None, 3.0), torch.full_like(x, 4.0))


def test_small_areas_with_inner_edges_are_refused():
    x = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="fade in over 8 cells"):
        side_output(model, x, torch.zeros(1), AreaConditioning([AreaEntry(c(1.0), area=(4, 4, 2, 2))]), None)
    ok = side_output(model, x, torch.zeros(1), AreaConditioning([AreaEntry(c(1.0), area=(8, 8, 4, 4))]), None)
    assert float(ok[0, 0, 4, 4]) == 1 and float(ok[0, 0, 0, 0]) == 0  # (8 cells: the fade fits)
