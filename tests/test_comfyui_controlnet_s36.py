"""ComfyUI's ControlNet nodes through a real server: ControlNetLoader (the ControlNets of serve --controlnet, by file
name), ControlNetApplyAdvanced (both passes, its strength, its start and end percents read as ComfyUI reads them:
the noise levels sigma((1 - p) 999) of the model's table, the ControlNet run where the call's level lies between them)
and the old ControlNetApply (the positive, and a negative with none of its own). The saved pictures against ComfyUI's
code restated over the model's U-Net, text encoder and VAE with diffusers' ControlNetModel on the same weights (the
peer's ControlNet), the hint brought to the picture's size as its common_upscale does (centre crop to the aspect,
nearest-exact)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_comfyui_api_s35 import close, graph, pictures, run
from test_k_diffusion import kd  # noqa: F401 (the fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
SEED, STEPS, CFG, SIDE = 33, 5, 4.0, 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_controlnet_files import SD1, diffusers_controlnet
    from test_loading import save_diffusers_folder

    root = tmp_path_factory.mktemp("cn")
    save_diffusers_folder(root / "sd", "sd1")
    diffusers_controlnet(SD1, seed=3).save_pretrained(root / "edges", safe_serialization=True)
    diffusers_controlnet(SD1, seed=8).save_pretrained(root / "depth", safe_serialization=True)
    pipe = TextToImagePipeline.from_pretrained(root / "sd", controlnets=[root / "edges", root / "depth"])
    app = create_app(pipe, ServerConfig(max_width=64, max_height=64, max_steps=20), model_name="sd",
                     comfyui=str(root / "comfy"))
    hint = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # (another size and aspect)
    buffer = io.BytesIO()
    Image.fromarray(hint).save(buffer, format="PNG")
    nets = {name: diffusers.ControlNetModel.from_pretrained(root / name).eval() for name in ("edges", "depth")}
    with BackgroundServer(app) as srv:
        requests.post(srv.url + "/upload/image", files={"image": ("hint.png", buffer.getvalue(), "image/png")})
        yield srv, pipe, nets, torch.from_numpy(hint.astype(np.float32) / 255.0)


def percent_sigma(pipe, p):
    """ComfyUI's percent_to_sigma over the model's float32 table."""
    if p <= 0:
        return 999999999.9
    if p >= 1:
        return 0.0
    abar = pipe.schedule.alphas_cumprod.float()
    log_sigmas = (((1 - abar) / abar) ** 0.5).log()
    t = torch.tensor((1 - p) * 999.0)
    lo, hi, w = int(t.floor()), int(t.ceil()), t.frac()
    return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())


def hint_at_size(hint):  # (its common_upscale: centre crop 48x40 -> 40x40, then nearest-exact)
    x = hint.permute(2, 0, 1)[None]
    x = x[:, :, :, 4:44]
    return torch.nn.functional.interpolate(x, size=(SIDE, SIDE), mode="nearest-exact")


def reference(kd, pipe, nets, sampler, controls):
    """ComfyUI's KSampler (normal, denoise 1) restated, each ControlNet of `controls` ((net, hint, strength, start,
    end)) run on both passes where the call's sigma lies in its window, its residuals summed into the U-Net's."""
    cond, uncond = pipe.encode_prompts(["a red circle"], "ComfyUI", True), pipe.encode_prompts([""])
    level = {}

    def unet(x, t, c):
        down = mid = None
        for net, hint, strength, start, end in controls:
            if not percent_sigma(pipe, end) <= level["sigma"] <= percent_sigma(pipe, start):
                continue
            d, m = net(x, t, encoder_hidden_states=c["context"], controlnet_cond=hint, conditioning_scale=strength,
                       return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        extra = {} if down is None else {"down_block_additional_residuals": tuple(down),
                                         "mid_block_additional_residual": mid}
        return pipe.unet(x, t, **c, **extra)

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c, e_u = unet(x, t, cond), unet(x, t, uncond)
            return e_u + (e_c - e_u) * CFG

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)

    def model(x, sigma, **kw):
        level["sigma"] = float(sigma[0])
        return den(x, sigma)

    sigmas = den.get_sigmas(STEPS)
    z = torch.randn(1, 4, SIDE // pipe.scale, SIDE // pipe.scale, generator=torch.manual_seed(SEED))
    with torch.no_grad():
        out = getattr(kd.sampling, sampler)(model, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        images = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8)


def cn_graph(sampler, nodes, positive="6", negative="7"):
    g = graph("sd", seed=SEED, steps=STEPS, cfg=CFG, sampler=sampler, scheduler="normal", batch=1)
    g["5"]["inputs"].update(width=SIDE, height=SIDE)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    g.update(nodes)
    g["3"]["inputs"].update(positive=[positive[0], positive[1]] if isinstance(positive, list) else [positive, 0],
                            negative=[negative[0], negative[1]] if isinstance(negative, list) else [negative, 0])
    return g


def test_the_loader_offers_the_served_controlnets(served):
    srv = served[0]
    info = requests.get(srv.url + "/object_info/ControlNetLoader").json()
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == ["edges", "depth"]


def test_apply_advanced_with_a_window(served, kd):
    srv, pipe, nets, hint = served
    nodes = {"20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges"}},
             "21": {"class_type": "ControlNetApplyAdvanced",
                    "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0],
                               "image": ["10", 0], "strength": 0.8, "start_percent": 0.1, "end_percent": 0.7}}}
    _, entry = run(srv, cn_graph("euler", nodes, ["21", 0], ["21", 1]))
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = pictures(srv, entry)[0]
    want = reference(kd, pipe, nets, "sample_euler", [(nets["edges"], hint_at_size(hint), 0.8, 0.1, 0.7)])
    assert close(got, want)
    # (the window shows: the whole run's ControlNet gives another picture, and no ControlNet a third)
    assert not close(got, reference(kd, pipe, nets, "sample_euler", [(nets["edges"], hint_at_size(hint), 0.8, 0.0,
                                                                        1.0)]))
    assert not close(got, reference(kd, pipe, nets, "sample_euler", []))


def test_two_chained_and_the_old_node_on_heun(served, kd):
    """Two ControlNets chained (their residuals summed), on Heun, whose second evaluation at sigma_{i+1} is windowed
    by its own level; the second applied with the old node to the positive only, which ComfyUI also runs on the
    negative (that has none of its own)."""
    srv, pipe, nets, hint = served
    nodes = {"20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "depth"}},
             "22": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges"}},
             "21": {"class_type": "ControlNetApply",
                    "inputs": {"conditioning": ["6", 0], "control_net": ["20", 0], "image": ["10", 0],
                               "strength": 1.2}},
             "23": {"class_type": "ControlNetApply",
                    "inputs": {"conditioning": ["21", 0], "control_net": ["22", 0], "image": ["10", 0],
                               "strength": 0.5}}}
    _, entry = run(srv, cn_graph("heun", nodes, "23", "7"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    h = hint_at_size(hint)
    want = reference(kd, pipe, nets, "sample_heun", [(nets["depth"], h, 1.2, 0.0, 1.0), (nets["edges"], h, 0.5, 0.0,
                                                                                         1.0)])
    assert close(pictures(srv, entry)[0], want)


def test_a_controlnet_twice_or_on_one_pass_only_is_refused(served):
    srv = served[0]
    apply = {"class_type": "ControlNetApplyAdvanced",
             "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0], "image": ["10", 0],
                        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    twice = {"20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges"}}, "21": apply,
             "22": {**apply, "inputs": {**apply["inputs"], "positive": ["21", 0], "negative": ["21", 1]}}}
    _, entry = run(srv, cn_graph("euler", twice, ["22", 0], ["22", 1]))
    assert "applied twice" in entry["status"]["messages"][-1][1]["exception_message"]
    one_side = {"20": twice["20"], "21": apply}
    _, entry = run(srv, cn_graph("euler", one_side, ["21", 0], "7"))
    assert "different ControlNets" in entry["status"]["messages"][-1][1]["exception_message"]


def test_the_hints_reach_the_pipeline_as_comfyui_sizes_them():
    """Execution.controls: per loaded ControlNet the hint centre-cropped to the picture's aspect and brought to its
    size nearest-exact (ComfyUI's common_upscale), one per image of the batch in turn (its broadcast_image_to), at
    its strength and percents; a ControlNet not applied, or applied with start >= end, at scale 0."""
    from types import SimpleNamespace

    from imagine.server.comfyui import Clip, Conditioning, Execution

    hint = torch.rand(2, 40, 48, 3)
    hint = (hint * 255).round() / 255  # (8-bit values, as LoadImage gives)
    ex = Execution.__new__(Execution)
    pipe = SimpleNamespace(scale=8, controlnets=[("a", None), ("b", None), ("c", None)])
    controls = ((0, hint, 0.7, 0.2, 0.9, False), (2, hint, 1.0, 0.5, 0.5, False))
    cond = Conditioning(("text", "x"), Clip(), controls=controls)
    got = ex.controls(pipe, cond, Conditioning(("text", ""), Clip(), controls=controls), torch.zeros(3, 4, 4, 4))
    assert got["controlnet_scale"] == [0.7, 0.0, 0.0]
    assert got["control_guidance_start"][0] == 0.2 and got["control_guidance_end"][0] == 0.9
    want = torch.nn.functional.interpolate(hint.permute(0, 3, 1, 2)[:, :, :, 4:44], size=(32, 32),
                                           mode="nearest-exact")
    for i, picture in enumerate(got["control_image"][0]):  # (images 0, 1, 0 of the batch of 3)
        expected = (want[i % 2].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(np.asarray(picture), expected), i
    assert ex.controls(pipe, Conditioning(("text", "x"), Clip()), Conditioning(("text", ""), Clip()),
                       torch.zeros(1, 4, 4, 4)) == {}
