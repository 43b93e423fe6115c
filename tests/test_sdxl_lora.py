"""SDXL LoRA and textual-inversion embeddings against diffusers' StableDiffusionXLPipeline on the same tiny random
weights (`test_sdxl.save_sdxl_folder`).

LoRA: a file diffusers writes itself (peft's lora_A / lora_B on the U-Net and both text towers, LoraConfigs in the
header) and a kohya-ss file (`lora_te1_`, `lora_te2_`, `lora_unet_` under the original SGM block names, written
here from this file's own table of SDXL's layout) are merged as diffusers' `load_lora_weights` + `fuse_lora`
merge them: the U-Net's output (with text_embeds / time_ids) and both towers' states to 1e-4 relative, the image
to 50 dB. Embeddings: an SDXL file's `clip_l` / `clip_g` vectors give both towers the word as diffusers'
`load_textual_inversion` on each tower does: the prompt states equal `encode_prompt`'s, the image to 50 dB. The
SD 1.x/2.x files on SDXL, and SDXL's on SD 1.x, are refused with messages that say so."""

from __future__ import annotations

import re

import pytest
import torch

from test_loading import rel_err, save_diffusers_folder  # noqa: E402
from test_lora import fused_reference  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, psnr  # noqa: E402
from test_sdxl import SIZE, save_sdxl_folder  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12


def _diffusers_image(ref, prompt=PROMPT, negative=NEGATIVE) -> torch.Tensor:
    with torch.no_grad():
        out = ref(prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt")
    return out.images[0].float()


def _our_image(pipe: TextToImagePipeline, prompt=PROMPT, negative=NEGATIVE) -> torch.Tensor:
    res = pipe.generate(prompt, negative, steps=STEPS, guidance_scale=CFG, sampler="euler", seed=SEED, height=SIZE,
                        width=SIZE, progress=False, output_type="latent")
    return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()


def _fresh_reference(folder):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def _compare_networks(ours: TextToImagePipeline, ref):
    """The U-Net (with SDXL's pooled text and size codes) and both text towers, every layer's output (the last
    hidden state sees the last layer, which SDXL's penultimate states do not), and the prompt encoding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, ref.text_encoder_2.config.projection_dim, generator=g)
    t = torch.tensor([999.0, 20.5])
    sizes = torch.tensor([[32.0, 32, 0, 0, 32, 32], [48, 40, 8, 0, 48, 40]])
    prompts = ["a red circle", "the blue square"]
    errors = {}
    with torch.no_grad():
        want = ref.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled,
                                                                            "time_ids": sizes}).sample
        errors["unet"] = rel_err(ours.unet(x, t, context=ctx, text_embeds=pooled, time_ids=sizes), want)
        for i, (tower, model) in enumerate(zip(ours.text_encoder.towers, (ref.text_encoder, ref.text_encoder_2))):
            ids = tower.tokenize(prompts)["input_ids"]
            errors[f"tower {i + 1}"] = rel_err(tower.model(ids).last_hidden_state, model(ids).last_hidden_state)
        states, _, pooled_want, _ = ref.encode_prompt(prompts, do_classifier_free_guidance=False)
    cond = ours.encode_prompts(prompts)
    errors["states"], errors["pooled"] = rel_err(cond["context"], states), rel_err(cond["text_embeds"], pooled_want)
    print("relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# LoRA written by diffusers
# ---------------------------------------------------------------------------------------------------------------
def _peft_lora_file(ref, folder):
    """peft adapters with random factors on the U-Net (r 4, alpha 8), the first tower (r 2, alpha 1) and the second
    (r 3, alpha 6, rsLoRA off), saved by StableDiffusionXLPipeline.save_lora_weights with their LoraConfigs."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in",
                                                         "time_emb_proj", "linear_1"], init_lora_weights=False)
    t1cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    t2cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj", "fc2"], init_lora_weights=False)
    torch.manual_seed(0)
    ref.unet.add_adapter(ucfg)
    layers = []
    for model, cfg in ((ref.text_encoder, t1cfg), (ref.text_encoder_2, t2cfg)):
        inject_adapter_in_model(cfg, model)
        layers.append({k.replace(".default.", "."): v for k, v in model.state_dict().items() if ".lora_" in k})
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref.unet), text_encoder_lora_layers=layers[0],
        text_encoder_2_lora_layers=layers[1], unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=t1cfg.to_dict(), text_encoder_2_lora_adapter_metadata=t2cfg.to_dict(),
        safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_written_by_diffusers_matches_diffusers(tmp_path):
    ref = save_sdxl_folder(tmp_path / "folder")
    plain = _diffusers_image(ref)
    path = _peft_lora_file(ref, tmp_path / "lora")
    ref = _fresh_reference(tmp_path / "folder")
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.8)
    want = _diffusers_image(ref)
    assert psnr(plain, want) < 30  # the LoRA shows in the picture
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    in_file = {part: sum(k.startswith(part + ".") and k.endswith("lora_A.weight") for k in keys)
               for part in ("unet", "text_encoder", "text_encoder_2")}
    assert in_file["text_encoder"] == in_file["text_encoder_2"] == 3 * 3  # 3 layers in each of 3 CLIP blocks
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert ours.load_lora(path, 0.8) == in_file
    _compare_networks(ours, ref)
    got = _our_image(ours)
    print(f"diffusers-written SDXL LoRA: PSNR {psnr(got, want):.1f} dB (without the LoRA {psnr(plain, want):.1f} dB)")
    assert psnr(got, want) >= 50


# ---------------------------------------------------------------------------------------------------------------
# kohya-ss LoRA: the original (SGM) U-Net names
# ---------------------------------------------------------------------------------------------------------------
# This test's own table of the tiny SDXL U-Net (levels of 2 residual blocks; no attention at the first level, two
# transformer blocks at the second; a cross-attention middle block), as the original SGM code numbers it:
# input_blocks.0 = conv_in, then per level one block per residual block (+ its spatial transformer as .1) and one
# for the downsampler (.0.op); the middle block's resnet, transformer, resnet; output_blocks per up level, three
# each, the upsampler inside the level's last block (.2 after a transformer, else .1).
SGM_BLOCKS = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0", "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.3.0", "up_blocks.1.resnets.1": "output_blocks.4.0",
    "up_blocks.1.resnets.2": "output_blocks.5.0",
}
SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_embedding.linear_1",
                "add_embedding.linear_2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _sgm_name(name: str) -> str:
    for block, sgm in SGM_BLOCKS.items():
        if name == block:
            return sgm
        if name.startswith(block + "."):
            rest = name[len(block) + 1:]
            return f"{sgm}.{SGM_RESNET.get(rest, rest) if '.resnets.' in name else rest}"
    raise AssertionError(name)


def _factors(w: torch.Tensor, rank: int, g) -> tuple[torch.Tensor, torch.Tensor]:
    if w.ndim == 4:  # LoCon: a down convolution of the layer's kernel, a 1x1 up
        return (torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3,
                torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3)
    return torch.randn(rank, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], rank, generator=g) * 0.3


def _kohya_sdxl_lora(ref, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """kohya-ss' SDXL file: lora_unet_<SGM name>, lora_te1_ / lora_te2_<CLIP name>, with underscores for dots, and
    an alpha per layer."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, targets in (("lora_unet", ref.unet, UNET_TARGETS), ("lora_te1", ref.text_encoder, TEXT_TARGETS),
                                   ("lora_te2", ref.text_encoder_2, TEXT_TARGETS)):
        for name, mod in model.named_modules():
            if not name.endswith(targets) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if prefix == "lora_unet":
                name = _sgm_name(name)
            elif not name.startswith("text_model."):
                name = "text_model." + name
            key = f"{prefix}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _factors(mod.weight, rank, g)
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def test_kohya_sdxl_lora_matches_diffusers(tmp_path):
    ref = save_sdxl_folder(tmp_path / "folder")
    state = _kohya_sdxl_lora(ref)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.") for k in state)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in state)
    path = tmp_path / "xl_style.safetensors"
    save_file(state, str(path))
    plain, want = fused_reference(ref, state, 0.7, _diffusers_image)
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    counts = ours.load_lora(path, 0.7)
    assert sum(counts.values()) == len(state) // 3 and counts["text_encoder"] == counts["text_encoder_2"] == 3 * 6
    _compare_networks(ours, ref)
    got = _our_image(ours)
    print(f"kohya SDXL LoRA: PSNR {psnr(got, want):.1f} dB (without the LoRA {psnr(plain, want):.1f} dB)")
    assert psnr(got, want) >= 50

    # kohya-ss' diffusers-style U-Net names (lora_unet_down_blocks_1_attentions_0_...) name the same layers
    plain = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    back = {_sgm_name(name).replace(".", "_"): name.replace(".", "_") for name, mod in plain.unet.named_modules()
            if name.endswith(UNET_TARGETS) and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    renamed = {}
    for key, value in state.items():
        layer, _, rest = key.partition(".")
        if layer.startswith("lora_unet_"):
            layer = "lora_unet_" + back[layer[len("lora_unet_"):]]
        renamed[f"{layer}.{rest}"] = value
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.") for k in renamed)
    other = tmp_path / "xl_style_diffusers_names.safetensors"
    save_file(renamed, str(other))
    assert plain.load_lora(other, 0.7) == counts
    for a, b in zip(plain.unet.parameters(), ours.unet.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# The other model's LoRA
# ---------------------------------------------------------------------------------------------------------------
def test_a_lora_for_the_other_model_is_refused_and_says_so(tmp_path):
    from test_lora import _kohya_lora

    sd1 = save_diffusers_folder(tmp_path / "sd1", "sd1")
    xl = save_sdxl_folder(tmp_path / "xl")
    sd1_lora, xl_lora = tmp_path / "sd1_style.safetensors", tmp_path / "xl_style.safetensors"
    save_file(_kohya_lora(sd1.unet, sd1.text_encoder), str(sd1_lora))
    save_file(_kohya_sdxl_lora(xl), str(xl_lora))
    xl_peft = _peft_lora_file(xl, tmp_path / "peft")
    on_xl = TextToImagePipeline.from_pretrained(tmp_path / "xl")
    on_sd1 = TextToImagePipeline.from_pretrained(tmp_path / "sd1")
    before = [p.detach().clone() for p in (*on_xl.unet.parameters(), *on_sd1.unet.parameters())]
    with pytest.raises(ValueError, match=re.escape("a LoRA for SD 1.x/2.x and this model is SDXL")):
        on_xl.load_lora(sd1_lora)
    for path in (xl_lora, xl_peft):
        with pytest.raises(ValueError, match=re.escape("a LoRA for SDXL and this model is SD 1.x/2.x")):
            on_sd1.load_lora(path)
    after = (*on_xl.unet.parameters(), *on_sd1.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and not on_xl.loras and not on_sd1.loras


# ---------------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings
# ---------------------------------------------------------------------------------------------------------------
def _widths(pipe) -> tuple[int, int]:
    """The token-embedding widths of the two towers (SDXL: 768 and 1280), of either pipeline."""
    towers = (pipe.text_encoder, pipe.text_encoder_2) if hasattr(pipe, "text_encoder_2") else \
        [t.model for t in pipe.text_encoder.towers]
    return tuple(m.get_input_embeddings().weight.shape[1] for m in towers)


def _sdxl_embedding(path, n: int, widths: tuple[int, int], seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    state = {"clip_l": torch.randn(n, widths[0], generator=g) * scale,
             "clip_g": torch.randn(n, widths[1], generator=g) * scale}
    save_file(state, str(path))
    return state


def _diffusers_loads(ref, state, word):
    ref.load_textual_inversion(state["clip_l"], token=word, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=word, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)


@pytest.mark.parametrize("n", [1, 3])
def test_sdxl_embedding_reads_as_diffusers_reads_it(tmp_path, n):
    ref = save_sdxl_folder(tmp_path / "folder")
    path = tmp_path / "xlword.safetensors"
    state = _sdxl_embedding(path, n, _widths(ref))
    _diffusers_loads(ref, state, "xlword")
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert ours.load_embedding(path) == ["xlword"] + [f"xlword_{i}" for i in range(1, n)]
    prompts = ["a red circle, xlword", "xlword the blue square xlword"]
    for tower, tok in zip(ours.text_encoder.towers, (ref.tokenizer, ref.tokenizer_2)):
        want_ids = tok([ref.maybe_convert_prompt(p, tok) for p in prompts], padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt").input_ids
        assert torch.equal(tower.tokenize(prompts)["input_ids"], want_ids)
        # any case reads all the vectors, as in AUTOMATIC1111 (diffusers expands only the word as written)
        assert torch.equal(tower.tokenize(["a red circle, XLword"])["input_ids"], want_ids[:1])
    with torch.no_grad():
        states, _, pooled, _ = ref.encode_prompt(prompts, do_classifier_free_guidance=False)
    cond = ours.encode_prompts(prompts)
    assert torch.equal(cond["context"], states) and torch.allclose(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    plain = TextToImagePipeline.from_pretrained(tmp_path / "folder").encode_prompts(prompts)
    assert rel_err(plain["context"], states) > 1e-2 and rel_err(plain["text_embeds"], pooled) > 1e-2  # it matters


def test_generation_with_an_sdxl_embedding_matches_diffusers(tmp_path):
    ref = save_sdxl_folder(tmp_path / "folder")
    plain = _diffusers_image(ref, "a red circle, xlword", f"{NEGATIVE}, badxl")
    for word, seed in (("xlword", 1), ("badxl", 2)):
        _diffusers_loads(ref, _sdxl_embedding(tmp_path / f"{word}.safetensors", 2, _widths(ref), seed, 3.0), word)
    want = _diffusers_image(ref, "a red circle, xlword", f"{NEGATIVE}, badxl")
    assert psnr(plain, want) < 30  # the words show in the picture
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder", embeddings=[tmp_path / "xlword.safetensors",
                                                                               tmp_path / "badxl.safetensors"])
    got = _our_image(ours, "a red circle, xlword", f"{NEGATIVE}, badxl")
    print(f"SDXL embeddings: PSNR {psnr(got, want):.1f} dB (without them {psnr(plain, want):.1f} dB)")
    assert psnr(got, want) >= 50


def test_bad_sdxl_embeddings_get_clear_errors(tmp_path):
    save_sdxl_folder(tmp_path / "xl")
    save_diffusers_folder(tmp_path / "sd1", "sd1")
    xl = TextToImagePipeline.from_pretrained(tmp_path / "xl")
    sd1 = TextToImagePipeline.from_pretrained(tmp_path / "sd1")
    w_l, w_g = _widths(xl)
    assert w_l != w_g
    one = tmp_path / "sd1word.safetensors"
    save_file({"emb_params": torch.zeros(2, w_l)}, str(one))
    with pytest.raises(ValueError, match=r"an SD 1.x/2.x embedding .*needs an SDXL embedding, with clip_l and clip_g"):
        xl.load_embedding(one)
    pair = tmp_path / "xlword.safetensors"
    _sdxl_embedding(pair, 1, (w_l, w_g))
    with pytest.raises(ValueError, match=r"is an SDXL embedding \(clip_l / clip_g.*this model is SD 1.x/2.x"):
        sd1.load_embedding(pair)
    cases = {
        "uneven": ({"clip_l": torch.zeros(2, w_l), "clip_g": torch.zeros(1, w_g)}, "as many for each"),
        "half": ({"clip_g": torch.zeros(1, w_g)}, "clip_l is missing"),
        "swapped": ({"clip_l": torch.zeros(1, w_g), "clip_g": torch.zeros(1, w_l)},
                    rf"\(clip_l\): its vectors are {w_g} wide, SDXL's first text encoder takes {w_l}"),
        "wide_g": ({"clip_l": torch.zeros(1, w_l), "clip_g": torch.zeros(1, 1280)},
                   rf"\(clip_g\): its vectors are 1280 wide, SDXL's second text encoder takes {w_g}"),
    }
    sizes = [len(t.tokenizer) for t in xl.text_encoder.towers]
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError, match=message):
            xl.load_embedding(path)
    # nothing was added to either tower by a refused file (the second tower is checked before the first changes)
    assert [len(t.tokenizer) for t in xl.text_encoder.towers] == sizes and not xl.embeddings
