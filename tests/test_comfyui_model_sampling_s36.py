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


def test_lcm_model_sampling(server, pipe, kd):
    """ModelSamplingDiscrete "lcm" + the lcm sampler on sgm_uniform, as ComfyUI runs it: its distilled model sampling
    (the table of the 50 timesteps 19, 39, ..., 999; a level's timestep the nearest of them; its LCM c_skip / c_out
    at that timestep), sgm_uniform over that table, x = D then D + sigma_next z (z from seed + 1)."""
    g = graph(server.name, seed=6, steps=4, cfg=1.5, sampler="lcm", scheduler="sgm_uniform", batch=1)
    g["20"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["4", 0], "sampling": "lcm", "zsnr": False}}
    g["3"]["inputs"]["model"] = ["20", 0]
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    cond, uncond = pipe.encode_prompts(["a red circle"], "ComfyUI", True), pipe.encode_prompts([""])
    abar = pipe.schedule.alphas_cumprod.float()
    full = ((1 - abar) / abar) ** 0.5
    table = torch.stack([full[999 - x * 20] for x in range(50)]).flip(0)  # (its sigmas_valid, least noisy first)
    log_t = table.log()

    def sigma_of(t):  # (its sigma(): the table's index (t - 19) / 20, log-linear)
        i = torch.clamp((t - 19) / 20, 0, 49)
        lo, hi, w = i.floor().long(), i.ceil().long(), i.frac()
        return ((1 - w) * log_t[lo] + w * log_t[hi]).exp()

    def model(x, sigma):
        t = (sigma.log() - log_t[:, None]).abs().argmin(dim=0) * 20 + 19  # (its timestep())
        xin = x / torch.sqrt(1 + sigma**2)
        e_c = pipe.unet(xin, t.float(), **cond)
        e_u = pipe.unet(xin, t.float(), **uncond)
        eps = e_u + (e_c - e_u) * 1.5
        x0 = x - eps * sigma
        st = t.float() * 10.0
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / (st**2 + 0.25) ** 0.5
        return c_out * x0 + c_skip * x

    sigmas = torch.cat([sigma_of(torch.linspace(999, 19, 5)[:-1]), torch.zeros(1)])
    z = torch.randn(1, pipe.latent_channels, 8, 8, generator=torch.manual_seed(6))
    g1 = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x = z * torch.sqrt(1 + sigmas[0] ** 2)
        for i in range(4):
            x = model(x, sigmas[i:i + 1])
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * torch.randn(x.shape, generator=g1)
        image = ((pipe.decode(x) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    assert close(pictures(server, entry)[0], (image.numpy() * 255).clip(0, 255).astype("uint8"))
