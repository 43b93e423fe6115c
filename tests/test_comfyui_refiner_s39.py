"""Two checkpoints in one ComfyUI prompt (`imagine serve --ckpt-dir`): ComfyUI's SDXL base + refiner graph (its
sdxl_refiner_prompt_example: two CheckpointLoaderSimple nodes, the base's KSamplerAdvanced stopping at step 8 of 10 with
its leftover noise, the refiner's taking that latent on without adding noise, the base's VAE decoding), and
CLIPTextEncodeSDXLRefiner.

The picture is held to ComfyUI's two passes restated with k-diffusion's Euler over each model's own U-Net and text
encodings: the base with its size codes (h, w, 0, 0, h, w), the refiner with (h, w, 0, 0, 6) on the prompt and
(h, w, 0, 0, 2.5) on the negative (ComfyUI's SDXLRefiner.encode_adm reads the prompt type), or what
CLIPTextEncodeSDXLRefiner sets ((height, width, 0, 0, ascore) on either side)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import requests
import torch

from imagine.server.app import BackgroundServer, ServerConfig
from test_comfyui_api_s35 import close, pictures, run
from test_k_diffusion import kd  # noqa: F401 (the fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE, SEED, CFG, STEPS, SWITCH, SIZE = "a red circle", "a blue square", 11, 5.0, 10, 8, 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the checkpoint server, its models' folder): base and refiner as diffusers folders, the refiner sharing the
    base's VAE and bigG tower as SDXL's does; one model in memory unless a prompt needs two."""
    from imagine.server import cli
    from test_loading import make_scheduler
    from test_refiner import tiny_refiner_unet
    from test_sdxl import save_sdxl_folder
    from test_sdxl_single_file import PROJ

    root = tmp_path_factory.mktemp("two")
    base = save_sdxl_folder(root / "models" / "base", scheduler="euler")
    unet = tiny_refiner_unet()
    with torch.no_grad():  # (the size codes' part of its added embedding made louder: a score's change shows at 8 bits)
        unet.add_embedding.linear_1.weight[:, PROJ:] *= 20
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=make_scheduler("euler"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.save_pretrained(root / "models" / "refiner", safe_serialization=True)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--ckpt-dir", str(root / "models"), "--threads", "1", "--comfyui-dir", str(root / "comfy")])
    server = cli._checkpoint_server(args, ServerConfig(max_width=64, max_height=64, max_steps=20), None)
    return server, root / "models"


def refiner_graph(base="base", refiner="refiner", refiner_text=None, switch=SWITCH):
    """ComfyUI's SDXL refiner example, API format; `refiner_text`: CLIPTextEncodeSDXLRefiner inputs for the refiner's
    two texts ((ascore, width, height) positive, negative) in place of plain CLIPTextEncodes."""
    g = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
         "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
         "15": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["12", 1]}},
         "16": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["12", 1]}},
         "10": {"class_type": "KSamplerAdvanced", "inputs": {
             "model": ["4", 0], "add_noise": "enable", "noise_seed": SEED, "steps": STEPS, "cfg": CFG,
             "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
             "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": switch,
             "return_with_leftover_noise": "enable"}},
         "11": {"class_type": "KSamplerAdvanced", "inputs": {
             "model": ["12", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": CFG,
             "sampler_name": "euler", "scheduler": "normal", "positive": ["15", 0], "negative": ["16", 0],
             "latent_image": ["10", 0], "start_at_step": switch, "end_at_step": 10000,
             "return_with_leftover_noise": "disable"}},
         "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
         "9": {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "refined"}}}
    if refiner_text is not None:
        for nid, text, (ascore, w, h) in (("15", PROMPT, refiner_text[0]), ("16", NEGATIVE, refiner_text[1])):
            g[nid] = {"class_type": "CLIPTextEncodeSDXLRefiner",
                      "inputs": {"ascore": ascore, "width": w, "height": h, "text": text, "clip": ["12", 1]}}
    return g


def guided_denoiser(kd, pipe, time_ids):
    """ComfyUI's cfg over a model's U-Net: its own encodings of the prompt and the negative, with their size codes."""
    cond, uncond = (pipe.encode_prompts([t], "ComfyUI", True) for t in (PROMPT, NEGATIVE))

    class Guided(torch.nn.Module):
        def forward(self, x, t, **kw):
            t = t.float().expand(x.shape[0])
            e_c = pipe.unet(x, t, **cond, time_ids=time_ids[0])
            e_u = pipe.unet(x, t, **uncond, time_ids=time_ids[1])
            return e_u + (e_c - e_u) * CFG

    return kd.external.DiscreteEpsDDPMDenoiser(Guided(), pipe.schedule.alphas_cumprod.float(), quantize=True)


def reference(kd, base, refiner, refiner_codes, switch=SWITCH) -> np.ndarray:
    """ComfyUI's two KSamplerAdvanced passes and VAEDecode -> SaveImage (8 bits by truncation)."""
    codes = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    den_b = guided_denoiser(kd, base, (codes, codes))
    den_r = guided_denoiser(kd, refiner, refiner_codes)
    sigmas = den_b.get_sigmas(STEPS)
    z = torch.randn(1, 4, SIZE // base.scale, SIZE // base.scale, generator=torch.manual_seed(SEED))
    with torch.no_grad():
        x = kd.sampling.sample_euler(den_b, z * torch.sqrt(1 + sigmas[0] ** 2), sigmas[:switch + 1], disable=True)
        if switch < STEPS:  # (the second pass: no noise added, from the level the first stopped at)
            x = kd.sampling.sample_euler(den_r, x, sigmas[switch:], disable=True)
        image = ((base.decode(x) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)[0]
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


def _codes(h, w, score):
    return torch.tensor([[h, w, 0, 0, score]], dtype=torch.float32)


def test_the_sdxl_refiner_graph_runs_base_then_refiner_as_comfyui(served, kd):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    server, models = served
    listed = refiner_graph()
    # (the refiner's texts as ComfyUI's conditioning lists, through a timestep range over the whole run: the negative
    # keeps its own score there too)
    for nid in ("15", "16"):
        listed[nid + "r"] = {"class_type": "ConditioningSetTimestepRange",
                             "inputs": {"conditioning": [nid, 0], "start": 0.0, "end": 1.0}}
    listed["11"]["inputs"].update(positive=["15r", 0], negative=["16r", 0])
    with BackgroundServer(server) as srv:
        _, entry = run(srv, refiner_graph())
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)[0]
        # both models were in memory for the prompt (one unless told): the refiner beside the base it ran on
        assert sorted(c.name for c in server._apps) == ["base", "refiner"] and server.current.name == "base"
        # the same graph again: nothing loads, nothing leaves (the node cache gives the same picture back)
        apps = dict(server._apps)
        _, again = run(srv, refiner_graph())
        assert dict(server._apps) == apps and np.array_equal(pictures(srv, again)[0], got)
        _, entry = run(srv, listed)
        assert entry["status"]["status_str"] == "success", entry["status"]
        got_listed = pictures(srv, entry)[0]
    base = TextToImagePipeline.from_pretrained(models / "base")
    refiner = TextToImagePipeline.from_pretrained(models / "refiner")
    want = reference(kd, base, refiner, (_codes(SIZE, SIZE, 6.0), _codes(SIZE, SIZE, 2.5)))
    assert close(got, want) and close(got_listed, want)
    # the refiner's two steps and its scores reach the picture: the base alone to the end, or the refiner told the
    # prompt's score on both sides, is another picture
    assert not close(got, reference(kd, base, refiner, None, switch=STEPS))
    assert not close(got, reference(kd, base, refiner, (_codes(SIZE, SIZE, 6.0), _codes(SIZE, SIZE, 6.0))))


def test_clip_text_encode_sdxl_refiner_sets_the_refiners_size_and_score(served, kd):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    server, models = served
    texts = ((9.0, 40, 48), (1.5, 24, 16))  # ((ascore, width, height) of the prompt, of the negative)
    with BackgroundServer(server) as srv:
        _, entry = run(srv, refiner_graph(refiner_text=texts))
        assert entry["status"]["status_str"] == "success", entry["status"]
        got = pictures(srv, entry)[0]
        info = requests.get(srv.url + "/object_info/CLIPTextEncodeSDXLRefiner").json()["CLIPTextEncodeSDXLRefiner"]
        assert list(info["input"]["required"]) == ["ascore", "width", "height", "text", "clip"]
        assert info["input"]["required"]["ascore"][1]["default"] == 6.0
    base = TextToImagePipeline.from_pretrained(models / "base")
    refiner = TextToImagePipeline.from_pretrained(models / "refiner")
    assert close(got, reference(kd, base, refiner, (_codes(48, 40, 9.0), _codes(16, 24, 1.5))))
    assert not close(got, reference(kd, base, refiner, (_codes(SIZE, SIZE, 6.0), _codes(SIZE, SIZE, 2.5))))


def test_a_model_with_another_checkpoints_texts_is_a_clear_error_and_memory_goes_back_to_one(served):
    server, _ = served
    g = refiner_graph()
    g["11"]["inputs"]["positive"], g["11"]["inputs"]["negative"] = ["6", 0], ["7", 0]  # (the base's CLIP's)
    with BackgroundServer(server) as srv:
        _, entry = run(srv, g)
        assert entry["status"]["status_str"] == "error"
        message = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
        assert "'base'" in message and "'refiner'" in message and "its own text encoder" in message
        # a prompt on the refiner alone: it is served, the base leaves memory (one model unless told)
        alone = {k: v for k, v in refiner_graph().items() if k in ("12", "5", "15", "16")}
        alone["11"] = {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "seed": 1, "steps": 2, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["15", 0], "negative": ["16", 0], "latent_image": ["5", 0], "denoise": 1.0}}
        alone["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}}
        alone["9"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "alone"}}
        _, entry = run(srv, alone)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert [c.name for c in server._apps] == ["refiner"] and server.current.name == "refiner"
        # a name the folder lacks, beside one it has: ComfyUI's validation error
        r = requests.post(srv.url + "/prompt", json={"prompt": refiner_graph(refiner="gamma.safetensors")})
        assert r.json()["node_errors"]["12"]["errors"][0]["type"] == "value_not_in_list"


def test_a_second_checkpoint_that_does_not_load_is_a_validation_error(tmp_path):
    """A prompt naming a checkpoint that fails to load beside the served one gets ComfyUI's 400 naming it; the
    served model stays and serves the next prompt."""
    from imagine.server import cli
    from imagine.testing import make_tiny_model
    from test_comfyui_api_s35 import graph

    make_tiny_model(tmp_path / "models" / "alpha", seed=0)
    (tmp_path / "models" / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--ckpt-dir", str(tmp_path / "models"), "--model", str(tmp_path / "models" / "alpha"),
                         "--threads", "1", "--comfyui-dir", str(tmp_path / "comfy")])
    server = cli._checkpoint_server(args, ServerConfig(max_width=64, max_height=64, max_steps=20), None)
    with BackgroundServer(server) as srv:
        two = {**graph("alpha", batch=1), "20": {"class_type": "CheckpointLoaderSimple",
                                                 "inputs": {"ckpt_name": "broken.safetensors"}}}
        r = requests.post(srv.url + "/prompt", json={"prompt": two})
        assert r.status_code == 400 and "broken.safetensors did not load" in r.json()["error"]["message"]
        assert [c.name for c in server._apps] == ["alpha"]
        _, entry = run(srv, graph("alpha", batch=1))
        assert entry["status"]["status_str"] == "success", entry["status"]
