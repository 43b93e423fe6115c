"""AUTOMATIC1111's prompt emphasis: its parser gives the pieces and weights of the examples AUTOMATIC1111
documents; the weighted states are the closed form z * w rescaled to z's mean; a prompt without the
syntax encodes exactly as without emphasis; the server's A1111 API reads the syntax unless told "None"."""

from __future__ import annotations

import base64
import json
import io

import pytest
import torch
from PIL import Image

from imagine.emphasis import parse_emphasis

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,want", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[[low]] (x:0.25) stray) ]", [("low", 1 / 1.1 ** 2), (" ", 1.0), ("x", 0.25), (" stray) ]", 1.0)]),
    ("", [("", 1.0)]),
    ("C:\\path a \\ b", [("C:path a  b", 1.0)]),  # a lone backslash is dropped, as A1111 drops it
])
def test_parse_follows_automatic1111s_examples(text, want):
    got = parse_emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    save_diffusers_folder(folder, "sd1")
    pipe = TextToImagePipeline.from_pretrained(folder)
    # Real CLIP's final LayerNorm has a bias, so its states have a mean to keep; the random one's is zero.
    with torch.no_grad():
        tower = getattr(pipe.text_encoder.model, "text_model", pipe.text_encoder.model)
        tower.final_layer_norm.bias.add_(torch.linspace(-0.2, 0.6, tower.final_layer_norm.bias.numel()))
    return pipe


def test_no_syntax_encodes_as_without_emphasis(clip):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    for encoder in (clip.text_encoder, TextToImagePipeline.from_pretrained(None).text_encoder):
        prompts = ["a red circle left of the blue square", ""]
        plain, weighted = encoder.encode(prompts), encoder.encode(prompts, emphasis=True)
        assert torch.equal(plain.states, weighted.states)
        assert (plain.mask is None and weighted.mask is None) or torch.equal(plain.mask, weighted.mask)


def test_weighted_states_are_the_closed_form(clip):
    """(red:1.5) and [blue]: the plain prompt's states z, the tokens of 'red' times 1.5 and of 'blue' over 1.1,
    then z' * mean(z) / mean(z'), per prompt."""
    enc = clip.text_encoder
    plain = enc.encode(["a red circle left of the blue square"]).states.double()
    ids = enc.tokenize(["a red circle left of the blue square"])["input_ids"][0].tolist()
    red, blue = (enc.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("red", "blue"))
    w = torch.ones(len(ids), dtype=torch.float64)
    for word, factor in ((red, 1.5), (blue, 1 / 1.1)):
        at = next(i for i in range(len(ids)) if ids[i:i + len(word)] == word)
        w[at:at + len(word)] = factor
    z = plain * w[None, :, None]
    want = z * plain.mean() / z.mean()
    got = enc.encode(["a (red:1.5) circle left of the [blue] square"], emphasis=True).states.double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_a1111s_other_emphasis_modes(clip):
    """A1111's "No norm" (sd_emphasis.EmphasisOriginalNoNorm: z * w, no mean restored; chunks too) and "Ignore" (the
    syntax read, no weights): the encoder's states; the record and infotext name the mode where a text has brackets."""
    from imagine.images import a1111_parameters

    enc = clip.text_encoder
    text = "a red circle left of the blue square"
    plain = enc.encode([text]).states.double()
    ids = enc.tokenize([text])["input_ids"][0].tolist()
    red = enc.tokenizer("red", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i:i + len(red)] == red)
    w = torch.ones(len(ids), dtype=torch.float64)
    w[at:at + len(red)] = 1.5
    weighted = "a (red:1.5) circle left of the blue square"
    for long_prompts in (False, True):
        got = enc.encode([weighted], emphasis="No norm", long_prompts=long_prompts).states.double()
        assert torch.allclose(got, plain * w[None, :, None], rtol=1e-5, atol=1e-6)
        ignored = enc.encode([weighted], emphasis="Ignore", long_prompts=long_prompts).states
        assert torch.allclose(ignored.double(), plain, atol=1e-6)
    with pytest.raises(ValueError, match="one of AUTOMATIC1111's modes None, Ignore, Original, No norm"):
        enc.encode([weighted], emphasis="no norm")
    kw = dict(steps=2, seed=5, height=16, width=16, progress=False, output_type="latent")
    res = clip.generate(weighted, emphasis="No norm", **kw)
    assert res.parameters["emphasis"] == "no_norm" and "Emphasis: No norm" in a1111_parameters(res.parameters)
    assert not torch.equal(res.latents, clip.generate(weighted, emphasis=True, **kw).latents)
    assert "emphasis" not in clip.generate(text, emphasis="No norm", **kw).parameters  # (no brackets: none said)


def test_a_prompts_weights_do_not_depend_on_its_batch(clip):
    one = clip.text_encoder.encode(["a (red:1.4) circle"], emphasis=True).states
    two = clip.text_encoder.encode(["the [[blue]] square", "a (red:1.4) circle"], emphasis=True).states
    assert torch.equal(one[0], two[1])


def test_generation_reads_emphasis_only_when_asked(clip):
    kw = dict(steps=2, seed=5, height=16, width=16, progress=False, output_type="latent")
    plain = clip.generate("a red circle", **kw).latents
    unit = clip.generate("(a red circle:1.0)", emphasis=True, **kw)
    assert torch.equal(unit.latents, plain) and unit.parameters["emphasis"] == "a1111"
    assert not torch.equal(clip.generate("(a red circle:1.4)", emphasis=True, **kw).latents, plain)
    assert not torch.equal(clip.generate("(a red circle:1.0)", **kw).latents, plain)  # brackets as text


def test_the_a1111_api_reads_emphasis_unless_told_none(tmp_path):
    httpx = pytest.importorskip("httpx")
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app
    from imagine.testing import make_tiny_model

    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        def image(prompt, **extra):
            body = {"prompt": prompt, "steps": 2, "width": 16, "height": 16, "seed": 3, **extra}
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
            assert r.status_code == 200, r.text
            png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            return png.convert("RGB").tobytes()  # the pixels (the PNG's infotext names the prompt as given)

        plain = image("a red circle")
        assert image("(a red circle:1.0)") == plain  # read as weight 1: the same states
        assert image("(a red circle:1.5)") != plain
        literal = image("(a red circle:1.0)", override_settings={"emphasis": "None"})
        assert literal != plain  # the brackets and the number are text then
        # A1111's "No norm": the weights without the mean restored (weight 1: the plain states; 1.5: not Original's)
        assert image("(a red circle:1.0)", override_settings={"emphasis": "No norm"}) == plain
        assert image("(a red circle:1.5)", override_settings={"emphasis": "No norm"}) != image("(a red circle:1.5)")
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "(a red circle:1.5)", "steps": 2, "width": 16,
                                                             "height": 16, "seed": 3,
                                                             "override_settings": {"emphasis": "No norm"}}, timeout=120)
        assert "Emphasis: No norm" in json.loads(r.json()["info"])["infotexts"][0]
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 16, "height": 16,
                                                             "override_settings": {"emphasis": "Strong"}}, timeout=120)
        assert r.status_code == 422 and "must be one of None, Ignore, Original, No norm" in r.text


def test_bad_weights_and_break_are_said(caplog):
    with pytest.raises(ValueError, match="weight '1.2.3' in '\\(a:1.2.3\\)' is not a number"):
        parse_emphasis("(a:1.2.3)")
    with caplog.at_level("WARNING"):
        assert parse_emphasis("a cat BREAK a dog") == [("a cat a dog", 1.0)]
    assert "BREAK" in caplog.text and "needs prompts read in chunks" in caplog.text
