"""A ComfyUI graph on an SDXL model (its two text towers, its size codes): KSampler with a plain CLIPTextEncode gives
ComfyUI's picture, restated over the model: both towers' penultimate states side by side and the big tower's pooled
vector (its SDXLClipModel), the negative "" encoded (ComfyUI encodes an empty text; only diffusers' negative_prompt
None is zeros), and the size codes its SDXL model reads for a plain CLIPTextEncode, the latent's size times 8 with no
crop: (h, w, 0, 0, h, w)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import close, graph, pictures, run
from test_k_diffusion import kd  # noqa: F401 (the fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_sdxl_graph_gives_comfyuis_picture(tmp_path, kd):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_sdxl import save_sdxl_folder

    ref = save_sdxl_folder(tmp_path / "xl")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "xl")
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="xl",
                     comfyui=str(tmp_path / "comfy"))
    seed, steps, cfg, w, h = 9, 4, 5.0, 32, 24
    g = graph("xl", seed=seed, steps=steps, cfg=cfg, sampler="dpmpp_2m", scheduler="karras", batch=1,
              text="a (red:1.2) circle")
    g["5"]["inputs"].update(width=w, height=h)
    with BackgroundServer(app) as srv:
        _, entry = run(srv, g)
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)[0]
    # the conditioning ComfyUI gives its SDXL U-Net: the towers' states and pooled vector as diffusers' SDXL pipeline
    # computes them for the unweighted text (the weights are test_comfyui_prompts_s35's), the empty negative encoded
    with torch.no_grad():
        pe, ne, pp, npp = ref.encode_prompt("a red circle", do_classifier_free_guidance=True, negative_prompt="")
    cond, uncond = pipe.encode_prompts(["a (red:1.2) circle"], "ComfyUI", True), pipe.encode_prompts([""])
    plain = pipe.encode_prompts(["a red circle"], "ComfyUI", True)
    assert torch.allclose(plain["context"], pe, atol=1e-5) and torch.allclose(plain["text_embeds"], pp, atol=1e-5)
    assert torch.allclose(uncond["context"], ne, atol=1e-5) and torch.allclose(uncond["text_embeds"], npp, atol=1e-5)
    assert float(ne.abs().max()) > 0  # (not diffusers' zeros for a negative prompt of None)
    sizes = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c = pipe.unet(x, t, **cond, time_ids=sizes)
            e_u = pipe.unet(x, t, **uncond, time_ids=sizes)
            return e_u + (e_c - e_u) * cfg

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = kd.sampling.get_sigmas_karras(steps, float(den.sigma_min), float(den.sigma_max))
    z = torch.randn(1, 4, h // pipe.scale, w // pipe.scale, generator=torch.manual_seed(seed))
    with torch.no_grad():
        out = kd.sampling.sample_dpmpp_2m(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    want = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
    assert close(got, want)
    wrong = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)  # (the size codes reach the picture)
    sizes = wrong
    with torch.no_grad():
        out = kd.sampling.sample_dpmpp_2m(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    assert not close(got, np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8))


def test_clip_text_encode_sdxl_gives_each_tower_its_text_and_its_size_codes(tmp_path, kd):
    """CLIPTextEncodeSDXL: text_l through the CLIP-L tower, text_g through bigG (its pooled vector too), as diffusers'
    SDXL pipeline reads prompt and prompt_2; the size codes (height, width, crop_h, crop_w, target_height,
    target_width) its node sets; the negative a plain CLIPTextEncode with the picture's own."""
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_sdxl import save_sdxl_folder

    ref = save_sdxl_folder(tmp_path / "xl")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "xl")
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="xl",
                     comfyui=str(tmp_path / "comfy"))
    seed, steps, cfg, w, h = 4, 4, 4.0, 32, 24
    g = graph("xl", seed=seed, steps=steps, cfg=cfg, sampler="euler", scheduler="normal", batch=1)
    g["5"]["inputs"].update(width=w, height=h)
    g["6"] = {"class_type": "CLIPTextEncodeSDXL",
              "inputs": {"clip": ["4", 1], "width": 40, "height": 48, "crop_w": 8, "crop_h": 0, "target_width": 32,
                         "target_height": 24, "text_g": "a red circle", "text_l": "a blue square"}}
    with BackgroundServer(app) as srv:
        _, entry = run(srv, g)
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)[0]
    with torch.no_grad():
        pe, ne, pp, npp = ref.encode_prompt("a blue square", prompt_2="a red circle", negative_prompt="",
                                            do_classifier_free_guidance=True)
    cond = {"context": pe, "text_embeds": pp, "time_ids": torch.tensor([[48, 40, 0, 8, 24, 32]], dtype=torch.float32)}
    uncond = {"context": ne, "text_embeds": npp, "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)}

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c, e_u = pipe.unet(x, t, **cond), pipe.unet(x, t, **uncond)
            return e_u + (e_c - e_u) * cfg

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = den.get_sigmas(steps)
    z = torch.randn(1, 4, h // pipe.scale, w // pipe.scale, generator=torch.manual_seed(seed))
    with torch.no_grad():
        out = kd.sampling.sample_euler(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    assert close(got, np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8))
