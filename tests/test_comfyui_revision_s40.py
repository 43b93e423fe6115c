"""SDXL's Revision through ComfyUI's nodes (`imagine serve --clip-vision-dir`): CLIPVisionLoader (a CLIP image tower
file: transformers' names or OpenCLIP's `visual.*`), CLIPVisionEncode and unCLIPConditioning on an SDXL model (a tiny
diffusers StableDiffusionXLPipeline folder).

The picture is held to ComfyUI's code restated here: the tower built by transformers from its config (GELU, as
ComfyUI's configs for the OpenCLIP towers), its clip_preprocess, and its sdxl_pooled: unclip_adm's noised embedding
in place of the text's pooled vector (SDXL's noise augmentor: diffusers' squaredcos_cap_v2 schedule, level round(999
aug), noise from torch.manual_seed(seed - 10), identity statistics, times the strength, the level's code cut off), the
negative's pooled vector its text's; KSampler's Euler on k-diffusion (DiscreteEpsDDPMDenoiser, quantized)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import close, pictures, run
from test_comfyui_unclip_s39 import clip_preprocess
from test_k_diffusion import kd  # noqa: F401 (the fixture)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SEED, STEPS, CFG, SIZE, TEXT, NEGATIVE = 5, 6, 5.0, 32, "a red circle", "a blue square"


def tiny_tower(width: int, projection: int, act: str = "gelu", seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                           num_attention_heads=max(1, width // 64), image_size=32, patch_size=8,
                                           projection_dim=projection, hidden_act=act)
    return transformers.CLIPVisionModelWithProjection(config).eval()


def as_openclip(tower) -> dict[str, torch.Tensor]:
    """The tower's weights in OpenCLIP's names under `visual.` (as a ComfyUI clip_vision file may hold them)."""
    sd, out = tower.state_dict(), {}
    v = "vision_model."
    out["visual.conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            out[f"visual.{theirs}.{leaf}"] = sd[f"{v}{ours}.{leaf}"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    for i in range(tower.config.num_hidden_layers):
        a, b = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[b + f"attn.in_proj_{leaf}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj",
                                 "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[b + f"{theirs}.{leaf}"] = sd[a + f"{ours}.{leaf}"]
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from safetensors.torch import save_file

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_sdxl import save_sdxl_folder
    from test_sdxl_single_file import PROJ
    from test_unclip import _picture

    root = tmp_path_factory.mktemp("revision")
    save_sdxl_folder(root / "sdxl", scheduler="euler")
    pipe = TextToImagePipeline.from_pretrained(root / "sdxl")
    with torch.no_grad():  # (the pooled vector's part of the added embedding made louder: its change shows at 8 bits)
        pipe.unet.add_embedding.linear_1.weight[:, :PROJ] *= 20
    tower = tiny_tower(64, PROJ)
    folder = root / "clip_vision"
    (folder / "sub").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(folder / "clip_vision_g.safetensors"))
    save_file(as_openclip(tower), str(folder / "sub" / "open_clip_g.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny_tower(64, PROJ + 8).state_dict().items()},
              str(folder / "other_width.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not weights")
    pipe.clip_vision_dir = folder
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="sdxl",
                     comfyui=str(root / "comfy"))
    (root / "comfy" / "input").mkdir(parents=True, exist_ok=True)
    _picture(0, (50, 40)).save(root / "comfy" / "input" / "pic.png")
    return app, pipe, tower, root


def revision_graph(clip_name="clip_vision_g.safetensors", strength=0.8, aug=0.2, ckpt="sdxl"):
    return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": TEXT, "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
            "20": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
            "21": {"class_type": "LoadImage", "inputs": {"image": "pic.png"}},
            "22": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["20", 0], "image": ["21", 0],
                                                                "crop": "center"}},
            "23": {"class_type": "unCLIPConditioning", "inputs": {
                "conditioning": ["6", 0], "clip_vision_output": ["22", 0], "strength": strength,
                "noise_augmentation": aug}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
            "3": {"class_type": "KSampler", "inputs": {
                "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["23", 0], "negative": ["7", 0], "latent_image": ["5", 0],
                "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "revision"}}}


def reference(kd, pipe, tower, root, strength, aug, noise_seed=SEED, revision=True) -> np.ndarray:
    picture = np.asarray(Image.open(root / "comfy" / "input" / "pic.png").convert("RGB"), np.float32) / 255
    with torch.no_grad():
        embeds = tower(clip_preprocess(torch.from_numpy(picture)[None], 32)).image_embeds
    abar = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    level = round(999 * aug)
    noise = torch.randn(embeds.shape, generator=torch.manual_seed(noise_seed - 10))
    pooled = (abar[level].sqrt() * embeds + (1 - abar[level]).sqrt() * noise) * strength
    cond, uncond = pipe.encode_prompts([TEXT], "ComfyUI", True), pipe.encode_prompts([NEGATIVE], "ComfyUI", True)
    if revision:
        cond["text_embeds"] = pooled
    codes = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c, e_u = pipe.unet(x, t, **cond, time_ids=codes), pipe.unet(x, t, **uncond, time_ids=codes)
            return e_u + (e_c - e_u) * CFG

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = den.get_sigmas(STEPS)
    z = torch.randn(1, 4, SIZE // pipe.scale, SIZE // pipe.scale, generator=torch.manual_seed(SEED))
    with torch.no_grad():
        out = kd.sampling.sample_euler(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("clip_name", ["clip_vision_g.safetensors", "sub/open_clip_g.safetensors"],
                         ids=["transformers names", "OpenCLIP names"])
def test_revision_gives_comfyuis_picture(served, kd, clip_name):
    app, pipe, tower, root = served
    with BackgroundServer(app) as srv:
        _, entry = run(srv, revision_graph(clip_name, 0.8, 0.2))
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)[0]
    assert close(got, reference(kd, pipe, tower, root, 0.8, 0.2))
    # the picture reaches the image, its noise is the seed's - 10, and the tower's GELU is GELU
    assert not close(got, reference(kd, pipe, tower, root, 0.8, 0.2, revision=False))
    assert not close(got, reference(kd, pipe, tower, root, 0.8, 0.2, noise_seed=SEED + 1))
    quick = tiny_tower(64, tower.config.projection_dim, act="quick_gelu")
    quick.load_state_dict(tower.state_dict())
    assert not close(got, reference(kd, pipe, quick, root, 0.8, 0.2))


def test_clip_vision_files_are_listed_and_bad_ones_refused(served):
    import requests

    app, pipe, _, root = served
    with BackgroundServer(app) as srv:
        info = requests.get(srv.url + "/object_info/CLIPVisionLoader").json()["CLIPVisionLoader"]
        assert info["input"]["required"]["clip_name"][0] == [
            "broken.safetensors", "clip_vision_g.safetensors", "other_width.safetensors",
            "sub/open_clip_g.safetensors"]
        for name in ("nope.safetensors", "../sdxl/unet/diffusion_pytorch_model.safetensors"):  # (ComfyUI's check)
            r = requests.post(srv.url + "/prompt", json={"prompt": revision_graph(name)})
            assert r.status_code == 400 and "Value not in list" in r.text, r.text
        for name, message in (("broken.safetensors", "broken.safetensors"),
                              ("other_width.safetensors", "Revision reads ViT-bigG's")):
            _, entry = run(srv, revision_graph(name))
            assert entry["status"]["status_str"] == "error", name
            text = str(entry["status"]["messages"])
            assert message in text, (name, text)


def test_unclip_conditioning_on_a_model_that_reads_no_picture_is_refused(tmp_path):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    from safetensors.torch import save_file

    make_tiny_model(tmp_path / "sd")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "sd")
    (tmp_path / "cv").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_tower(64, 16).state_dict().items()},
              str(tmp_path / "cv" / "g.safetensors"))
    pipe.clip_vision_dir = tmp_path / "cv"
    (tmp_path / "comfy" / "input").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 20, 20)).save(tmp_path / "comfy" / "input" / "pic.png")
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="sd",
                     comfyui=str(tmp_path / "comfy"))
    with BackgroundServer(app) as srv:
        _, entry = run(srv, revision_graph("g.safetensors", ckpt="sd"))
        assert entry["status"]["status_str"] == "error"
        assert "reads neither" in str(entry["status"]["messages"])
