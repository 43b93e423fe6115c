"""Prompts past CLIP's 77-token window, read in 75-token chunks as AUTOMATIC1111 reads them (imagine.long_prompts).

The truths: a chunk is the tokenizer's own encoding (start, end, padding) of the piece of text that A1111's rules
cut off, the pieces counted by hand here; a long prompt's states are CLIP's states of its pieces side by side, as
diffusers' encode_prompt gives them piece by piece; the image is diffusers' pipeline given those states (50 dB,
the SD parity bar), for SD and SDXL; a prompt and a negative prompt of different lengths, run apart as A1111 runs
them, give what one batch with the shorter text masked gives; a prompt's image does not depend on the prompts
beside it; an encoder with one window (MiniLM) and the flag off keep the window."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from test_loading import TEXT_WIDTH, save_diffusers_folder, write_clip_tokenizer  # noqa: E402
from test_sd_parity import CFG, SEED, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.guidance import guided_model_output  # noqa: E402
from imagine.long_prompts import prompt_chunks  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
# Every word below is one token of the tiny tokenizer (test_loading.MERGES), "," too.
LONG = "red circle, blue square, " + "the " * 60 + ", red " + "blue " * 30  # 6 + 60 + 2 + 30 = 98 tokens
LONG_PIECES = ["red circle, blue square, " + "the " * 60 + ",", "red " + "blue " * 30]  # cut after the last comma
NEGATIVE_LONG = "blue " * 80 + "red"  # 81 tokens, no comma: cut at 75
NEGATIVE_PIECES = ["blue " * 75, "blue " * 5 + "red"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {pad: transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / str(i), pad),
                                                            local_files_only=True)
            for i, pad in enumerate(("<|endoftext|>", "!"))}


def _window(tok, text: str) -> list[int]:
    return tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


@pytest.mark.parametrize("text,pieces,emphasis", [
    (LONG, LONG_PIECES, True),  # a full chunk whose last comma is 9 tokens back: cut after that comma
    ("red, " + "the " * 80, ["red, " + "the " * 73, "the " * 7], True),  # the comma is 74 back (> 20): cut at 75
    ("the " * 150, ["the " * 75] * 2, True),  # exactly two chunks, no empty third
    ("red circle BREAK blue square", ["red circle", "blue square"], True),
    ("red circle BREAK blue square", ["red circle BREAK blue square"], False),  # emphasis "None": BREAK is text
    ("BREAK red", ["", "red"], True),
    ("", [""], True),
    ("a short one", ["a short one"], True),
])
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 1's padding (the end token) and SD 2's ("!", id 0)
def test_chunks_are_the_tokenizers_windows_of_the_pieces_a1111_cuts(tokenizers, text, pieces, emphasis, pad):
    tok = tokenizers[pad]
    chunks = prompt_chunks(tok, text, 77, emphasis=emphasis)
    assert [c.ids for c in chunks] == [_window(tok, p) for p in pieces]
    assert all(c.weights == [1.0] * 77 for c in chunks)


def test_weights_follow_their_tokens_into_the_next_chunk(tokenizers):
    tok = tokenizers["<|endoftext|>"]
    chunks = prompt_chunks(tok, "the " * 74 + "(red:1.5) blue", 77)
    assert [c.ids for c in chunks] == [_window(tok, "the " * 74 + "red"), _window(tok, "blue")]
    assert chunks[0].weights == [1.0] * 75 + [1.5] + [1.0] and chunks[1].weights == [1.0] * 77


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "folder"
    ref = save_diffusers_folder(folder, "sd1", scheduler="dpmpp_2m")
    return ref, TextToImagePipeline.from_pretrained(folder)


def _diffusers_states(ref, pieces: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ref.encode_prompt(p, "cpu", 1, False)[0] for p in pieces], dim=1)


def test_a_long_prompts_states_are_clips_states_of_its_chunks(sd1):
    ref, pipe = sd1
    for text, pieces in ((LONG, LONG_PIECES), (NEGATIVE_LONG, NEGATIVE_PIECES)):
        got = pipe.text_encoder.encode([text], long_prompts=True)
        assert got.states.shape == (1, 154, TEXT_WIDTH) and got.mask is None
        assert torch.allclose(got.states, _diffusers_states(ref, pieces), rtol=0, atol=1e-6)
        # the pooled vector is the first chunk's
        assert torch.equal(got.pooled, pipe.text_encoder.encode([pieces[0]]).pooled)
    # a prompt within the window: the same states as without the flag, with emphasis and without
    for emphasis in (False, True):
        short = ["a red circle left of the (blue:1.2) square", ""]
        assert torch.equal(pipe.text_encoder.encode(short, emphasis, long_prompts=True).states,
                           pipe.text_encoder.encode(short, emphasis).states)


def test_each_chunk_has_its_own_emphasis(sd1):
    """A1111 rescales each chunk to its own mean: the chunks of "(red:1.5) ..." are the weighted first piece and
    the plain second piece."""
    _, pipe = sd1
    enc = pipe.text_encoder
    got = enc.encode(["(red:1.5) " + "the " * 74 + "blue"], emphasis=True, long_prompts=True).states
    assert torch.equal(got[:, :77], enc.encode(["(red:1.5) " + "the " * 74], emphasis=True).states)
    assert torch.equal(got[:, 77:], enc.encode(["blue"], emphasis=True).states)


def test_a_long_prompt_gives_diffusers_image_from_those_states(sd1):
    """diffusers' StableDiffusionPipeline given the chunks' states as prompt_embeds / negative_prompt_embeds (its
    own pipeline cuts the prompt at 77 tokens): the same image as ours reading the long prompts, 50 dB."""
    ref, pipe = sd1
    with torch.no_grad():
        want = ref(prompt_embeds=_diffusers_states(ref, LONG_PIECES),
                   negative_prompt_embeds=_diffusers_states(ref, NEGATIVE_PIECES), height=SIZE, width=SIZE,
                   num_inference_steps=12, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                   output_type="pt").images[0].float()
    res = pipe.generate(LONG, NEGATIVE_LONG, long_prompts=True, steps=12, guidance_scale=CFG, seed=SEED,
                        height=SIZE, width=SIZE, progress=False, output_type="latent")
    assert res.parameters["long_prompts"] is True
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert psnr(got, want) >= 50
    cut = pipe.generate(LONG, NEGATIVE_LONG, steps=12, guidance_scale=CFG, seed=SEED, height=SIZE, width=SIZE,
                        progress=False, output_type="latent")
    assert psnr(((pipe.decode(cut.latents)[0] + 1) / 2).clamp(0, 1), want) < 40  # without the flag: cut at 77
    assert "long_prompts" not in cut.parameters


def test_texts_of_different_lengths_run_apart_as_one_masked_batch_would(sd1):
    """A 154-token prompt and a 77-token negative cannot share a batch: run apart (A1111's default), they give what
    one batch gives with the negative filled up to 154 tokens and the filling masked out."""
    ref, pipe = sd1
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 700.0])
    cond = {"context": pipe.text_encoder.encode([LONG, LONG], long_prompts=True).states}
    short = pipe.text_encoder.encode(["the square", "red"]).states
    padded = {"context": torch.cat([short, torch.randn(2, 77, TEXT_WIDTH, generator=g)], dim=1),
              "context_mask": torch.arange(154).expand(2, -1) < 77}
    with torch.no_grad():
        apart = guided_model_output(pipe.unet, x, t, cond, {"context": short}, CFG)
        batch = guided_model_output(pipe.unet, x, t, cond, padded, CFG)
        # and the two halves are diffusers' U-Net's on each text
        want_u, want_c = (ref.unet(x, t, encoder_hidden_states=c).sample for c in (short, cond["context"]))
    assert torch.allclose(apart, batch, rtol=0, atol=1e-5)
    assert torch.allclose(apart, want_u + CFG * (want_c - want_u), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_prompts_image_does_not_depend_on_the_prompts_beside_it(sd1, precision):
    """A batch's shorter prompt is filled up with masked empty chunks, and each row attends over its own keys only
    (imagine.models.attention.kept_lengths): each row is its run alone, bit for bit, in both precisions (a masked
    attention ran another kernel in fast mode, moving every row of such a batch by 0.5 in latents), where A1111's
    unmasked filling would move it."""
    _, pipe = sd1
    if precision == "fast":
        pipe = TextToImagePipeline.from_pretrained(pipe.c.source, precision="fast")
    kw = dict(steps=3, guidance_scale=CFG, height=16, width=16, progress=False, output_type="latent",
              long_prompts=True)
    both = pipe.generate([LONG, "a red circle"], ["the square", NEGATIVE_LONG], seeds=[5, 6], **kw).latents
    assert torch.equal(both[:1], pipe.generate(LONG, "the square", seeds=[5], **kw).latents)
    assert torch.equal(both[1:], pipe.generate("a red circle", NEGATIVE_LONG, seeds=[6], **kw).latents)
    states = pipe.text_encoder.encode([LONG, "a red circle"], long_prompts=True)
    assert states.mask.tolist() == [[True] * 154, [True] * 77 + [False] * 77]


def test_a_textual_inversion_word_stays_in_one_chunk(sd1, tmp_path):
    from test_textual_inversion import _vectors, _write

    _, pipe = sd1
    pipe.load_embedding(_write("a1111.safetensors", _vectors(3), tmp_path / "emb", "sketchy"))
    try:
        enc = pipe.text_encoder
        tok = enc.tokenizer
        # 73 words, then a word of 3 vectors: it does not fit in the 2 places left, so it starts the next chunk
        chunks = enc.chunks("the " * 73 + "sketchy red")
        assert [c.ids for c in chunks] == [_window(tok, "the " * 73), _window(tok, "sketchy sketchy_1 sketchy_2 red")]
    finally:
        enc.expansions.clear()


def test_sdxl_reads_long_prompts_in_both_towers(tmp_path):
    """SDXL: both towers cut the prompt alike, their chunk states side by side; the pooled vector is the first
    chunk's (A1111). diffusers' StableDiffusionXLPipeline given those states and that pooled vector: 50 dB."""
    from test_sdxl import save_sdxl_folder

    ref = save_sdxl_folder(tmp_path / "folder", scheduler="euler")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with torch.no_grad():
        pieces = [ref.encode_prompt(p, do_classifier_free_guidance=False) for p in LONG_PIECES]
    states, pooled = torch.cat([p[0] for p in pieces], dim=1), pieces[0][2]
    cond = pipe.encode_prompts([LONG], long_prompts=True)
    assert torch.equal(cond["context"], states) and torch.allclose(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    with torch.no_grad():
        want = ref(prompt_embeds=states, pooled_prompt_embeds=pooled,
                   negative_prompt_embeds=torch.zeros(1, 154, states.shape[-1]),
                   negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=SIZE, width=SIZE,
                   num_inference_steps=8, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                   output_type="pt").images[0].float()
    # no negative prompt: zeros (77 of them: a masked batch or two calls give what 154 zeros give, to rounding)
    res = pipe.generate(LONG, long_prompts=True, steps=8, guidance_scale=CFG, seed=SEED, height=SIZE, width=SIZE,
                        progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50


def test_a_pooled_controlnet_acts_on_the_conditional_half_when_run_apart(tmp_path):
    """A shuffle ControlNet (guess mode) gives no residuals to the unconditional half: told which half it gets in
    two calls, it gives what the one guidance batch (the shorter text masked) gives."""
    from test_controlnet import _edges, tiny_controlnet

    from imagine.models.controlnet import Controlled, ControlNetModel

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    ref_net = tiny_controlnet(global_pool_conditions=True)
    net = ControlNetModel.from_config_dict(dict(ref_net.config)).eval()
    net.load_state_dict(ref_net.state_dict())
    picture = pipe._pixels([_edges(16)], 16, 16, normalize=False)
    model = Controlled(pipe.unet, [(net, picture, 0.8)])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    cond = {"context": pipe.text_encoder.encode([LONG], long_prompts=True).states}
    short = pipe.text_encoder.encode(["the square"]).states
    padded = {"context": torch.cat([short, torch.zeros(1, 77, TEXT_WIDTH)], dim=1),
              "context_mask": torch.arange(154)[None] < 77}
    with torch.no_grad():
        apart = guided_model_output(model, x, t, cond, {"context": short}, CFG)
        batch = guided_model_output(model, x, t, cond, padded, CFG)
        plain = guided_model_output(pipe.unet, x, t, cond, {"context": short}, CFG)
    assert torch.allclose(apart, batch, rtol=0, atol=1e-4)  # (rounding, times the guidance scale)
    assert float((apart - plain).abs().max()) > 1e-3  # (the ControlNet acts)


def test_an_encoder_with_one_window_keeps_it():
    """The default model's MiniLM reads its padding mask over one window: long_prompts leaves it as it was."""
    pipe = TextToImagePipeline.from_pretrained(None)
    text = "a red circle left of a blue square " * 8
    a, b = pipe.text_encoder.encode([text]), pipe.text_encoder.encode([text], long_prompts=True)
    assert torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask)


def test_the_cli_flag_and_the_a1111_api_read_long_prompts(sd1, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    _, pipe = sd1
    kw = dict(steps=3, guidance_scale=CFG, height=16, width=16, progress=False, long_prompts=True)
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings, --a1111-sampling)
    want = pipe.generate(LONG, NEGATIVE_LONG, seed=4, **kw, **a1111_settings("Euler")).images[0]
    out = tmp_path / "long.png"
    code = main(["generate", "--model", pipe.c.source, LONG, "-n", NEGATIVE_LONG, "--long-prompts", "--steps", "3",
                 "--sampler", "euler", "--a1111-sampling", "--seed", "4", "--height", "16", "--width", "16", "-o",
                 str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    img = Image.open(out)
    assert json.loads(img.text["imagine"])["long_prompts"] is True
    assert img.convert("RGB").tobytes() == want.convert("RGB").tobytes()
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": LONG, "negative_prompt": NEGATIVE_LONG, "steps": 3, "cfg_scale": CFG, "width": 16,
                "height": 16, "seed": 4, "sampler_name": "Euler"}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    # (the A1111 API reads emphasis too: these prompts have none, so the same states)
    assert got.tobytes() == want.convert("RGB").tobytes()
