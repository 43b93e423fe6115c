"""AUTOMATIC1111's "Pad prompt/negative prompt" options (its CFGDenoiser's pad_cond_uncond and pad_cond_uncond_v0,
infotext "Pad conds" and "Pad conds v0"): a prompt and a negative prompt of different lengths brought to one length,
so that they share the guidance batch. Checked against diffusers' U-Net on the states padded by hand as A1111's rule
says: "empty" appends the empty prompt's 77-token chunks to the shorter side; "v0" repeats the negative's last
state up to the prompt's length, or cuts the negative to it."""

from __future__ import annotations

import pytest
import torch

from test_long_prompts import LONG, NEGATIVE_LONG, sd1  # noqa: F401,E402
from test_sd_parity import CFG  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.guidance import PaddedConds  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_hand(ref, x, t, cond_states, uncond_states):
    with torch.no_grad():
        u, c = (ref.unet(x, t, encoder_hidden_states=s).sample for s in (uncond_states, cond_states))
    return u + CFG * (c - u)


def test_padding_is_a1111s_rule_on_the_unets_input(sd1):
    ref, pipe = sd1
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([700.0])
    long = pipe.text_encoder.encode([LONG], long_prompts=True).states  # 154 tokens
    short = pipe.text_encoder.encode(["the square"]).states  # 77
    with torch.no_grad():
        empty = ref.encode_prompt("", "cpu", 1, False)[0]
    cases = [  # (mode, prompt's states, negative's states, what the U-Net must read: prompt, negative)
        ("v0", long, short, long, torch.cat([short, short[:, -1:].repeat(1, 77, 1)], dim=1)),
        ("v0", short, long, short, long[:, :77]),
        ("empty", long, short, long, torch.cat([short, empty], dim=1)),
        ("empty", short, long, torch.cat([short, empty], dim=1), long),
    ]
    for mode, c, u, want_c, want_u in cases:
        pad = PaddedConds(mode, {"context": pipe.encode_prompts([""], False, False)["context"]})
        with torch.no_grad():
            got = pad(pipe.unet, x, t, {"context": c}, {"context": u}, CFG)
        assert pad.padded
        assert torch.allclose(got, _by_hand(ref, x, t, want_c, want_u), rtol=0, atol=1e-4), mode  # (CFG times 2e-6)
    # equal lengths: nothing to pad, the plain guided output
    pad = PaddedConds("v0")
    with torch.no_grad():
        same = pad(pipe.unet, x, t, {"context": long}, {"context": long.flip(1)}, CFG)
    assert not pad.padded and torch.allclose(same, _by_hand(ref, x, t, long, long.flip(1)), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="pad_conds must be one of 'empty', 'v0'"):
        PaddedConds("v1")


def test_generate_pads_in_one_guidance_batch_and_says_so(sd1):
    """generate(pad_conds=) runs the two texts as one batch (one U-Net call a step, where unpadded they run apart);
    the image is the padded states' (not the unpadded one's); the infotext writes A1111's field, and reads it back."""
    from imagine.commands.generate import infotext_defaults
    from imagine.images import a1111_parameters, parse_a1111_parameters

    from imagine.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(sd1[1].c.source)  # (its own: the U-Net's forward is wrapped below)
    kw = dict(steps=3, guidance_scale=CFG, height=16, width=16, progress=False, output_type="latent",
              long_prompts=True, seed=5)
    calls = []
    real = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: (calls.append(k["context"].shape[:2]), real(x, *a, **k))[1]
    try:
        plain = pipe.generate(LONG, "the square", **kw)
        n_plain, calls[:] = list(calls), []
        padded = pipe.generate(LONG, "the square", pad_conds="v0", **kw)
    finally:
        del pipe.unet.forward
    # (rows of text a call reads: apart, 154 then 77 tokens; padded, both rows at 154)
    assert n_plain == [(1, 77), (1, 154)] * 3 and calls == [(2, 154)] * 3
    assert not torch.equal(plain.latents, padded.latents)
    p = padded.parameters
    assert p["pad_conds"] == "v0" and p["padded_conds"] is True
    text = a1111_parameters({**p, "seed": 5})
    assert "Pad conds v0: True" in text and "Pad conds:" not in text
    assert infotext_defaults(parse_a1111_parameters(text))["pad_conds"] == "v0"
    empty = pipe.generate(LONG, "the square", pad_conds="empty", **kw)
    assert "Pad conds: True" in a1111_parameters({**empty.parameters, "seed": 5})
    # equal lengths: nothing padded, nothing written
    same = pipe.generate("a red circle", "the square", pad_conds="v0", **kw)
    assert same.parameters["padded_conds"] is False and "Pad conds" not in a1111_parameters(same.parameters)
    with pytest.raises(ValueError, match="pad_conds must be one of 'empty', 'v0' \\(or None: off\\); got 'yes'"):
        pipe.generate(LONG, pad_conds="yes", **kw)


def test_the_a1111_api_and_the_cli_pad(sd1, tmp_path):
    """override_settings pad_cond_uncond_v0 / pad_cond_uncond (A1111's option names) and --pad-conds give the
    pipeline's padded image, and their infotexts name the option; a picture's infotext turns it on again."""
    import base64
    import io
    import json

    import httpx
    from PIL import Image

    from imagine.cli import main
    from imagine.samplers import a1111_settings
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    _, pipe = sd1
    api = {**a1111_settings("Euler a"), "emphasis": True, "long_prompts": True, "prompt_editing": True,
           "composable": True}
    kw = dict(steps=3, height=16, width=16, guidance_scale=5.0, seed=5, progress=False)
    body = {"prompt": LONG, "negative_prompt": "the square", "steps": 3, "cfg_scale": 5, "width": 16, "height": 16,
            "seed": 5, "sampler_name": "Euler a"}
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        for option, mode, field in (("pad_cond_uncond_v0", "v0", "Pad conds v0: True"),
                                    ("pad_cond_uncond", "empty", "Pad conds: True")):
            want = pipe.generate(LONG, "the square", pad_conds=mode, **kw, **api).images[0]
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {option: True}},
                           timeout=120)
            assert r.status_code == 200, r.text
            got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
            assert got.tobytes() == want.convert("RGB").tobytes(), option
            assert field in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "override_settings": {"pad_cond_uncond": "yes"}},
                       timeout=60)
        assert r.status_code == 422 and "pad_cond_uncond must be true or false" in r.text
    out, again = tmp_path / "v0.png", tmp_path / "again.png"
    assert main(["generate", "--model", pipe.c.source, LONG, "--negative-prompt", "the square", "--pad-conds", "v0",
                 "--a1111-sampling", "--a1111-prompts", "--sampler", "Euler a", "--steps", "3", "--guidance-scale",
                 "5", "--seed", "5", "--height", "16", "--width", "16", "-o", str(out), "-q"]) == 0
    want = pipe.generate(LONG, "the square", pad_conds="v0", **kw, **api).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.convert("RGB").tobytes()
    assert "Pad conds v0: True" in Image.open(out).text["parameters"]
    # made again from its infotext alone (A1111's fields, without imagine's record): padded again
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(out).text["parameters"])
    bare = tmp_path / "bare.png"
    Image.new("RGB", (16, 16)).save(bare, pnginfo=info)
    assert main(["generate", "--model", pipe.c.source, "--infotext", str(bare), "-o", str(again), "-q"]) == 0
    assert Image.open(again).convert("RGB").tobytes() == want.convert("RGB").tobytes()


@pytest.mark.parametrize("mode", ["v0", "empty"])
def test_each_image_of_a_batch_is_padded_by_its_own_texts(sd1, mode):
    """A short prompt beside a long one in a batch is the image it gives alone (each row padded by its own texts'
    lengths; a batch's filling stays masked out), and only the long prompt's image says it was padded."""
    _, pipe = sd1
    kw = dict(steps=3, guidance_scale=CFG, height=16, width=16, progress=False, output_type="latent",
              long_prompts=True, pad_conds=mode)
    both = pipe.generate([LONG, "a red circle"], "the square", seeds=[1, 2], **kw)
    alone = [pipe.generate(p, "the square", seeds=[s], **kw) for p, s in ((LONG, 1), ("a red circle", 2))]
    assert torch.equal(both.latents[1:], alone[1].latents) and torch.equal(both.latents[:1], alone[0].latents)
    assert both.parameters["padded_conds"] == [True, False]
    assert [a.parameters["padded_conds"] for a in alone] == [True, False]
