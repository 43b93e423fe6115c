"""A BERT encoder (Devlin et al. 2019) for the default text encoder, all-MiniLM-L6-v2, with its WordPiece
tokenizer read through the `tokenizers` library.

Why not transformers' BertModel: importing transformers' modelling code (modeling_utils, generation,
masking_utils, torch._dynamo) took about 4.5 of the 9.8 seconds of a cold `imagine generate` on a 2-core
AVX2 machine, for a 6-layer encoder that is thirty lines of torch. The parameter names are BERT's own, so
the package's `model.safetensors` loads as it is, and tests/test_text_encoders.py holds the states to
transformers' BertModel on the same weights. Other text models (CLIP, T5, BERTs with other position or
activation choices) still go through transformers.

Post-LayerNorm blocks (Vaswani et al. 2017 / BERT): x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x)); keys at
padded positions are masked out of the attention (BERT's attention_mask); learned absolute positions and
token-type (segment 0) embeddings are added to the word embeddings, then a LayerNorm.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False}


def supports(config: dict) -> bool:
    """Whether `config` (a transformers config.json) describes a BERT this module computes exactly (an encoder: a
    BERT with is_decoder attends causally in transformers, where these blocks attend both ways)."""
    return (config.get("model_type") == "bert" and config.get("hidden_act", "gelu") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute" and not config.get("is_decoder", False))


class _Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, keep):
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(d_head)) v over the real (unpadded) keys
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return out.transpose(1, 2).reshape(b, n, d)


class _Dense(nn.Module):  # BERT's "output" blocks: dense, then LayerNorm of the residual sum
    def __init__(self, cin, cout, eps):
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        self.LayerNorm = nn.LayerNorm(cout, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Dense(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x, keep):
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # the exact (erf) GELU: BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Dense(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x, keep):
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT's encoder stack: ids [B, L] and mask [B, L] (True or 1 = a real token) -> states [B, L, D]."""

    def __init__(self, config: dict):
        super().__init__()
        if not supports(config):
            raise ValueError(f"BertEncoder computes {SUPPORTED}; this config has "
                             f"{ {k: config.get(k) for k in SUPPORTED} }")
        self.config = SimpleNamespace(**config)
        self.embeddings = _Embeddings(self.config)
        self.encoder = _Encoder(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "BertEncoder":
        """A transformers-format BERT folder: config.json and model.safetensors (the pooler, which we do not
        use, and the position_ids buffer are the only keys left out)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        # (built on the CPU without its random draws: a meta-device build runs nn.init through torch._refs, which
        # imports torch._dynamo, seconds of import for nothing)
        from imagine.models.io import without_random_init

        with without_random_init():
            model = cls(config)
        state = load_file(str(folder / "model.safetensors"))
        state = {k.removeprefix("bert."): v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        extra = {k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids"}
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in extra},
                                                    strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{folder / 'model.safetensors'} is not a BERT checkpoint of this config: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model.eval().requires_grad_(False)


class WordPieceTokenizer:
    """The folder's tokenizer.json through `tokenizers`, called the way TextEncoder.tokenize calls a
    transformers tokenizer (the subset it uses: plain ids, or padded and truncated to max_length as tensors)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    def __call__(self, prompts, *, add_special_tokens=True, truncation=False, padding=None, max_length=None,
                 return_tensors=None, verbose=True):
        tok = self._tok
        if truncation and max_length:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        if padding == "max_length" and max_length:
            tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        else:
            tok.no_padding()
        enc = tok.encode_batch(list(prompts), add_special_tokens=add_special_tokens)
        tok.no_padding()
        tok.no_truncation()
        ids = [e.ids for e in enc]
        mask = [e.attention_mask for e in enc]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def folder_is_supported(folder: str | Path) -> bool:
    """Whether a text-encoder folder can run on BertEncoder + WordPieceTokenizer."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return supports(config) and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
