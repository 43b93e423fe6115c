"""Text encoders: CLIP's clip_skip reads the right layer; MiniLM states and mask."""

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


def test_minilm_states_mask_and_truncation_warning(caplog):
    enc = MiniLMTextEncoder.from_package(max_length=8)
    r = enc.encode(["a red circle", ""])
    assert r.states.shape == (2, 8, 384)
    # [CLS] a red circle [SEP] = 5 real tokens; the empty prompt has [CLS] [SEP].
    assert r.mask.sum(1).tolist() == [5, 2]
    with caplog.at_level("WARNING"):
        enc.encode(["a red circle to the left of a blue square"])
    assert "truncated" in caplog.text and "tokens cut" in caplog.text
