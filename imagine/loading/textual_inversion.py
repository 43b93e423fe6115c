"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): new words for the
text encoder.

An embedding is n learned vectors v_1..v_n in the text encoder's token-embedding space (eq. 2 of
the paper optimises them with the whole model frozen). Loading one adds n tokens to the tokenizer,
`<name>`, `<name>_1`, ..., `<name>_{n-1}`, with those vectors as their rows of the embedding matrix;
a prompt that says `<name>` then reads all n (AUTOMATIC1111 and diffusers' `maybe_convert_prompt`
expand the word the same way). Nothing else in the model changes. People keep them as files beside
their checkpoints, most often for negative prompts; the layouts read here, offline:

- AUTOMATIC1111's `.pt` (`{"string_to_param": {"*": [n, d]}, "name": ..., "step": ...}`, read with
  `torch.load(weights_only=True)`) and `.safetensors` (`emb_params`: [n, d]); the word is the file's
  name without its suffix, as in AUTOMATIC1111;
- diffusers' `learned_embeds.safetensors` / `.bin` (`{"<token>": [d] or [n, d]}`); the word is that token;
- SDXL's (AUTOMATIC1111, and what diffusers' SDXL examples load): `clip_l` [n, 768] and `clip_g` [n, 1280],
  one set of n vectors for each text tower (CLIP ViT-L, OpenCLIP bigG); the word is the file's name. The
  word goes to both towers, each with its own vectors (`add_sdxl_embedding`), as diffusers'
  `load_textual_inversion(state["clip_l"], token, text_encoder, tokenizer)` and the same with `clip_g`,
  `text_encoder_2`, `tokenizer_2` do.

`token=` names the word instead. An embedding made for another text encoder (its width differs; SDXL's
two-tower files on SD 1.x/2.x, a one-tower file on SDXL) and a token the tokenizer's vocabulary already holds
(e.g. `red</w>`) are refused. A word is matched wherever a prompt says it, whatever its case: an embedding
named like a common word (`circle`) takes that word over, as in AUTOMATIC1111 and diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


SDXL_TOWERS = ("clip_l", "clip_g")  # SDXL files' vectors for the first and the second text tower
# which of SDXL's text encoders each takes (the refiner has the second alone, bigG, diffusers' text_encoder_2)
TOWER_NAMES = {"clip_l": "SDXL's first text encoder", "clip_g": "SDXL's second text encoder"}


def read_embedding(path: str | os.PathLike) -> tuple[str | None, torch.Tensor]:
    """(the word the file names or None, the vectors [n, d]) of an SD 1.x/2.x embedding file."""
    token, vectors = read_embedding_file(path)
    if isinstance(vectors, dict):
        raise ValueError(_sdxl_on_sd(Path(path).name))
    return token, vectors


def _sdxl_on_sd(source: str) -> str:
    return (f"{source} is an SDXL embedding (clip_l / clip_g vectors, for SDXL's two text encoders); this model is "
            "SD 1.x/2.x, with one text encoder")


def read_embedding_file(path: str | os.PathLike) -> tuple[str | None, torch.Tensor | dict[str, torch.Tensor]]:
    """(the word the file names or None, the vectors [n, d]) of an embedding file; for an SDXL file the vectors
    are {"clip_l": [n, d1], "clip_g": [n, d2]}."""
    from imagine.loading.single_file import read_weights_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding not found: {path} (give a .pt, .bin or .safetensors file)")
    obj = read_weights_file(path)  # (the checkpoints' reader: its format from its first bytes, weights-only pickles)
    return embedding_vectors(obj, path.name)


def embedding_vectors(obj, source: str) -> tuple[str | None, torch.Tensor | dict[str, torch.Tensor]]:
    """`read_embedding_file` on an embedding's contents (a file's, or one bundled in a LoRA file)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a textual-inversion embedding")
    token = None
    if any(k in obj for k in SDXL_TOWERS):
        missing = [k for k in SDXL_TOWERS if k not in obj]
        if missing:
            raise ValueError(f"{source}: an SDXL embedding needs clip_l and clip_g vectors; {missing[0]} is missing")
        parts = {k: _check_vectors(obj[k], f"{source} ({k})") for k in SDXL_TOWERS}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise ValueError(f"{source}: clip_l holds {parts['clip_l'].shape[0]} vectors and clip_g "
                             f"{parts['clip_g'].shape[0]}; an SDXL word needs as many for each text encoder")
        return None, parts
    if isinstance(obj.get("string_to_param"), dict) and obj["string_to_param"]:  # AUTOMATIC1111 .pt
        if len(obj["string_to_param"]) > 1:  # (AUTOMATIC1111: "embedding file has multiple terms in it")
            raise ValueError(f"{source}: its string_to_param holds {len(obj['string_to_param'])} terms "
                             f"({', '.join(map(str, obj['string_to_param']))}); an embedding file holds one")
        vectors = next(iter(obj["string_to_param"].values()))
    elif "emb_params" in obj:  # AUTOMATIC1111 .safetensors
        vectors = obj["emb_params"]
    elif len(obj) == 1 and torch.is_tensor(next(iter(obj.values()))):  # diffusers: {"<token>": vectors}
        token, vectors = next(iter(obj.items()))
    else:
        raise ValueError(f"{source}: not a textual-inversion embedding; expected string_to_param (AUTOMATIC1111 "
                         f".pt), emb_params (.safetensors) or one {{token: vectors}} entry (diffusers); found "
                         f"{sorted(map(str, obj))[:6]}")
    return token, _check_vectors(vectors, source)


def _check_vectors(vectors, source: str) -> torch.Tensor:
    if not torch.is_tensor(vectors) or vectors.ndim not in (1, 2) or not vectors.is_floating_point() \
            or vectors.numel() == 0:
        raise ValueError(f"{source}: the embedding should be float vectors [n, width]; got "
                         f"{tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__}")
    return vectors.reshape(-1, vectors.shape[-1]).detach()


def word_tokens(token: str, n: int) -> list[str]:
    """The n tokens that carry an n-vector embedding: token, token_1, ..., token_{n-1} (diffusers' and
    AUTOMATIC1111's naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


@torch.no_grad()
def add_embedding(encoder, token: str, vectors: torch.Tensor, source: str = "embedding",
                  check_only: bool = False) -> list[str]:
    """Give `encoder` (a TextEncoder over a transformers model with a token-embedding matrix) the word
    `token` read as `vectors` [n, d]; returns the n tokens added (check_only: only the checks, nothing added)."""
    if isinstance(vectors, dict):
        raise ValueError(_sdxl_on_sd(source))
    _check_fits(encoder, token, vectors, source, "this model's text encoder", "(SD 1.x: 768, SD 2.x: 1024)")
    return [] if check_only else _add(encoder, token, vectors)


@torch.no_grad()
def add_sdxl_embedding(towers, token: str, vectors: dict[str, torch.Tensor] | torch.Tensor,
                       source: str = "embedding", check_only: bool = False) -> list[str]:
    """Give SDXL's two text towers the word `token`: the first reads it as `vectors["clip_l"]`, the second as
    `vectors["clip_g"]` (n vectors each). The refiner's one tower is bigG, the second: it takes `clip_g` (as
    diffusers' refiner pipeline loads clip_g into its text_encoder_2). Every tower is checked before any changes;
    returns the n tokens added (check_only: only the checks)."""
    if not isinstance(vectors, dict):
        raise ValueError(f"{source} is an SD 1.x/2.x embedding (one set of {vectors.shape[-1]}-wide vectors, for one "
                         "text encoder); an SDXL model needs an SDXL embedding, with clip_l and clip_g vectors for "
                         "its two text encoders")
    pairs = list(zip(towers, SDXL_TOWERS[-len(towers):]))  # (the last ones: a refiner's one tower is bigG)
    for tower, key in pairs:
        _check_fits(tower, token, vectors[key], f"{source} ({key})", TOWER_NAMES[key],
                    "(SDXL: clip_l 768, clip_g 1280)")
    if check_only:
        return []
    added = [_add(tower, token, vectors[key]) for tower, key in pairs]
    return added[0]


def _check_fits(encoder, token: str, vectors: torch.Tensor, source: str, what: str, widths: str) -> None:
    emb = encoder.model.get_input_embeddings()
    if vectors.shape[-1] != emb.weight.shape[1]:
        raise ValueError(f"{source}: its vectors are {vectors.shape[-1]} wide, {what} takes "
                         f"{emb.weight.shape[1]}; it was made for another model {widths}")
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{source}: the word {token!r} must be one non-empty word without spaces")
    known = [t for t in word_tokens(token, vectors.shape[0]) if t in encoder.tokenizer.get_vocab()]
    if known:
        raise ValueError(f"{source}: the tokenizer's vocabulary already has the token {known[0]!r}; name the "
                         "embedding another word (token=..., or --embedding PATH:WORD)")


def _resize(model, n: int) -> None:
    """`model.resize_token_embeddings(n)`, whose new rows are about to be overwritten: without transformers' mean
    resizing (a multivariate normal over the old rows' covariance, O(width^3)), and with torch's global random state
    kept, which the new rows' initialisation draws from (a seeded script's later draws stay as they were)."""
    import inspect

    takes = inspect.signature(model.resize_token_embeddings).parameters
    options = {"mean_resizing": False} if "mean_resizing" in takes else {}  # (transformers >= 4.46)
    weight = model.get_input_embeddings().weight
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        model.resize_token_embeddings(n, **options)


def _add(encoder, token: str, vectors: torch.Tensor) -> list[str]:
    model, tok = encoder.model, encoder.tokenizer
    tokens = word_tokens(token, vectors.shape[0])
    tok.add_tokens(tokens)
    ids = tok.convert_tokens_to_ids(tokens)
    _resize(model, len(tok))
    emb = model.get_input_embeddings()
    emb.weight[ids] = vectors.to(device=emb.weight.device, dtype=emb.weight.dtype)
    encoder.expansions[token] = " ".join(tokens)
    return tokens
