"""`imagine serve` on pixel cascade folders (session 33): imagine.server.cascade behind the same app, AUTOMATIC1111's
and OpenAI's endpoints.

Imagen: the truth is ImagenPipeline.sample on the same folder (itself checked against imagen-pytorch 2.1.0 in
test_imagen_s31 / test_imagen_cli_s31): a served picture must be the one sample makes from the same seed, to the pixel,
at any batch size (per-image seeds). Karlo: diffusers' UnCLIPPipeline on the same weights with the seed's generator,
within one 8-bit level (test_karlo_s30's bound). What a cascade does not run must be a 422 that names it."""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from test_imagen_cli_s31 import PROMPT, checkpoint, folder  # noqa: F401 (fixtures: tiny two-stage cascades, 8 -> 16 px)

from imagine.pipelines.imagen import ImagenPipeline  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402
from imagine.server.cascade import IFServing, ImagenServing, KarloServing, _overall  # noqa: E402
from test_cascade_if_s29 import parts  # noqa: E402,F401 (fixture: tiny IF stages I and II, diffusers' and ours)
from test_karlo_s30 import karlo  # noqa: E402,F401 (fixture: a tiny Karlo folder, diffusers' pipeline, ours)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16  # (the cascade's last stage)


@pytest.fixture(scope="module")
def pipe(folder):  # noqa: F811
    return ImagenPipeline.from_pretrained(folder[0])


@pytest.fixture(scope="module")
def server(pipe, folder):  # noqa: F811
    app = create_app(ImagenServing(pipe, source=str(folder[0])), ServerConfig(max_batch=4, max_steps=20))
    with BackgroundServer(app) as srv:
        yield srv


def pixels(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def txt2img(srv, **kw) -> requests.Response:
    body = {"prompt": PROMPT, "seed": 4, "steps": 3, "cfg_scale": 2.0, "width": SIZE, "height": SIZE, **kw}
    return requests.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=120)


def test_txt2img_pictures_are_the_pipelines_at_any_batch(server, pipe):
    """A1111's txt2img, a batch of 2 with DPM++ 2M: sample's pictures from seeds 4 and 5; OpenAI's generations with
    seed 5 alone: the second of them (the batch does not change a picture)."""
    r = txt2img(server, sampler_name="DPM++ 2M", batch_size=2)
    assert r.status_code == 200, r.text
    got = [pixels(decoded(b)) for b in r.json()["images"]]
    want = pipe.sample([PROMPT] * 2, seeds=[4, 5], steps=3, cond_scale=2.0, sampler="dpmpp_2m", output_type="pil",
                       progress=False)
    assert [g.shape for g in got] == [(SIZE, SIZE, 3)] * 2
    assert all(np.array_equal(g, pixels(w)) for g, w in zip(got, want))
    assert not np.array_equal(got[0], got[1]) and got[0].std() > 10
    info = r.json()["info"]
    assert '"all_seeds": [4, 5]' in info and "DPM++ 2M" in info
    r = requests.post(server.url + "/v1/images/generations", timeout=120,
                      json={"prompt": PROMPT, "n": 1, "size": f"{SIZE}x{SIZE}", "seed": 5, "steps": 3,
                            "guidance_scale": 2.0, "sampler": "dpmpp_2m", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(decoded(r.json()["data"][0]["b64_json"])), got[1])


def test_defaults_and_listings_are_the_cascades(server, pipe):
    """No sampler, steps or scale: the folder's (3 steps, guidance 2) with the cascade's own sampler (DDPM); the
    samplers and schedule types listed are the cascade's."""
    r = txt2img(server, steps=None, cfg_scale=None, seed=7)
    assert r.status_code == 200, r.text
    want = pipe.sample([PROMPT], seeds=[7], steps=3, cond_scale=2.0, output_type="pil", progress=False)[0]
    assert np.array_equal(pixels(decoded(r.json()["images"][0])), pixels(want))
    listed = {s["options"]["imagine"] for s in requests.get(server.url + "/sdapi/v1/samplers", timeout=30).json()}
    assert listed == set(pipe.samplers)
    types = [s["label"] for s in requests.get(server.url + "/sdapi/v1/schedulers", timeout=30).json()]
    assert types == ["Automatic", "Uniform", "Karras"]
    # a Karras grid asked by its A1111 scheduler name: sample's schedule_type "karras"
    r = txt2img(server, sampler_name="DPM++ 2M", scheduler="Karras")
    assert r.status_code == 200, r.text
    want = pipe.sample([PROMPT], seeds=[4], steps=3, cond_scale=2.0, sampler="dpmpp_2m", schedule_type="karras",
                       output_type="pil", progress=False)[0]
    assert np.array_equal(pixels(decoded(r.json()["images"][0])), pixels(want))


def test_emphasis_is_read(server, pipe):
    """A1111's (word:1.5): the states weighted as sample(emphasis=True) weights them, a picture of its own."""
    prompt = "a (red:1.5) circle"
    r = txt2img(server, prompt=prompt, sampler_name="DDIM")
    assert r.status_code == 200, r.text
    got = pixels(decoded(r.json()["images"][0]))
    kw = dict(seeds=[4], steps=3, cond_scale=2.0, sampler="ddim", output_type="pil", progress=False)
    assert np.array_equal(got, pixels(pipe.sample([prompt], emphasis=True, **kw)[0]))
    assert not np.array_equal(got, pixels(pipe.sample([prompt], **kw)[0]))


def test_img2img_is_stage_one_image_to_image(server, pipe):
    """A1111's img2img: sample's init_image / strength (SDEdit at stage 1) on the picture."""
    start = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    body = {"prompt": PROMPT, "seed": 3, "steps": 4, "cfg_scale": 2.0, "width": SIZE, "height": SIZE,
            "sampler_name": "DDIM", "init_images": [b64png(start)], "denoising_strength": 0.5}
    r = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = pipe.sample([PROMPT], seeds=[3], steps=4, cond_scale=2.0, sampler="ddim", init_image=[start],
                       strength=0.5, output_type="pil", progress=False)[0]
    assert np.array_equal(pixels(decoded(r.json()["images"][0])), pixels(want))


@pytest.mark.parametrize("change, named", [
    ({"negative_prompt": "blue"}, "no negative prompt"),
    ({"width": 32, "height": 32}, f"{SIZE}x{SIZE} pictures"),
    ({"sampler_name": "LMS"}, "unknown sampler"),
    ({"prompt": "a red circle AND a blue square"}, "AND"),
    ({"prompt": "a [red:blue:0.5] circle"}, "prompt editing"),
    ({"subseed_strength": 0.5, "subseed": 3}, "variation seeds"),
    ({"enable_hr": True, "hr_scale": 2}, "hires. fix"),
    ({"sampler_name": "DDIM", "eta": 0.5}, "runs at eta 0"),
])
def test_what_a_cascade_does_not_run_is_refused_by_name(server, change, named):
    r = txt2img(server, **change)
    assert r.status_code == 422, (change, r.status_code, r.text[:300])
    assert named in r.text, r.text[:500]


def test_progress_counts_every_stage():
    """The stages' reports as one count: stage 2's steps follow stage 1's, out of the whole cascade's."""
    seen = []
    report = _overall(seen.append, {1: 3, 2: 3})
    for stage, total in ((1, 2), (2, 3)):  # (stage 1 ran 2 of its steps: image to image)
        for k in range(total):
            report({"stage": stage, "step": k, "total": total})
    assert [(d["step"], d["total"]) for d in seen] == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]


def test_serve_loads_a_cascade_and_refuses_latent_flags(folder, tmp_path):  # noqa: F811
    from imagine.server.cli import _cascade

    args = argparse.Namespace(model=str(folder[0]), vae=None, lora=[], lora_dir=None, embedding=[], controlnet=[],
                              refiner=None, clip_skip=None, dtype="float32", precision="exact",
                              text_encoder=None, ema_weights=False)
    served = _cascade(args, ServerConfig(max_steps=20))
    assert isinstance(served, ImagenServing) and served.defaults["height"] == SIZE
    assert served.defaults["steps"] == 3 and served.defaults["sampler"] == "ddpm"
    with pytest.raises(ValueError, match="--lora, --clip-skip change a latent model"):
        _cascade(argparse.Namespace(**{**vars(args), "lora": ["x.safetensors"], "clip_skip": 1}), ServerConfig())
    other = tmp_path / "if"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "IFPipeline"}')
    with pytest.raises(ValueError, match="is not a diffusers IF folder: it needs unet/ and scheduler/"):
        _cascade(argparse.Namespace(**{**vars(args), "model": str(other)}), ServerConfig())
    assert _cascade(argparse.Namespace(**{**vars(args), "model": str(tmp_path)}), ServerConfig()) is None


@pytest.fixture(scope="module")
def karlo_server(karlo):  # noqa: F811
    folder, _, ours = karlo
    app = create_app(KarloServing(ours, source=str(folder)), ServerConfig(max_batch=4))
    with BackgroundServer(app) as srv:
        yield srv


def test_karlo_txt2img_is_diffusers_unclip_per_seed(karlo_server, karlo):  # noqa: F811
    """Karlo's cascade served: the request's steps and guidance are the decoder's, the prior and super-resolution
    stage at diffusers' defaults (25 steps, guidance 4; 7 steps); each image diffusers' picture for its seed."""
    _, ref, _ = karlo
    body = {"prompt": "horse", "seed": 3, "steps": 3, "cfg_scale": 5.0, "width": 64, "height": 64, "batch_size": 2}
    r = requests.post(karlo_server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    for b64, seed in zip(r.json()["images"], (3, 4)):
        want = ref("horse", decoder_num_inference_steps=3, decoder_guidance_scale=5.0, output_type="np",
                   generator=torch.Generator().manual_seed(seed)).images[0]
        assert np.abs(pixels(decoded(b64)) - np.round(want * 255).astype(int)).max() <= 1
    names = [s["name"] for s in requests.get(karlo_server.url + "/sdapi/v1/samplers", timeout=30).json()]
    assert names == ["DDPM"]
    types = [s["label"] for s in requests.get(karlo_server.url + "/sdapi/v1/schedulers", timeout=30).json()]
    assert types == ["Automatic"]


@pytest.mark.parametrize("change, named", [
    ({"prompt": "a (horse:1.3)"}, "does not read AUTOMATIC1111's emphasis"),
    ({"scheduler": "Karras"}, "schedule type 'karras'"),
    ({"steps": 1}, "runs 2 or more"),
    ({"width": 32, "height": 32}, "64x64 pictures"),
])
def test_karlo_refusals(karlo_server, change, named):
    body = {"prompt": "horse", "seed": 3, "steps": 3, "width": 64, "height": 64, **change}
    r = requests.post(karlo_server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 422 and named in r.text, (r.status_code, r.text[:400])


def test_karlo_takes_no_init_picture(karlo_server, karlo):  # noqa: F811
    start = b64png(Image.new("RGB", (64, 64), (200, 10, 10)))
    r = requests.post(karlo_server.url + "/sdapi/v1/img2img", timeout=120,
                      json={"prompt": "horse", "seed": 3, "steps": 3, "width": 64, "height": 64,
                            "init_images": [start], "denoising_strength": 0.5})
    assert r.status_code == 422 and "img2img (an init picture)" in r.text, r.text[:400]
    from imagine.server.cli import _cascade

    args = argparse.Namespace(model=str(karlo[0]), vae=None, lora=[], lora_dir=None, embedding=[], controlnet=[],
                              refiner=None, clip_skip=None, dtype="float32", precision="exact",
                              text_encoder=None, ema_weights=False)
    served = _cascade(args, ServerConfig())
    assert isinstance(served, KarloServing) and served.defaults == {"height": 64, "width": 64, "sampler": "ddpm",
                                                                     "steps": 25, "guidance_scale": 8.0}
    fast = _cascade(argparse.Namespace(**{**vars(args), "precision": "fast", "dtype": "bfloat16"}), ServerConfig())
    assert next(fast.pipe.decoder.parameters()).dtype == torch.bfloat16  # (its fast form: bf16 weights)


def test_an_elucidated_cascade_serves_its_own_sampler_and_levels():
    """An ElucidatedImagen: Heun (Algorithm 2) at its num_sample_steps by default, on Karras' levels only."""
    import test_elucidated_imagen_s32 as s32
    from imagine.pipelines.elucidated_imagen import SAMPLERS

    served = ImagenServing(s32.ours_of(s32.build()))
    assert served.defaults["sampler"] == "heun" and served.defaults["steps"] == s32.STEPS[0]  # (stage 1's)
    assert served.schedule_types == ("karras",) and served.sampler_names == list(SAMPLERS)
    assert served.description == "an ElucidatedImagen cascade"
    with pytest.raises(ValueError, match="stages run on 'karras' levels"):
        served.generate(["a circle"], seeds=[1], steps=2, guidance_scale=1.0, sampler="heun", height=SIZE, width=SIZE,
                        sigma_schedule="uniform")


def test_img2img_with_a_mask_is_repaint(server, pipe):
    """A1111's inpainting (white: painted anew) on an Imagen cascade: ImagenPipeline.sample's RePaint at strength 1
    (the painted part from noise, 5 passes a step), the kept part the picture's own (A1111's paste back)."""
    start = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 2, 0, SIZE, SIZE))  # (the right half painted anew)
    body = {"prompt": PROMPT, "seed": 3, "steps": 3, "cfg_scale": 2.0, "width": SIZE, "height": SIZE,
            "init_images": [b64png(start)], "mask": b64png(mask), "mask_blur": 0, "inpainting_fill": 1,
            "denoising_strength": 1.0}
    r = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = pixels(decoded(r.json()["images"][0]))
    keep = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    keep[..., :SIZE // 2] = True
    want = pixels(pipe.sample([PROMPT], seeds=[3], steps=3, cond_scale=2.0, inpaint_images=[start],
                              inpaint_masks=keep, output_type="pil", progress=False)[0])
    assert np.array_equal(got[:, SIZE // 2:], want[:, SIZE // 2:])
    assert np.array_equal(got[:, :SIZE // 2], pixels(start)[:, :SIZE // 2])
    r = requests.post(server.url + "/sdapi/v1/img2img", json={**body, "sampler_name": "DDIM"}, timeout=120)
    assert r.status_code == 422 and "RePaint" in r.text and "use 'ddpm'" in r.text, r.text[:300]


@pytest.fixture(scope="module")
def if_server(parts):
    _, _, first, second = parts
    app = create_app(IFServing(first, second, source="if"), ServerConfig(max_batch=4))
    with BackgroundServer(app) as srv:
        yield srv


def test_if_txt2img_is_diffusers_chained_per_seed(if_server, parts):
    """DeepFloyd IF served (stage I at the request's steps, guidance and sampler, stage II at diffusers' defaults: 50
    steps, guidance 4, noise level 250), the negative prompt read: each image diffusers' IFPipeline then
    IFSuperResolutionPipeline chained with its seed's generator (diffusers' IF documentation), 50 dB or more."""
    import diffusers
    from test_cascade_if_s29 import SCHEDULER, psnr

    theirs_1, theirs_2, _, _ = parts
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 3, "steps": 4, "cfg_scale": 5.0,
            "width": 32, "height": 32, "batch_size": 2, "sampler_name": "DPM++ 2M"}
    r = requests.post(if_server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    cond, uncond = theirs_1.encode_prompt("a red circle", negative_prompt="blue", clean_caption=False)
    kept = theirs_1.scheduler, theirs_2.scheduler
    for pipe_ in (theirs_1, theirs_2):  # (DPM++ 2M from the stages' DDPM config, as imagine runs it)
        pipe_.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SCHEDULER)
    for b64, seed in zip(r.json()["images"], (3, 4)):
        g = torch.Generator().manual_seed(seed)
        low = theirs_1(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, generator=g,
                       guidance_scale=5.0, output_type="pt").images
        want = theirs_2(image=low, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=50,
                        generator=g, guidance_scale=4.0, noise_level=250).images
        assert psnr([decoded(b64)], want) >= 50
    theirs_1.scheduler, theirs_2.scheduler = kept
    r = requests.post(if_server.url + "/sdapi/v1/txt2img", json={**body, "sampler_name": "LMS"}, timeout=120)
    assert r.status_code == 422 and "unknown sampler" in r.text


def test_serve_loads_if_stages_and_refuses_a_misplaced_stage_2(parts, folder, tmp_path):  # noqa: F811
    from imagine.server.cli import _cascade

    theirs_1, theirs_2, _, _ = parts
    theirs_1.save_pretrained(tmp_path / "one")
    theirs_2.save_pretrained(tmp_path / "two")
    args = argparse.Namespace(model=str(tmp_path / "one"), stage_2=str(tmp_path / "two"), vae=None, lora=[],
                              lora_dir=None, embedding=[], controlnet=[], refiner=None, clip_skip=None,
                              dtype="float32", precision="exact")
    served = _cascade(args, ServerConfig())
    assert isinstance(served, IFServing) and served.size == 32 and served.defaults["steps"] == 100
    alone = _cascade(argparse.Namespace(**{**vars(args), "stage_2": None}), ServerConfig())
    assert alone.size == 16 and alone.second is None
    with pytest.raises(ValueError, match="serve stage I .* with it as --stage-2"):
        _cascade(argparse.Namespace(**{**vars(args), "model": str(tmp_path / "two"), "stage_2": None}),
                 ServerConfig())
    with pytest.raises(ValueError, match="--stage-2 is DeepFloyd IF's super-resolution stage"):
        _cascade(argparse.Namespace(**{**vars(args), "model": str(folder[0])}), ServerConfig())


def test_serve_loads_an_imagen_pytorch_checkpoint(checkpoint, folder, tmp_path):  # noqa: F811
    """`imagine serve --model FILE --text-encoder T5 [--ema-weights]`, as `imagine generate` loads it (one function):
    the checkpoint's EMA unets; the flags refused where they do not apply."""
    from imagine.server.cli import _cascade

    path, t5_folder, loaded = checkpoint
    args = argparse.Namespace(model=str(path), vae=None, lora=[], lora_dir=None, embedding=[], controlnet=[],
                              refiner=None, clip_skip=None, dtype="float32", precision="exact",
                              text_encoder=str(t5_folder), ema_weights=True)
    served = _cascade(args, ServerConfig(max_steps=20))
    assert isinstance(served, ImagenServing) and served.size == SIZE and served.defaults["steps"] == 6  # (its T)
    want = loaded[True].unets[0].state_dict()
    got = served.pipe.unets[0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if k in got) and len(set(got) & set(want)) > 10
    with pytest.raises(ValueError, match="give --text-encoder FOLDER"):
        _cascade(argparse.Namespace(**{**vars(args), "text_encoder": None}), ServerConfig())
    with pytest.raises(ValueError, match="--ema-weights is for an imagen-pytorch checkpoint"):
        _cascade(argparse.Namespace(**{**vars(args), "model": str(tmp_path), "text_encoder": None}), ServerConfig())
