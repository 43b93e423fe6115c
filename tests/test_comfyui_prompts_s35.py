"""ComfyUI's prompt weights and windows (imagine.emphasis "ComfyUI" mode, imagine.long_prompts.comfyui_chunks).

The truths: its token_weights as its comfy/sd1_clip.py documents and reads it ("((foo))" 1.21, "((foo:1.1))" 1.1,
"[x]" text, "\\(" the character); its windows (tokenize_with_weights: a weighted segment that does not fit what is
left of a window starts the next one unless it has 8 tokens or more, which is cut), counted by hand on a tokenizer
whose words are one token each; its encode_token_weights restated over diffusers' CLIP (the transformers model of a
diffusers SD folder): each window's states, and where a token's weight is not 1, z_empty + (z - z_empty) w with
z_empty the empty prompt's window.
"""

from __future__ import annotations

import pytest
import torch

from test_long_prompts import _window, sd1, tokenizers  # noqa: F401 (fixtures)

from imagine.emphasis import parse_comfyui  # noqa: E402
from imagine.long_prompts import comfyui_chunks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,want", [
    ("((foo))", [("foo", 1.1 * 1.1)]),
    ("((foo:1.1))", [("foo", 1.1)]),  # (a weight sets, it does not multiply)
    ("a (b:1.3) c", [("a ", 1.0), ("b", 1.3), (" c", 1.0)]),
    ("(a (b:0.5) c)", [("a ", 1.1), ("b", 0.5), (" c", 1.1)]),
    ("[d] \\(e\\)", [("[d] (e)", 1.0)]),  # (no square brackets in ComfyUI; escaped parentheses are characters)
    ("(a:b) c", [("a:b", 1.1), (" c", 1.0)]),  # (a colon without a number is text)
    ("x) (y", [("x) (y", 1.0)]),  # (a closing with nothing open, and one left open: text)
    ("", []),
])
def test_weights_are_read_as_comfyuis_token_weights(text, want):
    got = parse_comfyui(text)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.mark.parametrize("text,pieces,weights", [
    # a short weighted segment that does not fit moves whole to the next window (A1111 would cut at 75)
    ("the " * 72 + "(blue blue blue blue blue:1.2)", ["the " * 72, "blue " * 5], [[], [1.2] * 5]),
    # one of 8 tokens or more is cut at the window's end
    ("the " * 72 + "(" + "blue " * 10 + ":1.2)", ["the " * 72 + "blue " * 3, "blue " * 7], [[1.2] * 3, [1.2] * 7]),
    ("the " * 150, ["the " * 75] * 2, [[], []]),
    ("", [""], [[]]),
])
def test_windows_are_cut_as_comfyui_cuts_them(tokenizers, text, pieces, weights):
    tok = tokenizers["<|endoftext|>"]
    chunks = comfyui_chunks(tok, text, 77)
    assert [c.ids for c in chunks] == [_window(tok, p) for p in pieces]
    for c, p, w in zip(chunks, pieces, weights):
        n = len(tok(p)["input_ids"]) - 2
        assert c.weights == [1.0] * (1 + n - len(w)) + w + [1.0] * (77 - 1 - n)


def test_states_are_comfyuis_encode_token_weights_over_clip(sd1):
    ref, pipe = sd1
    text = "a (red:1.5) circle, " + "the " * 70 + "((blue)) square"

    def clip(ids):
        with torch.no_grad():
            return ref.text_encoder(torch.tensor([ids]))[0]

    tok = ref.tokenizer
    empty = clip(_window(tok, ""))
    want = []
    for c in comfyui_chunks(tok, text, 77):
        z = clip(c.ids)
        w = torch.tensor(c.weights)[None, :, None]
        want.append(torch.where(w != 1, (z - empty) * w + empty, z))
    want = torch.cat(want, dim=1)
    got = pipe.text_encoder.encode([text], emphasis="ComfyUI", long_prompts=True).states
    assert got.shape == want.shape == (1, 154, want.shape[-1])
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    # (A1111's reading of the same text is another: its mean restored, its windows cut at the comma)
    a1111 = pipe.text_encoder.encode([text], emphasis=True, long_prompts=True).states
    assert (a1111 - want).abs().max() > 1e-2
    # a text without weights is the plain reading, window for window
    plain = "a red circle"
    assert torch.equal(pipe.text_encoder.encode([plain], emphasis="ComfyUI", long_prompts=True).states,
                       pipe.text_encoder.encode([plain], long_prompts=True).states)
