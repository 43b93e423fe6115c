"""ComfyUI's custom sampling nodes through a real server: SamplerCustom with KSamplerSelect and its schedulers
(BasicScheduler, KarrasScheduler, ExponentialScheduler, SDTurboScheduler) and SplitSigmas.
BasicScheduler + SamplerCustom gives KSampler's picture (denoise too); KarrasScheduler's own range against ComfyUI's
code restated over the model; SplitSigmas' two halves, the second from the first's leftover noise without noise of
its own, give the whole run's picture with a deterministic sampler; SamplerCustom's denoised output is the last
step's x_0."""

from __future__ import annotations

import numpy as np
import torch

from imagine.server import comfyui as c
from test_comfyui_api_s35 import close, comfy_reference, graph, pictures, pipe, run, server  # noqa: F401
from test_k_diffusion import kd  # noqa: F401 (the fixture)


def custom(name, sampler, sigmas_node: dict, seed=21, cfg=5.0, add_noise=True, latent=("5", 0)):
    g = graph(name, seed=seed, cfg=cfg, batch=1)
    g.update({"20": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}, "21": sigmas_node,
              "3": {"class_type": "SamplerCustom",
                    "inputs": {"model": ["4", 0], "add_noise": add_noise, "noise_seed": seed, "cfg": cfg,
                               "positive": ["6", 0], "negative": ["7", 0], "sampler": ["20", 0],
                               "sigmas": ["21", 0], "latent_image": list(latent)}}})
    return g


def test_basic_scheduler_gives_ksamplers_picture(server):
    for denoise in (1.0, 0.6):
        g = custom(server.name, "dpmpp_2m", {"class_type": "BasicScheduler",
                                             "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 5,
                                                        "denoise": denoise}})
        if denoise < 1:  # (from a picture's latent: an earlier run's)
            g["30"] = {**graph(server.name, seed=3, batch=1)["3"]}
            g["30"]["inputs"] = {**g["30"]["inputs"], "steps": 3}
            g["3"]["inputs"]["latent_image"] = ["30", 0]
        _, a = run(server, g)
        k = graph(server.name, seed=21, cfg=5.0, batch=1, sampler="dpmpp_2m", scheduler="karras", steps=5,
                  denoise=denoise)
        if denoise < 1:
            k["30"] = g["30"]
            k["3"]["inputs"]["latent_image"] = ["30", 0]
        _, b = run(server, k)
        assert a["status"]["status_str"] == "success", a["status"]
        assert np.array_equal(pictures(server, a)[0], pictures(server, b)[0]), denoise


def test_karras_scheduler_of_its_own_range(server, pipe, kd):
    g = custom(server.name, "euler_ancestral", {"class_type": "KarrasScheduler",
                                                "inputs": {"steps": 5, "sigma_max": 10.0, "sigma_min": 0.1,
                                                           "rho": 5.0}})
    _, entry = run(server, g)
    want = comfy_reference(kd, pipe, "a red circle", 21, 5, 5.0, "sample_euler_ancestral",
                           lambda kd, den, n: kd.sampling.get_sigmas_karras(n, 0.1, 10.0, 5.0), 1)
    assert close(pictures(server, entry)[0], want[0])


def test_split_sigmas_chain_is_the_whole_run_and_the_denoised_output(server):
    whole = custom(server.name, "euler", {"class_type": "BasicScheduler",
                                          "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 6,
                                                     "denoise": 1.0}})
    _, a = run(server, whole)
    split = dict(whole)
    split["22"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["21", 0], "step": 2}}
    split["3"] = {**whole["3"], "inputs": {**whole["3"]["inputs"], "sigmas": ["22", 0]}}
    split["23"] = {"class_type": "SamplerCustom",
                   "inputs": {**whole["3"]["inputs"], "add_noise": False, "sigmas": ["22", 1],
                              "latent_image": ["3", 0]}}
    split["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["4", 2]}}
    _, b = run(server, split)
    assert b["status"]["status_str"] == "success", b["status"]
    assert close(pictures(server, b)[0], pictures(server, a)[0])
    # the first half's denoised output is its last x_0 prediction, not its noisy output
    den = dict(split)
    den["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 1], "vae": ["4", 2]}}
    noisy = dict(split)
    noisy["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    _, d = run(server, den)
    _, n = run(server, noisy)
    assert not close(pictures(server, d)[0], pictures(server, n)[0])


def test_sd_turbo_and_exponential_levels(pipe):
    from types import SimpleNamespace

    ctx = SimpleNamespace(pipe_of=lambda ckpt: pipe)
    log_sigmas = pipe.schedule.kdiffusion_log_sigmas()
    for steps, denoise, first in ((1, 1.0, 999), (4, 1.0, 999), (2, 0.5, 499)):
        got = c._sd_turbo_scheduler(ctx, c.Model(), steps, denoise)[0]
        t = torch.tensor([first - 100 * k for k in range(steps)])
        assert torch.allclose(got, torch.cat([log_sigmas[t].exp(), torch.zeros(1)])), (steps, denoise)
    e = c._exponential_scheduler(ctx, 4, 10.0, 0.1)[0]
    assert torch.allclose(e, torch.tensor([10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1, 0.0]), rtol=1e-5)


def test_sampler_custom_advanced_is_sampler_custom(server):
    """SamplerCustomAdvanced with RandomNoise + CFGGuider gives SamplerCustom's picture, with BasicGuider its cfg-1
    picture, with DisableNoise its add_noise-off picture; BasicGuider refuses a CFG++ sampler."""
    sched = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 5,
                                                         "denoise": 1.0}}
    for noise, guider, cfg, add in (
            ({"class_type": "RandomNoise", "inputs": {"noise_seed": 21}},
             {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                    "cfg": 5.0}}, 5.0, True),
            ({"class_type": "RandomNoise", "inputs": {"noise_seed": 21}},
             {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}, 1.0, True),
            ({"class_type": "DisableNoise", "inputs": {}},
             {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                    "cfg": 5.0}}, 5.0, False)):
        g = custom(server.name, "dpmpp_2m", sched, cfg=cfg, add_noise=add)
        _, plain = run(server, g)
        adv = dict(g)
        adv["30"], adv["31"] = noise, guider
        adv["3"] = {"class_type": "SamplerCustomAdvanced",
                    "inputs": {"noise": ["30", 0], "guider": ["31", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
                               "latent_image": ["5", 0]}}
        _, entry = run(server, adv)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert np.array_equal(pictures(server, entry)[0], pictures(server, plain)[0]), guider["class_type"]
    adv["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_cfg_pp"}}
    adv["31"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    _, entry = run(server, adv)
    assert "BasicGuider does not make" in entry["status"]["messages"][-1][1]["exception_message"]
