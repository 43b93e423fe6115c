"""Low-rank adapters merged into a model's weights (LoRA, Hu et al. 2021).

A LoRA file holds, for some linear layers and convolutions of the U-Net and the text encoder, two
thin factors: `down` (A, r x k) and `up` (B, d x r), with r much smaller than d and k. Eq. 3 of the
paper: h = W0 x + (alpha / r) B A x. Merging puts the update into the weight once,

    W = W0 + s * (alpha / r) * B A,

where s is the user's strength (AUTOMATIC1111's `<lora:name:s>`, diffusers' `lora_scale`). A merged
model runs at the plain model's speed in both modes (the fast mode's copies are rebuilt from the
merged weights). For a convolution, A is a convolution to r channels (1x1 or the layer's own kernel,
LoCon) and B a 1x1 convolution back: B A is the matrix product over the r channels, reshaped to
the layer's kernel.

The files people have come in three namings, all read here offline:

- kohya-ss / AUTOMATIC1111 (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_0_..._q_proj` for CLIP): the
  module's diffusers name with `_` for `.`;
- diffusers / peft (`unet.down_blocks.0....to_q.lora_A.weight`, `.lora_B.weight`;
  `text_encoder.text_model.encoder...`), alpha and rank from the `lora_adapter_metadata` that
  diffusers writes into the safetensors header (`unet.lora_alpha`, `unet.r`, `...alpha_pattern`,
  `...rank_pattern`, `use_rslora`), or from `.alpha` entries;
- diffusers' older attention-processor names (`...attn1.processor.to_q_lora.down.weight`, and
  `.lora.down.weight` / `.lora_linear_layer.down.weight`).

With no alpha given, alpha = r (a scale of 1), as kohya-ss and diffusers take it. A file with a key
that is none of these (LyCORIS' LoHa / LoKr factors, SDXL's second text encoder), or that names a
layer the model does not have, is refused with the keys it could not place: a LoRA applied in part
is a different model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

KOHYA = re.compile(r"^(lora_unet|lora_te)_(.+)\.(lora_down|lora_up)\.weight$")
KOHYA_ALPHA = re.compile(r"^(lora_unet|lora_te)_(.+)\.alpha$")
DIFFUSERS = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                       r"lora_linear_layer\.up)(?:\.default(?:_0)?)?\.weight$")
DIFFUSERS_ALPHA = re.compile(r"^(?:(unet|text_encoder)\.)?(.+)\.alpha$")
# diffusers' attention processors (save_attn_procs, 0.14-0.20) named their LoRA after the projection:
# unet ...attn1.processor.to_q_lora.down.weight; text encoder ...self_attn.to_q_lora.down.weight (= q_proj)
PROCESSOR = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)"
                       r"\.weight$")
PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "unet": "unet", "text_encoder": "text_encoder"}
OTHER_KINDS = {"hada_w1_a": "a LyCORIS LoHa", "lokr_w1": "a LyCORIS LoKr", "lora_te1_": "an SDXL LoRA",
               "lora_te2_": "an SDXL LoRA", "text_encoder_2.": "an SDXL LoRA", "oft_blocks": "a LyCORIS OFT",
               "diff_b": "a LyCORIS full-difference file"}


@dataclass
class LoraLayer:
    part: str  # "unet" or "text_encoder"
    module: str  # the layer's name in that part
    down: torch.Tensor  # A: [r, k] or [r, c_in, kh, kw]
    up: torch.Tensor  # B: [d, r] or [d, r, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """s (alpha / r) B A in float32, in the layer's weight shape (eq. 3, merged)."""
        r = self.rank
        alpha = float(r if self.alpha is None else self.alpha)
        up, down = self.up.float().reshape(self.up.shape[0], r), self.down.float().reshape(r, -1)
        return (strength * alpha / r) * (up @ down)


def read_lora(path: str | os.PathLike) -> list[LoraLayer]:
    """The layers of a LoRA file (.safetensors, or a .ckpt/.pt read with weights_only=True)."""
    from imagine.loading.single_file import read_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA not found: {path} (give a .safetensors or .ckpt file)")
    return lora_layers(read_checkpoint(path), path.name, _metadata(path))


def _metadata(path: Path) -> dict:
    """diffusers' `lora_adapter_metadata` (the peft LoraConfig of each part, keys `unet.r`, ...) if any."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


def lora_layers(state: dict[str, torch.Tensor], source: str = "LoRA", metadata: dict | None = None) -> list[LoraLayer]:
    """A LoRA state dict in any of the namings of the module docstring -> its layers."""
    for mark, kind in OTHER_KINDS.items():
        if any(mark in k for k in state):
            raise ValueError(f"{source} looks like {kind} file ({mark}...); imagine merges LoRA (lora_down/lora_up "
                             "or lora_A/lora_B) for SD 1.x/2.x")
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    unknown = []
    for key, value in state.items():
        if m := KOHYA.match(key):
            factors.setdefault((PARTS[m[1]], m[2]), {})["down" if m[3] == "lora_down" else "up"] = value
        elif m := KOHYA_ALPHA.match(key):
            alphas[(PARTS[m[1]], m[2])] = float(value)
        elif m := PROCESSOR.match(key):
            part = m[1] or "unet"
            factors.setdefault((part, f"{m[2]}.{PROCESSOR_TARGETS[part][m[3]]}"), {})[m[4]] = value
        elif m := DIFFUSERS.match(key):
            module = m[2]
            which = "down" if m[3] in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"
            factors.setdefault((m[1] or "unet", module), {})[which] = value
        elif m := DIFFUSERS_ALPHA.match(key):
            alphas[(m[1] or "unet", m[2])] = float(value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: entries that are not LoRA factors: {', '.join(unknown[:5])}"
                         + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
                         + "; expected <layer>.lora_down/lora_up.weight (kohya-ss, AUTOMATIC1111) or "
                           "<layer>.lora_A/lora_B.weight (diffusers, peft)")
    if not factors:
        raise ValueError(f"{source} holds no LoRA factors")
    layers = []
    for (part, module), f in sorted(factors.items()):
        if set(f) != {"down", "up"}:
            raise ValueError(f"{source}: {part} layer {module} has only its {'up' if 'up' in f else 'down'} factor")
        down, up = f["down"], f["up"]
        if up.shape[1] != down.shape[0] or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise ValueError(f"{source}: {part} layer {module}: factors of shapes {tuple(down.shape)} (down) and "
                             f"{tuple(up.shape)} (up) do not multiply")
        alpha = alphas.get((part, module))
        if alpha is None:
            alpha = _metadata_alpha(metadata or {}, part, module, down.shape[0])
        layers.append(LoraLayer(part, module, down, up, alpha))
    return layers


def _metadata_alpha(metadata: dict, part: str, module: str, rank: int) -> float | None:
    """alpha from diffusers' saved peft LoraConfig: alpha_pattern, else lora_alpha; rsLoRA (Kalajdzievski 2023)
    scales by alpha / sqrt(r), expressed here as the alpha that gives that over r."""
    alpha = metadata.get(f"{part}.lora_alpha")
    for pattern, value in (metadata.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
    if alpha is None:
        return None
    return float(alpha) * math.sqrt(rank) if metadata.get(f"{part}.use_rslora") else float(alpha)


def _targets(model: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """The layers a LoRA can name in `model`, under their dotted names and kohya-ss' underscored ones
    (CLIP's with and without transformers' older `text_model.` level)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            names = [name]
            if part == "text_encoder" and not name.startswith("text_model."):
                names.append("text_model." + name)
            for n in names:
                out[n] = mod
                out[n.replace(".", "_")] = mod
    return out


@torch.no_grad()
def merge_lora(models: dict[str, torch.nn.Module | None], layers: list[LoraLayer], strength: float = 1.0,
               source: str = "LoRA") -> dict[str, int]:
    """W += s (alpha / r) B A for every layer, in place (the weights' version counters move, so cached
    fast/exact copies are rebuilt). `models`: {"unet": ..., "text_encoder": <a torch module or None>}.
    Everything is checked before the first weight changes. Returns the layers merged per part."""
    targets = {part: _targets(m, part) for part, m in models.items() if m is not None}
    plan, problems = [], []
    for layer in layers:
        if layer.part not in targets:
            problems.append(f"{layer.part} layer {layer.module} (this model's {layer.part} takes no LoRA)")
            continue
        mod = targets[layer.part].get(layer.module)
        if mod is None:
            problems.append(f"{layer.part} layer {layer.module} (no such layer)")
            continue
        w = mod.weight
        fan_in = w[0].numel()
        if layer.up.shape[0] != w.shape[0] or layer.down[0].numel() != fan_in:
            problems.append(f"{layer.part} layer {layer.module}: factors {tuple(layer.down.shape)} / "
                            f"{tuple(layer.up.shape)} for a weight of shape {tuple(w.shape)}")
            continue
        plan.append((mod, layer))
    if problems:
        raise ValueError(f"{source}: does not fit this model; " + "; ".join(problems[:5])
                         + (f" ... ({len(problems)} in all)" if len(problems) > 5 else ""))
    counts: dict[str, int] = {}
    for mod, layer in plan:
        w = mod.weight
        w.copy_((w.float() + layer.delta(strength).reshape(w.shape)).to(w.dtype))
        counts[layer.part] = counts.get(layer.part, 0) + 1
    return counts
