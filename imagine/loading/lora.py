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
  diffusers' underscored names are read too; peft's `lora_A` / `lora_B` under these layer names are down / up,
  as AUTOMATIC1111 reads them (diffusers refuses them);
- diffusers / peft (`unet.down_blocks.0....to_q.lora_A.weight`, `.lora_B.weight`;
  `text_encoder.text_model.encoder...`, `text_encoder_2....` for SDXL's second tower), alpha and rank
  from the `lora_adapter_metadata` that diffusers writes into the safetensors header (`unet.lora_alpha`,
  `unet.r`, `...alpha_pattern`, `...rank_pattern`, `use_rslora`), or from `.alpha` entries;
- diffusers' older attention-processor names (`...attn1.processor.to_q_lora.down.weight`, and
  `.lora.down.weight` / `.lora_linear_layer.down.weight`).

With no alpha given, alpha = r (a scale of 1), as kohya-ss and diffusers take it. A LoRA made on a 4-channel U-Net
merges into an inpainting model (9 input channels) as AUTOMATIC1111 merges it: its update of the first convolution
acts on the latent channels, zeros for the other five.

LyCORIS' other kinds, in kohya-ss names, are merged as AUTOMATIC1111's built-in Lora extension merges them
(`update` has the formulas): LoCon's Tucker form (`lora_mid`), LoHa (`hada_w1_a` ...), LoKr (`lokr_w1` ...),
full differences (`diff`, `diff_b`) and norm differences (`w_norm`, `b_norm`), each with its scale, alpha / r
(r the inner size of the low-rank product, none for whole factors), or the file's `scale`. DoRA (Liu et al.
2024) comes as LyCORIS' `dora_scale` beside any of them (AUTOMATIC1111's rule) or as peft's
`lora_magnitude_vector` in diffusers' files (diffusers' rule); `LoraLayer.delta` says how the two differ.
A file with a key that is none of these (OFT, (IA)^3, GLoRA), or that names a layer the model does not
have, is refused with the keys it could not place: a LoRA applied in part is a different model. Textual-inversion
embeddings bundled in the file (`bundle_emb.<word>.*`, kohya-ss / AUTOMATIC1111) are read beside the layers
(`read_lora_file`, `bundled_embeddings`). An
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

# kohya-ss / AUTOMATIC1111 / LyCORIS: <prefix>_<the module's name with _ for .>.<entry>
KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([^.]+)\.(.+)$")
# a layer's entries in those files -> their names here (AUTOMATIC1111's extensions-builtin/Lora reads the same; its
# network_lora also takes peft's lora_A / lora_B under a kohya-ss layer name, as down / up)
KOHYA_ENTRIES = {"lora_down.weight": "lora_down", "lora_up.weight": "lora_up", "lora_mid.weight": "lora_mid",
                 "lora_A.weight": "lora_down", "lora_B.weight": "lora_up",
                 **{e: e for e in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                                   "diff", "diff_b", "w_norm", "b_norm", "dora_scale", "alpha", "scale")}}
# which entries make a layer of each kind, and which are optional
KINDS = {"lora": ({"lora_down", "lora_up"}, {"lora_mid"}),
         "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
         "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
         "full": ({"diff"}, {"diff_b"}),
         "norm": ({"w_norm"}, {"b_norm"})}
DORA = ("dora_scale", "magnitude")  # LyCORIS' (AUTOMATIC1111's rule), peft's (diffusers' rule)
_PART = r"(?:(unet|text_encoder_2|text_encoder)\.)?"
DIFFUSERS = re.compile(rf"^{_PART}(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                       r"lora_linear_layer\.up)(?:\.default(?:_0)?)?\.weight$")
DIFFUSERS_ALPHA = re.compile(rf"^{_PART}(.+)\.alpha$")
# peft's DoRA magnitudes as diffusers saves them (`...to_q.lora_magnitude_vector`, older peft: `.weight` after it)
DIFFUSERS_MAGNITUDE = re.compile(rf"^{_PART}(.+?)\.lora_magnitude_vector(?:\.default(?:_0)?)?(?:\.weight)?$")
# diffusers' attention processors (save_attn_procs, 0.14-0.20) named their LoRA after the projection:
# unet ...attn1.processor.to_q_lora.down.weight; text encoder ...self_attn.to_q_lora.down.weight (= q_proj)
PROCESSOR = re.compile(rf"^{_PART}(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_CLIP_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text_encoder": _CLIP_PROCESSOR, "text_encoder_2": _CLIP_PROCESSOR}
PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
         "unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
# LyCORIS' other kinds, by an entry of theirs: refused (AUTOMATIC1111 reads them, rarely met in SD files)
OTHER_KINDS = {"oft_blocks": "a LyCORIS OFT", "oft_diag": "an OFT", "on_input": "a LyCORIS (IA)^3",
               "a1.weight": "a LyCORIS GLoRA", "b1.weight": "a LyCORIS GLoRA"}
# the original (LDM / SGM) U-Net's modules outside the block table of keymap.unet_module_table: SDXL's MLP over
# [pooled text, size codes], which diffusers calls add_embedding
SGM_EXTRA = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A convolution kernel from its Tucker (CP) factors, as LyCORIS stores a "tucker" layer: a core t [r, r', kh, kw]
    between the 1x1 maps wa [r, out] and wb [r', in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def _low_rank(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """B A over the inner size: up [d, r, ...] and down [r, k, ...] -> [d, k * ...]."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def update(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's update before its scale, from the entries of one kind (KINDS):
    - LoRA / LoCon: B A (Hu et al. 2021 eq. 3); with `lora_mid` (LoCon's Tucker form) up, mid and down as three
      convolutions in a row, 1x1 -> kh x kw -> 1x1, folded into one kernel;
    - LoHa (Hyeon-Woo et al. 2022, FedPara eq. 2): (B1 A1) * (B2 A2), the element-wise product of two low-rank
      products, each optionally in Tucker form;
    - LoKr (Yeh et al. 2024, LyCORIS): W1 (x) W2, the Kronecker product, each factor whole or low-rank (W2 also in
      Tucker form); a convolution's kernel comes with W2;
    - full and norm differences: the difference itself.
    Rows are the output channels; the shape is the product's own (the caller reshapes to the weight's)."""
    if "lora_down" in w:
        up, down = w["lora_up"], w["lora_down"]
        if "lora_mid" in w:  # (the same Tucker form as LoHa's and LoKr's, its 1x1 maps stored as convolutions)
            return make_weight_cp(w["lora_mid"], up.reshape(up.shape[0], -1).T, down.reshape(down.shape[0], -1))
        return _low_rank(up, down)
    if "hada_w1_a" in w:
        halves = []
        for i in ("1", "2"):
            a, b, t = w[f"hada_w{i}_a"], w[f"hada_w{i}_b"], w.get(f"hada_t{i}")
            halves.append(_low_rank(a, b) if t is None else make_weight_cp(t, a, b).flatten(1))
        return halves[0] * halves[1]
    if any(k.startswith("lokr_") for k in w):
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        # the Kronecker product W1 (x) W2 over the first two axes, [o1 o2, i1 i2, kh, kw] (einsum: works on meta)
        kron = torch.einsum("ij,kl...->ikjl...", w1, w2)
        return kron.reshape(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return w["diff"] if "diff" in w else w["w_norm"]


@dataclass
class LoraLayer:
    """One layer's update in an adapter file: its entries under LyCORIS' names (KINDS: lora_down / lora_up /
    lora_mid, hada_*, lokr_*, diff / diff_b, w_norm / b_norm; DoRA's `dora_scale` or peft's `magnitude`), alpha,
    and an explicit `scale` (which AUTOMATIC1111 takes in place of alpha / r)."""
    part: str  # "unet", "text_encoder" or (SDXL's second tower) "text_encoder_2"
    module: str  # the layer's name in that part
    w: dict[str, torch.Tensor]
    alpha: float | None = None
    scale: float | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.w)

    @property
    def rank(self) -> int | None:
        """r in alpha / r (AUTOMATIC1111's `dim`): the inner size of the low-rank product (LoKr: W2's, else W1's);
        None where nothing is low-rank (a LoKr of two whole factors, a full or norm difference)."""
        for key in ("lora_down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if key in self.w:
                return self.w[key].shape[0]
        return None

    def factor(self) -> float:
        """The update's scale: `scale` if the file gives one, else alpha / r; 1 without alpha or r (kohya-ss and
        diffusers take a missing alpha as r)."""
        if self.scale is not None:
            return self.scale
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank

    def shape(self) -> torch.Size:
        """The update's shape before reshaping, computed on the meta device (nothing multiplied)."""
        return update({k: v.to("meta") for k, v in self.w.items() if k not in DORA}).shape

    def delta(self, strength: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The change to the layer's weight at strength s, in float32, in `weight`'s shape (needed for DoRA) and on
        its device: s * factor * update; an update made for a 4-channel U-Net's first
        convolution, given an inpainting model's 9-channel one, acts on the 4 latent channels, zeros for the mask
        and masked-image channels (AUTOMATIC1111 pads it so; diffusers refuses the file). With DoRA (Liu et al.
        2024, eq. 5: W' = m (W0 + dW) / ||W0 + dW||), the weight's direction and magnitude set as the file's tool
        does it:
        - LyCORIS' `dora_scale`, AUTOMATIC1111's rule: s ((W0 + dW) m / ||W0 + dW|| - W0), the norm over each
          input column, dW = factor * update (where m has one value per output row, LyCORIS' wd_on_out, the norm
          is over each row, as LyCORIS computes it: A1111 would divide by column norms there too);
        - peft's magnitude (diffusers' files), diffusers' rule: m (W0 + s dW) / ||W0 + s dW|| - W0, rows."""
        device = None if weight is None else weight.device
        d = self.factor() * update({k: v.to(device=device, dtype=torch.float32) for k, v in self.w.items()
                                    if k not in DORA})
        if weight is None:
            if any(k in self.w for k in DORA):
                raise ValueError(f"{self.part} layer {self.module}: DoRA needs the layer's weight")
            return strength * d
        w0 = weight.float()
        if d.numel() != w0.numel() and _inpainting_input(d.numel(), w0.shape):
            # (before DoRA, which then sees the whole weight; AUTOMATIC1111 pads after it and fails there)
            d = torch.nn.functional.pad(d.reshape(w0.shape[0], 4, *w0.shape[2:]), (0, 0, 0, 0, 0, w0.shape[1] - 4))
        d = d.reshape(w0.shape)
        if "dora_scale" in self.w:
            merged, m = w0 + d, self.w["dora_scale"].to(device=device, dtype=torch.float32)
            return strength * (merged * (m.reshape(_dora_shape(m, w0.shape)) / _norms(merged, _dora_axis(m, w0.shape)))
                               - w0)
        if "magnitude" in self.w:
            merged, m = w0 + strength * d, self.w["magnitude"].to(device=device, dtype=torch.float32)
            return m.reshape(_dora_shape(m, w0.shape, rows=True)) * merged / _norms(merged, 0) - w0
        return strength * d

    def bias_delta(self, strength: float = 1.0) -> torch.Tensor | None:
        """A full or norm difference's bias change, s * diff_b (AUTOMATIC1111 leaves alpha out of it), or None."""
        b = self.w.get("diff_b", self.w.get("b_norm"))
        return None if b is None else strength * b.float().flatten()

    def misfit(self, module: torch.nn.Module) -> str | None:
        """Why this update cannot go into `module`, or None when it fits."""
        w = module.weight
        if (self.kind == "norm") != isinstance(module, NORMS):
            return f"a {self.kind} update for a {type(module).__name__}"
        factors = " / ".join(f"{k} {tuple(v.shape)}" for k, v in self.w.items() if k not in DORA)
        try:
            shape = self.shape()
        except (RuntimeError, IndexError, ValueError):  # (what torch says of factors that do not multiply)
            return f"factors {factors} do not multiply"
        if shape[0] != w.shape[0] or (shape.numel() != w.numel() and not _inpainting_input(shape.numel(), w.shape)):
            return f"factors {factors} for a weight of shape {tuple(w.shape)}"
        bias = self.bias_delta()
        if bias is not None and (module.bias is None or module.bias.numel() != bias.numel()):
            return f"a bias difference of {bias.numel()} values for a layer with " + (
                "no bias" if module.bias is None else f"{module.bias.numel()}")
        if w.ndim < 2 and any(k in self.w for k in DORA):
            return "DoRA magnitudes for a layer without input columns (a norm's weight)"
        for key in DORA:
            if key in self.w and _dora_shape(self.w[key], w.shape, rows=key == "magnitude") is None:
                return f"DoRA magnitudes of shape {tuple(self.w[key].shape)} for a weight of shape {tuple(w.shape)}"
        return None


def _inpainting_input(numel: int, shape: torch.Size) -> bool:
    """Whether an update of `numel` values is one for a 4-channel input convolution and `shape` that convolution's
    weight in an inpainting U-Net (9 input channels: the latents, the mask, the masked picture's latents), which
    AUTOMATIC1111 fills up with zeros (networks.network_apply_weights)."""
    return len(shape) == 4 and shape[1] == 9 and numel == shape[0] * 4 * shape[2:].numel()


def _dora_axis(m: torch.Tensor, shape: torch.Size) -> int:
    """0 where DoRA's magnitudes are one per output row (LyCORIS' wd_on_out, shape [out, 1, ...]: LyCORIS' own rule;
    AUTOMATIC1111 divides by column norms whatever the shape, which scrambles such a file), else 1 (one per input
    column, [1, in, ...], the DoRA paper's and AUTOMATIC1111's reading; a 1-D tensor of `in` values too)."""
    per_row = m.ndim >= 2 and m.shape[0] == shape[0] and m[0].numel() == 1 and shape[0] > 1
    return 0 if per_row or (m.ndim == 1 and m.numel() == shape[0] != shape[1]) else 1


def _dora_shape(m: torch.Tensor, shape: torch.Size, rows: bool = False) -> tuple | None:
    """The shape that broadcasts DoRA's magnitudes over a weight of `shape`, or None when their number fits no axis."""
    axis = 0 if rows else _dora_axis(m, shape)
    return _along(shape, axis) if m.numel() == shape[axis] else None


def _along(shape: torch.Size, axis: int) -> tuple:
    """The shape of one value per output row (axis 0: [out, 1, ...]) or per input column (1: [1, in, 1, ...]) of a
    weight of `shape`, which broadcasts over it."""
    return tuple(n if k == axis else 1 for k, n in enumerate(shape))


def _norms(w: torch.Tensor, axis: int) -> torch.Tensor:
    """||w|| over everything but `axis` (0: one norm per output row, 1: per input column), kept broadcastable."""
    return w.transpose(0, axis).flatten(1).norm(dim=1).reshape(_along(w.shape, axis))


def kind_of(w: dict[str, torch.Tensor]) -> str:
    """The kind (KINDS) a layer's entries make: the one kind they all belong to."""
    kinds = {k for k, (need, optional) in KINDS.items() for e in w if e in need | optional}
    return kinds.pop() if len(kinds) == 1 else ""


def read_lora(path: str | os.PathLike) -> list[LoraLayer]:
    """The layers of a LoRA file (.safetensors, or a .ckpt/.pt read with weights_only=True)."""
    return read_lora_file(path)[0]


def read_lora_file(path: str | os.PathLike) -> tuple[list[LoraLayer], dict]:
    """(the layers, the textual-inversion embeddings bundled with them) of a LoRA file; see `bundled_embeddings`."""
    from imagine.loading.single_file import read_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA not found: {path} (give a .safetensors or .ckpt file)")
    state = read_checkpoint(path)
    embeddings = bundled_embeddings(state, path.name)
    return lora_layers({k: v for k, v in state.items() if not k.startswith(BUNDLE)}, path.name,
                       _metadata(path)), embeddings


BUNDLE = "bundle_emb."


def bundled_embeddings(state: dict[str, torch.Tensor], source: str = "LoRA") -> dict:
    """The textual-inversion embeddings a LoRA file bundles (kohya-ss' and AUTOMATIC1111's `bundle_emb.<word>.<key>`:
    an embedding file's entries under its word, `string_to_param.*` / `emb_params` for SD 1.x/2.x, `clip_l` / `clip_g`
    for SDXL) -> {word: vectors [n, d], or {"clip_l": ..., "clip_g": ...}}, as `textual_inversion` reads files."""
    from imagine.loading.textual_inversion import embedding_vectors

    grouped: dict[str, dict] = {}
    for key, value in state.items():
        if not key.startswith(BUNDLE):
            continue
        word, _, entry = key[len(BUNDLE):].partition(".")
        if not word or not entry:
            raise ValueError(f"{source}: {key} names no embedding entry; expected {BUNDLE}<word>.<entry> (e.g. "
                             "emb_params, string_to_param.*, clip_l, clip_g)")
        head, _, sub = entry.partition(".")
        if head == "string_to_param":  # (an A1111 .pt's {"string_to_param": {"*": vectors}}, flattened)
            grouped.setdefault(word, {}).setdefault("string_to_param", {})[sub or "*"] = value
        else:
            grouped.setdefault(word, {})[entry] = value
    out = {}
    for word, entries in grouped.items():
        if not (entries.keys() & {"string_to_param", "emb_params", "clip_l", "clip_g"}):
            raise ValueError(f"{source}: the bundled embedding {word!r} has {sorted(entries)}; expected emb_params or "
                             "string_to_param.* (SD 1.x/2.x) or clip_l and clip_g (SDXL)")
        out[word] = embedding_vectors(entries, f"{source} (bundled embedding {word!r})")[1]
    return out


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
    """An adapter's state dict in any of the namings of the module docstring -> its layers."""
    entries: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown, other = [], {}
    for key, value in state.items():
        if (m := KOHYA.match(key)) and m[3] in KOHYA_ENTRIES:
            entries.setdefault((PARTS[m[1]], m[2]), {})[KOHYA_ENTRIES[m[3]]] = value
        elif m and m[3] in OTHER_KINDS:
            other.setdefault(OTHER_KINDS[m[3]], key)
        elif m := PROCESSOR.match(key):
            part = m[1] or "unet"
            entries.setdefault((part, f"{m[2]}.{PROCESSOR_TARGETS[part][m[3]]}"), {})[f"lora_{m[4]}"] = value
        elif m := DIFFUSERS.match(key):
            which = "lora_down" if m[3] in ("lora_A", "lora.down", "lora_linear_layer.down") else "lora_up"
            entries.setdefault((m[1] or "unet", m[2]), {})[which] = value
        elif m := DIFFUSERS_MAGNITUDE.match(key):
            entries.setdefault((m[1] or "unet", m[2]), {})["magnitude"] = value
        elif m := DIFFUSERS_ALPHA.match(key):
            entries.setdefault((m[1] or "unet", m[2]), {})["alpha"] = value
        else:
            unknown.append(key)
    if other:
        kind, key = next(iter(other.items()))
        raise ValueError(f"{source} looks like {kind} file ({key}); imagine merges LoRA and LoCon, LyCORIS' LoHa, "
                         "LoKr, full and norm differences, and DoRA")
    if unknown:
        raise ValueError(f"{source}: entries that are not LoRA factors: {', '.join(unknown[:5])}"
                         + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
                         + "; expected <layer>.lora_down/lora_up.weight (kohya-ss, AUTOMATIC1111), LyCORIS' "
                           "<layer>.hada_*/lokr_*/diff entries, or <layer>.lora_A/lora_B.weight (diffusers, peft)")
    layers = []
    for (part, module), w in sorted(entries.items()):
        alpha, scale = w.pop("alpha", None), w.pop("scale", None)
        for name, value in (("alpha", alpha), ("scale", scale)):
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"{source}: {part} layer {module}: its {name} holds {value.numel()} values; one "
                                 "number was expected")
        if not w:
            continue  # an alpha alone (kohya-ss writes one for layers it left untrained)
        if problem := _incomplete(w):
            raise ValueError(f"{source}: {part} layer {module} {problem}")
        if (rank := LoraLayer(part, module, w).rank) is not None and alpha is None and "lora_down" in w:
            alpha = _metadata_alpha(metadata or {}, part, module, rank)
        layers.append(LoraLayer(part, module, w, None if alpha is None else float(alpha),
                                None if scale is None else float(scale)))
    if not layers:
        raise ValueError(f"{source} holds no LoRA factors")
    return layers


def _incomplete(w: dict[str, torch.Tensor]) -> str | None:
    """What a layer's entries lack to make one update, or None."""
    update_entries = {k for k in w if k not in DORA}
    if not update_entries:
        return "has DoRA magnitudes and no update"
    kind = kind_of({k: w[k] for k in update_entries})
    if not kind:
        return f"mixes entries of different kinds ({', '.join(sorted(update_entries))})"
    need = KINDS[kind][0]
    if kind == "lora" and len(need & w.keys()) == 1:
        return f"has only its {'up' if 'lora_up' in w else 'down'} factor"
    if kind == "lokr":  # each factor whole, or as its two low-rank factors
        for i in "12":
            need = need | ({f"lokr_w{i}"} if f"lokr_w{i}" in w else {f"lokr_w{i}_a", f"lokr_w{i}_b"})
    missing = sorted(need - w.keys())
    return f"lacks {', '.join(missing)} ({kind})" if missing else None


def _metadata_alpha(metadata: dict, part: str, module: str, rank: int) -> float | None:
    """alpha from diffusers' saved peft LoraConfig: alpha_pattern, else lora_alpha; rsLoRA (Kalajdzievski 2023)
    scales by alpha / sqrt(r), expressed here as the alpha that gives that over r. A pattern is matched as peft's
    get_pattern_key matches it, re.match(rf"(.*\\.)?({pattern})$", module), the first that matches in the file's
    order taking the layer."""
    alpha = metadata.get(f"{part}.lora_alpha")
    for pattern, value in (metadata.get(f"{part}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if alpha is None:
        return None
    return float(alpha) * math.sqrt(rank) if metadata.get(f"{part}.use_rslora") else float(alpha)


def _targets(model: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """The layers an adapter can name in `model` (linear layers, convolutions, and the norms LyCORIS' norm
    differences change), under their dotted names and kohya-ss' underscored ones (CLIP's with and without
    transformers' older `text_model.` level; the U-Net's under the original LDM / SGM names too,
    `original_unet_names`)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, *NORMS)
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, kinds)]
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
    """Each layer's update (`LoraLayer.delta`: W += s (alpha / r) B A for a LoRA) merged in place (the weights'
    version counters move, so cached fast/exact copies are rebuilt). `models`: {"unet": ..., "text_encoder": <a
    torch module or None>}, and for SDXL "text_encoder_2" (the second tower). `strength`: s, or (the text encoders'
    s, the U-Net's s). Everything is checked before the first weight changes. `before(w)` is called with each weight
    (and bias) before it changes (to keep it, for an exact unmerge). Returns the layers merged per part."""
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
        elif misfit := layer.misfit(mod):
            problems.append(f"{layer.part} layer {layer.module}: {misfit}")
        else:
            plan.append((mod, layer))
    if problems:
        kind, model_kind = _lora_kind(layers), _model_kind(models)
        what = (f"it is a LoRA for {kind} and this model is {model_kind} (its layers are not this model's); "
                if None not in (kind, model_kind) and kind != model_kind else "")
        raise ValueError(f"{source}: does not fit this model; {what}" + "; ".join(problems[:5])
                         + (f" ... ({len(problems)} in all)" if len(problems) > 5 else ""))
    counts: dict[str, int] = {}
    for mod, layer in plan:
        s = strengths[layer.part]
        for param, change in ((mod.weight, layer.delta(s, mod.weight)), (mod.bias, layer.bias_delta(s))):
            if change is not None:
                if before is not None:
                    before(param)
                param.copy_((param.float() + change.reshape(param.shape).to(param.device)).to(param.dtype))
        counts[layer.part] = counts.get(layer.part, 0) + 1
    return counts
