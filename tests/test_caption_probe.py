"""`imagine eval captions`: the altered captions are what they say, and a model blind to its text
has zero excess error for every alteration while one that reads it does not."""

import types

import pytest
import torch

from imagine import caption_probe as P
from imagine.data.judge import parse_caption
from imagine.schedules import NoiseSchedule


def test_altered_captions_are_canonical_and_altered_one_way():
    caps = P.probe_captions(20)
    for true, rev, swap in zip(caps["true"], caps["reversed"], caps["swapped shapes"]):
        p, r, s = parse_caption(true), parse_caption(rev), parse_caption(swap)
        assert r["objects"] == p["objects"] and r["relation"] == P.FLIP[p["relation"]]
        a, b = p["objects"]
        assert s["relation"] == p["relation"]
        assert s["objects"] == [{"color": a["color"], "shape": b["shape"]}, {"color": b["color"], "shape": a["shape"]}]


class _Encoder:
    """Per-caption states: a vector made from the caption's characters (any function of the text)."""

    def encode(self, captions):
        states = torch.stack([torch.tensor([float(sum(map(ord, c)) % 97), float(len(c))]) for c in captions])
        return types.SimpleNamespace(as_cond=lambda: {"context": states[:, None, :] / 100})


def _pipe(reads_text: bool):
    def unet(x, t, context):
        out = 0.5 * x
        return out + context.mean((1, 2))[:, None, None, None] if reads_text else out

    unet.config = types.SimpleNamespace(sample_size=64)
    enc = _Encoder()
    return types.SimpleNamespace(unet=unet, vae=None, schedule=NoiseSchedule.from_config("linear", num_train_timesteps=1000),
                                 prediction_type="v_prediction", encode_prompts=lambda c: enc.encode(c).as_cond())


def test_a_text_blind_model_has_zero_excess_and_a_reading_one_does_not():
    blind = P.caption_excess(_pipe(False), n=6, timesteps=(100, 900))
    assert all(v == 0.0 for r in blind for v in r["excess"].values())
    reading = P.caption_excess(_pipe(True), n=6, timesteps=(100, 900))
    assert all(abs(r["excess"]["empty"]) > 1e-3 for r in reading)
    assert "| 900 |" in P.format_rows(reading)
    with pytest.raises(ValueError, match="0..999"):
        P.caption_excess(_pipe(False), n=2, timesteps=(1000,))
