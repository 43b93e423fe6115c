"""Model loading, after review: what real files carry that the loaders refused or misread.

- ComfyUI's empty `v_pred` / `ztsnr` marker tensors in SD 1.x/2.x files (its CheckpointSave writes them into any
  v-prediction / zero-SNR model): v-prediction unless the caller or a .yaml says otherwise, decided before the SD 2
  probe; zero terminal SNR as diffusers' rescale_betas_zero_snr computes it.
- diffusers' sharded weights (save_pretrained past max_shard_size: <stem>-0000k-of-0000n.safetensors and the
  .safetensors.index.json) load as diffusers loads them.
- an SDXL embedding on the refiner (bigG alone): its clip_g vectors, as diffusers' refiner takes them.
- a safetensors file whose header length's low byte is 0x80 (a pickle's first byte) is read as safetensors, under
  any name, by the checkpoint and the embedding reader alike.
- bigG's projection stored as a Linear weight, `text_projection.weight` [proj, width] (an older diffusers script's
  output), is read; only exact names are dropped.
- adding an embedding's words leaves torch's global random state alone; a LoRA or an embedding given as the model
  gets an error saying what it is.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_loading import (compvis_checkpoint, make_scheduler, save_diffusers_folder, tiny_diffusers_parts,  # noqa: E402
                          write_clip_tokenizer)
from test_sdxl_single_file import PROJ, compvis_state, tiny_sdxl_parts  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.loading import load_folder, single_file  # noqa: E402
from imagine.loading.single_file import (_file_kind, components_from_state, load_single_file,  # noqa: E402
                                         read_checkpoint)
from imagine.loading.textual_inversion import add_embedding, read_embedding_file  # noqa: E402
from imagine.models import io  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_parts():
    return {kind: tiny_diffusers_parts(kind) for kind in ("sd1", "sd2")}


def _state(sd_parts, kind: str, **extra) -> dict:
    unet, vae, text = sd_parts[kind]
    return dict(compvis_checkpoint(unet, vae, text, openclip=kind == "sd2"), **extra)


def _tok(tmp_path: Path, kind: str) -> Path:
    return write_clip_tokenizer(tmp_path / f"tok_{kind}", "!" if kind == "sd2" else "<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# 1. ComfyUI's markers in SD 1.x / 2.x files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_comfyui_v_pred_marker_means_v_prediction_without_the_probe(sd_parts, tmp_path, monkeypatch, kind):
    def no_probe(*a, **k):
        raise AssertionError("the SD 2 probe ran although the file says v_pred")
    monkeypatch.setattr(single_file, "sd2_prediction_type", no_probe)
    state = _state(sd_parts, kind, v_pred=torch.tensor([]))
    c = components_from_state(state, "comfy.safetensors", tokenizer=_tok(tmp_path, kind))
    assert c.prediction_type == c.scheduler_config["prediction_type"] == "v_prediction"
    assert "rescale_betas_zero_snr" not in c.scheduler_config
    if kind == "sd2":  # the 768-v models' size follows the prediction type, as it does for a .yaml's
        assert c.unet.config.sample_size == 96
    # the caller's word, and a .yaml's, come first
    c = components_from_state(state, "comfy.safetensors", tokenizer=_tok(tmp_path, kind), prediction_type="epsilon")
    assert c.prediction_type == "epsilon"
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert load_single_file(path, tokenizer=_tok(tmp_path, kind)).prediction_type == "epsilon"


def test_comfyui_ztsnr_marker_is_zero_terminal_snr_as_diffusers_computes_it(sd_parts, tmp_path):
    state = _state(sd_parts, "sd1", v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    c = components_from_state(state, "zsnr.safetensors", tokenizer=_tok(tmp_path, "sd1"))
    assert c.scheduler_config["rescale_betas_zero_snr"] is True and c.prediction_type == "v_prediction"
    ref = diffusers.DDIMScheduler(**single_file.SD_SCHEDULER_CONFIG, rescale_betas_zero_snr=True)
    ours = torch.as_tensor(c.schedule.alphas_cumprod, dtype=torch.float64)
    assert torch.allclose(ours, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-9)
    assert ours[-1] < 1e-6


def test_other_top_level_weights_are_still_refused(sd_parts):
    with pytest.raises(ValueError, match=r"x\.safetensors: unexpected weights v_pred_typo"):
        single_file.split_checkpoint(_state(sd_parts, "sd1", v_pred_typo=torch.tensor([])), "x.safetensors")


# ---------------------------------------------------------------------------------------------
# 2. Sharded weights
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """An SD 1.x diffusers folder whose U-Net, VAE and text encoder are saved in shards (as diffusers and
    transformers save a model larger than max_shard_size), the unsharded files removed; with the pipeline."""
    root = tmp_path_factory.mktemp("sharded")
    pipe = save_diffusers_folder(root / "sd", "sd1")
    for sub, model, single in (("unet", pipe.unet, "diffusion_pytorch_model.safetensors"),
                               ("vae", pipe.vae, "diffusion_pytorch_model.safetensors"),
                               ("text_encoder", pipe.text_encoder, "model.safetensors")):
        (root / "sd" / sub / single).unlink()
        model.save_pretrained(root / "sd" / sub, max_shard_size="200KB", safe_serialization=True)
        assert (root / "sd" / sub / (single + ".index.json")).is_file() and not (root / "sd" / sub / single).exists()
    return root / "sd", pipe


def test_sharded_diffusers_folder_loads_as_diffusers_loads_it(sharded_folder):
    folder, _ = sharded_folder
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    c = load_folder(folder)
    for ours, sub, cls in ((c.unet, "unet", diffusers.UNet2DConditionModel),
                           (c.vae, "vae", diffusers.AutoencoderKL)):
        theirs = cls.from_pretrained(folder / sub, local_files_only=True).state_dict()
        mine = ours.state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs), sub
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).state_dict()
    mine = c.text_encoder.model.state_dict()
    assert all(torch.equal(mine[k], text[k]) for k in text if not k.endswith("position_ids"))


def test_broken_shard_sets_get_errors_naming_the_file(sharded_folder, tmp_path):
    import shutil

    unet = tmp_path / "unet"
    shutil.copytree(sharded_folder[0] / "unet", unet)
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    content = json.loads(index.read_text())
    shards = sorted(set(content["weight_map"].values()))
    # a key the index places in a shard that lacks it (shards of another save)
    key = next(k for k, v in content["weight_map"].items() if v == shards[0])
    content["weight_map"][key] = shards[1]
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{shards[1]} lacks {key}, which .*index\.json lists in it"):
        io.load_tensors(io.find_weights(unet))
    (unet / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json: its shard {shards[1]} is not in"):
        io.load_tensors(io.find_weights(unet))
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"lists the shard '\.\./elsewhere\.safetensors'; expected a \.safetensors"):
        io.load_tensors(index)
    # shards without their index: nothing to load them by, and the files found named
    index.unlink()
    for p in unet.glob("*.safetensors"):
        p.rename(p.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match=r"no weights in .*found \['config.json', 'diffusion_pytorch_model-0"):
        io.find_weights(unet)


# ---------------------------------------------------------------------------------------------
# 3. An SDXL embedding on the refiner
# ---------------------------------------------------------------------------------------------
def test_sdxl_embedding_on_the_refiner_takes_clip_g_as_diffusers_refiner_does(tmp_path):
    from test_refiner import tiny_refiner_unet
    from imagine.pipelines.text_to_image import TextToImagePipeline

    _, vae, te1, te2 = tiny_sdxl_parts()
    tok2 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok2", "!"),
                                                      local_files_only=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2, unet=tiny_refiner_unet(),
        scheduler=make_scheduler("euler"), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    g = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, te1.config.hidden_size, generator=g),
               "clip_g": torch.randn(2, te2.config.hidden_size, generator=g)}
    save_file(vectors, str(tmp_path / "xlword.safetensors"))

    pipe = TextToImagePipeline.from_pretrained(tmp_path / "refiner")
    assert pipe.load_embedding(tmp_path / "xlword.safetensors") == ["xlword", "xlword_1"]
    refiner.load_textual_inversion(vectors["clip_g"], token="xlword", text_encoder=refiner.text_encoder_2,
                                   tokenizer=refiner.tokenizer_2)
    tower = pipe.text_encoder.towers[0]
    prompt = "a xlword circle"
    theirs_prompt = refiner.maybe_convert_prompt(prompt, refiner.tokenizer_2)
    ids = refiner.tokenizer_2(theirs_prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(tower.tokenize([prompt])["input_ids"], ids)
    with torch.no_grad():
        want = refiner.text_encoder_2(ids, output_hidden_states=True)
        got = tower.model(ids, output_hidden_states=True)
    assert torch.allclose(got.hidden_states[-2], want.hidden_states[-2], atol=1e-6)
    assert torch.allclose(got.text_embeds, want.text_embeds, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Sniffing the format
# ---------------------------------------------------------------------------------------------
def _safetensors_with_header_low_byte(path: Path, low: int) -> int:
    """Save a small embedding whose safetensors header length is = low (mod 256); returns the length."""
    for pad in range(300):  # (safetensors pads its header to 8 bytes: metadata of every length gets there)
        save_file({"emb_params": torch.randn(2, 8)}, str(path), metadata={"x": "a" * pad})
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n % 256 == low:
            return n
    raise AssertionError("no padding gave that header length")


@pytest.mark.parametrize("name", ["emb.safetensors", "emb.pt"])
def test_safetensors_whose_first_byte_is_a_pickles_is_read_as_safetensors(tmp_path, name):
    path = tmp_path / name
    _safetensors_with_header_low_byte(path, 0x80)
    assert path.read_bytes()[:1] == b"\x80"
    assert _file_kind(path) == "safetensors"
    assert set(read_checkpoint(path)) == {"emb_params"}
    token, vectors = read_embedding_file(path)  # (the same reader)
    assert token is None and vectors.shape == (2, 8)


def test_pickles_and_cut_safetensors_are_still_told_apart(tmp_path):
    legacy, zipped = tmp_path / "legacy.ckpt", tmp_path / "zipped.ckpt"
    torch.save({"emb_params": torch.randn(2, 8)}, legacy, _use_new_zipfile_serialization=False)
    torch.save({"emb_params": torch.randn(2, 8)}, zipped)
    assert _file_kind(legacy) == _file_kind(zipped) == "pickle"
    assert read_embedding_file(legacy)[1].shape == read_embedding_file(zipped)[1].shape == (2, 8)
    # a safetensors file cut inside its header: still safetensors, reported as damaged, whatever its name
    whole = tmp_path / "whole.safetensors"
    n = _safetensors_with_header_low_byte(whole, 0x80)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:8 + n // 2])
    assert _file_kind(cut) == "safetensors"
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable weights file .*truncated or corrupt"):
        read_checkpoint(cut)


# ---------------------------------------------------------------------------------------------
# 5. bigG's projection as a Linear weight
# ---------------------------------------------------------------------------------------------
BIGG = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def sdxl():
    parts = tiny_sdxl_parts()
    return parts, compvis_state(*parts)


def test_sdxl_projection_stored_as_a_linear_weight_is_read(sdxl, tmp_path):
    parts, state = sdxl
    te2 = parts[3]
    state = dict(state)
    state[BIGG + "text_projection.weight"] = state.pop(BIGG + "text_projection").t().contiguous()
    assert state[BIGG + "text_projection.weight"].shape[0] == PROJ
    toks = write_clip_tokenizer(tmp_path / "tok"), write_clip_tokenizer(tmp_path / "tok2", "!")
    c = components_from_state(state, "from_script.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    tower = c.text_encoder.towers[1]
    assert torch.equal(tower.model.text_projection.weight, te2.text_projection.weight)
    ids = tower.tokenize(["a red circle"])["input_ids"]
    with torch.no_grad():
        assert torch.allclose(tower.model(ids).text_embeds, te2(ids).text_embeds, atol=1e-6)
    # both names: ambiguous; another entry under the name: not dropped, reported
    both = dict(state, **{BIGG + "text_projection": state[BIGG + "text_projection.weight"].t()})
    with pytest.raises(ValueError, match="both text_projection and text_projection.weight"):
        components_from_state(both, "x.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])
    bias = dict(state, **{BIGG + "text_projection.bias": torch.zeros(PROJ)})
    with pytest.raises(ValueError, match=r"not in the expected layout: text_projection\.bias"):
        components_from_state(bias, "x.safetensors", tokenizer=toks[0], tokenizer_2=toks[1])


def test_sd2_projection_as_a_linear_weight_still_marks_the_whole_tower(sd_parts, tmp_path):
    """SD 2.x drops the last OpenCLIP block of a released (whole) tower; the projection under either name says the
    tower is whole."""
    p = "cond_stage_model.model."
    state = _state(sd_parts, "sd2")
    renamed = {k: v for k, v in state.items() if k != p + "text_projection"}
    renamed[p + "text_projection.weight"] = state[p + "text_projection"].t()
    a = components_from_state(state, "a.safetensors", tokenizer=_tok(tmp_path, "sd2"))
    b = components_from_state(renamed, "b.safetensors", tokenizer=_tok(tmp_path, "sd2"))
    assert a.text_encoder.model.config.num_hidden_layers == b.text_encoder.model.config.num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------
# Adding words; add-ons given as the model
# ---------------------------------------------------------------------------------------------
def test_adding_an_embedding_leaves_the_global_random_state_alone(sd_parts, tmp_path, caplog):
    from imagine.models.text_encoders import CLIPTextEncoder

    tok = transformers.CLIPTokenizer.from_pretrained(_tok(tmp_path, "sd1"), local_files_only=True)
    text = sd_parts["sd1"][2]
    model = transformers.CLIPTextModel(text.config).eval()
    model.load_state_dict(text.state_dict())
    encoder = CLIPTextEncoder(model, tok, 77, "test")
    vectors = torch.randn(2, text.config.hidden_size)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        assert add_embedding(encoder, "newword", vectors) == ["newword", "newword_1"]
    assert torch.equal(torch.get_rng_state(), before)
    assert "multivariate normal" not in caplog.text
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and torch.equal(emb[-2:], vectors)
    assert torch.equal(emb[:-2], text.get_input_embeddings().weight)


def test_a_lora_or_an_embedding_given_as_the_model_is_named(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(lora))
    with pytest.raises(ValueError, match=r"style\.safetensors looks like a LoRA \(lora_down/lora_up keys.*--lora"):
        load_single_file(lora)
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match=r"looks like a LoRA"):
        components_from_state(peft, "peft.safetensors")
    for name, state in (("a1111.safetensors", {"emb_params": torch.zeros(2, 8)}),
                        ("xl.safetensors", {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)}),
                        ("learned_embeds.safetensors", {"<cat>": torch.zeros(8)})):
        save_file(state, str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"{name} looks like a textual-inversion embedding .*--embedding"):
            load_single_file(tmp_path / name)
    pt = tmp_path / "word.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 8)}, "name": "word", "step": 100}, pt)
    with pytest.raises(ValueError, match=r"word\.pt holds no tensors .*looks like an AUTOMATIC1111 textual-inversion "
                                         r"embedding \(string_to_param\): give it with --embedding"):
        load_single_file(pt)
