"""Loading Stable Diffusion checkpoints offline: original single files (CompVis names, SD 1.x
CLIP and SD 2.x OpenCLIP text encoders) and diffusers folders, their inferred shapes, the
full-size SD 1.5 / 2.1 layouts, and the errors for bad files.

The original-layout checkpoints are written here with a diffusers -> CompVis mapping of this
file's own (diffusers' wheel has no such converter), keyed on diffusers' names, independent of
imagine.loading.keymap. The helpers at the top are also used by test_sd_parity.py and
test_generate_cli.py.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# A tiny CLIP tokenizer: byte-level BPE with CLIP's conventions (</w> word ends, 256 byte
# symbols), a handful of merges, and CLIP's two special tokens.
# ---------------------------------------------------------------------------------------------
MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>", "circ le</w>", "b l", "bl u", "blu e</w>",
          "s q", "sq u", "squ a", "squa r", "squar e</w>", "a n", "o f</w>", "t h", "th e</w>"]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible table of the 256 bytes as printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_symbols()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


VOCAB = 2 * 256 + len(MERGES) + 2

# ---------------------------------------------------------------------------------------------
# Tiny Stable-Diffusion-shaped models in diffusers
# ---------------------------------------------------------------------------------------------
# The heads follow the released convention the single-file loader assumes: 8 heads per level
# with 1x1-conv projections (SD 1.x), 64-channel heads with linear projections (SD 2.x).
TINY = {
    "sd1": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(hidden_act="quick_gelu", num_hidden_layers=2), openclip=False),
    "sd2": dict(unet=dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=(1, 2),
                          use_linear_projection=True, upcast_attention=True,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(hidden_act="gelu", num_hidden_layers=2), openclip=True),
    # all levels attend, two transformer layers per block, three residual blocks per level
    "deep": dict(unet=dict(block_out_channels=(32, 32), layers_per_block=3, attention_head_dim=8,
                           transformer_layers_per_block=2,
                           down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
                 text=dict(hidden_act="quick_gelu", num_hidden_layers=1), openclip=False),
}
TEXT_WIDTH = 64


def tiny_diffusers_parts(kind: str, seed: int = 0, in_channels: int = 4):
    """(unet, vae, text_encoder) of diffusers/transformers with random weights (in_channels 9: an inpainting
    model's U-Net)."""
    spec = TINY[kind]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=4, norm_num_groups=32,
                                          cross_attention_dim=TEXT_WIDTH, **spec["unet"]).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=32, sample_size=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    tcfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=96,
                                       num_attention_heads=1, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                                       bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                                       pad_token_id=0 if spec["openclip"] else VOCAB - 1, **spec["text"])
    text = transformers.CLIPTextModel(tcfg).eval()
    with torch.no_grad():  # spread the weights out so every path matters in the comparisons
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, text


def save_diffusers_folder(folder: Path, kind: str, scheduler: str = "ddim", prediction_type: str = "epsilon",
                          seed: int = 0, in_channels: int = 4):
    """A diffusers StableDiffusionPipeline folder; returns the pipeline."""
    unet, vae, text = tiny_diffusers_parts(kind, seed, in_channels)
    tok_dir = write_clip_tokenizer(Path(folder).parent / f"_tok_{kind}", "!" if TINY[kind]["openclip"] else
                                   "<|endoftext|>")
    tok = transformers.CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                             scheduler=make_scheduler(scheduler, prediction_type),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, timestep_spacing="leading")


def make_scheduler(name: str, prediction_type: str = "epsilon"):
    if name == "ddim":
        return diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                       prediction_type=prediction_type)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, prediction_type=prediction_type,
                                                     algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    if name == "heun":
        return diffusers.HeunDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    if name == "ddpm":  # diffusers' default clip_sample=True: x_0 clipped to [-1, 1]
        return diffusers.DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# diffusers names -> CompVis names (this test's own mapping, keyed on diffusers' names)
# ---------------------------------------------------------------------------------------------
RESNET_BACK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, leaf = rest.partition(".")
    return f"{RESNET_BACK[head]}.{leaf}"


def unet_to_compvis(sd: dict, cfg) -> dict:
    lpb = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            name = f"input_blocks.{1 + i * (lpb + 1) + j}.0.{_resnet(rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            name = f"input_blocks.{1 + i * (lpb + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            name = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            name = f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            i = int(m[1])
            slot = 2 if attn[levels - 1 - i] else 1
            name = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", k):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
            name = f"middle_block.1.{m[1]}"
        else:
            fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                     "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
                     "class_embedding": "label_emb"}  # (an upscaler's noise-level classes)
            head, _, leaf = k.rpartition(".")
            name = f"{fixed[head]}.{leaf}"
        out["model.diffusion_model." + name] = v
    return out


VAE_ATTN_BACK = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_compvis(sd: dict, levels: int) -> dict:
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k2):
            k2 = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", k2):
            k2 = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k2):
            k2 = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k2):
            k2 = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", k2):
            k2 = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k2):
            k2 = f"{m[1]}.mid.attn_1.{VAE_ATTN_BACK[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM's attention uses 1x1 convs
        out["first_stage_model." + k2] = v
    return out


def clip_to_compvis(sd: dict) -> dict:
    """SD 1.x: transformers CLIPTextModel saved under the old `text_model.` prefix."""
    out = {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()}
    n = sd["embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return out


def clip_to_openclip(sd: dict, extra_layer_seed: int = 5) -> dict:
    """SD 2.x: OpenCLIP's text tower, with one more (random) block after the ones the model uses
    and the contrastive projection, as the released checkpoints have them."""
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        a = f"encoder.layers.{i}."
        b = f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[b + f"attn.in_proj_{leaf}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for ours, theirs in names.items():
                out[b + f"{theirs}.{leaf}"] = sd[a + f"{ours}.{leaf}"]
    g = torch.Generator().manual_seed(extra_layer_seed)
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        out[k.replace("resblocks.0.", f"resblocks.{layers}.")] = torch.randn(out[k].shape, generator=g)
    width = sd["final_layer_norm.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(width, width, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def compvis_checkpoint(unet, vae, text, openclip: bool, extras: bool = True, betas_range=(0.00085, 0.012)) -> dict:
    state = {}
    state.update(unet_to_compvis(unet.state_dict(), unet.config))
    state.update(vae_to_compvis(vae.state_dict(), len(vae.config.block_out_channels)))
    ts = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    state.update(clip_to_openclip(ts) if openclip else clip_to_compvis(ts))
    if extras:  # what LDM's DDPM module also saves
        betas = torch.linspace(betas_range[0] ** 0.5, betas_range[1] ** 0.5, 1000, dtype=torch.float64) ** 2
        state["betas"] = betas.float()
        state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_single_file(path: Path, kind: str, seed: int = 0, fmt: str = "safetensors", tokenizer_next_to_it=True,
                      in_channels: int = 4):
    """An original-layout single-file checkpoint of tiny random weights (and the diffusers parts
    it was made from)."""
    unet, vae, text = tiny_diffusers_parts(kind, seed, in_channels)
    state = compvis_checkpoint(unet, vae, text, TINY[kind]["openclip"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, path)
    if tokenizer_next_to_it:
        write_clip_tokenizer(path.parent / "tokenizer", "!" if TINY[kind]["openclip"] else "<|endoftext|>")
    return unet, vae, text


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
from imagine.loading import keymap  # noqa: E402
from imagine.loading.single_file import (  # noqa: E402
    components_from_state, infer_unet_config, load_single_file, read_checkpoint, split_checkpoint,
)


def _inputs(unet_cfg, seed=1, b=2, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([11.0, 741.5])[:b]
    ctx = torch.randn(b, 77, TEXT_WIDTH, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("kind,fmt", [("sd1", "safetensors"), ("sd2", "ckpt"), ("deep", "safetensors")])
def test_single_file_matches_diffusers(tmp_path, kind, fmt):
    """U-Net, VAE and text encoder of a single file, loaded by shape inference alone, give the
    outputs of the diffusers/transformers models the file was written from."""
    path = tmp_path / f"model.{fmt}"
    unet, vae, text = write_single_file(path, kind, fmt=fmt)
    c = load_single_file(path)
    cfg = dict(unet.config)
    assert list(c.unet.config.block_out_channels) == list(cfg["block_out_channels"])
    assert c.unet.config.use_linear_projection == cfg["use_linear_projection"]
    assert c.unet.config.heads_per_block == tuple(
        cfg["attention_head_dim"] if isinstance(cfg["attention_head_dim"], (list, tuple))
        else [cfg["attention_head_dim"]] * len(cfg["block_out_channels"]))
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        assert rel_err(c.unet(x, t, context=ctx), unet(x, t, ctx).sample) < 1e-4
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        assert rel_err(c.vae.decode(z), vae.decode(z).sample) < 1e-4
        img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
        assert rel_err(c.vae.encode(img).mean, vae.encode(img).latent_dist.mean) < 1e-4
        enc = c.text_encoder.encode(["a red circle", "the blue square"])
        ids = c.text_encoder.tokenize(["a red circle", "the blue square"])["input_ids"]
        assert rel_err(enc.states, text(ids).last_hidden_state) < 1e-4
    assert c.prediction_type == "epsilon"
    assert c.vae.config.scaling_factor == pytest.approx(0.18215)


def test_sd2_text_encoder_drops_last_block_and_pads_with_zero(tmp_path):
    path = tmp_path / "v2.safetensors"
    _, _, text = write_single_file(path, "sd2")
    c = load_single_file(path)
    assert c.text_encoder.model.config.num_hidden_layers == TINY["sd2"]["text"]["num_hidden_layers"]
    assert c.text_encoder.model.config.hidden_act == "gelu"
    ids = c.text_encoder.tokenize(["a red circle"])["input_ids"][0]
    assert ids[-1].item() == 0  # open_clip.tokenize pads with id 0 ('!')
    # q, k, v were one fused in_proj in the file
    sd = text.state_dict()
    for x in "qkv":
        w = c.text_encoder.model.state_dict()[f"encoder.layers.1.self_attn.{x}_proj.weight"]
        assert torch.equal(w, sd[f"encoder.layers.1.self_attn.{x}_proj.weight"])


def test_diffusers_folder_loads(tmp_path):
    pipe = save_diffusers_folder(tmp_path / "sd", "sd2", scheduler="euler", prediction_type="v_prediction")
    from imagine.loading.folder import load_folder

    c = load_folder(tmp_path / "sd")
    assert c.prediction_type == "v_prediction"
    assert c.defaults["sampler"] == "euler"
    x, t, ctx = _inputs(dict(pipe.unet.config))
    with torch.no_grad():
        assert rel_err(c.unet(x, t, context=ctx), pipe.unet(x, t, ctx).sample) < 1e-4


def test_diffusers_folder_text_encoder_loads_strictly_with_clear_errors(tmp_path):
    """transformers' from_pretrained fills a weight the file lacks, or one config.json gives another shape, with
    random values and only logs it: a text_encoder/ folder must load whole and as configured, else a ValueError
    naming the file and the keys; a truncated model.safetensors names the file; no tokenizer/ says tokenizer."""
    import shutil

    from safetensors.torch import load_file, save_file

    from imagine.loading.folder import load_folder

    base = tmp_path / "base"
    pipe = save_diffusers_folder(base, "sd1")

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(base, folder)
        change(folder / "text_encoder")
        return folder

    def drop_key(te):
        sd = load_file(te / "model.safetensors")
        save_file({k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.weight"}, te / "model.safetensors")
    with pytest.raises(ValueError, match=r"text_encoder/model\.safetensors do not fit CLIPTextModel as configured in "
                                         r".*text_encoder/config\.json: missing keys: encoder\.layers\.1\.mlp\.fc2"):
        load_folder(variant("missing", drop_key))

    def narrower(te):
        cfg = json.loads((te / "config.json").read_text())
        (te / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=32)))
    with pytest.raises(ValueError, match=r"text_encoder/model\.safetensors do not fit CLIPTextModel .*shape "
                                         r"mismatches: encoder\.layers\.0\.mlp\.fc1\.bias \(96,\) vs \(32,\)"):
        load_folder(variant("misshapen", narrower))

    def truncate(te):
        data = (te / "model.safetensors").read_bytes()
        (te / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"text_encoder/model\.safetensors is not a readable safetensors file .*"
                                         "truncated or corrupt"):
        load_folder(variant("truncated", truncate))

    # a truncated pytorch_model.bin (torch.load's OSError) and a pickle weights_only refuses: named too
    def truncated_bin(te):
        torch.save(load_file(te / "model.safetensors"), te / "pytorch_model.bin")
        (te / "model.safetensors").unlink()
        data = (te / "pytorch_model.bin").read_bytes()
        (te / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"text_encoder/pytorch_model\.bin is not a readable weights file"):
        load_folder(variant("truncated_bin", truncated_bin))

    def code_pickle(te):
        (te / "model.safetensors").unlink()
        (te / "pytorch_model.bin").write_bytes(pickle.dumps(Exception("runs code on load")))
    with pytest.raises(ValueError, match=r"text_encoder/pytorch_model\.bin is not a readable weights file"):
        load_folder(variant("code_pickle", code_pickle))

    with pytest.raises(FileNotFoundError, match=r"^tokenizer folder not found: .*notok/tokenizer"):
        load_folder(variant("notok", lambda te: shutil.rmtree(te.parent / "tokenizer")))

    # a folder saved by transformers < 4.31 keeps the position_ids buffer in the file: no weight, it loads, and
    # gives the states of the text encoder it was saved from
    def old_transformers(te):
        sd = load_file(te / "model.safetensors")
        save_file(dict(sd, **{"text_model.embeddings.position_ids": torch.arange(77)[None]}), te / "model.safetensors")
    c = load_folder(variant("old", old_transformers))
    ids = c.text_encoder.tokenize(["a red circle"])["input_ids"]
    with torch.no_grad():
        assert rel_err(c.text_encoder.encode(["a red circle"]).states, pipe.text_encoder(ids).last_hidden_state) < 1e-5


def test_prediction_type_argument_and_yaml(tmp_path):
    path = tmp_path / "v2.safetensors"
    write_single_file(path, "sd2")
    c = load_single_file(path, prediction_type="epsilon")
    assert c.prediction_type == "epsilon" and c.defaults["height"] == 512
    c = load_single_file(path, prediction_type="v_prediction")
    assert c.prediction_type == "v_prediction" and c.scheduler_config["prediction_type"] == "v_prediction"
    assert c.defaults["height"] == 768  # the 768-v convention
    (tmp_path / "v2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    assert load_single_file(path).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        load_single_file(path, prediction_type="v")


def test_tokenizer_lookup(tmp_path, monkeypatch):
    path = tmp_path / "a" / "m.safetensors"
    write_single_file(path, "sd1", tokenizer_next_to_it=False)
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer found.*tokenizer=FOLDER.*IMAGINE_CLIP_TOKENIZER"):
        load_single_file(path)
    tok = write_clip_tokenizer(tmp_path / "elsewhere")
    assert load_single_file(path, tokenizer=tok).text_encoder.max_length == 77
    monkeypatch.setenv("IMAGINE_CLIP_TOKENIZER", str(tok))
    load_single_file(path)
    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER")
    with pytest.raises(FileNotFoundError, match="not a CLIP tokenizer folder"):
        load_single_file(path, tokenizer=tmp_path / "a")
    # a local Hugging Face cache copy is used (never fetched)
    snap = tmp_path / "empty-cache" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    write_clip_tokenizer(snap)
    load_single_file(path)


def test_bad_files_get_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    write_single_file(good, "sd1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_single_file(tmp_path / "missing.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_single_file(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_single_file(junk)
    # a pickle that needs more than tensors to load
    evil = tmp_path / "evil.ckpt"
    import argparse

    torch.save({"state_dict": {"x": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1)}, evil)
    with pytest.raises(ValueError, match="holds more than weights.*argparse.Namespace"):
        load_single_file(evil)
    cut_ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, cut_ckpt)
    cut_ckpt.write_bytes(cut_ckpt.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_single_file(cut_ckpt)
    with pytest.raises(ValueError, match="is a folder"):
        read_checkpoint(tmp_path)


NOT_CHECKPOINTS = {  # what a failed download or a missing `git lfs pull` leaves under a .ckpt name
    "hello.ckpt": (b"hello world\n", "a text file"),
    "page.ckpt": (b"<!DOCTYPE html><html><body>Access denied</body></html>\n", "an HTML/XML page"),
    "error.ckpt": (b'{"error":"Access to model is restricted. You must be authenticated."}', "JSON text"),
    "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n",
                 "a Git LFS pointer, not the file: fetch it with git lfs pull"),
    "random.ckpt": (bytes(range(7, 256)) * 20, "binary data that is neither a zip/pickle torch checkpoint nor"),
    "empty.ckpt": (b"", "empty"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path, name):
    """A .ckpt that is really an error page, a Git LFS pointer or junk is told apart from a pickle
    that holds more than weights (every weights-only failure used to read as that), and never
    escapes as a raw KeyError from the unpickler."""
    data, looks_like = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        load_single_file(path)
    msg = str(err.value)
    assert f"{path} is not a torch checkpoint or a safetensors file" in msg
    assert looks_like in msg and "holds more than weights" not in msg
    assert ".safetensors" in msg and ".ckpt" in msg  # what is valid


def test_damaged_pickle_is_reported_as_corrupt_whatever_torch_raises(tmp_path):
    """A file that starts like a pickle but is damaged makes torch's unpickler raise all sorts
    (here a KeyError from a memo lookup): it is reported as unreadable, not as a raw traceback."""
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(b"\x80\x02h\x05" + b"\x00" * 40)  # protocol 2, then BINGET of a memo entry never stored
    with pytest.raises(ValueError, match=r"damaged.ckpt is not a readable .*truncated or corrupt") as err:
        load_single_file(path)
    assert "holds more than weights" not in str(err.value)


def test_safetensors_under_a_ckpt_name_is_read_as_safetensors(tmp_path):
    """The format comes from the first bytes (a u64 header length, then '{'), not the suffix."""
    path = tmp_path / "m.safetensors"
    write_single_file(path, "sd1")
    renamed = tmp_path / "renamed.ckpt"
    renamed.write_bytes(path.read_bytes())
    a, b = read_checkpoint(path), read_checkpoint(renamed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert load_single_file(renamed).prediction_type == "epsilon"


def test_lightning_ckpt_with_numpy_metadata_loads_and_code_is_still_refused(tmp_path):
    """Lightning/LDM training checkpoints keep numpy scalars in their metadata (callbacks'
    best_model_score, ...); their weights are plain tensors, so they load. numpy 1.x wrote the
    scalar reconstructor as numpy.core.multiarray.scalar, numpy 2 as numpy._core.multiarray.scalar.
    A pickle that names anything able to run code is still refused, naming it."""
    np = pytest.importorskip("numpy")
    unet, vae, text = tiny_diffusers_parts("sd1")
    state = compvis_checkpoint(unet, vae, text, openclip=False)
    meta = {"global_step": np.int64(12), "epoch": np.int32(1),
            "callbacks": {"ModelCheckpoint": {"best_model_score": np.float64(0.5), "mode": "min",
                                              "dtype": np.dtype("float32"), "flag": np.bool_(True)}}}
    new = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, **meta}, new)
    got = read_checkpoint(new)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    # the same written by numpy 1.x (legacy torch format: the pickle's GLOBAL lines are plain text)
    old = tmp_path / "numpy1.ckpt"
    torch.save({"state_dict": {"x": torch.ones(3)}, **meta}, old, _use_new_zipfile_serialization=False)
    data = old.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in data
    old.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert torch.equal(read_checkpoint(old)["x"], torch.ones(3))
    import os

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": os.system}, evil)
    with pytest.raises(ValueError, match=r"holds more than weights \(it needs (posix|nt)\.system\)"):
        read_checkpoint(evil)


def _half_state(dtype, betas=None):
    unet, vae, text = tiny_diffusers_parts("sd1")
    state = compvis_checkpoint(unet, vae, text, openclip=False)
    if betas is not None:
        state["betas"] = betas.float()
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_betas_are_recognised_as_sds_schedule(tmp_path, caplog, dtype):
    """fp16/bf16 prunes store LDM's betas buffer rounded (up to half an ulp, ~5e-4 / 4e-3
    relative): that is still SD's schedule, so SD's exact one is used, without a warning."""
    tok = write_clip_tokenizer(tmp_path / "tok")
    with caplog.at_level("WARNING"):
        c = components_from_state(_half_state(dtype), "half.safetensors", tokenizer=tok)
    assert "differ" not in caplog.text
    assert "trained_betas" not in c.scheduler_config
    full = components_from_state(_half_state(torch.float32), "full.safetensors", tokenizer=tok)
    assert torch.equal(c.schedule.alphas_cumprod, full.schedule.alphas_cumprod)


def test_half_precision_betas_of_another_schedule_are_still_used(tmp_path, caplog):
    """Stored betas that differ beyond their dtype's rounding (here DDPM's linear schedule) are the
    model's own, and are used."""
    linear = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    with caplog.at_level("WARNING"):
        c = components_from_state(_half_state(torch.float16, linear), "other.safetensors",
                                  tokenizer=write_clip_tokenizer(tmp_path / "tok"))
    assert "betas differ" in caplog.text
    assert torch.allclose(torch.tensor(c.scheduler_config["trained_betas"], dtype=torch.float64), linear, rtol=1e-3)


# --- SD 2.x prediction type without a .yaml ---------------------------------------------------
def _probe_score(unet) -> float:
    """AUTOMATIC1111's v-prediction test quantity, computed here on its own: mean(out - x) for
    x = 0.5 (1x4x8x8), t = 999, context = 0.5 (1x2xwidth)."""
    x = torch.ones(1, 4, 8, 8) * 0.5
    ctx = torch.ones(1, 2, unet.config.cross_attention_dim) * 0.5
    with torch.no_grad():
        return (unet(x, torch.tensor([999.0]), context=ctx) - x).mean().item()


@pytest.mark.parametrize("shift", [-3.0, 3.0])
def test_sd2_prediction_type_follows_the_unet_probe(tmp_path, caplog, shift):
    """SD 2.x without a .yaml: the loader's decision is AUTOMATIC1111's (v when mean(out - x) < -1),
    checked against the quantity computed independently on the loaded U-Net. Shifting the
    output conv's bias moves the U-Net's output mean, so both decisions occur on real weights."""
    unet, vae, text = tiny_diffusers_parts("sd2")
    state = compvis_checkpoint(unet, vae, text, openclip=True)
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + shift
    path = tmp_path / "v2.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    write_clip_tokenizer(tmp_path / "tokenizer", "!")
    score = _probe_score(load_single_file(path, prediction_type="epsilon").unet)
    expected = "v_prediction" if score < -1 else "epsilon"
    assert expected == ("v_prediction" if shift < 0 else "epsilon")  # the shift dominates tiny random weights
    with caplog.at_level("INFO", logger="imagine.loading.single_file"):
        c = load_single_file(path)
    assert c.prediction_type == expected
    assert c.defaults["height"] == (768 if expected == "v_prediction" else 512)
    assert c.unet.config.sample_size == (96 if expected == "v_prediction" else 64)
    assert "probe" in caplog.text and expected in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _patch_unet_output(monkeypatch, shift: float):
    """Make every U-Net call return x + shift (what the probe then sees as mean(out - x))."""
    from imagine.models import unet as unet_mod

    calls = []

    def forward(self, x, t, context=None, **kw):
        calls.append(tuple(x.shape))
        return x + shift

    monkeypatch.setattr(unet_mod.UNet2DConditionModel, "forward", forward)
    return calls


@pytest.mark.parametrize("shift,expected", [(-1.5, "v_prediction"), (-0.5, "epsilon"), (2.0, "epsilon")])
def test_sd2_probe_threshold(tmp_path, monkeypatch, shift, expected):
    path = tmp_path / "v2.safetensors"
    write_single_file(path, "sd2")
    calls = _patch_unet_output(monkeypatch, shift)
    assert load_single_file(path).prediction_type == expected
    assert calls == [(1, 4, 8, 8)]  # one call on an 8x8 latent


def test_sd2_explicit_yaml_and_global_step_override_the_probe(tmp_path, monkeypatch, caplog):
    """An explicit prediction_type or the .yaml wins; a .ckpt with global_step 875000 is SD 2's
    512-base (epsilon, diffusers' rule) and is not probed; SD 1.x is epsilon whatever its U-Net says."""
    path = tmp_path / "v2.safetensors"
    write_single_file(path, "sd2")
    calls = _patch_unet_output(monkeypatch, -5.0)  # the probe would say v
    assert load_single_file(path, prediction_type="epsilon").prediction_type == "epsilon"
    (tmp_path / "v2.yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    assert load_single_file(path).prediction_type == "epsilon"
    assert calls == []
    unet, vae, text = tiny_diffusers_parts("sd2")
    state = compvis_checkpoint(unet, vae, text, openclip=True)
    for step, expected in ((875000, "epsilon"), (470000, "v_prediction")):
        ckpt = tmp_path / f"step{step}.ckpt"
        torch.save({"state_dict": state, "global_step": step, "epoch": 3}, ckpt)
        with caplog.at_level("INFO", logger="imagine.loading.single_file"):
            assert load_single_file(ckpt).prediction_type == expected
    assert "global_step 875000" in caplog.text
    assert len(calls) == 1  # only the 470000-step file was probed
    sd1 = tmp_path / "v1" / "m.safetensors"
    write_single_file(sd1, "sd1")
    assert load_single_file(sd1).prediction_type == "epsilon"
    assert len(calls) == 1


def test_sd2_probe_failure_warns_and_keeps_epsilon(tmp_path, monkeypatch, caplog):
    path = tmp_path / "v2.safetensors"
    write_single_file(path, "sd2")
    from imagine.models import unet as unet_mod

    def broken(self, *a, **kw):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(unet_mod.UNet2DConditionModel, "forward", broken)
    with caplog.at_level("WARNING"):
        c = load_single_file(path)
    assert c.prediction_type == "epsilon"
    assert "could not probe" in caplog.text and "prediction_type='v_prediction'" in caplog.text


def test_sd2_on_the_meta_device_is_not_probed(tmp_path, monkeypatch):
    calls = _patch_unet_output(monkeypatch, -5.0)
    tok = write_clip_tokenizer(tmp_path / "tok", "!")
    c = components_from_state(_meta_full_size("sd21"), "sd21.safetensors", tokenizer=tok)
    assert c.prediction_type == "epsilon" and calls == []


# --- what is not a model --------------------------------------------------------------------
def test_folder_without_model_index_says_what_to_pass(tmp_path):
    """A folder holding a single-file checkpoint, or one component folder of a diffusers model, is
    not a model folder: the error says what one needs and what to pass instead."""
    from imagine.loading import load
    from imagine.loading.folder import load_folder

    holder = tmp_path / "downloads"
    write_single_file(holder / "m.safetensors", "sd1")
    with pytest.raises(FileNotFoundError, match=r"no model_index.json.*one sub-folder per component.*"
                                                r"pass the file itself, e\.g\. .*m\.safetensors"):
        load(holder)
    save_diffusers_folder(tmp_path / "sd", "sd1")
    with pytest.raises(FileNotFoundError, match=r"one component of a diffusers model \(UNet2DConditionModel\).*"
                                                r"pass its parent folder .*sd, which has model_index.json"):
        load_folder(tmp_path / "sd" / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_index.json and one sub-folder per component.*found nothing"):
        load_folder(tmp_path / "empty")


def test_unknown_layouts_name_what_was_found(tmp_path):
    unet, vae, text = tiny_diffusers_parts("sd1")
    full = compvis_checkpoint(unet, vae, text, openclip=False)
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match=r"no VAE weights found; expected .*first_stage_model.*found .*model\.diffusion_model"):
        split_checkpoint(no_vae)
    with pytest.raises(ValueError, match="one diffusers component"):
        split_checkpoint(dict(unet.state_dict()))
    # SDXL (conditioner.embedders.*) loads through imagine.loading.sdxl (tests/test_sdxl_single_file.py), which
    # names what a piece of one lacks; split_checkpoint, SD 1.x/2.x's, still names it for what it is
    sdxl_piece = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"no U-Net and no VAE and no OpenCLIP ViT-bigG text encoder weights found; "
                                         r"expected an original SDXL checkpoint"):
        components_from_state(sdxl_piece, "piece.safetensors")
    with pytest.raises(ValueError, match="SDXL checkpoint"):
        split_checkpoint(sdxl_piece)
    odd = dict(full, **{"some_adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected weights some_adapter.weight"):
        split_checkpoint(odd)
    # a U-Net tensor the inferred layout has no place for
    extra = dict(full, **{"model.diffusion_model.middle_block.3.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="middle_block.3.weight"):
        components_from_state(extra, "extra.safetensors", tokenizer=write_clip_tokenizer(tmp_path / "tok"))
    # a weight of the wrong shape
    bad = dict(full)
    k = "model.diffusion_model.out.2.bias"
    bad[k] = torch.zeros(5)
    with pytest.raises(ValueError, match="conv_out.bias"):
        components_from_state(bad, "bad.safetensors", tokenizer=tmp_path / "tok")


def test_sd2_file_converted_from_diffusers_keeps_every_block(tmp_path):
    """A file written by diffusers' convert_diffusers_to_original_stable_diffusion.py holds only the OpenCLIP blocks
    diffusers' text encoder has (the unused last one already gone) and no text_projection / logit_scale; every
    block is used, so none is dropped: the states are diffusers' own. Run on a folder saved by transformers < 4.31
    the converter also leaves the position_ids buffer, which is no weight. (The released layout, with the extra
    block and the projection, is test_sd2_text_encoder_drops_last_block_and_pads_with_zero's.)"""
    from safetensors.torch import save_file

    unet, vae, text = tiny_diffusers_parts("sd2")
    released = compvis_checkpoint(unet, vae, text, openclip=True)
    p = "cond_stage_model.model."
    extra = f"{p}transformer.resblocks.{text.config.num_hidden_layers}."
    converted = {k: v for k, v in released.items()
                 if not k.startswith((extra, p + "text_projection", p + "logit_scale"))}
    old = dict(converted, **{p + "transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    write_clip_tokenizer(tmp_path / "tokenizer", "!")
    prompts = ["a red circle", "the blue square"]
    for name, state in (("converted", converted), ("converted_old", old)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        c = load_single_file(tmp_path / f"{name}.safetensors")
        assert c.text_encoder.model.config.num_hidden_layers == text.config.num_hidden_layers
        ids = c.text_encoder.tokenize(prompts)["input_ids"]
        with torch.no_grad():
            assert rel_err(c.text_encoder.encode(prompts).states, text(ids).last_hidden_state) < 1e-4


@pytest.mark.parametrize("damage,match", [
    ("no in_layers.2", r"expected the weight 'input_blocks\.1\.0\.in_layers\.2\.weight'"),
    ("no proj_in", r"no proj_in weight"),
    ("1-d in_layers.2", r"input_blocks\.1\.0\.in_layers\.2\.weight should be a 4-d weight .*got shape \(5,\)"),
    ("1-d token embedding", r"embeddings\.token_embedding\.weight should be a 2-d weight .*got shape \(10,\)"),
    ("1-d VAE conv_in", r"encoder\.conv_in\.weight should be a 4-d weight"),
    # what the checks do not name (a 0-d tensor where the upscaler's noise-level classes go) still makes a
    # ValueError naming the file and the layout, not an IndexError
    ("0-d label_emb", r"damaged\.safetensors: the weights do not have the layout of an original SD 1\.x/2\.x "
                      r"checkpoint \(.*IndexError"),
])
def test_damaged_single_files_get_clear_errors(tmp_path, damage, match):
    unet, vae, text = tiny_diffusers_parts("sd1")
    state = compvis_checkpoint(unet, vae, text, openclip=False)
    u = "model.diffusion_model."
    if damage == "no in_layers.2":
        del state[u + "input_blocks.1.0.in_layers.2.weight"]
    elif damage == "no proj_in":
        state = {k: v for k, v in state.items() if ".proj_in." not in k}
    elif damage == "1-d in_layers.2":
        state[u + "input_blocks.1.0.in_layers.2.weight"] = torch.zeros(5)
    elif damage == "1-d token embedding":
        state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10)
    elif damage == "1-d VAE conv_in":
        state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    else:
        state[u + "label_emb.weight"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=match):
        components_from_state(state, "damaged.safetensors", tokenizer=write_clip_tokenizer(tmp_path / "tok"))


def test_unet_config_overrides_the_sample_size(tmp_path):
    """unet_config overrides what was inferred, sample_size (and so the default picture size) included, also
    over the 768-v models' 96."""
    path = tmp_path / "v2.safetensors"
    write_single_file(path, "sd2")
    c = load_single_file(path, unet_config={"sample_size": 48})
    assert c.unet.config.sample_size == 48 and c.defaults["height"] == c.defaults["width"] == 384
    c = load_single_file(path, prediction_type="v_prediction", unet_config={"sample_size": 80})
    assert c.unet.config.sample_size == 80 and c.defaults["height"] == 640
    assert load_single_file(path, prediction_type="v_prediction").unet.config.sample_size == 96


def test_inferred_config_and_keymap_round_trip():
    """keymap's own inverse (for export) undoes its forward map, and both agree with this file's
    independent mapping."""
    unet, vae, text = tiny_diffusers_parts("sd2")
    ldm = {k[len("model.diffusion_model."):]: v
           for k, v in unet_to_compvis(unet.state_dict(), unet.config).items()}
    cfg, layers, attention = infer_unet_config(ldm)
    assert layers == [2, 2] and attention == [True, False]
    assert cfg["attention_head_dim"] == [1, 2] and cfg["use_linear_projection"] and cfg["upcast_attention"]
    ours = keymap.unet_to_diffusers(ldm, layers, attention)
    assert set(ours) == set(unet.state_dict())
    assert set(keymap.unet_to_original(ours, layers, attention)) == set(ldm)
    vs = {k[len("first_stage_model."):]: v for k, v in vae_to_compvis(vae.state_dict(), 2).items()}
    back = keymap.vae_to_original(keymap.vae_to_diffusers(vs, 2, 1), 2, 1)
    assert set(back) == set(vs) and all(back[k].shape == vs[k].shape for k in vs)
    oc = {k[len("cond_stage_model.model."):]: v
          for k, v in clip_to_openclip(text.state_dict()).items()}
    mapped = keymap.openclip_to_transformers(oc, keep_layers=2)
    again = keymap.transformers_to_openclip(mapped)
    for k, v in again.items():
        assert torch.equal(v, oc[k])


# ---------------------------------------------------------------------------------------------
# Full-size SD 1.5 and SD 2.1: the real key layout, on the meta device (no memory, no time)
# ---------------------------------------------------------------------------------------------
SD15_KEYS = {  # names and shapes as in the released v1-5 checkpoint
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}
SD21_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
    "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.text_projection": (1024, 1024),
}


def _meta_full_size(which: str) -> dict:
    """Random-free 'weights' of the real SD 1.5 / 2.1 shapes on the meta device, in the
    original key layout (built by diffusers and transformers, renamed by this file's map)."""
    if which == "sd15":
        ucfg = dict(cross_attention_dim=768, attention_head_dim=8)
        tcfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu")
    else:
        ucfg = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                    upcast_attention=True)
        tcfg = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    hidden_act="gelu")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), **ucfg)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                                      **tcfg))
    state = compvis_checkpoint(unet, vae, text, openclip=which == "sd21", extras=False)
    return state


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_full_size_layouts_load_without_missing_or_unexpected_keys(tmp_path, which):
    state = _meta_full_size(which)
    for k, shape in (SD15_KEYS if which == "sd15" else SD21_KEYS).items():
        assert tuple(state[k].shape) == shape, k
    n_unet = sum(k.startswith("model.diffusion_model.") for k in state)
    assert n_unet == 686  # the released checkpoints' U-Net tensor count
    tok = write_clip_tokenizer(tmp_path / "tok", "!" if which == "sd21" else "<|endoftext|>")
    c = components_from_state(state, f"{which}.safetensors", tokenizer=tok,
                              prediction_type="v_prediction" if which == "sd21" else None)
    from imagine.models.unet import UNetConfig

    want = UNetConfig.sd15() if which == "sd15" else UNetConfig.sd21()
    assert c.unet.config == want
    assert c.unet.conv_in.weight.is_meta  # nothing was allocated
    assert c.vae.config.block_out_channels == (128, 256, 512, 512)
    te = c.text_encoder.model.config
    assert (te.hidden_size, te.num_hidden_layers) == ((768, 12) if which == "sd15" else (1024, 23))


@pytest.mark.parametrize("layout", ["pruned of the projection", "converted from diffusers"])
def test_full_size_sd2_text_tower_keeps_the_layers_sd2_uses(tmp_path, layout):
    """SD 2.x conditions on the 23rd of ViT-H's 24 text blocks: a released file without text_projection (pruned)
    still has the 24 and the last is dropped; a file converted from diffusers has the 23 and keeps them."""
    state = _meta_full_size("sd21")
    p = "cond_stage_model.model."
    state = {k: v for k, v in state.items() if not k.startswith((p + "text_projection", p + "logit_scale"))}
    if layout == "converted from diffusers":
        state = {k: v for k, v in state.items() if not k.startswith(p + "transformer.resblocks.23.")}
    c = components_from_state(state, "sd21.safetensors", tokenizer=write_clip_tokenizer(tmp_path / "tok", "!"),
                              prediction_type="v_prediction")
    assert c.text_encoder.model.config.num_hidden_layers == 23
