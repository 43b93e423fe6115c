"""Text encoders: CLIP's clip_skip reads the right layer; MiniLM states and mask."""

import shutil

import pytest
import torch

from imagine.models.text_encoders import CLIPTextEncoder, MiniLMTextEncoder


def test_clip_skip_takes_the_layer_before_last_through_the_final_norm():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    model = CLIPTextModel(cfg).eval()
    ids = torch.randint(2, 100, (2, 16))
    out = model(input_ids=ids, output_hidden_states=True)
    tower = getattr(model, "text_model", model)
    expected = tower.final_layer_norm(out.hidden_states[-2])
    got = CLIPTextEncoder(model, None, 16, "test", clip_skip=1)._encode(ids, None)
    assert torch.allclose(got.states, expected, atol=1e-6)
    plain = CLIPTextEncoder(model, None, 16, "test")._encode(ids, None)
    assert torch.allclose(plain.states, out.last_hidden_state, atol=1e-6)
    assert not torch.allclose(plain.states, got.states)


def test_clip_skip_range_is_checked_and_folders_take_it(tmp_path):
    """clip_skip counts layers skipped (diffusers): 0 .. layers - 1, else one clear error (not an IndexError deep
    in transformers). A diffusers folder takes it too (its configs do not carry it), and the image's parameters
    record it."""
    from test_loading import save_diffusers_folder  # the tiny SD folder: a 2-layer CLIP

    from imagine.pipelines.text_to_image import TextToImagePipeline

    save_diffusers_folder(tmp_path / "folder", "sd1")
    for bad in (2, 50, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"clip_skip must be an integer from 0 .* to 1 .*'Clip skip 2' is clip_skip 1"):
            TextToImagePipeline.from_pretrained(tmp_path / "folder", clip_skip=bad)
    kw = dict(steps=2, seed=1, height=16, width=16, progress=False, output_type="latent")
    skip = TextToImagePipeline.from_pretrained(tmp_path / "folder", clip_skip=1)
    plain = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    a, b = skip.generate("a red circle", **kw), plain.generate("a red circle", **kw)
    assert a.parameters["clip_skip"] == 1 and "clip_skip" not in b.parameters
    assert not torch.equal(a.latents, b.latents)


def test_minilm_states_mask_and_truncation_warning(caplog):
    enc = MiniLMTextEncoder.from_package(max_length=8)
    r = enc.encode(["a red circle", ""])
    assert r.states.shape == (2, 8, 384)
    # [CLS] a red circle [SEP] = 5 real tokens; the empty prompt has [CLS] [SEP].
    assert r.mask.sum(1).tolist() == [5, 2]
    with caplog.at_level("WARNING"):
        enc.encode(["a red circle to the left of a blue square"])
    assert "truncated" in caplog.text and "tokens cut" in caplog.text


PROMPTS = ["a red circle to the left of a blue square", "", "Ünïcödé prompt — with dashes, 日本語", "x " * 60,
           "two yellow circles"]


def _max_err_on_real_tokens(a, b):
    keep = a.mask[..., None].expand_as(a.states)
    return float((a.states - b.states).abs()[keep].max())


def test_our_bert_gives_transformers_states_on_the_package_weights():
    """The default encoder runs on imagine.models.bert (no transformers import at generation time): same token
    ids and masks as transformers' tokenizer, the same states as its BertModel on the same weights (real tokens:
    what the U-Net attends to) and the same pooled vector, including a truncated and a non-ASCII prompt."""
    from imagine.models.bert import BertEncoder

    ours = MiniLMTextEncoder.from_package(max_length=32)
    assert isinstance(ours.model, BertEncoder)
    theirs = MiniLMTextEncoder.from_folder(ours.source, max_length=32, backend="transformers")
    assert not isinstance(theirs.model, BertEncoder)
    ta, tb = ours.tokenize(PROMPTS), theirs.tokenize(PROMPTS)
    assert torch.equal(ta["input_ids"], tb["input_ids"]) and torch.equal(ta["attention_mask"], tb["attention_mask"])
    a, b = ours.encode(PROMPTS), theirs.encode(PROMPTS)
    assert torch.equal(a.mask, b.mask)
    assert _max_err_on_real_tokens(a, b) < 1e-4
    assert float((a.pooled - b.pooled).abs().max()) < 1e-5
    assert float(b.states.std()) > 0.1  # not a degenerate comparison


def test_our_bert_on_a_random_tiny_bert_folder(tmp_path):
    """A BERT of another shape (random weights, written by transformers), so the check does not rest on one
    checkpoint: the states agree with transformers' BertModel on real tokens."""
    transformers = pytest.importorskip("transformers")
    from imagine.models.bert import BertEncoder
    from imagine.models.text_encoders import minilm_folder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(minilm_folder() / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = BertEncoder.from_folder(tmp_path)
    ids = torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    keep = mask.bool()
    assert float((got - want).abs()[keep].max()) < 1e-5
    enc = MiniLMTextEncoder.from_folder(tmp_path, max_length=16)
    assert isinstance(enc.model, BertEncoder) and enc.dim == 64


def test_non_bert_folder_with_backend_imagine_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="not a plain BERT folder"):
        MiniLMTextEncoder.from_folder(tmp_path, backend="imagine")
    with pytest.raises(ValueError, match="backend must be"):
        MiniLMTextEncoder.from_folder(tmp_path, backend="onnx")
    with pytest.raises(FileNotFoundError, match="not found"):
        MiniLMTextEncoder.from_folder(tmp_path / "nope")


def test_server_reports_clip_skip_in_a1111_numbering(tmp_path):
    """imagine serve --clip-skip 1 (diffusers' numbering) is AUTOMATIC1111's "Clip skip 2": its options, the
    response's info and the image's infotext say 2."""
    httpx = pytest.importorskip("httpx")
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", clip_skip=1)
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        assert httpx.get(f"{srv.url}/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        # (2 steps: the model's DDIM runs as A1111's, a step short of the end)
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 16,
                                                            "height": 16}, timeout=120)
        import json

        info = json.loads(r.json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]


def test_use_attention_mask_in_a_clip_config_is_diffusers_reading(tmp_path):
    """A text encoder whose config.json sets use_attention_mask (diffusers' StableDiffusionPipeline.encode_prompt
    then passes the tokenizer's padding mask) gives diffusers' prompt states; without it, all 77 are attended."""
    import json

    pytest.importorskip("diffusers")
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "sd", "sd1")
    plain = TextToImagePipeline.from_pretrained(tmp_path / "sd").encode_prompts(["a red circle"])["context"]
    config = tmp_path / "sd" / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_attention_mask": True}))
    ours = TextToImagePipeline.from_pretrained(tmp_path / "sd").encode_prompts(["a red circle"])["context"]
    ref.text_encoder.config.use_attention_mask = True
    with torch.no_grad():
        want = ref.encode_prompt("a red circle", "cpu", 1, False)[0]
    assert torch.allclose(ours, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # (the padding tokens' states differ)
