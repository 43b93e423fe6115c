"""The trainer's caption cache (CaptionStates.precompute_text, session 40): captions past the text encoder's window are
told in one line with their count, not one warning a caption (a shapes run's 3553 captions at an 8-token window were
thousands of lines), and their states are the encoder's, as before."""

from __future__ import annotations

import logging

import torch


def test_cut_captions_are_told_once_with_their_count(caplog):
    from imagine.models.text_encoders import load_text_encoder
    from imagine.train.diffusion_task import CaptionStates

    task = CaptionStates()
    task.text_encoder = load_text_encoder({"type": "minilm", "max_length": 8})
    task.text_cache, task.d = {}, {"cache_text": True}
    captions = ["a red circle", "a blue square to the left of a green triangle on a white canvas",
                "three yellow circles and two purple squares on a white canvas", ""]
    with caplog.at_level(logging.WARNING):
        task.precompute_text(captions)
    cut = [r for r in caplog.records if "window" in r.getMessage()]
    assert len(cut) == 1 and cut[0].getMessage().startswith("2 of 4 captions are longer than the text encoder's "
                                                             "window"), [r.getMessage() for r in caplog.records]
    for c in captions:  # (each caption's states: the encoder's, batch of its sorted chunk)
        want = task.text_encoder.encode(sorted(captions)).states[sorted(captions).index(c)]
        assert torch.equal(task.text_cache[c][0], want.float())
    # the encoder's own warning is back after it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        task.text_encoder.encode([captions[1]])
    assert any("prompt truncated" in r.getMessage() for r in caplog.records)
