"""AUTOMATIC1111's `AND`: one image of several prompts at once (composable diffusion, Liu et al. 2022, "Compositional
Visual Generation with Composable Diffusion Models", eq. 10, the conjunction of concepts).

`a red circle AND a blue square :0.8` is two prompts, each encoded on its own, weighted 1 and 0.8. Guidance sums
their pulls away from the unconditional prediction:

    e~ = e(x, 0) + s * sum_k w_k (e(x, c_k) - e(x, 0)),

one forward over [uncond; c_1; ...; c_K] (parts of different lengths filled up with their last state, as A1111
stacks them; two forwards where the uncond's length differs; `imagine.guidance.composed_guidance`). As A1111 (`get_multicond_prompt_list`): the prompt is split at the word AND
(in capitals), a part's trailing `:w` is its weight (default 1; also with a single part, where it scales the
guidance), and each part may carry prompt editing and emphasis of its own. A1111 reads AND in the prompt only, not
in the negative prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`prompt` -> [(part, weight)]: split at AND, each part's trailing `:w` its weight (default 1)."""
    parts = []
    for part in AND.split(prompt):
        m = _WEIGHT.search(part)
        text, weight = (m.group(1), m.group(2)) if m else (part, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


@dataclass
class ComposedConditioning:
    """Several conditionings per image (`parts`, each a cond dict or an imagine.guidance.StepConditioning of the
    batch's B rows) and their weights [B, K]: a row with fewer parts than K has weight 0 on the rest."""

    parts: list
    weights: torch.Tensor

    def at(self, i: int) -> "ComposedConditioning":
        from imagine.guidance import cond_at

        return ComposedConditioning([cond_at(p, i) for p in self.parts], self.weights)

    def map(self, f) -> "ComposedConditioning":
        """`f` applied to each part (a dict, or each step's dict of a StepConditioning)."""
        from imagine.guidance import StepConditioning

        return ComposedConditioning([p.map(f) if isinstance(p, StepConditioning) else f(p) for p in self.parts],
                                    self.weights)
