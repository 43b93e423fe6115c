"""Prompts longer than CLIP's window, read as AUTOMATIC1111 reads them: in chunks of 75 tokens (ComfyUI cuts its own
way: `comfyui_chunks`).

CLIP's text transformer has 77 positions: a start token, 75 tokens of text and an end token. A longer prompt is
cut into chunks of 75 tokens; each chunk gets its own start and end tokens and padding, is encoded on its own,
and the U-Net cross-attends to the states of all of them side by side, 77 k tokens (cross-attention takes any
number of tokens: LDM eq. 3's K and V are just longer). Where the cut falls, as A1111's `tokenize_line`:

- `BREAK` (when the emphasis syntax is read) ends the chunk there; the rest of it is padding;
- when a chunk is full and its last comma is at most `backtrack` tokens back (A1111's "comma padding
  backtrack", 20), the chunk ends after that comma and the words after it start the next one, so that a
  phrase is not split between two windows;
- a textual-inversion word's vectors (`runs`) stay in one chunk: a word that would not fit starts the next.

Each chunk's emphasis (`imagine.emphasis.apply_emphasis`) is applied to that chunk's states, as A1111 does.
A pooled vector (SDXL's `text_embeds`) is the first chunk's. In a batch, a prompt with fewer chunks than the
longest gets empty chunks (the encoding of ""), as in A1111; a prompt and its negative prompt of different
lengths go through the U-Net apart (`imagine.guidance.guided_model_output`), as A1111 runs them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagine.emphasis import parse_emphasis, special_tokens, token_ids

BACKTRACK = 20  # AUTOMATIC1111's default "comma padding backtrack"


@dataclass
class Chunk:
    """One window: `ids` (max_length of them: start, text, end, padding), a weight per id, and how many of the ids are
    real (start, text, end: what the tokenizer's attention mask marks)."""

    ids: list[int]
    weights: list[float]
    real: int


def prompt_chunks(tokenizer, text: str, max_length: int, emphasis: bool = True, backtrack: int = BACKTRACK,
                  runs: dict[int, list[int]] | None = None) -> list[Chunk]:
    """`text` as its chunks (at least one). `emphasis`: read the `(word:1.3)` syntax and BREAK (off: the text as
    it is, BREAK included, as A1111 reads it with its emphasis set to "None"). `runs`: first id -> the ids of a
    textual-inversion word's vectors, kept in one chunk."""
    before, after, padding = special_tokens(tokenizer, max_length)
    length = max_length - len(before) - len(after)  # 75 for CLIP
    commas = token_ids(tokenizer, ",", False)
    comma = commas[0] if len(commas) == 1 else None
    runs = runs or {}
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_window(before, ids, weights, after, padding, max_length))
        ids, weights, last_comma = [], [], -1

    pieces = parse_emphasis(text, breaks=True) if emphasis else [(text, 1.0)]
    for piece, weight in pieces:
        if weight is None:  # BREAK
            close()
            continue
        tokens = token_ids(tokenizer, piece, False) if piece else []
        at = 0
        while at < len(tokens):
            token = tokens[at]
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == length and last_comma != -1 and len(ids) - last_comma <= backtrack:
                # the words after the chunk's last comma move to the next chunk
                moved, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close()
                ids, weights = moved, moved_weights
            if len(ids) == length:
                close()
            run = runs.get(token)
            if run and tokens[at:at + len(run)] == run:
                if len(run) > length:
                    raise ValueError(f"a textual-inversion word of {len(run)} vectors does not fit in one "
                                     f"{length}-token chunk")
                if len(ids) + len(run) > length:
                    close()
                ids, weights, at = ids + run, weights + [weight] * len(run), at + len(run)
            else:
                ids.append(token)
                weights.append(weight)
                at += 1
    if ids or not chunks:
        close()
    return chunks


def comfyui_chunks(tokenizer, text: str, max_length: int, max_word_length: int = 8) -> list[Chunk]:
    """`text` as ComfyUI cuts it into windows (its SD1Tokenizer.tokenize_with_weights): its weighted segments
    (imagine.emphasis.parse_comfyui), each tokenized whole, are laid in windows of max_length - 2 tokens; a segment
    that does not fit in what is left of a window starts the next one (the rest padded) unless it has
    max_word_length tokens or more, which is cut at the window's end and goes on in the next."""
    from imagine.emphasis import parse_comfyui

    before, after, padding = special_tokens(tokenizer, max_length)
    length = max_length - len(before) - len(after)
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal ids, weights
        chunks.append(_window(before, ids, weights, after, padding, max_length))
        ids, weights = [], []

    for piece, weight in parse_comfyui(text):
        group = token_ids(tokenizer, piece, False)
        large = len(group) >= max_word_length
        while group:
            if len(group) + len(ids) > length:
                if large:
                    room = length - len(ids)
                    ids, weights, group = ids + group[:room], weights + [weight] * room, group[room:]
                close()
            else:
                ids, weights, group = ids + group, weights + [weight] * len(group), []
    close()
    return chunks


def _window(before: list[int], ids: list[int], weights: list[float], after: list[int], padding: list[int],
            max_length: int) -> Chunk:
    """A chunk of text ids with the tokenizer's start / end tokens and padding to max_length (weight 1 for those)."""
    pad = max_length - len(before) - len(ids) - len(after)
    return Chunk(before + ids + after + padding[:pad], [1.0] * len(before) + weights + [1.0] * (len(after) + pad),
                 len(before) + len(ids) + len(after))


def empty_chunk(tokenizer, max_length: int) -> Chunk:
    """The window of "": what a shorter prompt of a batch is filled up with."""
    return prompt_chunks(tokenizer, "", max_length, emphasis=False)[0]
