"""ComfyUI's Conditioning* nodes through a real server on a tiny SD 1.x folder (CLIP text encoder, VAE factor 2):
ConditioningCombine, ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength,
ConditioningSetMask (its mask and its bounds), ConditioningSetTimestepRange, ConditioningZeroOut, ConditioningAverage
and ConditioningConcat. The saved pictures against ComfyUI's samplers.calc_cond_batch restated here over
k-diffusion's quantized denoiser on the model's U-Net: per side, each entry's x_0 of its crop of the sample, summed
per cell with its weights (strength, mask, the 8-cell fade of an area's inner edges) and divided by their sum (from
1e-37); an area of one side copied to the other with that side's covering text (create_cond_with_same_area_if_none);
an entry with a timestep range left out at a level outside it; then cfg between the sides."""

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
from test_comfyui_controlnet_s36 import percent_sigma
from test_k_diffusion import kd  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
SEED, STEPS, CFG, W, H = 12, 4, 5.0, 96, 64  # (latents 48 x 32 cells at the tiny VAE's factor 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_loading import save_diffusers_folder

    root = tmp_path_factory.mktemp("conds")
    save_diffusers_folder(root / "sd", "sd1")
    pipe = TextToImagePipeline.from_pretrained(root / "sd")
    app = create_app(pipe, ServerConfig(max_width=128, max_height=128, max_steps=20), model_name="sd",
                     comfyui=str(root / "comfy"))
    rgba = np.full((H, W, 4), 255, dtype=np.uint8)
    rgba[10:40, 20:70, 3] = 0  # (the mask: 1 - alpha)
    rgba[40:46, 20:70, 3] = 100
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    with BackgroundServer(app) as srv:
        requests.post(srv.url + "/upload/image", files={"image": ("mask.png", buffer.getvalue(), "image/png")})
        yield srv, pipe, 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)[None]


def entry(pipe, text=None, cond=None, **values):
    return {"cond": cond if cond is not None else pipe.encode_prompts([text], "ComfyUI", True), **values}


def resolved(e, h, w):
    """Its resolve_areas_and_cond_masks_multidim: a percentage area in cells, a mask bilinear to the latents (its
    bounds the box of the cells it covers, 8 at least)."""
    e = dict(e)
    if e.get("area") and e["area"][0] == "percentage":
        a = e["area"][1:]
        e["area"] = (max(1, round(a[0] * h)), max(1, round(a[1] * w)), round(a[2] * h), round(a[3] * w))
    if "mask" in e:
        m = torch.nn.functional.interpolate(e["mask"][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        e["mask"] = m
        if e.get("bounds"):
            ys, xs = torch.nonzero(m.abs().max(dim=0).values, as_tuple=True)
            e["area"] = (max(8, int(ys.max() - ys.min()) + 1), max(8, int(xs.max() - xs.min()) + 1), int(ys.min()),
                         int(xs.min()))
    return e


def same_area(conds, c):  # (its create_cond_with_same_area_if_none)
    if "area" not in c:
        return
    ca, smallest = c["area"], None
    for x in conds:
        if "area" in x:
            a = x["area"]
            if ca[2] >= a[2] and ca[3] >= a[3] and ca[0] + ca[2] <= a[0] + a[2] and ca[1] + ca[3] <= a[1] + a[3]:
                if smallest is None or "area" not in smallest or math.prod(smallest["area"][:2]) > math.prod(a[:2]):
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or smallest.get("area") == ca:
        return
    conds.append({**c, "cond": smallest["cond"]})


def calc(den, entries, x, sigma):
    """Its calc_cond_batch for one side."""
    out, count = torch.zeros_like(x), torch.ones_like(x) * 1e-37
    for e in entries:
        if "start" in e and (float(sigma) > e["start"] or float(sigma) < e["end"]):
            continue
        area = e.get("area")
        crop = x if area is None else x.narrow(2, area[2], area[0]).narrow(3, area[3], area[1])
        if "mask" in e:
            m = e["mask"]
            if area is not None:
                m = m.narrow(1, area[2], area[0]).narrow(2, area[3], area[1])
            m = (m * e.get("mask_strength", 1.0)).unsqueeze(1).repeat(1, crop.shape[1], 1, 1)
            mult = m * e.get("strength", 1.0)
        else:
            mult = torch.ones_like(crop) * e.get("strength", 1.0)
        if area is not None:
            for i in range(2):
                if area[2 + i] != 0:
                    for t in range(8):
                        mult.narrow(i + 2, t, 1).mul_((t + 1) / 8)
                if area[i] + area[2 + i] < x.shape[i + 2]:
                    for t in range(8):
                        mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((t + 1) / 8)
        o = den(crop, sigma, **e["cond"])
        if area is None:
            out += o * mult
            count += mult
        else:
            out.narrow(2, area[2], area[0]).narrow(3, area[3], area[1]).add_(o * mult)
            count.narrow(2, area[2], area[0]).narrow(3, area[3], area[1]).add_(mult)
    return out / count


def reference(kd, pipe, positive, negative):
    class Inner(torch.nn.Module):
        def forward(self, x, t, **kw):
            return pipe.unet(x, t.float().expand(x.shape[0]), **kw)

    den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    h, w = H // pipe.scale, W // pipe.scale
    pos, neg = [resolved(e, h, w) for e in positive], [resolved(e, h, w) for e in negative]
    for k, side in (("pos", pos), ("neg", neg)):
        for c in list(side):
            same_area(neg if k == "pos" else pos, c)

    def model(x, sigma, **kw):
        u, c = calc(den, neg, x, sigma), calc(den, pos, x, sigma)
        return u + (c - u) * CFG

    sigmas = den.get_sigmas(STEPS)
    z = torch.randn(1, 4, h, w, generator=torch.manual_seed(SEED))
    with torch.no_grad():
        out = kd.sampling.sample_euler(model, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True)
        image = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


def text(t):
    return {"class_type": "CLIPTextEncode", "inputs": {"text": t, "clip": ["4", 1]}}


def served_picture(srv, nodes, positive, negative=("7", 0)):
    g = graph("sd", seed=SEED, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal", batch=1)
    g["5"]["inputs"].update(width=W, height=H)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    g.update(nodes)
    g["3"]["inputs"].update(positive=list(positive), negative=list(negative))
    _, entry_ = run(srv, g)
    assert entry_["status"]["status_str"] == "success", entry_["status"]
    return pictures(srv, entry_)[0]


def test_combine_with_a_strength(served, kd):
    srv, pipe, _ = served
    got = served_picture(srv, {"20": text("a blue square"),
                               "21": {"class_type": "ConditioningSetAreaStrength",
                                      "inputs": {"conditioning": ["20", 0], "strength": 0.4}},
                               "22": {"class_type": "ConditioningCombine",
                                      "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["21", 0]}}},
                         ("22", 0))
    want = reference(kd, pipe, [entry(pipe, "a red circle"), entry(pipe, "a blue square", strength=0.4)],
                     [entry(pipe, "")])
    assert close(got, want)
    assert not close(got, reference(kd, pipe, [entry(pipe, "a red circle")], [entry(pipe, "")]))


@pytest.mark.parametrize("kind", ["pixels", "percentage"])
def test_an_area_over_a_whole_prompt(served, kd, kind):
    srv, pipe, _ = served
    if kind == "pixels":  # (its area in cells is pixels // 8 whatever the VAE's factor: 8 x 9 cells at (2, 0))
        node = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["20", 0], "width": 64, "height": 72,
                                                               "x": 16, "y": 0, "strength": 0.9}}
        area = (72 // 8, 64 // 8, 0, 16 // 8)
    else:
        node = {"class_type": "ConditioningSetAreaPercentage",
                "inputs": {"conditioning": ["20", 0], "width": 0.5, "height": 0.5, "x": 0.25, "y": 0.3,
                           "strength": 1.0}}
        area = ("percentage", 0.5, 0.5, 0.3, 0.25)
    got = served_picture(srv, {"20": text("a blue square"), "21": node,
                               "22": {"class_type": "ConditioningCombine",
                                      "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["21", 0]}}},
                         ("22", 0))
    strength = 0.9 if kind == "pixels" else 1.0
    want = reference(kd, pipe, [entry(pipe, "a red circle"), entry(pipe, "a blue square", area=area,
                                                                   strength=strength)], [entry(pipe, "")])
    assert close(got, want)


@pytest.mark.parametrize("bounds", [False, True])
def test_a_mask(served, kd, bounds):
    srv, pipe, mask = served
    got = served_picture(srv, {"20": text("a blue square"),
                               "21": {"class_type": "ConditioningSetMask",
                                      "inputs": {"conditioning": ["20", 0], "mask": ["10", 1], "strength": 0.8,
                                                 "set_cond_area": "mask bounds" if bounds else "default"}},
                               "22": {"class_type": "ConditioningCombine",
                                      "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["21", 0]}}},
                         ("22", 0))
    want = reference(kd, pipe, [entry(pipe, "a red circle"),
                                entry(pipe, "a blue square", mask=mask, mask_strength=0.8, bounds=bounds)],
                     [entry(pipe, "")])
    assert close(got, want)


def test_timestep_ranges_and_a_zeroed_negative(served, kd):
    srv, pipe, _ = served
    ranged = {"21": {"class_type": "ConditioningSetTimestepRange",
                     "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 0.45}},
              "20": text("a blue square"),
              "22": {"class_type": "ConditioningSetTimestepRange",
                     "inputs": {"conditioning": ["20", 0], "start": 0.45, "end": 1.0}},
              "23": {"class_type": "ConditioningCombine",
                     "inputs": {"conditioning_1": ["21", 0], "conditioning_2": ["22", 0]}},
              "24": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}}}
    got = served_picture(srv, ranged, ("23", 0), ("24", 0))
    mid = percent_sigma(pipe, 0.45)
    zero = {"context": torch.zeros_like(pipe.encode_prompts([""], "ComfyUI", True)["context"])}
    want = reference(kd, pipe, [entry(pipe, "a red circle", start=999999999.9, end=mid),
                                entry(pipe, "a blue square", start=mid, end=0.0)], [entry(pipe, cond=zero)])
    assert close(got, want)


def test_average_and_concat(served, kd):
    srv, pipe, _ = served
    a = pipe.encode_prompts(["a red circle"], "ComfyUI", True)["context"]
    b = pipe.encode_prompts(["a blue square, a green triangle on the left of the picture, big"], "ComfyUI",
                            True)["context"]
    nodes = {"20": text("a blue square, a green triangle on the left of the picture, big"),
             "21": {"class_type": "ConditioningAverage",
                    "inputs": {"conditioning_to": ["6", 0], "conditioning_from": ["20", 0],
                               "conditioning_to_strength": 0.3}}}
    got = served_picture(srv, nodes, ("21", 0))
    assert close(got, reference(kd, pipe, [entry(pipe, cond={"context": a * 0.3 + b[:, :a.shape[1]] * 0.7})],
                                [entry(pipe, "")]))
    nodes["21"] = {"class_type": "ConditioningConcat",
                   "inputs": {"conditioning_to": ["6", 0], "conditioning_from": ["20", 0]}}
    got = served_picture(srv, nodes, ("21", 0))
    assert close(got, reference(kd, pipe, [entry(pipe, cond={"context": torch.cat([a, b], dim=1)})],
                                [entry(pipe, "")]))


def test_an_a1111_lora_tag_is_text_to_comfyui(served, kd):
    """ComfyUI reads `<lora:name:1>` in a CLIPTextEncode text as words (the pipeline's A1111 reading would look for a
    LoRA file and fail here, where none is served)."""
    srv, pipe, _ = served
    words = "a <lora:style:0.8> red circle"
    got = served_picture(srv, {"20": text(words)}, ("20", 0))
    assert close(got, reference(kd, pipe, [entry(pipe, words)], [entry(pipe, "")]))
