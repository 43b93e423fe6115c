"""Text encoders, review s29: a window the text encoder cannot read is refused with a clear error (not an IndexError
deep in torch, nor a "5 of 3 tokens cut" notice); SDXL's pooled vector (`text_embeds`) is the end-of-text token's
state, as OpenCLIP and AUTOMATIC1111 pool it, also where a released config's legacy eos_token_id (2) makes
transformers pool at the highest token id, which a textual-inversion word's added ids are; a CLIP whose config sets
use_attention_mask masks each 75-token chunk's padding, as diffusers masks each window's; a decoder BERT (causal in
transformers) is not run on imagine.models.bert's two-way attention."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from imagine.models.text_encoders import CLIPTextEncoder, MiniLMTextEncoder, minilm_folder  # noqa: E402


def test_a_minilm_window_past_its_positions_or_without_room_for_text_is_refused():
    """The package's BERT has max_position_embeddings positions (its config.json, as transformers' BertConfig reads
    it) and its tokenizer adds [CLS] and [SEP] (transformers' AutoTokenizer: num_special_tokens_to_add): a window
    must hold those and at least one text token, and no more tokens than the positions."""
    folder = minilm_folder()
    positions = transformers.BertConfig.from_pretrained(folder, local_files_only=True).max_position_embeddings
    specials = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).num_special_tokens_to_add()
    assert (positions, specials) == (512, 2)
    for bad in (positions + 1, 600, specials, 1, 0, -3, 2.5, True, "32", None):
        with pytest.raises(ValueError, match=rf"max_length must be an integer from {specials + 1} .* to {positions}"):
            MiniLMTextEncoder.from_package(max_length=bad)
    for good in (specials + 1, positions, 32.0):  # (a whole float, as a YAML config may write it)
        enc = MiniLMTextEncoder.from_package(max_length=good)
        assert enc.encode(["a red circle"]).states.shape == (1, good, 384)


def test_a_clip_window_past_its_positions_is_refused():
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16)
    model = transformers.CLIPTextModel(cfg)
    with pytest.raises(ValueError, match=r"max_length must be an integer from 1 .* to 16"):
        CLIPTextEncoder(model, None, 17, "test")
    assert CLIPTextEncoder(model, None, 16, "test").max_length == 16


def test_sdxl_pools_at_the_end_token_with_an_embedding_in_the_prompt(tmp_path):
    """Stability's SDXL text_encoder_2/config.json (and SD 1.5's) says eos_token_id 2, which transformers' CLIP takes
    as "pool at the highest id" (diffusers issue #10754): a textual-inversion word's added ids are higher than the
    end token's, so the pooled vector came from the word. OpenCLIP pools at the end-of-text token and AUTOMATIC1111
    (whose embedding vectors sit on placeholder ids 0) reads it there: the truth is tower 2's final states (through
    transformers) at the first end token, projected."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from test_sdxl import save_sdxl_folder
    from test_sdxl_single_file import WIDTHS

    from imagine.pipelines.text_to_image import TextToImagePipeline

    save_sdxl_folder(tmp_path / "xl")
    for name in ("text_encoder", "text_encoder_2"):  # as the released configs (transformers 4.30's conversion)
        config = tmp_path / "xl" / name / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": 2}))
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "xl")
    g = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(2, WIDTHS[0], generator=g), "clip_g": torch.randn(2, WIDTHS[1], generator=g)},
              str(tmp_path / "emb.safetensors"))
    pipe.load_embedding(tmp_path / "emb.safetensors", token="zzstyle")
    tower = pipe.text_encoder.towers[1]
    prompts = ["a red circle in zzstyle", "a red circle"]
    got = pipe.text_encoder.encode(prompts).pooled

    ids = tower.tokenize(prompts)["input_ids"]  # (the word read as its two added ids)
    assert (ids[0] > tower.tokenizer.eos_token_id).sum() == 2
    with torch.no_grad():
        states = tower.model.text_model(input_ids=ids).last_hidden_state
    end = (ids == tower.tokenizer.eos_token_id).int().argmax(-1)
    want = tower.model.text_projection(states[torch.arange(len(prompts)), end])
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # (a prompt without the word: diffusers' own pooled vector)
    with torch.no_grad():
        ref = pipe.text_encoder.encode(["a red circle"]).pooled
    assert torch.allclose(got[1:], ref, rtol=0, atol=1e-6)


def test_a_text_encoder_that_masks_its_padding_masks_each_chunks_padding(tmp_path):
    """A text encoder whose config sets use_attention_mask gets each window's padding mask from diffusers'
    encode_prompt; read in 75-token chunks, each chunk is such a window: a long prompt's states are diffusers' states
    of its pieces side by side (the pieces A1111 cuts, counted in tests/test_long_prompts.py), and a prompt within one
    window has the same states with the flag as without it."""
    pytest.importorskip("diffusers")
    from test_loading import save_diffusers_folder
    from test_long_prompts import LONG, LONG_PIECES

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "sd", "sd1")
    config = tmp_path / "sd" / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_attention_mask": True}))
    ref.text_encoder.config.use_attention_mask = True
    enc = TextToImagePipeline.from_pretrained(tmp_path / "sd").text_encoder
    with torch.no_grad():
        want = torch.cat([ref.encode_prompt(p, "cpu", 1, False)[0] for p in LONG_PIECES], dim=1)
        unmasked = ref.text_encoder(ref.tokenizer(LONG_PIECES[1], padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids)[0]
    got = enc.encode([LONG], long_prompts=True).states
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(want[:, 77:], unmasked, atol=1e-3)  # (the mask changes the padding's states)
    short = ["a red circle", "blue square"]
    assert torch.equal(enc.encode(short, long_prompts=True).states, enc.encode(short).states)


def test_a_decoder_bert_is_left_to_transformers(tmp_path):
    """A BERT whose config says is_decoder attends causally in transformers' BertModel (each token to itself and the
    ones before); imagine.models.bert attends both ways, so such a folder must not run on it: the encoder's states are
    transformers' on the same weights."""
    import shutil

    from imagine.models.bert import BertEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, is_decoder=True)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(minilm_folder() / "tokenizer.json", tmp_path / "tokenizer.json")
    enc = MiniLMTextEncoder.from_folder(tmp_path, max_length=16)
    prompts = ["a red circle left of a blue square", "two"]
    tok = enc.tokenize(prompts)
    with torch.no_grad():
        want = ref(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    got = enc.encode(prompts)
    keep = got.mask
    assert float((got.states - want).abs()[keep].max()) < 1e-5
    assert not isinstance(enc.model, BertEncoder)
    with pytest.raises(ValueError, match="not a plain BERT folder"):
        MiniLMTextEncoder.from_folder(tmp_path, max_length=16, backend="imagine")
