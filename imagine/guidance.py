"""Guidance and thresholding: what turns a model's raw prediction into the denoised x_0 a sampler steps with.

- Classifier-free guidance (Ho & Salimans 2022, eq. 6; GLIDE, Nichol et al. 2022, eq. 4): one
  network conditioned and unconditioned, combined as pred = uncond + s (cond - uncond). Both passes
  run as ONE forward on a batch of 2B (uncond first, as diffusers orders them); negative prompts are
  just the uncond inputs. A prompt and a negative prompt of different lengths (prompts read in 75-token
  chunks, imagine.long_prompts) cannot share a batch: they run as two forwards, as AUTOMATIC1111 runs them.
- Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16): with std over each sample's elements,
  rescaled = cfg * std(cond) / std(cfg), then phi * rescaled + (1 - phi) * cfg; it undoes the
  over-exposure large scales cause. Applied to the raw prediction, as diffusers' pipelines do.
- Projected guidance (Sadat et al. 2024, APG's projection; imagen-pytorch 2.1.0's default): the update cond - uncond
  less its part along cond (or a fraction of it), per sample; `projected_guidance`, a `combine` rule of
  guided_model_output. Fraction 1 is classifier-free guidance.
- Classifier guidance (Dhariwal & Nichol 2021): the gradient g of log p_phi(y | x_t, t) from a
  classifier trained on noisy images either shifts the DDPM posterior mean by s * Sigma * g
  (Algorithm 1) or the predicted noise by -sqrt(1 - abar_t) * s * g (Algorithm 2, for DDIM and
  any sampler that works from eps / x_0).
- Thresholding of x_0 (Saharia et al. 2022, Imagen, sec. 2.3): static clips to [-1, 1]; dynamic
  takes s = the p-th percentile of |x_0| per sample, s = max(s, 1), clips to [-s, s] and divides by s;
  `threshold_range` R carries both to data in [-R, R] (a latent), R = 1 being the paper's pixels.
  An upper cap on s (`max_value`, DeepFloyd IF's sample_max_value 1.5, as diffusers' DDPMScheduler with
  thresholding clamps s to [1, sample_max_value]) bounds how far a sample is pushed inwards.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

THRESHOLDINGS = (None, "static", "dynamic")


# -- classifier-free guidance ---------------------------------------------------------------------
class StepConditioning:
    """Conditioning that changes with the sampler's step (AUTOMATIC1111's prompt editing, imagine.prompt_editing):
    `at(i)` is the cond dict of step i of the run (from 0), made by `fn`. The denoiser reads it at every step."""

    def __init__(self, fn: Callable[[int], dict[str, Any]]):
        self.fn = fn

    def at(self, i: int) -> dict[str, Any]:
        return self.fn(i)

    def map(self, f: Callable[[dict[str, Any]], dict[str, Any]]) -> "StepConditioning":
        """The conditioning with `f` applied to each step's dict."""
        return StepConditioning(lambda i: f(self.at(i)))


def cond_at(cond, i: int):
    """A cond dict, or a StepConditioning's dict at step i (a ComposedConditioning: its parts at step i)."""
    from imagine.composable import ComposedConditioning

    return cond.at(i) if isinstance(cond, (StepConditioning, ComposedConditioning)) else cond


def check_cond(cond: dict[str, Any] | None, batch: int, name: str = "cond") -> dict[str, Any]:
    """Every tensor in a cond dict must be batch-first with `batch` rows (a StepConditioning: its first step's)."""
    if cond is None:
        return {}
    if isinstance(cond, StepConditioning):
        check_cond(cond.at(0), batch, name)
        return cond
    from imagine.area_conditioning import AreaConditioning, check_entries
    from imagine.composable import ComposedConditioning

    if isinstance(cond, AreaConditioning):
        check_entries(cond, batch, name)
        return cond
    if isinstance(cond, ComposedConditioning):
        for part in cond.parts:
            check_cond(part, batch, name)
        if tuple(cond.weights.shape) != (batch, len(cond.parts)):
            raise ValueError(f"{name}: {len(cond.parts)} composed parts need weights [{batch}, {len(cond.parts)}]; "
                             f"got {tuple(cond.weights.shape)}")
        return cond
    if not isinstance(cond, dict):
        raise TypeError(f"{name} must be a dict of keyword tensors for the model (e.g. context=...); "
                        f"got {type(cond).__name__}")
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] != batch):
            raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)}, but the batch has {batch} samples: "
                             f"its first dimension must be {batch}")
    return cond


def concat_cond(uncond: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
    """One cond dict for the 2B batch [uncond; cond]: tensors concatenated along dim 0; anything else
    (flags, None) must be the same in both and is passed once. A text given without a `context_mask` beside one
    with a mask attends to all of its tokens."""
    uncond, cond = _with_mask(uncond, cond), _with_mask(cond, uncond)
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys for one batched forward; cond has "
                         f"{sorted(cond)}, uncond has {sorted(uncond)}")
    out = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if u.shape[1:] != c.shape[1:]:
                raise ValueError(f"cond[{k!r}] {tuple(c.shape)} and uncond[{k!r}] {tuple(u.shape)} differ beyond "
                                 f"the batch dimension (pad both prompts to the same length)")
            out[k] = torch.cat([u, c.to(u.dtype)], dim=0)
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            raise TypeError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or both not")
        else:
            if u is not c and u != c:
                raise ValueError(f"non-tensor entry {k!r} differs between cond ({c!r}) and uncond ({u!r})")
            out[k] = c
    return out


def _with_mask(cond: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`cond` with an all-true mask for each text (a key ending in "context": "context", the refiner's
    "refiner_context") that has none where `other` has one (its key + "_mask")."""
    out = cond
    for key, context in cond.items():
        mask = key + "_mask"
        if (key.endswith("context") and mask not in cond and mask in other and torch.is_tensor(context)
                and context.ndim == 3):
            out = {**out, mask: torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)}
    return out


def _lengths_differ(uncond: dict[str, Any], cond: dict[str, Any]) -> bool:
    """Whether a text of cond and its uncond have different numbers of tokens ([B, L, D] tensors alike but in L),
    so that they cannot be one batch. Any other difference is left to concat_cond, which names it."""
    return any(torch.is_tensor(c) and torch.is_tensor(uncond.get(k)) and c.ndim == uncond[k].ndim == 3
               and c.shape[1] != uncond[k].shape[1] and c.shape[2] == uncond[k].shape[2] for k, c in cond.items())


def _forward_parts(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, parts: list[dict[str, Any]],
                   halves: list[str] | None = None) -> list[torch.Tensor]:
    """The model's outputs for the same (x, t) under each cond dict of `parts`: one forward over their concatenation
    (a model whose `shares_guidance_batch` is true gets x and t once, with every part's rows of text), or one
    forward each where their texts' lengths differ; a model that treats the halves of guidance apart
    (`takes_guidance_half`: a ControlNet in guess mode) is then told each part's (`halves`)."""
    k = len(parts)
    if any(_lengths_differ(a, b) for a in parts for b in parts):
        tell = halves is not None and getattr(model, "takes_guidance_half", False)
        return [model(x, t, **p, **({"guidance_half": h} if tell else {})) for p, h in zip(parts, halves or parts)]
    both = parts[0]
    for p in parts[1:]:
        both = concat_cond(both, p)
    if getattr(model, "shares_guidance_batch", False) and torch.is_tensor(both.get("context")):
        return list(model(x, t, **both).chunk(k))
    return list(model(torch.cat([x] * k), torch.cat([t] * k), **both).chunk(k))


# AUTOMATIC1111's "Pad prompt/negative prompt" options, for a prompt and negative prompt of different lengths:
# "empty" (its pad_cond_uncond, infotext "Pad conds") fills the shorter up with the empty prompt's chunks; "v0" (its
# pad_cond_uncond_v0, "Pad conds v0": what its DDIM always did before 1.6.0) repeats the negative's last state up to
# the prompt's length, or cuts the negative to it
PAD_CONDS = ("empty", "v0")


def fill_parts(cond):
    """AND's parts (an imagine.composable.ComposedConditioning at one step) brought to one text length as
    AUTOMATIC1111's stack_conds brings them (prompt_parser.reconstruct_multicond_batch): each part's text filled up
    with its last state repeated, to the longest part's length. Per image (A1111 takes the longest over its whole
    batch; here an image's parts alone decide, so that an image stays the one its prompt gives alone). Parts of one
    length are returned as they are."""
    from imagine.composable import ComposedConditioning

    if not all(torch.is_tensor(p.get("context")) and p["context"].ndim == 3 for p in cond.parts):
        return cond
    rows = [_rows(p) for p in cond.parts]
    if len({len(r) for part in rows for r in part}) == 1 and len({p["context"].shape[1] for p in cond.parts}) == 1:
        return cond
    longest = [max(len(part[r]) for part in rows) for r in range(len(rows[0]))]
    filled = [[torch.cat([v, v[-1:].expand(n - len(v), -1)]) for v, n in zip(part, longest)] for part in rows]
    return ComposedConditioning([_as_batch(p, f, max(longest)) for p, f in zip(cond.parts, filled)], cond.weights)


def check_pad_conds(mode) -> None:
    if mode not in PAD_CONDS:
        raise ValueError(f"pad_conds must be one of {', '.join(map(repr, PAD_CONDS))} (or None: off); got {mode!r}")


def _rows(c: dict[str, Any]) -> list[torch.Tensor]:
    # each row's own text states: a batch fills its shorter rows up at the end, masked out (context_mask)
    v, mask = c["context"], c.get("context_mask")
    return [v[r] if mask is None else v[r][: int(mask[r].sum())] for r in range(v.shape[0])]


def _as_batch(c: dict[str, Any], rows: list[torch.Tensor], length: int) -> dict[str, Any]:
    # `rows` back into c's "context" of `length` tokens, each row filled up at the end and the filling masked out
    # (the other texts, e.g. an SDXL refiner's "refiner_context", as they are)
    v = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=v.device)
    for r, states in enumerate(rows):
        v[r, : len(states)], mask[r, : len(states)] = states, True
    out = {**c, "context": v}
    out.pop("context_mask", None)
    return out if bool(mask.all()) else {**out, "context_mask": mask}


class PaddedConds:
    """A guidance rule (called as guided_model_output is) that first brings each image's prompt and negative prompt
    texts to one length by AUTOMATIC1111's rule `mode` (PAD_CONDS; its CFGDenoiser's pad_cond_uncond /
    pad_cond_uncond_v0), so that they share the guidance batch, then runs `inner`. Each row of a batch is padded by
    its own texts' lengths (a batch fills its shorter rows up and masks the filling: an image stays the one its prompt
    gives alone). The base model's text ("context") is padded; an SDXL refiner's own text runs as it is. `empty`: the
    empty prompt's cond dict (one chunk, [1, 77, D] states), for "empty". `padded_rows`: the rows some step padded (A1111
    then writes the option in the image's infotext)."""

    def __init__(self, mode: str, empty: dict[str, Any] | None = None, inner: Callable[..., torch.Tensor] | None = None):
        check_pad_conds(mode)
        if mode == "empty" and empty is None:
            raise ValueError("pad_conds 'empty' pads with the empty prompt's states: give `empty`")
        self.mode, self.empty, self.inner = mode, empty, inner or guided_model_output
        self.padded_rows: set[int] = set()
        self._last = None  # (cond, uncond, their padded pair)

    @property
    def padded(self) -> bool:
        return bool(self.padded_rows)

    def _pair(self, r: int, c: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lc, lu = len(c), len(u)
        if lc == lu:
            return c, u
        if self.mode == "v0":  # the negative's last state repeated, or the negative cut to the prompt's length
            self.padded_rows.add(r)
            return c, (u[:lc] if lu > lc else torch.cat([u, u[-1:].expand(lc - lu, -1)]))
        chunk = self.empty["context"][0].to(c)
        repeats = abs(lc - lu) // len(chunk)  # (whole chunks of the empty prompt, as A1111 counts them)
        if repeats == 0:
            return c, u
        self.padded_rows.add(r)
        fill = chunk.repeat(repeats, 1)
        return (torch.cat([c, fill]), u) if lc < lu else (c, torch.cat([u, fill]))

    def pad(self, cond: dict[str, Any], uncond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if not all(torch.is_tensor(x.get("context")) and x["context"].ndim == 3 for x in (cond, uncond)):
            return cond, uncond
        last = self._last  # (the texts of most runs are the same dicts at every step: padded once)
        if last is not None and last[0] is cond and last[1] is uncond:
            return last[2]
        rows = list(zip(_rows(cond), _rows(uncond)))
        if all(len(c) == len(u) for c, u in rows) and cond["context"].shape[1] == uncond["context"].shape[1]:
            out = cond, uncond
        else:
            pairs = [self._pair(r, c, u) for r, (c, u) in enumerate(rows)]
            length = max(len(x) for pair in pairs for x in pair)
            out = _as_batch(cond, [c for c, _ in pairs], length), _as_batch(uncond, [u for _, u in pairs], length)
        self._last = (cond, uncond, out)
        return out

    def __call__(self, model, x, t, cond, uncond, scale, rescale: float = 0.0, **kw):
        from imagine.composable import ComposedConditioning

        if uncond is not None:
            if isinstance(cond, ComposedConditioning):  # (A1111 pads all of AND's parts, one stack, against it)
                cond = fill_parts(cond)  # (the parts first brought to one length, as A1111 stacks them)
                pairs = [self.pad(p, uncond) for p in cond.parts]
                cond = ComposedConditioning([c for c, _ in pairs], cond.weights)
                uncond = pairs[0][1]
            else:
                cond, uncond = self.pad(cond, uncond)
        return self.inner(model, x, t, cond, uncond, scale, rescale=rescale, **kw)


def classifier_free_guidance(uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6 (in its diffusers form): uncond + s (cond - uncond); s = 1 is cond alone."""
    return uncond_out + scale * (cond_out - uncond_out)


def projected_guidance(uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float,
                       parallel_fraction: float = 0.0) -> torch.Tensor:
    """Guidance with the update's part along the conditional output scaled by eta = `parallel_fraction` (Sadat et al.
    2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models", arXiv 2410.02416,
    sec. 3 and Algorithm 1, APG without its momentum and norm threshold): with the update D = cond - uncond split, per
    sample over all its elements, into D_par = (<D, cond> / <cond, cond>) cond and D_orth = D - D_par,

        guided = cond + (s - 1) (D_orth + eta D_par).

    The parallel part is what over-saturates at high scales; eta = 1 is classifier-free guidance (uncond + s D),
    eta = 0 (imagen-pytorch 2.1.0's default, Unet.forward_with_cond_scale) drops it. The projection in float64, as
    imagen-pytorch's; a sample whose cond is all zero has no parallel part."""
    dtype = cond_out.dtype
    cond, update = cond_out.double().flatten(1), (cond_out - uncond_out).double().flatten(1)
    norm_sq = (cond * cond).sum(1, keepdim=True)
    parallel = (update * cond).sum(1, keepdim=True) / torch.where(norm_sq > 0, norm_sq, 1.0) * cond
    kept = (update - parallel + parallel_fraction * parallel).to(dtype).view_as(cond_out)
    return cond_out + (scale - 1) * kept


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, eq. 15-16: x_rescaled = x_cfg * std(x_pos) / std(x_cfg) per sample;
    result = phi * x_rescaled + (1 - phi) * x_cfg."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    factor = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * (guided * factor) + (1 - phi) * guided


def split_variance(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model output of twice x's channels is (prediction, learned variance) (Nichol & Dhariwal 2021, Improved DDPM
    sec. 3.1: the U-Net's extra channels interpolate the log variance, "learned_range"; or, diffusers' "learned",
    are the variance itself); any other is (prediction, None)."""
    c = x.shape[1]
    if out.ndim == x.ndim and out.shape[1] == 2 * c:
        return out[:, :c], out[:, c:]
    return out, None


def _with_variance(guided: torch.Tensor, variance: torch.Tensor | None) -> torch.Tensor:
    # guidance moves the prediction only: a learned variance is the conditional pass's own, as GLIDE's sampling code
    # and diffusers' IF and unCLIP pipelines keep it
    return guided if variance is None else torch.cat([guided, variance.to(guided.dtype)], dim=1)


def guided_model_output(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                        cond: dict[str, Any] | None, uncond: dict[str, Any] | None = None, scale: float = 1.0,
                        rescale: float = 0.0, parts: dict[str, torch.Tensor] | None = None,
                        combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = classifier_free_guidance
                        ) -> torch.Tensor:
    """The model's prediction at (x, t), with classifier-free guidance when scale != 1 and uncond is
    given: one forward on cat([x, x]) with every cond tensor concatenated [uncond; cond]. A model
    whose `shares_guidance_batch` is true (the cross-attention U-Net) gets x and t once with the
    2B rows of context, and runs the layers both halves share once. `parts`, a dict, receives the unconditional
    output as parts["uncond"] (CFG++'s samplers renoise with it; it is computed at scale 1 too; with no uncond it is
    the output itself). `combine(uncond_out, cond_out, scale)`: how the two outputs make the guided one
    (classifier_free_guidance; e.g. functools.partial(projected_guidance, parallel_fraction=0.0), imagen-pytorch's)."""
    from imagine.area_conditioning import AreaConditioning
    from imagine.composable import ComposedConditioning

    if isinstance(cond, ComposedConditioning):  # AUTOMATIC1111's AND
        return composed_guidance(model, x, t, cond, uncond, scale, rescale, parts=parts)
    if isinstance(cond, AreaConditioning):  # ComfyUI's lists of conditionings with areas, masks, strengths
        return area_guidance(model, x, t, cond, uncond, scale, rescale, parts=parts, combine=combine)
    cond = cond or {}
    if uncond is None or (scale == 1 and parts is None):  # (CFG++ needs the unconditional pass at scale 1 too)
        out = model(x, t, **cond)
        if parts is not None:
            parts["uncond"] = out
        return out
    (uncond_out, _), (cond_out, variance) = (split_variance(o, x) for o in _forward_parts(
        model, x, t, [uncond, cond], ["uncond", "cond"]))
    if parts is not None:
        parts["uncond"] = uncond_out
    return _with_variance(rescale_guidance(combine(uncond_out, cond_out, scale), cond_out, rescale), variance)


def area_guidance(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond, uncond, scale: float,
                  rescale: float = 0.0, parts: dict[str, torch.Tensor] | None = None,
                  combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = classifier_free_guidance
                  ) -> torch.Tensor:
    """Classifier-free guidance between two sides that are imagine.area_conditioning.AreaConditioning lists (ComfyUI's
    conditionings): each side's prediction is its entries' weighted per-cell average (`side_output`); the
    unconditional side is not run where uncond is None or, unless `parts` asks for it, at scale 1."""
    from imagine.area_conditioning import side_output

    cond_out = side_output(model, x, t, cond, uncond)
    if uncond is None or (scale == 1 and parts is None):
        if parts is not None:
            parts["uncond"] = cond_out
        return cond_out
    uncond_out = side_output(model, x, t, uncond, cond)
    if parts is not None:
        parts["uncond"] = uncond_out
    return rescale_guidance(combine(uncond_out, cond_out, scale), cond_out, rescale)


def composed_guidance(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond,
                      uncond: dict[str, Any] | None, scale: float, rescale: float = 0.0,
                      parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Composable diffusion's conjunction (Liu et al. 2022, eq. 10; AUTOMATIC1111's AND): with K parts c_k of
    weights w_k per image, e~ = e(x, 0) + s * sum_k w_k (e(x, c_k) - e(x, 0)). The parts are first filled up to one
    length as A1111 stacks them (`fill_parts`); one forward over [uncond; c_1; ...; c_K] where the uncond is of that
    length too (the cross-attention U-Net takes x once with the (K + 1) B rows of text), else one forward each. Guidance rescale (Lin et al.) takes the first part as its conditional output.
    parts: as guided_model_output's."""
    if uncond is None:
        raise ValueError("AND (composed prompts) needs the unconditional pass: give uncond")
    cond = fill_parts(cond)  # (parts of different lengths filled up as A1111 stacks them)
    outs = _forward_parts(model, x, t, [uncond, *cond.parts], ["uncond"] + ["cond"] * len(cond.parts))
    variance = split_variance(outs[1], x)[1]  # (the first part's, as guidance rescale reads it)
    outs = [split_variance(o, x)[0] for o in outs]
    nothing = outs[0]
    if parts is not None:
        parts["uncond"] = nothing
    w = cond.weights.to(device=nothing.device, dtype=nothing.dtype)
    guided = nothing.clone()
    for j, out in enumerate(outs[1:]):
        guided = guided + (out - nothing) * (scale * w[:, j]).view(-1, *[1] * (nothing.ndim - 1))
    return _with_variance(rescale_guidance(guided, outs[1], rescale), variance)


def instruct_pix2pix_guidance(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                              cond: dict[str, Any], uncond: dict[str, Any] | None, scale: float, image_scale: float,
                              rescale: float = 0.0, gate: bool = True,
                              parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Classifier-free guidance on two conditions, the picture to edit c_I and the instruction c_T (Brooks et al.
    2023, InstructPix2Pix, eq. 3):

        e~ = e(z, 0, 0) + s_I (e(z, c_I, 0) - e(z, 0, 0)) + s_T (e(z, c_I, c_T) - e(z, c_I, 0)),

    the picture's latents travelling in cond["concat"] (for the U-Net's extra input channels) and zeroed for
    e(z, 0, 0). Three passes, one batch where the texts are of one length. `gate` (diffusers' pipeline): guidance
    runs when s_T > 1 and s_I >= 1, else the conditional pass alone; without it (AUTOMATIC1111) the formula always
    runs. At s_I = 1 it is classifier-free guidance with the picture in both passes, which is how AND's parts
    (imagine.composable) combine with it. parts: as guided_model_output's (the unconditional output is e(z, 0, 0))."""
    from imagine.composable import ComposedConditioning

    if isinstance(cond, ComposedConditioning):
        if image_scale != 1:
            raise ValueError("AND (composed prompts) combines with instruct-pix2pix only at image_guidance_scale 1 "
                             "(as AUTOMATIC1111); give the instruction as one prompt, or image guidance 1")
        return composed_guidance(model, x, t, cond, uncond, scale, rescale, parts=parts)
    # (the gate is diffusers' CFG rule; CFG++'s lambda is below 1 and needs the unconditional pass: no gate for it)
    if uncond is None or (gate and parts is None and not (scale > 1 and image_scale >= 1)):
        out = model(x, t, **cond)
        if parts is not None:
            parts["uncond"] = out
        return out
    none = {**uncond, "concat": torch.zeros_like(uncond["concat"])}
    (text, variance), (image, _), (nothing, _) = (split_variance(o, x) for o in _forward_parts(
        model, x, t, [cond, uncond, none]))
    if parts is not None:
        parts["uncond"] = nothing
    guided = nothing + scale * (text - image) + image_scale * (image - nothing)
    return _with_variance(rescale_guidance(guided, text, rescale), variance)


# -- classifier guidance --------------------------------------------------------------------------
def classifier_log_prob(classifier: Callable[..., torch.Tensor], labels: torch.Tensor) -> Callable:
    """Wrap a noisy classifier `classifier(x_t, t) -> logits [B, K]` into the `(x_t, t) -> log p(y | x_t) [B]`
    that sampling's `classifier=` takes, for fixed target labels y [B]."""

    def log_prob(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = classifier(x_t, t)
        return torch.log_softmax(logits.float(), dim=-1).gather(1, labels.to(logits.device).long().view(-1, 1))[:, 0]

    return log_prob


def classifier_gradient(log_prob: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t) (Dhariwal & Nichol 2021, sec. 4.1), one gradient per sample."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        lp = log_prob(x_in, t)
        if lp.shape != (x.shape[0],):
            raise ValueError(f"the classifier must return log p(y | x_t) with shape [{x.shape[0]}]; got "
                             f"{tuple(lp.shape)} (wrap a logits classifier with classifier_log_prob)")
        (grad,) = torch.autograd.grad(lp.sum(), x_in)
    return grad.detach()


def classifier_mean_shift(grad: torch.Tensor, variance: float, scale: float) -> torch.Tensor:
    """Dhariwal & Nichol 2021, Algorithm 1: the DDPM posterior mean moves by s * Sigma * grad."""
    return scale * variance * grad


def classifier_eps_shift(eps: torch.Tensor, grad: torch.Tensor, alphas_cumprod_t: float, scale: float) -> torch.Tensor:
    """Dhariwal & Nichol 2021, Algorithm 2: eps_hat = eps - sqrt(1 - abar_t) * s * grad."""
    return eps - (1 - alphas_cumprod_t) ** 0.5 * scale * grad


# -- thresholding ---------------------------------------------------------------------------------
# Imagen's rules assume x_0 lives in the pixel range [-1, 1]. `bound` = R generalises them to data in
# [-R, R] (a VAE latent, whose range is several units): the rule applied to x_0 / R, then times R.
# R = 1 is the paper's rule exactly.
def check_threshold_range(bound) -> float:
    """R as a float, or a ValueError naming what is valid."""
    try:
        value = float(bound)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"threshold_range must be a positive finite number (1 for pixels in [-1, 1], the data's "
                         f"range for a latent); got {bound!r}")
    return value


def static_threshold(x0: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """Saharia et al. 2022, sec. 2.3: clip x_0 to the data range [-R, R] (R = 1: pixels)."""
    bound = check_threshold_range(bound)
    return x0.clamp(-bound, bound)


def check_threshold_max(max_value) -> float | None:
    """The cap on dynamic thresholding's s, in units of R: None (no cap, the paper's rule) or a finite number >= 1
    (a cap below 1 would rescale samples already within the data range); else a ValueError naming what is valid."""
    if max_value is None:
        return None
    try:
        value = float(max_value)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(max_value, bool) or not (value >= 1 and math.isfinite(value)):
        raise ValueError(f"threshold_max must be None (no cap) or a finite number >= 1, the largest s dynamic "
                         f"thresholding divides by, in units of threshold_range (DeepFloyd IF's sample_max_value: "
                         f"1.5); got {max_value!r}")
    return value


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995, bound: float = 1.0,
                      max_value: float | None = None) -> torch.Tensor:
    """Saharia et al. 2022, sec. 2.3: per sample, s = the `percentile` quantile of |x_0|; s = max(s, R);
    x_0 = clip(x_0, -s, s) * R / s (R = 1 in the paper). Pushes saturated values inwards instead of
    flattening them; a sample whose quantile stays within R is only clipped, never rescaled.
    `max_value` M caps s at M R (diffusers' DDPMScheduler with thresholding: s clamped to [1, sample_max_value];
    DeepFloyd IF's M = 1.5): values past M R are clipped there, and nothing is divided by more than M."""
    if not 0 < percentile <= 1:
        raise ValueError(f"threshold_percentile must be in (0, 1]; got {percentile}")
    bound = check_threshold_range(bound)
    max_value = check_threshold_max(max_value)
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):  # (as diffusers: the quantile in float64 for a float64 x_0)
        flat = flat.float()
    s = torch.quantile(flat, percentile, dim=1)
    s = s.clamp(min=bound, max=None if max_value is None else max_value * bound).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) * (bound / s)


def latent_threshold_range(latents: torch.Tensor, percentile: float = 0.995) -> float:
    """R for thresholding a latent model: the largest per-sample `percentile` quantile of |latent| over
    latents of real data (batch-first), so that dynamic thresholding rescales no real sample."""
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents must be a non-empty batch [B, ...]; got shape {tuple(latents.shape)}")
    flat = latents.reshape(latents.shape[0], -1).abs().float()
    return float(torch.quantile(flat, percentile, dim=1).max())


def apply_threshold(x0: torch.Tensor, thresholding: str | None, percentile: float = 0.995,
                    bound: float = 1.0, max_value: float | None = None) -> torch.Tensor:
    """x_0 thresholded by the rule `thresholding` (None: as it is); `max_value`: the dynamic rule's cap on s."""
    if thresholding is None:
        return x0
    if thresholding == "static":
        return static_threshold(x0, bound)
    if thresholding == "dynamic":
        return dynamic_threshold(x0, percentile, bound, max_value)
    raise ValueError(f"thresholding must be None, 'static' or 'dynamic'; got {thresholding!r}")
