"""SD 2.1 unCLIP from its original single file (sd21-unclip-h.ckpt / -l.ckpt, as ComfyUI and A1111 users have it):
the U-Net's image input (label_emb.0.*), the CLIP image tower (embedder.model.visual.*: OpenCLIP's alone, or OpenAI's
beside its text half), the noise augmentor's buffers, the rest SD 2.x's layout.

The file is written here from a tiny diffusers StableUnCLIPImg2ImgPipeline (its own key mapping: LDM's names for the
U-Net, VAE and OpenCLIP text tower, OpenCLIP's for the image tower) whose image statistics are the identity, which is
what such a file carries (its noise augmentor's statistics are not saved in it); loaded offline, its variations are
diffusers' from the folder at 50 dB or more."""

from __future__ import annotations

import pytest
import torch

from test_loading import clip_to_openclip, unet_to_compvis, vae_to_compvis, write_clip_tokenizer
from test_sd_parity import psnr
from test_unclip import E, TEXT_WIDTH, _picture, tiny_decoder_parts

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unclip_pipeline(folder, act: str):
    """A diffusers unCLIP image-variation pipeline with identity image statistics and a 64-wide image tower of one
    head (heads are not in the weights: a loader reads 64 per head) using `act`."""
    parts = tiny_decoder_parts(folder)
    torch.manual_seed(1)  # (SD's 32 groups in every norm, which a single file's layout implies)
    parts["unet"] = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, norm_num_groups=32, block_out_channels=(64, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH, attention_head_dim=(1, 1),
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * E, use_linear_projection=True).eval()
    parts["vae"] = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        parts["unet"].class_embedding.linear_1.weight.mul_(20)  # (a class embedding that shows the picture)
        parts["image_normalizer"].mean.zero_()
        parts["image_normalizer"].std.fill_(1.0)
    torch.manual_seed(3)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=64, projection_dim=E, num_hidden_layers=2, num_attention_heads=1, intermediate_size=37,
        image_size=32, patch_size=4, hidden_act=act)).eval()
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32), image_encoder=encoder, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def visual_to_openclip(sd: dict, prefix: str = "embedder.model.visual.") -> dict:
    """transformers' CLIPVisionModelWithProjection -> OpenCLIP's / OpenAI's visual.* names."""
    v = "vision_model."
    out = {prefix + "conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
           prefix + "class_embedding": sd[v + "embeddings.class_embedding"],
           prefix + "positional_embedding": sd[v + "embeddings.position_embedding.weight"],
           prefix + "proj": sd["visual_projection.weight"].t()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            out[f"{prefix}{theirs}.{leaf}"] = sd[f"{v}{ours}.{leaf}"]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(v + "encoder.layers."))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        a, b = f"{v}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[b + f"attn.in_proj_{leaf}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for ours, theirs in names.items():
                out[b + f"{theirs}.{leaf}"] = sd[a + f"{ours}.{leaf}"]
    return out


def unclip_file(pipe, path, openai: bool) -> None:
    """The pipeline as sd21-unclip-*'s single file (safetensors), a tokenizer folder beside it."""
    from safetensors.torch import save_file

    unet = pipe.unet.state_dict()
    state = unet_to_compvis({k: v for k, v in unet.items() if not k.startswith("class_embedding.")},
                            pipe.unet.config)
    for i, layer in ((0, "linear_1"), (2, "linear_2")):
        for leaf in ("weight", "bias"):
            state[f"model.diffusion_model.label_emb.0.{i}.{leaf}"] = unet[f"class_embedding.{layer}.{leaf}"]
    state.update(vae_to_compvis(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    state.update(clip_to_openclip({k: v for k, v in pipe.text_encoder.state_dict().items()
                                   if not k.endswith("position_ids")}))
    state.update(visual_to_openclip(pipe.image_encoder.state_dict()))
    if openai:  # (ClipImageEmbedder keeps OpenAI's whole CLIP: its text half and its pixel statistics too)
        state["embedder.model.token_embedding.weight"] = torch.randn(10, 8)
        state["embedder.model.transformer.resblocks.0.ln_1.weight"] = torch.ones(8)
        state["embedder.mean"], state["embedder.std"] = torch.zeros(3), torch.ones(3)
    betas = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    state["noise_augmentor.betas"] = betas
    state["noise_augmentor.alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    write_clip_tokenizer(path.parent / "tokenizer", "!")


@pytest.mark.parametrize("openai,act", [(False, "gelu"), (True, "quick_gelu")], ids=["openclip-h", "openai-l"])
def test_an_unclip_single_file_gives_diffusers_variations(tmp_path, openai, act):
    from imagine.loading.single_file import load_single_file
    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = tiny_unclip_pipeline(tmp_path / "parts", act)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    path = tmp_path / "single" / "sd21-unclip-h.safetensors"
    unclip_file(ref, path, openai)
    ours = TextToImagePipeline(load_single_file(path))
    c = ours.c
    assert ours.picture_model == "an unCLIP decoder (SD 2.1 unCLIP)" and c.prediction_type == "v_prediction"
    assert c.image_embedder.encoder.config.hidden_act == act and c.image_embedder.dim == E
    assert torch.allclose(c.image_noise_schedule.alphas_cumprod.float(), ref.image_noising_scheduler.alphas_cumprod)
    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    kw = dict(height=32, width=32, guidance_scale=7.5)
    for level in (0, 300):
        want = ref(image=_picture(1), prompt="a red circle", num_inference_steps=10, noise_level=level,
                   generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images[0].float()
        res = ours.variations(_picture(1), "a red circle", steps=10, noise_level=level, seeds=[3], sampler="ddim",
                              progress=False, output_type="latent", **kw)
        got = ((ours.decode(res.latents) + 1) / 2).clamp(0, 1)[0]
        assert psnr(got, want) >= 50, (level, psnr(got, want))
    # the image tower is the picture's: another picture is another image
    other = ours.variations(_picture(2), "a red circle", steps=10, seeds=[3], sampler="ddim", progress=False,
                            output_type="latent", **kw)
    assert psnr(((ours.decode(other.latents) + 1) / 2).clamp(0, 1)[0], got) < 40


def test_an_unclip_file_without_its_image_tower_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from imagine.loading.single_file import load_single_file

    ref = tiny_unclip_pipeline(tmp_path / "parts", "gelu")
    path = tmp_path / "single" / "unclip.safetensors"
    unclip_file(ref, path, False)
    state = load_file(str(path))
    no_tower = {k: v for k, v in state.items() if not k.startswith("embedder.")}
    save_file(no_tower, str(path))
    with pytest.raises(ValueError, match=r"no CLIP image tower \(embedder\.model\.visual\.\*\)"):
        load_single_file(path)
    save_file({k: v for k, v in no_tower.items() if not k.startswith("noise_augmentor.")}, str(path))
    with pytest.raises(ValueError, match=r"reads an image embedding \(label_emb\.0\.\*: SD 2\.1 unCLIP\)"):
        load_single_file(path)


def test_an_unclip_file_runs_from_the_cli_and_comfyuis_unclip_nodes(tmp_path):
    """The file as users run it: `imagine generate --model FILE --init-image PIC` (the pipeline's variation, to the
    byte), and `imagine serve`'s ComfyUI API with unCLIPCheckpointLoader on it (the picture's embedding reaches the
    picture: without unCLIPConditioning it is another)."""
    from PIL import Image

    from imagine.cli import main
    from imagine.loading.single_file import load_single_file
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app
    from test_comfyui_api_s35 import close, pictures, run
    from test_comfyui_unclip_s39 import unclip_graph

    ref = tiny_unclip_pipeline(tmp_path / "parts", "gelu")
    path = tmp_path / "single" / "sd21-unclip-h.safetensors"
    unclip_file(ref, path, False)
    ours = TextToImagePipeline(load_single_file(path))
    src, out = tmp_path / "pic.png", tmp_path / "var.png"
    _picture(7).save(src)
    assert main(["generate", "--model", str(path), "--init-image", str(src), "a red circle", "--steps", "4",
                 "--seed", "2", "--noise-level", "50", "--height", "32", "--width", "32", "-o", str(out)]) == 0
    want = ours.variations(Image.open(src).convert("RGB"), "a red circle", steps=4, seed=2, noise_level=50, height=32,
                           width=32, progress=False).images[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    app = create_app(ours, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="unclip",
                     comfyui=str(tmp_path / "comfy"))
    (tmp_path / "comfy" / "input").mkdir(parents=True, exist_ok=True)
    _picture(0).save(tmp_path / "comfy" / "input" / "pic0.png")
    with BackgroundServer(app) as srv:
        _, entry = run(srv, unclip_graph())
        assert entry["status"]["status_str"] == "success", entry["status"]
        _, plain = run(srv, unclip_graph(uses=()))
        assert plain["status"]["status_str"] == "success", plain["status"]
        assert not close(pictures(srv, entry)[0], pictures(srv, plain)[0])
