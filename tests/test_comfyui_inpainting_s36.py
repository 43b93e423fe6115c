"""ComfyUI's inpainting nodes on an inpainting model (a U-Net of 4 + 1 + 4 input channels): VAEEncodeForInpaint (the
masked part grey, the noise mask grown by a box of grow_mask_by pixels), InpaintModelConditioning (the grey picture's
latents and the mask ride on the conditionings; the latent is the whole picture's) and a plain empty latent, whose
concatenated channels are then a mask of ones and ComfyUI's blank latents. Each graph's saved picture, through a real
server, against ComfyUI's code restated over the model's own U-Net, text encoder and VAE: its concat_cond (mask
rounded, masked picture beside the sample), its KSamplerX0Inpaint blend, its noise and start, k-diffusion's Euler over
the quantized denoiser, and its 8-bit truncation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import close, graph, pictures, run
from test_k_diffusion import kd  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
SEED, STEPS, CFG, SIDE = 21, 4, 4.0, 32
BLANK = (0.8223, -0.6876, 0.6364, 0.1380)  # (its blank_inpaint_image_like, written out again)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_loading import save_diffusers_folder

    root = tmp_path_factory.mktemp("inpainting")
    save_diffusers_folder(root / "folder", "sd1", scheduler="ddim", in_channels=9)
    pipe = TextToImagePipeline.from_pretrained(root / "folder")
    assert pipe.image_conditioned
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="folder",
                     comfyui=str(root / "comfy"))
    rgba = np.random.default_rng(5).integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:20, 10:26, 3] = 0  # (the hole: LoadImage's MASK is 1 - alpha)
    rgba[20:22, 10:26, 3] = 128
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    with BackgroundServer(app) as srv:
        r = requests.post(srv.url + "/upload/image", files={"image": ("hole.png", buffer.getvalue(), "image/png")})
        assert r.status_code == 200
        yield srv, pipe, rgba


def reference(kd, pipe, latent, concat, blend):
    """ComfyUI's KSampler (euler, normal, denoise 1) on an inpainting model, restated: the U-Net reads
    [x, concat] (its concat_cond), KSamplerX0Inpaint keeps `latent` where the blend mask is 0; then its VAEDecode."""
    cond, uncond = pipe.encode_prompts(["a red circle"], "ComfyUI", True), pipe.encode_prompts([""])

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            xc = torch.cat([x, concat], dim=1)
            e_c, e_u = pipe.unet(xc, t, **cond), pipe.unet(xc, t, **uncond)
            return e_u + (e_c - e_u) * CFG

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = den.get_sigmas(STEPS)
    z = torch.randn(latent.shape, generator=torch.manual_seed(SEED))
    x = latent + z * torch.sqrt(1 + sigmas[0] ** 2)

    def model(x, sigma, **kw):
        if blend is None:
            return den(x, sigma)
        s = sigma.view(-1, 1, 1, 1)
        return den(x * blend + (latent + z * s) * (1 - blend), sigma) * blend + latent * (1 - blend)

    with torch.no_grad():
        out = kd.sampling.sample_euler(model, x, sigmas, disable=True)
        images = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8)


def picture_and_mask(rgba):
    pixels = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)[None]
    mask = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)[None, None]
    return pixels, mask


def encode(pipe, pixels):  # (VAEEncode: the posterior's mean)
    return pipe.vae.to_latent(pipe.vae_mode(pixels.permute(0, 3, 1, 2) * 2 - 1))


def to_latent_size(mask, latent):
    return torch.nn.functional.interpolate(mask, size=tuple(latent.shape[2:]), mode="bilinear")


def inpaint_graph(name, latent_node):
    g = graph(name, seed=SEED, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal", batch=1,
              latent=[latent_node, 0 if latent_node != "15" else 2])
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "hole.png"}}
    return g


@pytest.mark.parametrize("grow", [6, 0])
def test_vae_encode_for_inpaint(inpainting, kd, grow):
    srv, pipe, rgba = inpainting
    g = inpaint_graph("folder", "11")
    g["11"] = {"class_type": "VAEEncodeForInpaint",
               "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": grow}}
    _, entry = run(srv, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pixels, mask = picture_and_mask(rgba)
    grey = (pixels - 0.5) * (1 - mask.round())[:, 0, ..., None] + 0.5
    latent = encode(pipe, grey)
    if grow:
        pad = math.ceil((grow - 1) / 2)
        mask = torch.clamp(torch.nn.functional.conv2d(mask.round(), torch.ones(1, 1, grow, grow), padding=pad), 0, 1)
        mask = mask[:, :, :SIDE, :SIDE]
    mask = mask.round()
    small = to_latent_size(mask, latent)
    want = reference(kd, pipe, latent, torch.cat([small.round(), latent], dim=1), small)
    got = pictures(srv, entry)[0]
    assert close(got, want)
    # (the concat shows: the same run with the blank channels of no mask is another picture)
    blank = torch.cat([torch.ones_like(small), torch.tensor(BLANK).view(1, 4, 1, 1).expand_as(latent)], dim=1)
    assert not close(got, reference(kd, pipe, latent, blank, small))


@pytest.mark.parametrize("noise_mask", [True, False])
def test_inpaint_model_conditioning(inpainting, kd, noise_mask):
    srv, pipe, rgba = inpainting
    g = inpaint_graph("folder", "15")
    g["15"] = {"class_type": "InpaintModelConditioning",
               "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["10", 0],
                          "mask": ["10", 1], "noise_mask": noise_mask}}
    g["3"]["inputs"].update(positive=["15", 0], negative=["15", 1])
    _, entry = run(srv, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pixels, mask = picture_and_mask(rgba)
    grey = (pixels - 0.5) * (1 - mask.round())[:, 0, ..., None] + 0.5
    latent = encode(pipe, pixels)
    concat = torch.cat([to_latent_size(mask, latent).round(), encode(pipe, grey)], dim=1)
    want = reference(kd, pipe, latent, concat, to_latent_size(mask, latent) if noise_mask else None)
    assert close(pictures(srv, entry)[0], want)


def test_an_inpainting_model_from_an_empty_latent_reads_the_blank_channels(inpainting, kd):
    srv, pipe, _ = inpainting
    g = graph("folder", seed=SEED, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal", batch=1)
    g["5"]["inputs"].update(width=SIDE, height=SIDE)
    _, entry = run(srv, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    f = pipe.scale
    latent = torch.zeros(1, 4, SIDE // f, SIDE // f)
    blank = torch.cat([torch.ones(1, 1, SIDE // f, SIDE // f), torch.tensor(BLANK).view(1, 4, 1, 1).expand_as(latent)],
                      dim=1)
    assert close(pictures(srv, entry)[0], reference(kd, pipe, latent, blank, None))
