"""ComfyUI's API (imagine/server/comfyui.py) on a tiny model, through a real server.

The pictures are held to ComfyUI's KSampler restated with k-diffusion's sampler functions (which ComfyUI vendors) over
the model's U-Net and text encodings: its noise (one torch.manual_seed(seed) draw for the batch, the ancestral steps'
from seed + 1 on a CPU), its start (z sqrt(1 + sigma_max^2), or latent + z sigma_0 below sigma_max), the nearest
training timestep (DiscreteEpsDDPMDenoiser(quantize=True)), its Karras and "normal" levels, its image to image (the last
steps + 1 levels of int(steps / denoise)), its VAEDecode ((x + 1) / 2 clamped) and SaveImage (8 bits by truncation).
The answers' shapes are those of ComfyUI's server.py (its /prompt errors, history entries, queue, socket messages).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagine.server.app import BackgroundServer, ServerConfig, create_app
from test_k_diffusion import kd  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    return TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    app = create_app(pipe, ServerConfig(max_width=128, max_height=128, max_steps=50),
                     comfyui=str(tmp_path_factory.mktemp("comfy")))
    with BackgroundServer(app) as srv:
        srv.name = requests.get(srv.url + "/object_info/CheckpointLoaderSimple").json()[
            "CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0][0]
        yield srv


def graph(name, seed=5, steps=4, cfg=6.0, sampler="euler_ancestral", scheduler="karras", batch=2, text="a red circle",
          latent=None, denoise=1.0, save="SaveImage"):
    g = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": batch}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
         "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                                    "scheduler": scheduler, "denoise": denoise, "model": ["4", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": latent or ["5", 0]}},
         "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
         "9": {"class_type": save, "inputs": {"images": ["8", 0]}}}
    if save == "SaveImage":
        g["9"]["inputs"]["filename_prefix"] = "ComfyUI"
    return g


def run(srv, g, **body) -> tuple[str, dict]:
    r = requests.post(srv.url + "/prompt", json={"prompt": g, **body})
    assert r.status_code == 200, r.text
    return run_wait(srv, r.json()["prompt_id"])


def run_wait(srv, pid) -> tuple[str, dict]:
    t0 = time.time()
    while time.time() - t0 < 120:
        h = requests.get(f"{srv.url}/history/{pid}").json()
        if h:
            return pid, h[pid]
        time.sleep(0.05)
    raise AssertionError("the prompt did not finish")


def pictures(srv, entry, node="9") -> list[np.ndarray]:
    out = []
    for image in entry["outputs"][node]["images"]:
        r = requests.get(srv.url + "/view", params=image)
        assert r.status_code == 200
        out.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
    return out


def comfy_reference(kd, pipe, text, seed, steps, cfg, sampler, sigmas_of, batch, latent=None, denoise=1.0,
                    window=None, decode=True, mask=None):
    """ComfyUI's KSampler -> VAEDecode -> SaveImage, restated over the pipeline's U-Net and text encodings; `window`:
    KSamplerAdvanced's (start_at_step, end_at_step, force_full_denoise, add_noise) instead of denoise."""
    # (its weights: imagine.emphasis' "ComfyUI" mode, held to its encode_token_weights in test_comfyui_prompts_s35)
    cond, uncond = pipe.encode_prompts([text] * batch, "ComfyUI", True), pipe.encode_prompts([""] * batch)

    class Guided(torch.nn.Module):  # (its cfg_function: uncond + (cond - uncond) * cfg)
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c, e_u = pipe.unet(x, t, **cond), pipe.unet(x, t, **uncond)
            return e_u + (e_c - e_u) * cfg

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    n = int(steps / denoise) if denoise < 1 else steps
    sigmas = sigmas_of(kd, den, n)[-(steps + 1):]
    if window is not None:  # (its common_ksampler: last_step, force_full_denoise, then start_step)
        start, end, full, add_noise = window
        if end < len(sigmas) - 1:
            sigmas = sigmas[:end + 1].clone()
            if full:
                sigmas[-1] = 0
        sigmas = sigmas[start:]
    shape = (batch, pipe.latent_channels, 8, 8) if latent is None else tuple(latent.shape)
    z = torch.randn(shape, generator=torch.manual_seed(seed))
    if window is not None and not window[3]:
        z = torch.zeros(shape)
    latent = torch.zeros(shape) if latent is None else latent
    top = float(den.sigma_max)
    full = abs(float(sigmas[0]) - top) <= 1e-5 * top or float(sigmas[0]) > top
    x = latent + z * (torch.sqrt(1 + sigmas[0] ** 2) if full else sigmas[0])
    if mask is not None:  # (its prepare_mask and KSamplerX0Inpaint)
        m = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=shape[2:], mode="bilinear")
        plain, known = den, latent

        def den(x, sigma, **kw):
            s = sigma.view(-1, 1, 1, 1)
            return plain(x * m + (known + z * s) * (1 - m), sigma) * m + known * (1 - m)
    g = torch.Generator().manual_seed(seed + 1)
    if callable(sampler):  # (a restatement of ComfyUI's own, fn(model, x, sigmas): test_comfyui_samplers_s36)
        fn = sampler
    else:
        kw = {"noise_sampler": lambda s, s_next: torch.randn(shape, generator=g)} if "ancestral" in sampler else {}
        fn = functools.partial(getattr(kd.sampling, sampler), disable=True, **kw)
    with torch.no_grad():
        out = fn(den, x, sigmas)
        if not decode:
            return out
        images = ((pipe.decode(out) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return [np.clip(255.0 * im.numpy(), 0, 255).astype(np.uint8) for im in images]


def karras(kd, den, n):
    return kd.sampling.get_sigmas_karras(n, float(den.sigma_min), float(den.sigma_max))


def normal(kd, den, n):
    return den.get_sigmas(n)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    # (the pipeline's packed float32 weights against the module's: a rounding may cross a level, not more)
    d = np.abs(a.astype(int) - b.astype(int))
    return d.max() <= 1 and (d > 0).mean() < 0.01


def test_a_text_to_image_graph_gives_comfyuis_pictures(server, pipe, kd):
    seed = 2**64 - 5  # (ComfyUI's seeds reach 2^64 - 1; its default workflow's is 156680208700286)
    pid, entry = run(server, graph(server.name, seed=seed), client_id="t1")
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["prompt"][1] == pid and entry["prompt"][4] == ["9"] and entry["prompt"][3] == {"client_id": "t1"}
    files = entry["outputs"]["9"]["images"]
    assert [f["type"] for f in files] == ["output", "output"]
    assert all(f["filename"].startswith("ComfyUI_") and f["filename"].endswith("_.png") for f in files)
    got = pictures(server, entry)
    want = comfy_reference(kd, pipe, "a red circle", seed, 4, 6.0, "sample_euler_ancestral", karras, 2)
    assert all(close(a, b) for a, b in zip(got, want))
    assert not np.array_equal(got[0], got[1])  # (image 1 is the batch draw's second row, not seed + 1's)
    # the graph travels in the PNG, as ComfyUI writes it ("prompt"; the client's extra_pnginfo beside it)
    r = requests.get(server.url + "/view", params=files[0])
    assert json.loads(Image.open(io.BytesIO(r.content)).text["prompt"])["3"]["inputs"]["seed"] == seed


def test_normal_scheduler_euler_and_ddim_and_a_png_workflow(server, pipe, kd):
    want = comfy_reference(kd, pipe, "a blue square", 77, 5, 3.0, "sample_euler", normal, 1)
    for name in ("euler", "ddim"):  # (ComfyUI's ddim is Euler)
        _, entry = run(server, graph(server.name, seed=77, steps=5, cfg=3.0, sampler=name, scheduler="normal",
                                     batch=1, text="a blue square"),
                       extra_data={"extra_pnginfo": {"workflow": {"nodes": [1, 2]}}})
        assert close(pictures(server, entry)[0], want[0]), name
        r = requests.get(server.url + "/view", params=entry["outputs"]["9"]["images"][0])
        assert json.loads(Image.open(io.BytesIO(r.content)).text["workflow"]) == {"nodes": [1, 2]}


def test_a_weighted_prompt_is_read_with_comfyuis_weights(server, pipe, kd):
    text = "a (red:1.6) circle"
    _, entry = run(server, graph(server.name, seed=9, steps=4, cfg=5.0, sampler="euler", scheduler="normal", batch=1,
                                 text=text))
    got = pictures(server, entry)[0]
    assert close(got, comfy_reference(kd, pipe, text, 9, 4, 5.0, "sample_euler", normal, 1)[0])
    # (the brackets read as text are another encoding)
    plain = pipe.encode_prompts([text]), pipe.encode_prompts([text], "ComfyUI")
    assert (plain[0]["context"] - plain[1]["context"]).abs().max() > 1e-3


def test_image_to_image_from_an_uploaded_picture(server, pipe, kd):
    rgb = np.random.default_rng(0).integers(0, 256, (19, 17, 3), dtype=np.uint8)  # (cropped to 16 x 18 by VAEEncode)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    r = requests.post(server.url + "/upload/image", files={"image": ("pic.png", buffer.getvalue(), "image/png")})
    assert r.status_code == 200 and r.json() == {"name": "pic.png", "subfolder": "", "type": "input"}
    r2 = requests.post(server.url + "/upload/image", files={"image": ("pic.png", buffer.getvalue(), "image/png")})
    assert r2.json()["name"] == "pic (1).png"  # (not overwritten unless asked)
    g = graph(server.name, seed=3, steps=4, cfg=4.0, sampler="euler", scheduler="normal", batch=1,
              latent=["11", 0], denoise=0.5)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "pic.png"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = pictures(server, entry)[0]
    assert got.shape == (18, 16, 3)
    pixels = torch.from_numpy(rgb[:18, :16].astype(np.float32) / 255.0)  # ((19 % 2) // 2 = 0 offsets)
    latent = pipe.vae.to_latent(pipe.vae_mode(pixels.permute(2, 0, 1)[None] * 2 - 1))
    want = comfy_reference(kd, pipe, "a red circle", 3, 4, 4.0, "sample_euler", normal, 1, latent=latent, denoise=0.5)
    assert close(got, want[0])


def test_a_base_and_finish_pair_of_advanced_samplers(server, pipe, kd):
    # (the two-pass graph of ComfyUI's SDXL base + refiner examples, on one model: the first pass stops at step 3
    # with its leftover noise, the second takes that latent on without adding noise)
    g = graph(server.name, batch=1)
    ks = g.pop("3")["inputs"]
    common = {k: ks[k] for k in ("model", "positive", "negative")}
    common.update(steps=6, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras")
    g["3"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "enable", "noise_seed": 12,
              "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 3, "return_with_leftover_noise": "enable"}}
    g["13"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "disable", "noise_seed": 12,
               "latent_image": ["3", 0], "start_at_step": 3, "end_at_step": 10000,
               "return_with_leftover_noise": "disable"}}
    g["8"]["inputs"]["samples"] = ["13", 0]
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    first = comfy_reference(kd, pipe, "a red circle", 12, 6, 5.0, "sample_dpmpp_2m", karras, 1,
                            window=(0, 3, False, True), decode=False)
    want = comfy_reference(kd, pipe, "a red circle", 12, 6, 5.0, "sample_dpmpp_2m", karras, 1, latent=first,
                           window=(3, 10000, True, False))
    assert close(pictures(server, entry)[0], want[0])


def test_a_hires_fix_graph_upscales_the_latent_and_samples_again(server, pipe, kd):
    g = graph(server.name, seed=31, steps=4, cfg=5.0, sampler="dpmpp_2m_sde_gpu", scheduler="karras", batch=1)
    g["10"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                         "width": 32, "height": 24, "crop": "disabled"}}
    g["11"] = {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "sampler_name": "euler", "denoise": 0.5,
                                                    "latent_image": ["10", 0]}}
    g["8"]["inputs"]["samples"] = ["11", 0]
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = pictures(server, entry)[0]
    assert got.shape == (24, 32, 3)

    # (the first pass: DPM++ 2M SDE on ComfyUI's one Brownian tree for the batch, seeded with the seed)
    cond, uncond = pipe.encode_prompts(["a red circle"], "ComfyUI", True), pipe.encode_prompts([""])

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c, e_u = pipe.unet(x, t, **cond), pipe.unet(x, t, **uncond)
            return e_u + (e_c - e_u) * 5.0

    den = kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)
    sigmas = karras(kd, den, 4)
    x = torch.randn((1, pipe.latent_channels, 8, 8), generator=torch.manual_seed(31)) * torch.sqrt(1 + sigmas[0] ** 2)
    with torch.no_grad():
        first = kd.sampling.sample_dpmpp_2m_sde(den, x, sigmas, disable=True, noise_sampler=kd.sampling.
                                                BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                         seed=31))
    up = torch.nn.functional.interpolate(first, size=(12, 16), mode="nearest-exact")
    want = comfy_reference(kd, pipe, "a red circle", 31, 4, 5.0, "sample_euler", karras, 1, latent=up, denoise=0.5)
    assert close(got, want[0])


def test_image_scale_and_invert_before_the_encoder(server, pipe, kd):
    # (ComfyUI's ImageScale "lanczos": each picture to 8 bits by truncation, Pillow's Lanczos, / 255; a width of 0 keeps
    # the aspect ratio; ImageInvert: 1 - x)
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    requests.post(server.url + "/upload/image", files={"image": ("wide.png", buffer.getvalue(), "image/png")},
                  data={"overwrite": "true"})
    g = graph(server.name, seed=8, steps=3, cfg=4.0, sampler="euler", scheduler="normal", batch=1, latent=["11", 0],
              denoise=0.6)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "wide.png"}}
    g["12"] = {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "lanczos", "width": 0,
                                                      "height": 12, "crop": "disabled"}}
    g["13"] = {"class_type": "ImageInvert", "inputs": {"image": ["12", 0]}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["4", 2]}}
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = pictures(server, entry)[0]
    assert got.shape == (12, 16, 3)
    loaded = rgb.astype(np.float32) / 255.0
    small = Image.fromarray(np.clip(255.0 * loaded, 0, 255).astype(np.uint8)).resize((16, 12), Image.LANCZOS)
    pixels = 1.0 - torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
    latent = pipe.vae.to_latent(pipe.vae_mode(pixels.permute(2, 0, 1)[None] * 2 - 1))
    want = comfy_reference(kd, pipe, "a red circle", 8, 3, 4.0, "sample_euler", normal, 1, latent=latent, denoise=0.6)
    assert close(got, want[0])
    big = {**g, "12": {**g["12"], "inputs": {**g["12"]["inputs"], "width": 4096, "height": 4096}}}
    _, entry = run(server, big)  # (past the server's size limit: the node's error, in ComfyUI's execution_error)
    error = entry["status"]["messages"][-1]
    assert error[0] == "execution_error" and error[1]["node_id"] == "12" and "limit" in error[1]["exception_message"]


def test_inpainting_with_a_noise_mask_from_the_pictures_alpha(server, pipe, kd):
    # (LoadImage's MASK is 1 - alpha: the transparent part is painted anew; SetLatentNoiseMask on VAEEncode's latent)
    rgba = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[4:12, 6:14, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    requests.post(server.url + "/upload/image", files={"image": ("holed.png", buffer.getvalue(), "image/png")},
                  data={"overwrite": "true"})
    g = graph(server.name, seed=14, steps=4, cfg=4.0, sampler="euler_ancestral", scheduler="karras", batch=1,
              latent=["14", 0])
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "holed.png"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["14"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    _, entry = run(server, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = pictures(server, entry)[0]
    pixels = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)
    latent = pipe.vae.to_latent(pipe.vae_mode(pixels.permute(2, 0, 1)[None] * 2 - 1))
    mask = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)[None]
    want = comfy_reference(kd, pipe, "a red circle", 14, 4, 4.0, "sample_euler_ancestral", karras, 1, latent=latent,
                           mask=mask)
    assert close(got, want[0])
    plain = comfy_reference(kd, pipe, "a red circle", 14, 4, 4.0, "sample_euler_ancestral", karras, 1, latent=latent)
    assert not close(got, plain[0])  # (the mask is read)
    g["3"]["inputs"]["sampler_name"] = "ddim"
    _, entry = run(server, g)
    assert "use euler" in entry["status"]["messages"][-1][1]["exception_message"]


def test_validation_errors_have_comfyuis_shape(server):
    g = graph(server.name)
    g["3"]["inputs"].update(sampler_name="nope", steps=0)
    del g["3"]["inputs"]["cfg"]
    r = requests.post(server.url + "/prompt", json={"prompt": g})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    kinds = {e["type"]: e for e in body["node_errors"]["3"]["errors"]}
    assert set(kinds) == {"value_not_in_list", "value_smaller_than_min", "required_input_missing"}
    assert kinds["required_input_missing"]["extra_info"]["input_name"] == "cfg"
    assert body["node_errors"]["3"]["class_type"] == "KSampler"
    assert body["node_errors"]["3"]["dependent_outputs"] == ["9"]
    no_out = graph(server.name)
    del no_out["9"]
    assert requests.post(server.url + "/prompt", json={"prompt": no_out}).json()["error"]["type"] == \
        "prompt_no_outputs"
    unknown = {**graph(server.name), "12": {"class_type": "SomeCustomNode", "inputs": {}}}
    r = requests.post(server.url + "/prompt", json={"prompt": unknown})
    assert r.status_code == 400 and r.json()["error"]["type"] == "missing_node_type"
    wrong = graph(server.name)
    wrong["8"]["inputs"]["samples"] = ["6", 0]  # (a CONDITIONING into a LATENT input)
    e = requests.post(server.url + "/prompt", json={"prompt": wrong}).json()["node_errors"]["8"]["errors"][0]
    assert e["type"] == "return_type_mismatch"
    assert requests.post(server.url + "/prompt", json={"prompt": graph("other.safetensors")}).json()[
        "node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    deep = graph(server.name)  # (a chain of 5000 latent upscales: refused, not a crash)
    for k in range(5000):
        deep[f"u{k}"] = {"class_type": "LatentUpscaleBy", "inputs": {
            "samples": [f"u{k - 1}" if k else "5", 0], "upscale_method": "area", "scale_by": 1.0}}
    deep["3"]["inputs"]["latent_image"] = ["u4999", 0]
    r = requests.post(server.url + "/prompt", json={"prompt": deep})
    assert r.status_code == 400 and "too deep" in r.json()["error"]["message"]


def test_the_socket_tells_the_run_and_queue_and_history_answer(server):
    import websockets

    async def listen():
        async with websockets.connect(server.url.replace("http", "ws") + "/ws?clientId=me") as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "status" and first["data"]["sid"] == "me"
            r = requests.post(server.url + "/prompt", json={"prompt": graph(server.name, steps=3, save="PreviewImage"),
                                                           "client_id": "me"})
            pid = r.json()["prompt_id"]
            seen = []
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if m["type"] == "status":
                    continue
                seen.append(m)
                if m["type"] == "executing" and m["data"]["node"] is None:
                    return pid, seen

    pid, seen = asyncio.run(listen())
    kinds = [m["type"] for m in seen]
    assert kinds[:2] == ["execution_start", "execution_cached"] and kinds[-2:] == ["execution_success", "executing"]
    progress = [m["data"] for m in seen if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3] and {p["max"] for p in progress} == {3}
    assert all(p["node"] == "3" and p["prompt_id"] == pid for p in progress)
    executed = [m["data"] for m in seen if m["type"] == "executed"]
    assert len(executed) == 1 and executed[0]["node"] == "9"
    assert [i["type"] for i in executed[0]["output"]["images"]] == ["temp", "temp"]
    order = [m["data"]["node"] for m in seen if m["type"] == "executing"]
    assert order.index("3") < order.index("8") < order.index("9")
    assert requests.get(server.url + "/queue").json() == {"queue_running": [], "queue_pending": []}
    assert pid in requests.get(server.url + "/history").json()
    assert requests.post(server.url + "/history", json={"delete": [pid]}).status_code == 200
    assert requests.get(f"{server.url}/history/{pid}").json() == {}


def test_view_refuses_paths_outside_its_folders(server):
    assert requests.get(server.url + "/view", params={"filename": "../x.png", "type": "output"}).status_code == 403
    assert requests.get(server.url + "/view", params={"filename": "missing.png"}).status_code == 404
    assert requests.get(server.url + "/view", params={"filename": "a.png", "type": "secret"}).status_code == 400


def test_object_info_lists_the_nodes_with_their_inputs(server):
    info = requests.get(server.url + "/api/object_info").json()
    assert {"KSampler", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode", "SaveImage", "LoadImage"} <= set(info)
    ks = info["KSampler"]
    assert ks["output"] == ["LATENT"] and ks["input"]["required"]["seed"][1]["max"] == 2**64 - 1
    assert "euler_ancestral" in ks["input"]["required"]["sampler_name"][0]
    assert info["SaveImage"]["output_node"] is True


def test_an_interrupt_ends_the_prompt_as_interrupted(server):
    g = graph(server.name, steps=40, batch=1)
    r = requests.post(server.url + "/prompt", json={"prompt": g})
    pid = r.json()["prompt_id"]
    t0 = time.time()
    while requests.get(server.url + "/queue").json()["queue_running"] == [] and time.time() - t0 < 30:
        time.sleep(0.01)
    requests.post(server.url + "/interrupt", json={"prompt_id": pid})
    _, entry = run_wait(server, pid)
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["outputs"] == {}


def test_a_folder_of_checkpoints_runs_each_prompt_on_the_one_it_names(tmp_path):
    """`imagine serve --ckpt-dir`: CheckpointLoaderSimple offers the folder's checkpoints; a prompt runs on the one it
    names (its picture that of a server serving only that model), the queue and history are one across models."""
    import argparse

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server import cli
    from imagine.testing import make_tiny_model

    make_tiny_model(tmp_path / "models" / "alpha", seed=0)
    make_tiny_model(tmp_path / "models" / "sub" / "beta", seed=5)
    config = ServerConfig(max_width=64, max_height=64, max_steps=20)
    truth = {}
    for name in ("alpha", "sub/beta"):
        app = create_app(TextToImagePipeline.from_pretrained(tmp_path / "models" / name), config, model_name=name,
                         comfyui=str(tmp_path / ("alone-" + name.replace("/", "-"))))
        with BackgroundServer(app) as srv:
            truth[name] = pictures(srv, run(srv, graph(name, batch=1))[1])[0]
    assert not np.array_equal(truth["alpha"], truth["sub/beta"])
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--ckpt-dir", str(tmp_path / "models"), "--threads", "1",
                         "--comfyui-dir", str(tmp_path / "comfy")])
    import gc
    import threading
    import weakref

    import websockets.sync.client

    server = cli._checkpoint_server(args, config, None)
    with BackgroundServer(server) as srv:
        info = requests.get(srv.url + "/object_info/CheckpointLoaderSimple").json()
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["alpha", "sub/beta"]
        # a client's socket open across the changes of model: it hears every prompt, and keeps no model in memory
        with websockets.sync.client.connect(srv.url.replace("http", "ws") + "/ws?clientId=c1") as socket:
            heard: list[dict] = []
            listening = threading.Thread(target=lambda: [heard.append(json.loads(m)) for m in socket], daemon=True)
            listening.start()
            done, models = [], [weakref.ref(server.app.state.pipe)]  # (the one the socket came in on, too)
            for name in ("sub/beta", "alpha", "sub/beta"):
                pid, entry = run(srv, graph(name, batch=1), client_id="c1")
                assert np.array_equal(pictures(srv, entry)[0], truth[name]), name
                done.append(pid)
                models.append(weakref.ref(server.app.state.pipe))
            gc.collect()
            assert [m() is None for m in models] == [True, True, True, False]  # (those switched from are gone)
            t0 = time.time()
            while sum(m["type"] == "execution_success" for m in heard) < 3 and time.time() - t0 < 30:
                time.sleep(0.05)
            assert [m["data"]["prompt_id"] for m in heard if m["type"] == "execution_success"] == done
        assert set(done) <= set(requests.get(srv.url + "/history").json())  # (one history across the models)
        assert requests.get(srv.url + "/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sub/beta")
        # a prompt naming two (session 39): it runs on the one served, the other loaded beside it for its nodes
        two = {**graph("alpha", batch=1), "20": {"class_type": "CheckpointLoaderSimple",
                                                 "inputs": {"ckpt_name": "sub/beta"}}}
        _, entry = run(srv, two)
        assert np.array_equal(pictures(srv, entry)[0], truth["alpha"])
        assert server.current.name == "sub/beta" and sorted(c.name for c in server._apps) == ["alpha", "sub/beta"]
        r = requests.post(srv.url + "/prompt", json={"prompt": graph("gamma.safetensors")})
        assert r.json()["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
        # files saved under --comfyui-dir, one counter across the models
        assert sorted(p.name for p in (tmp_path / "comfy" / "output").iterdir()) == [
            "ComfyUI_00001_.png", "ComfyUI_00002_.png", "ComfyUI_00003_.png", "ComfyUI_00004_.png"]


def test_lora_loaders_merge_their_files_at_their_strengths(tmp_path):
    """LoraLoader (U-Net and text encoder strengths apart) and LoraLoaderModelOnly on files of serve --lora-dir: the
    pictures of a model with those LoRAs merged at load at the same strengths (the merge itself is held to diffusers'
    in tests/test_lora.py), and afterwards, without them, the plain model's again."""
    from safetensors.torch import save_file

    from imagine.pipelines.text_to_image import TextToImagePipeline
    from test_loading import save_diffusers_folder
    from test_lora import _kohya_lora

    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    (tmp_path / "loras").mkdir()
    save_file(_kohya_lora(ref.unet, ref.text_encoder, seed=0), str(tmp_path / "loras" / "style.safetensors"))
    config = ServerConfig(max_width=64, max_height=64, max_steps=20)

    def lora_graph(name, *loaders):
        g = graph(name, batch=1, sampler="euler", scheduler="normal")
        g["5"]["inputs"].update(width=32, height=32)
        for k, (kind, inputs) in enumerate(loaders):
            nid, before = str(20 + k), str(20 + k - 1) if k else "4"
            g[nid] = {"class_type": kind, "inputs": {**inputs, "model": [before, 0], "lora_name": "style.safetensors",
                                                    **({"clip": [before, 1]} if kind == "LoraLoader" else {})}}
            g["3"]["inputs"]["model"] = [nid, 0]
            if kind == "LoraLoader":
                g["6"]["inputs"]["clip"] = g["7"]["inputs"]["clip"] = [nid, 1]
        return g

    def picture(pipe, g):
        app = create_app(pipe, config, model_name="folder", comfyui=str(tmp_path / f"c{len(list(tmp_path.iterdir()))}"))
        with BackgroundServer(app) as srv:
            _, entry = run(srv, g)
            assert entry["status"]["status_str"] == "success", entry["status"]
            return pictures(srv, entry)[0]

    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    pipe.lora_dir = tmp_path / "loras"
    plain = picture(pipe, lora_graph("folder"))
    both = picture(pipe, lora_graph("folder", ("LoraLoader", {"strength_model": 0.7, "strength_clip": 0.4})))
    model_only = picture(pipe, lora_graph("folder", ("LoraLoaderModelOnly", {"strength_model": 0.3}),
                                          ("LoraLoaderModelOnly", {"strength_model": 0.4})))  # (they add: 0.7)
    assert np.array_equal(picture(pipe, lora_graph("folder")), plain)  # (the weights put back exactly)
    file = tmp_path / "loras" / "style.safetensors"
    for got, strengths in ((both, (0.4, 0.7)), (model_only, (0.0, 0.7))):
        merged = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(file, strengths)])
        assert np.array_equal(got, picture(merged, lora_graph("folder"))), strengths
    assert not np.array_equal(both, plain) and not np.array_equal(both, model_only)
