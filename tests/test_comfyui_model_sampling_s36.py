"""ComfyUI's ModelSamplingDiscrete: "v_prediction" reads the U-Net's output as v (its V model sampling: k-diffusion's
DiscreteVDDPMDenoiser, quantized), zsnr over the schedule rescaled to zero terminal SNR (its
rescale_zero_terminal_snr_sigmas, restated here); the modes not run here are refused with a message."""

from __future__ import annotations

import torch

from test_comfyui_api_s35 import close, graph, pictures, pipe, run, server  # noqa: F401 (the fixtures)
from test_k_diffusion import kd  # noqa: F401 (the fixture)


def rescaled_sigmas(abar):
    """Its rescale_zero_terminal_snr_sigmas from the model's sigmas, in float32."""
    sigmas = ((1 - abar) / abar) ** 0.5
    a = (1 / (sigmas * sigmas + 1)).sqrt()
    a0, at = a[0].clone(), a[-1].clone()
    a = (a - at) * (a0 / (a0 - at))
    bar = a**2
    bar[-1] = 4.8973451890853435e-08
    return ((1 - bar) / bar) ** 0.5


def reference(kd, pipe, seed, steps, cfg, zsnr):
    cond, uncond = pipe.encode_prompts(["a red circle"], "ComfyUI", True), pipe.encode_prompts([""])

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            v_c, v_u = pipe.unet(x, t, **cond), pipe.unet(x, t, **uncond)
            return v_u + (v_c - v_u) * cfg

    abar = pipe.schedule.alphas_cumprod.float()
    if zsnr:
        abar = 1 / (1 + rescaled_sigmas(abar) ** 2)
    den = kd.external.DiscreteVDDPMDenoiser(Guided(), abar, quantize=True)
    sigmas = den.get_sigmas(steps)
    z = torch.randn(1, pipe.latent_channels, 8, 8, generator=torch.manual_seed(seed))
    with torch.no_grad():
        out = kd.sampling.sample_euler(den, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    return (image.numpy() * 255).clip(0, 255).astype("uint8")


def test_v_prediction_and_zsnr(server, pipe, kd):
    for zsnr in (False, True):
        g = graph(server.name, seed=8, steps=4, cfg=3.0, sampler="euler", scheduler="normal", batch=1)
        g["20"] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": zsnr}}
        g["3"]["inputs"]["model"] = ["20", 0]
        _, entry = run(server, g)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert close(pictures(server, entry)[0], reference(kd, pipe, 8, 4, 3.0, zsnr)), zsnr
    g["20"]["inputs"]["sampling"] = "lcm"
    _, entry = run(server, g)
    assert "not run by this server" in entry["status"]["messages"][-1][1]["exception_message"]
