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

The files people have come in three namings, all read here offline, for SD 1.x/2.x and SDXL:

- kohya-ss / AUTOMATIC1111 (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_0_..._q_proj` for CLIP): the
  module's diffusers name with `_` for `.`. For SDXL, `lora_te1_` / `lora_te2_` name the two text
  towers (CLIP ViT-L, OpenCLIP bigG), and the U-Net's layers come under the ORIGINAL (LDM / SGM)
  block names kohya-ss trains SDXL on (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_2_2_conv`; in a residual block
  `in_layers_2` / `emb_layers_1` / `out_layers_3` / `skip_connection` = conv1 / time_emb_proj /
  conv2 / conv_shortcut, `input_blocks_0_0` = conv_in, `out_2` = conv_out, `time_embed_0` / `_2` and
  `label_emb_0_0` / `_2` = the time and added-condition MLPs). Those names depend on the U-Net's layout
  (residual blocks per level, levels without attention: SDXL's first level has none), so they are
  placed from the model's own layout (`keymap.unet_module_table`, as for single files), for any U-Net;
  diffusers' underscored names are read too;
- diffusers / peft (`unet.down_blocks.0....to_q.lora_A.weight`, `.lora_B.weight`;
  `text_encoder.text_model.encoder...`, `text_encoder_2....` for SDXL's second tower), alpha and rank
  from the `lora_adapter_metadata` that diffusers writes into the safetensors header (`unet.lora_alpha`,
  `unet.r`, `...alpha_pattern`, `...rank_pattern`, `use_rslora`), or from `.alpha` entries;
- diffusers' older attention-processor names (`...attn1.processor.to_q_lora.down.weight`, and
  `.lora.down.weight` / `.lora_linear_layer.down.weight`).

With no alpha given, alpha = r (a scale of 1), as kohya-ss and diffusers take it. A file with a key
that is none of these (LyCORIS' LoHa / LoKr factors, DoRA), or that names a layer the model does not
have, is refused with the keys it could not place: a LoRA applied in part is a different model. An
SDXL LoRA given to an SD 1.x/2.x model (or the reverse) is refused so, and the message says which is which.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down|lora_up)\.weight$")
KOHYA_ALPHA = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.alpha$")
_PART = r"(?:(unet|text_encoder_2|text_encoder)\.)?"
DIFFUSERS = re.compile(rf"^{_PART}(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                       r"lora_linear_layer\.up)(?:\.default(?:_0)?)?\.weight$")
DIFFUSERS_ALPHA = re.compile(rf"^{_PART}(.+)\.alpha$")
# diffusers' attention processors (save_attn_procs, 0.14-0.20) named their LoRA after the projection:
# unet ...attn1.processor.to_q_lora.down.weight; text encoder ...self_attn.to_q_lora.down.weight (= q_proj)
PROCESSOR = re.compile(rf"^{_PART}(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_CLIP_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text_encoder": _CLIP_PROCESSOR, "text_encoder_2": _CLIP_PROCESSOR}
PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
         "unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
OTHER_KINDS = {"hada_w1_a": "a LyCORIS LoHa", "lokr_w1": "a LyCORIS LoKr", "oft_blocks": "a LyCORIS OFT",
               "diff_b": "a LyCORIS full-difference file", "dora_scale": "a DoRA"}
# the original (LDM / SGM) U-Net's modules outside the block table of keymap.unet_module_table: SDXL's MLP over
# [pooled text, size codes], which diffusers calls add_embedding
SGM_EXTRA = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


@dataclass
class LoraLayer:
    part: str  # "unet", "text_encoder" or (SDXL's second tower) "text_encoder_2"
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
                             "or lora_A/lora_B) for SD 1.x/2.x and SDXL")
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
    (CLIP's with and without transformers' older `text_model.` level; the U-Net's under the original LDM / SGM
    names too, `original_unet_names`)."""
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    original = original_unet_names(model) if part == "unet" else {}
    out = {}
    for name, mod in layers:
        names = [name]
        if part.startswith("text_encoder") and not name.startswith("text_model."):
            names.append("text_model." + name)
        for n in names:
            out[n] = mod
            out[n.replace(".", "_")] = mod
    for name, mod in layers:  # never in place of a diffusers name
        if name in original:
            out.setdefault(original[name], mod)
            out.setdefault(original[name].replace(".", "_"), mod)
    return out


_DOWN_BLOCK = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)$")


def original_unet_names(model: torch.nn.Module) -> dict[str, str]:
    """{diffusers module name: original (LDM / SGM) module name} for a U-Net with diffusers' names, e.g. for SDXL
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
    and `down_blocks.0.resnets.1.conv1` -> `input_blocks.2.0.in_layers.2`. The layout (residual blocks per level,
    which levels have attention) is read off the module names, so SD 1.x/2.x and SDXL alike; {} for other models."""
    from imagine.loading.keymap import unet_module_table

    names = [name for name, _ in model.named_modules()]
    resnets: dict[int, set[int]] = {}
    attention: dict[int, bool] = {}
    for name in names:
        if m := _DOWN_BLOCK.match(name):
            level = int(m[1])
            if m[2] == "resnets":
                resnets.setdefault(level, set()).add(int(m[3]))
            else:
                attention[level] = True
    levels = sorted(resnets)
    if not levels or levels != list(range(len(levels))):
        return {}
    table = unet_module_table([len(resnets[i]) for i in levels], [attention.get(i, False) for i in levels],
                              has_mid_block=any(n.startswith("mid_block.") for n in names))
    back = {ours: (orig, {v: k for k, v in renames.items()}) for orig, (ours, renames) in table.items()}
    back.update({ours: (orig, {}) for orig, ours in SGM_EXTRA.items()})
    out = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest module of the table that holds `name`
            head = ".".join(parts[:cut])
            if head in back:
                orig, renames = back[head]
                rest = parts[cut:]
                for inner in range(len(rest), 0, -1):
                    if ".".join(rest[:inner]) in renames:
                        rest = renames[".".join(rest[:inner])].split(".") + rest[inner:]
                        break
                out[name] = ".".join([orig, *rest])
                break
    return out


def _lora_kind(layers: list[LoraLayer]) -> str | None:
    """"SDXL" or "SD 1.x/2.x" where the layer names tell, else None: SDXL has a second text tower, an
    added-condition MLP and spatial transformers of depth 2 and 10 (SD 1.x/2.x: 1), and no attention at the first
    level, which SD 1.x/2.x has."""
    unet = [layer.module.replace("_", ".") for layer in layers if layer.part == "unet"]
    if any(layer.part == "text_encoder_2" for layer in layers) or any(
            "add.embedding" in m or "label.emb" in m or re.search(r"transformer\.blocks\.[1-9]", m) for m in unet):
        return "SDXL"
    if any(m.startswith(("down.blocks.0.attentions.", "input.blocks.1.1.", "input.blocks.2.1.")) for m in unet):
        return "SD 1.x/2.x"
    return None


def _model_kind(models: dict[str, torch.nn.Module | None]) -> str | None:
    """"SDXL" (two text towers), "SD 1.x/2.x" (one CLIP text encoder) or None (another model)."""
    if "text_encoder_2" in models:
        return "SDXL"
    config = getattr(models.get("text_encoder"), "config", None)
    return "SD 1.x/2.x" if str(getattr(config, "model_type", "")).startswith("clip") else None


def part_strengths(strength: float | tuple[float, float]) -> dict[str, float]:
    """A LoRA's strength per part: one number for all, or (text encoders', U-Net's) as AUTOMATIC1111's
    `<lora:name:te:unet>`."""
    te, unet = (strength, strength) if isinstance(strength, (int, float)) else strength
    return {"unet": float(unet), "text_encoder": float(te), "text_encoder_2": float(te)}


@torch.no_grad()
def merge_lora(models: dict[str, torch.nn.Module | None], layers: list[LoraLayer],
               strength: float | tuple[float, float] = 1.0, source: str = "LoRA", before=None) -> dict[str, int]:
    """W += s (alpha / r) B A for every layer, in place (the weights' version counters move, so cached
    fast/exact copies are rebuilt). `models`: {"unet": ..., "text_encoder": <a torch module or None>}, and for
    SDXL "text_encoder_2" (the second tower). `strength`: s, or (the text encoders' s, the U-Net's s). Everything
    is checked before the first weight changes. `before(w)` is called with each weight before it changes (to keep
    it, for an exact unmerge). Returns the layers merged per part."""
    strengths = part_strengths(strength)
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
        kind, model_kind = _lora_kind(layers), _model_kind(models)
        what = (f"it is a LoRA for {kind} and this model is {model_kind} (its layers are not this model's); "
                if None not in (kind, model_kind) and kind != model_kind else "")
        raise ValueError(f"{source}: does not fit this model; {what}" + "; ".join(problems[:5])
                         + (f" ... ({len(problems)} in all)" if len(problems) > 5 else ""))
    counts: dict[str, int] = {}
    for mod, layer in plan:
        w = mod.weight
        if before is not None:
            before(w)
        w.copy_((w.float() + layer.delta(strengths[layer.part]).reshape(w.shape)).to(w.dtype))
        counts[layer.part] = counts.get(layer.part, 0) + 1
    return counts
