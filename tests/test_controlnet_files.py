"""ControlNet files (imagine.loading.controlnet): lllyasviel's original layout (ControlNet 1.0 / 1.1, with and
without `control_model.`, .safetensors and .pth, a 1.0 file with the whole SD model beside it), diffusers-named
weights in one file, and diffusers folders, against diffusers' ControlNetModel on the same weights; the full-size
SD 1.5 layout on the meta device; and the errors for what is not a ControlNet.

The original-layout files are written with this file's own diffusers -> lllyasviel mapping (keyed on diffusers'
names, the U-Net part through test_loading's `unet_to_compvis`), independent of imagine.loading.keymap.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_loading import TEXT_WIDTH, tiny_diffusers_parts, unet_to_compvis, write_single_file  # noqa: E402

from imagine.loading.controlnet import controlnet_from_state, load_controlnet  # noqa: E402
from imagine.models.controlnet import ControlNetModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=TEXT_WIDTH,
           norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           conditioning_embedding_out_channels=(8, 16))
# SD 2.x-like: linear projections, 64-wide heads, two residual blocks a level; diffusers' default hint encoder
# (16, 32, 96, 256: 8 convolutions, conv_out at input_hint_block.14, as in the released files)
SD2 = dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=(1, 2), cross_attention_dim=TEXT_WIDTH,
           norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), use_linear_projection=True,
           upcast_attention=True)
SDXL_TIME, SDXL_POOLED = 8, 32
SDXL = dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=(1, 2), cross_attention_dim=TEXT_WIDTH,
            norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), use_linear_projection=True,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME,
            projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME, conditioning_embedding_out_channels=(8, 16))


def diffusers_controlnet(spec: dict, seed: int = 3, **kw):
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel(**{**spec, **kw}).eval()
    with torch.no_grad():  # the zero convolutions start at zero: make every path matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


# ---------------------------------------------------------------------------------------------
# diffusers names -> lllyasviel's (this test's own mapping)
# ---------------------------------------------------------------------------------------------
def to_lllyasviel(sd: dict, cfg) -> dict:
    """A diffusers ControlNetModel state dict -> cldm.py's ControlNet names (no prefix)."""
    blocks = 1 + max(int(m[1]) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k)))
    unet, out = {}, {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", head):
            out[f"input_hint_block.{2 * (int(m[1]) + 1)}.{leaf}"] = v
        elif head == "controlnet_cond_embedding.conv_in":
            out[f"input_hint_block.0.{leaf}"] = v
        elif head == "controlnet_cond_embedding.conv_out":
            out[f"input_hint_block.{2 * (blocks + 1)}.{leaf}"] = v
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", head):
            out[f"zero_convs.{m[1]}.0.{leaf}"] = v
        elif head == "controlnet_mid_block":
            out[f"middle_block_out.0.{leaf}"] = v
        elif head in ("add_embedding.linear_1", "add_embedding.linear_2"):
            out[f"label_emb.0.{0 if head.endswith('1') else 2}.{leaf}"] = v
        else:
            unet[k] = v
    for k, v in unet_to_compvis(unet, cfg).items():
        out[k[len("model.diffusion_model."):]] = v
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_state(path: Path, state: dict, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "ckpt" else state, path)
    return path


def save_state_copies(path: Path, state: dict) -> Path:
    """save_state of tensors that may share memory (each saved as its own copy)."""
    return save_state(path, {k: v.clone() for k, v in state.items()}, "safetensors")


def _inputs(b=2, latent=16, picture=32, sdxl=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, latent, latent, generator=g)
    t = torch.tensor([10.0, 700.0])[:b]
    ctx = torch.randn(b, 7, TEXT_WIDTH, generator=g)
    c = torch.rand(b, 3, picture, picture, generator=g)
    extra = {}
    if sdxl:
        extra = {"text_embeds": torch.randn(b, SDXL_POOLED, generator=g),
                 "time_ids": torch.tensor([[picture, picture, 0, 0, picture, picture]] * b, dtype=torch.float32)}
    return x, t, ctx, c, extra


def assert_same_outputs(ref, ours, sdxl=False, latent=16, picture=32, tol=1e-5):
    x, t, ctx, c, extra = _inputs(latent=latent, picture=picture, sdxl=sdxl)
    with torch.no_grad():
        kw = {"added_cond_kwargs": extra} if sdxl else {}
        d, m = ref(x, t, ctx, controlnet_cond=c, conditioning_scale=0.7, return_dict=False, **kw)
        d2, m2 = ours(x, t, ctx, control=c, scale=0.7, **extra)
    assert len(d) == len(d2)
    scale = max(float(r.abs().max()) for r in (*d, m))
    err = max(float((a - b).abs().max()) for a, b in zip((*d, m), (*d2, m2)))
    assert err <= tol * scale, err / scale
    return err / scale


# ---------------------------------------------------------------------------------------------
# Layouts that load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt,prefix", [
    ("control_v11p_sd15_canny.safetensors", "safetensors", True),
    ("control_canny-fp16.safetensors", "safetensors", False),
    ("control_v11p_sd15_canny.pth", "pth", True),
    ("control_bare.pth", "pth", False),
    ("control_v11p.ckpt", "ckpt", True),   # a Lightning-style {"state_dict": ...}
])
def test_original_files_give_diffusers_outputs(tmp_path, name, fmt, prefix):
    ref = diffusers_controlnet(SD1)
    state = to_lllyasviel(ref.state_dict(), ref.config)
    if prefix:
        state = {"control_model." + k: v for k, v in state.items()}
    path = save_state(tmp_path / name, state, fmt)
    net = load_controlnet(path)
    assert isinstance(net, ControlNetModel) and not net.config.global_pool_conditions
    assert list(net.config.block_out_channels) == [32, 64] and tuple(net.config.conditioning_embedding_out_channels) == (8, 16)
    assert_same_outputs(ref, net)


def test_a_controlnet_1_0_file_with_the_whole_sd_model_beside_it(tmp_path):
    """ControlNet 1.0's control_sd15_*.pth hold cldm.py's ControlLDM: the SD model (model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.*) and the ControlNet under control_model.*: only the latter is read."""
    from test_loading import compvis_checkpoint

    ref = diffusers_controlnet(SD1)
    unet, vae, text = tiny_diffusers_parts("sd1")
    state = compvis_checkpoint(unet, vae, text, openclip=False)
    state.update({"control_model." + k: v for k, v in to_lllyasviel(ref.state_dict(), ref.config).items()})
    path = save_state(tmp_path / "control_sd15_canny.pth", state, "pth")
    assert_same_outputs(ref, load_controlnet(path))


def test_sd2_layout_with_the_released_hint_encoder(tmp_path):
    """Linear projections, 64-wide heads (inferred), two residual blocks a level, and diffusers' default hint
    encoder: 8 convolutions, conv_out at input_hint_block.14 (8x down: a 64 px picture for 8x8 latents)."""
    ref = diffusers_controlnet(SD2)
    state = to_lllyasviel(ref.state_dict(), ref.config)
    assert "input_hint_block.14.weight" in state and "zero_convs.5.0.weight" in state
    net = load_controlnet(save_state(tmp_path / "control_v11p_sd21_canny.safetensors", state, "safetensors"))
    assert net.config.use_linear_projection and list(net.config.attention_head_dim) == [1, 2]
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    assert_same_outputs(ref, net, latent=8, picture=64)


def test_sdxl_original_layout_with_label_emb(tmp_path):
    """An SDXL ControlNet in the original names (label_emb: the pooled text and size codes), as AUTOMATIC1111's
    extension converts them; the size codes' width is SDXL's 256 unless unet_config says otherwise."""
    ref = diffusers_controlnet(SDXL)
    state = to_lllyasviel(ref.state_dict(), ref.config)
    path = save_state(tmp_path / "xl.safetensors", state, "safetensors")
    net = load_controlnet(path, unet_config={"addition_time_embed_dim": SDXL_TIME})
    assert net.config.addition_embed_type == "text_time"
    assert net.config.projection_class_embeddings_input_dim == SDXL_POOLED + 6 * SDXL_TIME
    assert_same_outputs(ref, net, sdxl=True)
    with pytest.raises(ValueError, match="label_emb.0.0 takes 80 inputs"):  # 80 < 6 x 256: SDXL's width cannot fit
        load_controlnet(path)


def test_diffusers_named_single_files(tmp_path):
    """diffusers' names in one file (as AUTOMATIC1111's extension keeps diffusers_xl_canny_full.safetensors):
    the layout read off the names; with a config.json beside the file, that config."""
    from safetensors.torch import save_file

    for spec, sdxl, kw in ((SD1, False, {}), (SDXL, True, {"unet_config": {"addition_time_embed_dim": SDXL_TIME}})):
        ref = diffusers_controlnet(spec)
        path = tmp_path / ("xl" if sdxl else "sd") / "diffusers_canny.safetensors"
        path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        assert_same_outputs(ref, load_controlnet(path, **kw), sdxl=sdxl)
    # a config.json beside it: its heads are used (here 4, which the names cannot tell from the released 8)
    ref = diffusers_controlnet(SD1, attention_head_dim=4)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    net = load_controlnet(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    assert net.config.attention_head_dim == 4
    assert_same_outputs(ref, net)


def test_diffusers_folders_sd_and_sdxl(tmp_path):
    for spec, sdxl in ((SD1, False), (SDXL, True)):
        ref = diffusers_controlnet(spec)
        ref.save_pretrained(tmp_path / str(sdxl), safe_serialization=True)
        assert_same_outputs(ref, load_controlnet(tmp_path / str(sdxl)), sdxl=sdxl)
    # a ControlNet pipeline's folder: its controlnet/ sub-folder
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    ref.save_pretrained(tmp_path / "pipe" / "controlnet", safe_serialization=True)
    assert load_controlnet(tmp_path / "pipe").config.addition_embed_type == "text_time"


def test_shuffle_averages_its_residuals_dtype_and_the_pipeline(tmp_path):
    """global_average_pooling: the .yaml beside the file, else 'shuffle' in its name (A1111's rule)."""
    ref = diffusers_controlnet(SD1, global_pool_conditions=True)
    state = {"control_model." + k: v for k, v in to_lllyasviel(ref.state_dict(), ref.config).items()}
    shuffle = save_state(tmp_path / "control_v11e_sd15_shuffle.safetensors", state, "safetensors")
    net = load_controlnet(shuffle)
    assert net.config.global_pool_conditions
    assert_same_outputs(ref, net)
    other = save_state(tmp_path / "b" / "my_controlnet.safetensors", state, "safetensors")
    assert not load_controlnet(other).config.global_pool_conditions
    other.with_suffix(".yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                          "        global_average_pooling: True\n")
    assert load_controlnet(other).config.global_pool_conditions
    shuffle.with_suffix(".yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                            "        hint_channels: 3\n")
    assert not load_controlnet(shuffle).config.global_pool_conditions  # the yaml decides
    half = load_controlnet(shuffle, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_the_pipeline_loads_an_original_file_as_the_folder(tmp_path):
    """pipe.load_controlnet on lllyasviel's layout gives the image the diffusers folder of the same weights gives."""
    from test_loading import save_diffusers_folder
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from PIL import Image

    save_diffusers_folder(tmp_path / "sd", "sd1")
    ref = diffusers_controlnet(SD1)
    ref.save_pretrained(tmp_path / "cn_folder", safe_serialization=True)
    state = {"control_model." + k: v for k, v in to_lllyasviel(ref.state_dict(), ref.config).items()}
    file = save_state(tmp_path / "control_v11p_sd15_canny.pth", state, "pth")
    picture = Image.effect_noise((32, 32), 60).convert("RGB")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "sd")
    out = []
    for source in (tmp_path / "cn_folder", file):
        pipe.controlnets = []
        assert pipe.load_controlnet(source) == source.stem
        out.append(pipe.generate("a red circle", control_image=picture, steps=3, seed=4, progress=False,
                                 output_type="latent").latents)
    assert torch.equal(out[0], out[1])


def test_full_size_sd15_layout_on_the_meta_device():
    """The released SD 1.5 ControlNet layout (lllyasviel/control_v11p_sd15_canny's config: diffusers' defaults
    with a 768-wide context: 320..1280, 8 heads, input_hint_block.0..14, zero_convs.0..11), on the meta device:
    every tensor finds its place and the config read off the shapes is diffusers'."""
    with torch.device("meta"):
        ref = diffusers.ControlNetModel(cross_attention_dim=768)
    state = to_lllyasviel(ref.state_dict(), ref.config)
    assert sorted(int(k.split(".")[1]) for k in state if k.startswith("zero_convs.") and k.endswith("weight")) \
        == list(range(12))
    net = controlnet_from_state({"control_model." + k: v for k, v in state.items()}, "control_v11p_sd15_canny.pth")
    c = net.config
    assert list(c.block_out_channels) == [320, 640, 1280, 1280] and c.layers_per_block == 2
    assert c.cross_attention_dim == 768 and c.attention_head_dim == 8 and not c.use_linear_projection
    assert list(c.down_block_types) == list(ref.config.down_block_types)
    assert tuple(net.config.conditioning_embedding_out_channels) == tuple(ref.config.conditioning_embedding_out_channels)
    assert len(net.state_dict()) == len(ref.state_dict()) == len(state)


# ---------------------------------------------------------------------------------------------
# What is not a ControlNet
# ---------------------------------------------------------------------------------------------
def test_errors(tmp_path):
    ref = diffusers_controlnet(SD1)
    good = to_lllyasviel(ref.state_dict(), ref.config)
    with pytest.raises(FileNotFoundError, match="ControlNet not found"):
        load_controlnet(tmp_path / "nothing.safetensors")
    # a whole SD checkpoint given as a ControlNet
    sd = tmp_path / "v1-5-pruned.safetensors"
    write_single_file(sd, "sd1")
    with pytest.raises(ValueError, match=r"is a Stable Diffusion checkpoint \(model.diffusion_model"):
        load_controlnet(sd)
    # its U-Net alone, in the LDM names
    unet, _, _ = tiny_diffusers_parts("sd1")
    ldm = {k[len("model.diffusion_model."):]: v for k, v in unet_to_compvis(unet.state_dict(), unet.config).items()}
    with pytest.raises(ValueError, match="holds a U-Net"):
        load_controlnet(save_state(tmp_path / "unet.safetensors", ldm, "safetensors"))
    # a diffusers U-Net folder, and its weights alone
    unet.save_pretrained(tmp_path / "unet_folder", safe_serialization=True)
    with pytest.raises(ValueError, match=r"config.json is for a U-Net \(UNet2DConditionModel\)"):
        load_controlnet(tmp_path / "unet_folder")
    with pytest.raises(ValueError, match="holds a diffusers U-Net"):
        load_controlnet(tmp_path / "unet_folder" / "diffusion_pytorch_model.safetensors")
    # a whole model folder
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="whole model folder"):
        load_controlnet(tmp_path / "model")
    # other control models
    w = torch.zeros(4, 4, 3, 3)
    for what, state in (("T2I-Adapter", {"conv_in.weight": w, "body.0.block1.weight": w}),
                        ("T2I-Adapter", {"adapter.body.0.resnets.0.block1.weight": w}),
                        ("Control-LoRA", {"lora_controlnet": torch.zeros(1), **good}),
                        ("ControlNet-LLLite", {"lllite_unet_input_blocks_1_1_conditioning1.weight": w}),
                        ("IP-Adapter", {"image_proj.proj.weight": w, "ip_adapter.1.to_k_ip.weight": w}),
                        ("'difference' ControlNet", {"difference": torch.zeros(1), **good})):
        with pytest.raises(ValueError, match=f"looks like an? {re.escape(what)}"):
            load_controlnet(save_state_copies(tmp_path / "other.safetensors", state))
    with pytest.raises(ValueError, match="not a ControlNet layout imagine knows.*found foo.bar"):
        load_controlnet(save_state(tmp_path / "odd.safetensors", {"foo.bar.weight": w}, "safetensors"))
    # a hint encoder with a convolution missing; a misshapen weight; a weight with no place
    bad = {k: v for k, v in good.items() if not k.startswith("input_hint_block.2.")}
    with pytest.raises(ValueError, match=r"input_hint_block has convolutions at \[0, 4, 6\]"):
        load_controlnet(save_state(tmp_path / "bad1.safetensors", bad, "safetensors"))
    bad = dict(good, **{"zero_convs.0.0.weight": torch.zeros(32, 16, 1, 1)})
    with pytest.raises(ValueError, match=r"shape mismatches: controlnet_down_blocks.0.weight \(32, 16, 1, 1\)"):
        load_controlnet(save_state(tmp_path / "bad2.safetensors", bad, "safetensors"))
    bad = dict(good, **{"zero_convs.9.0.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ValueError, match="fit no module.*zero_convs.9.0.weight"):
        load_controlnet(save_state(tmp_path / "bad3.safetensors", bad, "safetensors"))
    # a truncated file, and a pickle that needs more than weights
    data = save_state(tmp_path / "whole.safetensors", good, "safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_controlnet(tmp_path / "cut.safetensors")
    torch.save({"state_dict": good, "cfg": Path("x")}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match="holds more than weights"):
        load_controlnet(tmp_path / "objects.pth")


def test_a_small_sdxl_file_without_its_config_and_a_nested_ip_adapter_say_what_they_are(tmp_path):
    """SDXL's "small" ControlNets hold attention blocks with no transformer layer: with no config.json beside the
    file the text width cannot be read, which the error says (with the config it loads); h94's IP-Adapter .bin nests
    image_proj / ip_adapter."""
    from safetensors.torch import save_file

    ref = diffusers_controlnet(SDXL, transformer_layers_per_block=(0, 0))
    path = tmp_path / "small" / "diffusers_xl_canny_small.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="attention blocks hold no transformer layer.*put its config.json beside"):
        load_controlnet(path, unet_config={"addition_time_embed_dim": SDXL_TIME})  # (the tiny model's, not 256)
    ref.save_config(path.parent)
    assert_same_outputs(ref, load_controlnet(path), sdxl=True)
    ip = tmp_path / "ip-adapter_sd15.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}},
               ip)
    with pytest.raises(ValueError, match="looks like an IP-Adapter"):
        load_controlnet(ip)
