"""ComfyUI's unCLIP nodes on an SD 2.1 unCLIP model (a tiny diffusers StableUnCLIPImg2ImgPipeline folder):
unCLIPCheckpointLoader, CLIPVisionEncode and unCLIPConditioning, through a real server.

The picture is held to ComfyUI's code restated here over the model's own parts and diffusers' schedules: its
clip_preprocess (the shorter side to the tower's size by torch's antialiased bicubic, the middle cut out, 8-bit
rounded, normalized), the tower's projected embedding, its unclip_adm (the embedding normalized, noised by the
squaredcos_cap_v2 schedule at round(999 aug) with torch.manual_seed(seed - 10), un-normalized, the level's sinusoidal
code appended, times the strength; several summed and noised again at round(999 * 0.05)), zeros for the negative,
and its KSampler on a v-prediction model (k-diffusion's DiscreteVDDPMDenoiser, quantized)."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import close, pictures, run
from test_k_diffusion import kd  # noqa: F401 (the fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SEED, STEPS, CFG, SIZE, TEXT = 7, 6, 5.0, 32, "a red circle"
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_unclip import _picture, _tiny_unclip

    root = tmp_path_factory.mktemp("comfy_unclip")
    _tiny_unclip(root / "unclip")
    pipe = TextToImagePipeline.from_pretrained(root / "unclip")
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="unclip",
                     comfyui=str(root / "comfy"))
    (root / "comfy" / "input").mkdir(parents=True, exist_ok=True)
    for k, size in ((0, (50, 40)), (1, (30, 44))):
        _picture(k, size).save(root / "comfy" / "input" / f"pic{k}.png")
    return app, pipe, root


def unclip_graph(uses=((0, 0.8, 0.3),), seed=SEED):
    """unCLIPCheckpointLoader -> CLIPTextEncode -> (LoadImage -> CLIPVisionEncode -> unCLIPConditioning) per
    (picture, strength, noise augmentation) -> KSampler (euler, normal) -> VAEDecode -> SaveImage."""
    g = {"4": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "unclip"}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": TEXT, "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
         "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
         "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "unclip"}}}
    last = ["6", 0]
    for i, (k, strength, aug) in enumerate(uses):
        g[f"2{i}0"] = {"class_type": "LoadImage", "inputs": {"image": f"pic{k}.png"}}
        g[f"2{i}1"] = {"class_type": "CLIPVisionEncode",
                       "inputs": {"clip_vision": ["4", 3], "image": [f"2{i}0", 0], "crop": "center"}}
        g[f"2{i}2"] = {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": last, "clip_vision_output": [f"2{i}1", 0], "strength": strength,
            "noise_augmentation": aug}}
        last = [f"2{i}2", 0]
    g["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
        "positive": last, "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return g


def clip_preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI's clip_preprocess (crop), restated."""
    x = image.movedim(-1, 1)
    scale = size / min(x.shape[2], x.shape[3])
    x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])),
                                        mode="bicubic", antialias=True)
    h, w = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = (torch.clip(255.0 * x[:, :, h:h + size, w:w + size], 0, 255).round() / 255.0)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def adm(pipe, embeds: torch.Tensor, aug: float, seed: int) -> torch.Tensor:
    """ComfyUI's noise augmentor on one embedding row [1, D]: (its CLIPEmbeddingNoiseAugmentation)."""
    from diffusers.models.embeddings import get_timestep_embedding

    e = pipe.c.image_embedder
    abar = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    level = round(999 * aug)
    noise = torch.randn(embeds.shape, generator=torch.manual_seed(seed - 10))
    z = (embeds - e.mean) / e.std
    z = abar[level].sqrt() * z + (1 - abar[level]).sqrt() * noise
    code = get_timestep_embedding(torch.tensor([level]), embeds.shape[1], flip_sin_to_cos=True,
                                  downscale_freq_shift=0)
    return torch.cat([z * e.std + e.mean, code], dim=1)


def reference(kd, pipe, root, uses, seed=SEED, noise_seed=None) -> list[np.ndarray]:
    rows = []
    for k, strength, aug in uses:
        picture = np.asarray(Image.open(root / "comfy" / "input" / f"pic{k}.png").convert("RGB"), np.float32) / 255
        with torch.no_grad():
            embeds = pipe.c.image_embedder.encoder(clip_preprocess(torch.from_numpy(picture)[None], 32)).image_embeds
        rows.append(adm(pipe, embeds, aug, seed if noise_seed is None else noise_seed) * strength)
    label = rows[0] if len(rows) == 1 else adm(pipe, sum(rows)[:, :rows[0].shape[1] // 2], 0.05, seed)
    cond, uncond = pipe.encode_prompts([TEXT] * 2, "ComfyUI", True), pipe.encode_prompts([""] * 2)
    cond["class_labels"], uncond["class_labels"] = label.repeat(2, 1), torch.zeros(2, label.shape[1])

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            v_c, v_u = pipe.unet(x, t, **cond), pipe.unet(x, t, **uncond)
            return v_u + (v_c - v_u) * CFG

    den = kd.external.DiscreteVDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = den.get_sigmas(STEPS)
    z = torch.randn(2, 4, SIZE // pipe.scale, SIZE // pipe.scale, generator=torch.manual_seed(seed))
    with torch.no_grad():
        out = kd.sampling.sample_euler(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        images = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return [np.clip(255.0 * im.numpy(), 0, 255).astype(np.uint8) for im in images]


@pytest.mark.parametrize("uses", [((0, 0.8, 0.3),), ((0, 1.0, 0.0), (1, 0.6, 0.5))], ids=["one", "two merged"])
def test_unclip_conditioning_gives_comfyuis_picture(served, kd, uses):
    app, pipe, root = served
    with BackgroundServer(app) as srv:
        _, entry = run(srv, unclip_graph(uses))
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)
    want = reference(kd, pipe, root, uses)
    assert all(close(a, b) for a, b in zip(got, want))
    # the embedding's noise is the seed's - 10 and the picture reaches the image: another noise, or none, differs
    assert not close(got[0], reference(kd, pipe, root, uses, noise_seed=SEED + 1)[0])
    assert not close(got[0], reference(kd, pipe, root, [(k, 0.0, a) for k, _, a in uses][:1])[0])


def test_unclip_nodes_refuse_what_they_cannot_run(served, tmp_path):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    app, _, root = served
    with BackgroundServer(app) as srv:
        info = requests.get(srv.url + "/object_info/unCLIPConditioning").json()["unCLIPConditioning"]
        assert info["input"]["required"]["noise_augmentation"][1] == {"default": 0.0, "min": 0.0, "max": 1.0,
                                                                      "step": 0.01}
        g = unclip_graph()
        g["201"]["inputs"]["crop"] = "middle"
        r = requests.post(srv.url + "/prompt", json={"prompt": g})
        assert r.json()["node_errors"]["201"]["errors"][0]["type"] == "value_not_in_list"
    make_tiny_model(tmp_path / "plain")
    plain = create_app(TextToImagePipeline.from_pretrained(tmp_path / "plain"),
                       ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="plain",
                       comfyui=str(root / "comfy"))
    with BackgroundServer(plain) as srv:
        g = unclip_graph()
        g["4"]["inputs"]["ckpt_name"] = "plain"
        _, entry = run(srv, g)
        message = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
        assert "'plain' is not an unCLIP model" in message and "CheckpointLoaderSimple" in message
