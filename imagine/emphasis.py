"""Prompt emphasis in AUTOMATIC1111's syntax: `(word)`, `[word]`, `(word:1.3)`.

A weight per piece of the prompt scales the text encoder's states of that piece's tokens; the states
are then rescaled so that their mean stays what it was (AUTOMATIC1111's default emphasis, "Original"):

    z' = z * w,    z'' = z' * mean(z) / mean(z'),

with w per token (1 for the start, end and padding tokens); its "No norm" mode (A1111 1.8+) stops at z'
(`apply_emphasis(..., mode="No norm")`). The syntax, as AUTOMATIC1111 documents it:
`(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by
w; brackets nest (their factors multiply); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters
themselves (a lone backslash is dropped, though, as in A1111, it keeps the text on its two sides apart where
its weight differs from theirs: `.(\\:2)]` is the pieces "." and "]"); a bracket left open applies to the rest of
the prompt; A1111's `BREAK` starts a new 75-token chunk where prompts are read in chunks (`imagine.long_prompts`);
in one window it is taken out with a warning. A BREAK inside brackets, `(a BREAK b)`, starts a new chunk here too,
where AUTOMATIC1111 multiplies its BREAK marker's weight by the brackets' factor and then no longer recognises it,
so it reads the word "BREAK" as text with that (negative) weight: an oddity of its own not followed. Each
piece is tokenized on its own, so a piece's tokens carry exactly its weight.

Off by default in the pipeline and the CLI (`--emphasis`), where a prompt means what diffusers reads in
it; on for the server's AUTOMATIC1111 API, whose clients write prompts in this syntax.

ComfyUI reads its own form of the syntax (mode "ComfyUI", its comfy/sd1_clip.py; the server's ComfyUI API):
`(text)` multiplies by 1.1 and nests, `(text:w)` sets the weight to w (not a product), `[text]` is text, `\\(` and
`\\)` are the characters (`parse_comfyui`); and it weights a token's state towards the empty prompt's state at the
same position instead of scaling it, z' = z_empty + (z - z_empty) w, with no rescale (`apply_comfyui`).
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

ROUND, SQUARE = 1.1, 1 / 1.1
# AUTOMATIC1111's "emphasis" setting (1.8+, modules/sd_emphasis.py): "None" reads brackets as text; "Ignore" reads the
# syntax but applies no weights; "Original" weights and restores the mean; "No norm" weights without restoring it
EMPHASIS_MODES = ("None", "Ignore", "Original", "No norm")
COMFYUI = "ComfyUI"  # ComfyUI's weights (parse_comfyui, apply_comfyui): a mode of generate's, not one of A1111's
BREAK = re.compile(r"\s*\bBREAK\b\s*")
_TOKENS = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes
\(|\[|                        # openings
:\s*([+-]?[.\d]+)\s*\)|       # a weighted closing: (text:1.3)
\)|]|                         # closings
[^\\()\[\]:]+|                # text
:
""", re.X)


def parse_emphasis(text: str, breaks: bool = False) -> list[tuple[str, float | None]]:
    """`text` -> [(piece, weight)], neighbouring pieces of one weight merged; a text without pieces -> [("", 1)].
    `breaks`: each BREAK becomes ("BREAK", None), where a new chunk starts (imagine.long_prompts); else it is
    taken out, with a warning: one window has no chunks to break."""
    if not breaks and BREAK.search(text):
        log.warning("emphasis: BREAK (AUTOMATIC1111's new 75-token chunk) needs prompts read in chunks "
                    "(long_prompts, --long-prompts); the prompt continues in one window without it")
        text = BREAK.sub(" ", text)
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for p in pieces[start:]:
            if p[1] is not None:  # (a BREAK is not weighted)
                p[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):  # an escaped character is itself; a lone backslash is an empty piece (as A1111)
            pieces.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"emphasis: the weight {weight!r} in {text!r} is not a number, e.g. (word:1.3)") from None
            scale(round_open.pop(), w)
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, and a closing or a ":w)" with nothing open: the characters themselves
            for k, part in enumerate(BREAK.split(tok) if breaks else [tok]):
                if k:
                    pieces.append(["BREAK", None])
                pieces.append([part, 1.0])
    for start in round_open:  # left open: to the end
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    # Neighbours of one weight merge as in A1111, empty pieces (a lone backslash, a BREAK's edges) included: an empty
    # piece of another weight keeps the text on its two sides apart, each side then tokenized on its own
    # (`.(\\:2)]`: "." and "]", not ".]"); then the empty pieces, which have no tokens, are left out.
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1] and piece[1] is not None:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(p, w) for p, w in merged if p or w is None] or [("", 1.0)]


def parse_comfyui(text: str) -> list[tuple[str, float]]:
    """`text` -> [(segment, weight)] as ComfyUI's token_weights reads it: a parenthesised group at the top level
    (parse_parentheses: a ")" with nothing open is text, one left open runs to the end as text) weighs its inside 1.1
    times the weight around it, or w where it ends in ":w" (the last colon; a colon not followed by a number is text);
    groups nest; escaped `\\(` / `\\)` are the characters. Empty segments are left out."""
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")

    def groups(s: str) -> list[str]:
        out, current, depth = [], "", 0
        for ch in s:
            if ch == "(":
                if depth == 0:
                    if current:
                        out.append(current)
                    current = "("
                else:
                    current += ch
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    out.append(current + ")")
                    current = ""
                else:
                    current += ch
            else:
                current += ch
        if current:
            out.append(current)
        return out

    def weights(s: str, current: float) -> list[tuple[str, float]]:
        out = []
        for g in groups(s):
            if len(g) >= 2 and g[0] == "(" and g[-1] == ")":
                inner, w = g[1:-1], current * 1.1
                colon = inner.rfind(":")
                if colon > 0:
                    try:
                        w = float(inner[colon + 1:])
                        inner = inner[:colon]
                    except ValueError:
                        pass
                out += weights(inner, w)
            else:
                out.append((g, current))
        return out

    pieces = [(p.replace("\0\1", ")").replace("\0\2", "("), w) for p, w in weights(escaped, 1.0)]
    return [(p, w) for p, w in pieces if p]


def apply_comfyui(states: torch.Tensor, weights: torch.Tensor, empty) -> torch.Tensor:
    """ComfyUI's weights (its encode_token_weights): where a token's weight is not 1, its state moves along the line
    from the empty prompt's state at that position, z_empty + (z - z_empty) w; `empty` [1 or B, N, D] is the encoding
    of the empty prompt's window (start, end, padding), or a callable giving it: called only where a weight is not 1
    (ComfyUI encodes the empty prompt only then)."""
    if not bool((weights != 1).any()):
        return states
    w = weights.to(states.dtype)[..., None]
    e = (empty() if callable(empty) else empty).to(states.dtype)
    return torch.where(w != 1, (states - e) * w + e, states)


def weighted_tokens(tokenizer, text: str, max_length: int, comfyui: bool = False
                    ) -> tuple[list[int], list[float], int, int]:
    """The ids of `text` with its emphasis taken out, with the tokenizer's own start / end tokens and padding to
    `max_length`, a weight per id (1 for those), how many are real (not padding), and how many tokens past the
    window were cut. Each piece is tokenized on its own (its tokens carry its weight). `comfyui`: ComfyUI's syntax
    (parse_comfyui)."""
    ids, weights = [], []
    for piece, w in (parse_comfyui(text) if comfyui else parse_emphasis(text)):
        if not piece:
            continue
        tok = token_ids(tokenizer, piece, False)
        ids += tok
        weights += [w] * len(tok)
    before, after, padding = special_tokens(tokenizer, max_length)
    room = max_length - len(before) - len(after)
    cut = max(0, len(ids) - room)
    ids, weights = before + ids[:room] + after, [1.0] * len(before) + weights[:room] + [1.0] * len(after)
    n = len(ids)
    return ids + padding[: max_length - n], weights + [1.0] * (max_length - n), n, cut


def special_tokens(tokenizer, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """The tokenizer's own special tokens before and after a text (CLIP: start / end, BERT: [CLS] / [SEP], T5:
    end only) and its padding (CLIP for SD 1: the end token again; SD 2's OpenCLIP: "!", id 0)."""
    bare, marked = token_ids(tokenizer, "a", False), token_ids(tokenizer, "a", True)
    head = next(i for i in range(len(marked)) if marked[i:i + len(bare)] == bare)
    before, after = marked[:head], marked[head + len(bare):]
    padded = token_ids(tokenizer, "", True, max_length)  # the specials, then the padding
    return before, after, padded[len(before) + len(after):]


def token_ids(tokenizer, text: str, special: bool, pad_to: int | None = None) -> list[int]:
    """One text's ids, through the call that transformers' tokenizers and imagine.models.bert's both take."""
    kw = dict(padding="max_length", max_length=pad_to, truncation=True) if pad_to else dict(truncation=False)
    return list(tokenizer([text], add_special_tokens=special, verbose=False, **kw)["input_ids"][0])


def emphasis_mode(emphasis) -> str:
    """generate's `emphasis` as one of A1111's modes (EMPHASIS_MODES): False or None -> "None" (brackets are text),
    True -> "Original"; a mode as it is."""
    if emphasis is None or emphasis is False:
        return "None"
    if emphasis is True:
        return "Original"
    if isinstance(emphasis, str) and (emphasis in EMPHASIS_MODES or emphasis == COMFYUI):
        return emphasis
    raise ValueError(f"emphasis must be True, False, one of AUTOMATIC1111's modes {', '.join(EMPHASIS_MODES)} or "
                     f"{COMFYUI!r}; got {emphasis!r}")


def emphasis_record(emphasis, texts: list[str]) -> str | None:
    """A run's record of its emphasis (its parameters' "emphasis"): "a1111" for the "Original" mode; for A1111's other
    modes their name ("none", "no_norm", "ignore") where a text has brackets, as A1111 writes its "Emphasis: ..."
    only then; else None."""
    mode = emphasis_mode(emphasis)
    if mode == "Original":
        return "a1111"
    if mode == COMFYUI:
        return "comfyui" if any("(" in t for t in texts) else None
    return mode.lower().replace(" ", "_") if any("(" in t or "[" in t for t in texts) else None


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None,
                   mode: str = "Original") -> torch.Tensor:
    """z * w rescaled to z's mean, per prompt (AUTOMATIC1111's "Original" emphasis). `mask`: the tokens an
    encoder's states count for (None: all, as CLIP's 77). `mode`: A1111's emphasis setting (its sd_emphasis, 1.8+):
    "Original"; "No norm", z * w without the rescale ("seems to work better for SDXL"); "Ignore" (the syntax read,
    its weights not applied) and "None" (nothing to apply: the brackets were text) leave the states as they are."""
    if mode not in EMPHASIS_MODES:
        raise ValueError(f"emphasis mode must be one of {', '.join(EMPHASIS_MODES)} (AUTOMATIC1111's); got {mode!r}")
    if mode in ("None", "Ignore"):
        return states
    if mode == "No norm":
        return states * weights.to(states.dtype)[..., None]
    m = (torch.ones_like(weights) if mask is None else mask).to(states.dtype)[..., None]
    count = m.sum(dim=(1, 2), keepdim=True).clamp_min(1) * states.shape[-1]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return (t * m).sum(dim=(1, 2), keepdim=True) / count

    z = states * weights.to(states.dtype)[..., None]
    before, after = mean(states), mean(z)
    # (a mean of zero - a text encoder whose last LayerNorm has no bias - leaves nothing to rescale to)
    return z * torch.where(after.abs() > 1e-12, before / after, torch.ones_like(after))
