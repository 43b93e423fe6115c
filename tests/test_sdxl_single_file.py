"""Original SDXL base single files (the sd_xl_base_1.0.safetensors layout), loaded offline by
imagine.loading.sdxl: tiny random SDXL-shaped parts built in diffusers / transformers are written in the
CompVis SDXL layout by this file's own inverse map (diffusers' wheel has no diffusers-to-original
converter; the SD parts reuse test_loading.py's, which are independent of imagine.loading.keymap), then
loaded by shape inference alone and compared with the models they were written from; the real SDXL base
layout is checked on the meta device; EDM models and missing tokenizers get clear errors (the refiner's layout:
tests/test_refiner.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_loading import (  # noqa: E402
    VOCAB, clip_to_compvis, clip_to_openclip, rel_err, unet_to_compvis, vae_to_compvis, write_clip_tokenizer,
)

from imagine.loading.single_file import components_from_state, load_single_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (32, 64)  # CLIP ViT-L and OpenCLIP ViT-bigG (SDXL: 768, 1280)
PROJ = 48  # bigG's projection (SDXL: 1280); not its width, so a missing transpose shows
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
PROMPTS = ["a red circle", "the blue square of the circle"]


def tiny_sdxl_parts(seed: int = 0):
    """(unet, vae, text_encoder, text_encoder_2) with random weights, SDXL-shaped: no attention on the first
    level, two transformer layers on the second (and in the middle), linear projections, 64-wide heads (as the
    loader assumes, SDXL's), text_time conditioning on the projected pooled vector."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2), use_linear_projection=True,
        cross_attention_dim=sum(WIDTHS), addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJ + 6 * TIME_DIM, norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.13025,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    towers = []
    for width, cls, act, pad in ((WIDTHS[0], transformers.CLIPTextModel, "quick_gelu", VOCAB - 1),
                                 (WIDTHS[1], transformers.CLIPTextModelWithProjection, "gelu", 0)):
        cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                          num_attention_heads=max(1, width // 64), num_hidden_layers=3,
                                          max_position_embeddings=77, projection_dim=PROJ, hidden_act=act,
                                          bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=pad)
        towers.append(cls(cfg).eval())
    with torch.no_grad():  # spread the weights out so every path matters in the comparisons
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, *towers


# ---------------------------------------------------------------------------------------------
# diffusers / transformers names -> the CompVis SDXL names (this file's own map)
# ---------------------------------------------------------------------------------------------
LABEL_EMB = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _unprefixed(sd: dict) -> dict:
    """transformers' text-model keys without `text_model.` (CLIPTextModelWithProjection keeps the prefix)."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def sdxl_to_compvis(unet_sd: dict, unet_cfg, vae_sd: dict, vae_levels: int, text_sd: dict | None,
                    text_2_sd: dict) -> dict:
    """The four state dicts in sgm's names: SD's U-Net map (test_loading) plus label_emb, SD's VAE map,
    CLIP ViT-L as SD 1.x's under conditioner.embedders.0.transformer, bigG in OpenCLIP names (test_loading's
    SD 2 writer, without the extra block it adds) under conditioner.embedders.1.model, with
    text_projection = W^T (OpenCLIP applies x @ P). text_sd None: the refiner's layout, bigG alone as
    conditioner.embedders.0.model."""
    state = {}
    plain = {k: v for k, v in unet_sd.items() if not k.startswith("add_embedding.")}
    state.update(unet_to_compvis(plain, unet_cfg))
    for k, v in unet_sd.items():
        if k.startswith("add_embedding."):
            head, _, leaf = k.rpartition(".")
            state[f"model.diffusion_model.{LABEL_EMB[head]}.{leaf}"] = v
    state.update(vae_to_compvis(vae_sd, vae_levels))
    for k, v in (clip_to_compvis(_unprefixed(text_sd)) if text_sd is not None else {}).items():
        state[k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", 1)] = v
    bigg = "conditioner.embedders.1.model." if text_sd is not None else "conditioner.embedders.0.model."
    t2 = _unprefixed(text_2_sd)
    proj = t2.pop("text_projection.weight")
    layers = 1 + max(int(k.split(".")[2]) for k in t2 if k.startswith("encoder.layers."))
    for k, v in clip_to_openclip(t2).items():
        if f".resblocks.{layers}." in k:
            continue  # the block SD 2 drops, which test_loading's writer appends
        state[k.replace("cond_stage_model.model.", bigg, 1)] = v
    state[bigg + "text_projection"] = proj.t()
    return {k: v.detach().contiguous() for k, v in state.items()}


def compvis_state(unet, vae, te1, te2) -> dict:
    return sdxl_to_compvis(unet.state_dict(), unet.config, vae.state_dict(), len(vae.config.block_out_channels),
                           te1.state_dict(), te2.state_dict())


def write_sdxl_single_file(path: Path, seed: int = 0, tokenizers: tuple[str, ...] = ("tokenizer", "tokenizer_2")):
    """An SDXL-layout .safetensors of tiny random weights, with CLIP tokenizers beside it (tokenizer/ pads with
    the end token, tokenizer_2/ with '!', as SDXL's); returns the diffusers / transformers parts."""
    from safetensors.torch import save_file

    parts = tiny_sdxl_parts(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(compvis_state(*parts), str(path))
    for name in tokenizers:
        write_clip_tokenizer(path.parent / name, "!" if name == "tokenizer_2" else "<|endoftext|>")
    return parts


@pytest.fixture
def no_tokenizer_env(monkeypatch, tmp_path):
    """No tokenizer from the environment or a Hugging Face cache of this machine."""
    for env in ("IMAGINE_CLIP_TOKENIZER", "IMAGINE_CLIP_TOKENIZER_2"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


# ---------------------------------------------------------------------------------------------
# Numbers: the same weights give diffusers' / transformers' outputs
# ---------------------------------------------------------------------------------------------
def test_sdxl_single_file_matches_diffusers(tmp_path, no_tokenizer_env):
    from imagine.models.text_encoders import SDXLTextEncoder

    path = tmp_path / "sdxl.safetensors"
    unet, vae, te1, te2 = write_sdxl_single_file(path)
    c = load_single_file(path)
    cfg = c.unet.config
    assert cfg.addition_embed_type == "text_time" and cfg.addition_time_embed_dim == TIME_DIM
    assert cfg.projection_class_embeddings_input_dim == PROJ + 6 * TIME_DIM
    assert cfg.transformer_layers_per_block == (1, 2) and cfg.heads_per_block == (1, 2)
    assert cfg.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert cfg.cross_attention_dim == sum(WIDTHS) and cfg.use_linear_projection and not cfg.upcast_attention
    assert isinstance(c.text_encoder, SDXLTextEncoder)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([11.0, 741.5])
    ctx = torch.randn(2, 77, sum(WIDTHS), generator=g)
    pooled = torch.randn(2, PROJ, generator=g)
    sizes = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 512, 768]])
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": sizes}
        want = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        assert rel_err(c.unet(x, t, context=ctx, text_embeds=pooled, time_ids=sizes), want) < 1e-4
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(c.vae.decode(z), vae.decode(z).sample) < 1e-4
        img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        assert rel_err(c.vae.encode(img).mean, vae.encode(img).latent_dist.mean) < 1e-4

        # each tower, every layer, and bigG's projected pooled vector
        for tower, ref in zip(c.text_encoder.towers, (te1, te2)):
            ids = tower.tokenize(PROMPTS)["input_ids"]
            got, exp = tower.model(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
            assert len(got.hidden_states) == len(exp.hidden_states) == 4  # embeddings + all 3 layers kept
            for a, b in zip(got.hidden_states, exp.hidden_states):
                assert rel_err(a, b) < 1e-5
        assert rel_err(te2(ids).text_embeds, c.text_encoder.towers[1].model(ids).text_embeds) < 1e-5

        # what the U-Net is given: diffusers' encode_prompt with the tokenizers found beside the file
        toks = [transformers.CLIPTokenizer.from_pretrained(tmp_path / n, local_files_only=True)
                for n in ("tokenizer", "tokenizer_2")]
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=toks[0],
                                                   tokenizer_2=toks[1], unet=unet,
                                                   scheduler=diffusers.EulerDiscreteScheduler())
        states, _, pooled_want, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        enc = c.text_encoder.encode(PROMPTS)
        assert rel_err(enc.states, states) < 1e-5 and rel_err(enc.pooled, pooled_want) < 1e-5
        assert set(enc.as_cond()) == {"context", "text_embeds"}
    assert c.text_encoder.towers[1].tokenize(["a"])["input_ids"][0, -1].item() == 0  # tokenizer_2 pads with '!'
    assert c.text_encoder.towers[0].tokenize(["a"])["input_ids"][0, -1].item() == VOCAB - 1  # the end token

    assert c.prediction_type == "epsilon"
    assert c.vae.config.scaling_factor == pytest.approx(0.13025)
    assert c.defaults == {"height": 1024, "width": 1024, "sampler": "euler", "zero_empty_negative": True}
    sc = c.scheduler_config
    assert (sc["_class_name"], sc["beta_schedule"], sc["timestep_spacing"], sc["steps_offset"]) == \
        ("EulerDiscreteScheduler", "scaled_linear", "leading", 1)
    ref_sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(c.schedule.alphas_cumprod.double(), ref_sched.alphas_cumprod.double(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The real SDXL base layout, on the meta device
# ---------------------------------------------------------------------------------------------
SDXL_BASE_KEYS = {  # names and shapes of sd_xl_base_1.0.safetensors
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}


REAL_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,  # OpenCLIP bigG
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def real_sdxl_vae():
    """SDXL's VAE (stabilityai/sdxl-vae's config), built where the caller's device says (meta: no memory)."""
    return diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)


def _meta_sdxl_base() -> tuple[dict, int]:
    """'Weights' of the real SDXL base shapes on the meta device, in the sgm layout (built by diffusers and
    transformers from stabilityai/stable-diffusion-xl-base-1.0's configs, renamed by this file's map), and the
    number of U-Net tensors diffusers has."""
    from imagine.models.unet import UNetConfig

    ucfg = {k: v for k, v in UNetConfig.sdxl().to_dict().items() if k != "num_attention_heads"}
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
        vae = real_sdxl_vae()
        te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_l))
        te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**REAL_BIGG))
    return compvis_state(unet, vae, te1, te2), len(unet.state_dict())


def test_full_size_sdxl_base_layout_loads_without_missing_or_unexpected_keys(tmp_path, no_tokenizer_env):
    from imagine.models.unet import UNetConfig

    state, n_diffusers = _meta_sdxl_base()
    for k, shape in SDXL_BASE_KEYS.items():
        assert tuple(state[k].shape) == shape, k
    assert sum(k.startswith("model.diffusion_model.") for k in state) == n_diffusers == 1680
    tok = write_clip_tokenizer(tmp_path / "tok")
    tok2 = write_clip_tokenizer(tmp_path / "tok2", "!")
    # every tensor finds its place (strict: a missing, unexpected or misshapen key is an error)
    c = components_from_state(state, "sd_xl_base_1.0.safetensors", tokenizer=tok, tokenizer_2=tok2)
    assert c.unet.config == UNetConfig.sdxl()
    assert c.unet.conv_in.weight.is_meta  # nothing was allocated
    assert c.vae.config.block_out_channels == (128, 256, 512, 512)
    assert c.vae.config.scaling_factor == pytest.approx(0.13025)
    t1, t2 = (tower.model.config for tower in c.text_encoder.towers)
    assert (t1.hidden_size, t1.num_hidden_layers, t1.num_attention_heads, t1.hidden_act) == (768, 12, 12, "quick_gelu")
    assert (t2.hidden_size, t2.num_hidden_layers, t2.num_attention_heads, t2.intermediate_size, t2.projection_dim,
            t2.hidden_act) == (1280, 32, 20, 5120, 1280, "gelu")
    assert c.text_encoder.dim == 2048 and c.text_encoder.pooled_dim == 1280


# ---------------------------------------------------------------------------------------------
# What the file says beyond the weights, and bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state():
    return compvis_state(*tiny_sdxl_parts())


@pytest.fixture
def toks(tmp_path):
    return write_clip_tokenizer(tmp_path / "tok"), write_clip_tokenizer(tmp_path / "tok2", "!")


def test_v_pred_and_ztsnr_markers(tiny_state, toks, no_tokenizer_env):
    state = dict(tiny_state, v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    c = components_from_state(state, "vpred.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    assert c.prediction_type == "v_prediction" and c.scheduler_config["prediction_type"] == "v_prediction"
    assert c.scheduler_config["rescale_betas_zero_snr"] and c.schedule.alphas_cumprod[-1] < 1e-6
    c = components_from_state(state, "vpred.safetensors", tokenizer=toks[0], tokenizer_2=toks[1],
                              prediction_type="epsilon")
    assert c.prediction_type == "epsilon"


def test_stored_sigmas(tiny_state, toks, no_tokenizer_env, caplog):
    """sgm's denoiser.sigmas: SDXL's own (in fp16, largest first) change nothing; others are used, with a warning."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - abar) / abar).sqrt()
    c = components_from_state(dict(tiny_state, **{"denoiser.sigmas": sigmas.flip(0).half()}), "a.safetensors",
                              tokenizer=toks[0], tokenizer_2=toks[1])
    assert "trained_betas" not in c.scheduler_config
    other = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - other, 0)
    with caplog.at_level(logging.WARNING):
        c = components_from_state(dict(tiny_state, **{"denoiser.sigmas": ((1 - abar) / abar).sqrt().float()}),
                                  "b.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    assert "differs from SDXL's" in caplog.text
    assert torch.allclose(torch.tensor(c.scheduler_config["trained_betas"], dtype=torch.float64), other, rtol=1e-4)


def test_edm_checkpoints_and_broken_layouts_are_refused(tiny_state, toks):
    # the refiner's layout (bigG alone, as embedders.0) around a base U-Net: its added embedding is not pooled text
    # plus the refiner's five size codes (tests/test_refiner.py loads real refiner layouts)
    refiner = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v
               for k, v in tiny_state.items() if not k.startswith("conditioner.embedders.0.transformer.")}
    with pytest.raises(ValueError, match=rf"label_emb.0.0 takes {PROJ + 6 * TIME_DIM} inputs, which is not the "
                                         rf"{PROJ}-wide pooled text vector plus 5 equal size codes"):
        components_from_state(refiner, "sd_xl_refiner_1.0.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    with pytest.raises(ValueError, match="Playground v2.5"):
        components_from_state(dict(tiny_state, edm_mean=torch.zeros(1, 4, 1, 1)), "pg.safetensors")
    # a piece missing, a weight of no known place
    no_vae = {k: v for k, v in tiny_state.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match=r"no VAE weights found; expected an original SDXL checkpoint"):
        components_from_state(no_vae, "x.safetensors")
    with pytest.raises(ValueError, match=r"unexpected weights conditioner\.embedders\.5\.thing"):
        components_from_state(dict(tiny_state, **{"conditioner.embedders.5.thing": torch.zeros(1)}), "x.safetensors")
    # a U-Net whose added embedding is not pooled text + six size codes (the refiner's aesthetic score)
    odd = dict(tiny_state)
    k = "model.diffusion_model.label_emb.0.0.weight"
    odd[k] = odd[k][:, :-TIME_DIM]
    with pytest.raises(ValueError, match=rf"label_emb.0.0 takes {PROJ + 5 * TIME_DIM} inputs"):
        components_from_state(odd, "x.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    # damaged files: a weight the inference reads is gone, or has lost a dimension the checks do not name; a
    # ValueError naming the file and the layout, not a StopIteration / IndexError from deep inside
    no_proj_in = {k: v for k, v in tiny_state.items() if ".proj_in." not in k}
    with pytest.raises(ValueError, match="no proj_in weight"):
        components_from_state(no_proj_in, "x.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    adm = "model.diffusion_model.label_emb.0.0.weight"  # (its inputs: .shape[1])
    flat = dict(tiny_state, **{adm: tiny_state[adm].flatten()})
    with pytest.raises(ValueError, match=r"x\.safetensors: the weights do not have the layout of an original SDXL "
                                         r"checkpoint \(.*IndexError"):
        components_from_state(flat, "x.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])


def test_tokenizer_lookup(tmp_path, monkeypatch, no_tokenizer_env):
    path = tmp_path / "m" / "sdxl.safetensors"
    write_sdxl_single_file(path, tokenizers=("tokenizer",))
    with pytest.raises(FileNotFoundError) as e:
        load_single_file(path)
    msg = str(e.value)
    assert "no tokenizer_2 found for sdxl.safetensors (SDXL's OpenCLIP ViT-bigG/14, text encoder 2)" in msg
    assert "Pass tokenizer_2=FOLDER" in msg and "IMAGINE_CLIP_TOKENIZER_2=FOLDER" in msg
    assert str(path.parent / "tokenizer_2") in msg  # where it looked
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer_2={tmp_path}: not a CLIP tokenizer folder")):
        load_single_file(path, tokenizer_2=tmp_path)

    tok2 = write_clip_tokenizer(tmp_path / "elsewhere" / "tok2", "!")
    assert load_single_file(path, tokenizer_2=tok2).text_encoder.towers[1].tokenizer.pad_token == "!"
    monkeypatch.setenv("IMAGINE_CLIP_TOKENIZER_2", str(tok2))
    load_single_file(path)
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER_2")

    # an SDXL model folder (tokenizer/ and tokenizer_2/) given as tokenizer=, or its tokenizer/
    model = tmp_path / "sdxl-base"
    write_clip_tokenizer(model / "tokenizer")
    write_clip_tokenizer(model / "tokenizer_2", "!")
    (path.parent / "tokenizer").rename(tmp_path / "moved")
    load_single_file(path, tokenizer=model)
    load_single_file(path, tokenizer=model / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found .*CLIP ViT-L/14, text encoder 1.*Pass "
                                                r"tokenizer=FOLDER.*IMAGINE_CLIP_TOKENIZER=FOLDER"):
        load_single_file(path)
    # tokenizer_2 means nothing to an SD 1.x/2.x checkpoint
    with pytest.raises(ValueError, match="tokenizer_2 is the second tokenizer of an SDXL checkpoint"):
        components_from_state({"model.diffusion_model.out.2.bias": torch.zeros(4)}, "sd15.safetensors",
                              tokenizer_2=tok2)
