"""SDXL's refiner (Podell et al. 2023, sec. 2.5; imagine.refiner), against diffusers on the same tiny random weights:

- a refiner folder (the bigG tower alone, a U-Net whose added embedding takes five numbers: original size, crop
  corner, aesthetic score) run as image to image gives `StableDiffusionXLImg2ImgPipeline`'s image (50 dB), with a
  negative prompt and without one (the refiner encodes "", as diffusers' refiner config says);
- base + refiner over one run (the refiner after `refiner_switch` of the steps) gives diffusers' two-pipeline
  ensemble, the base to `denoising_end` and the refiner from `denoising_start` on its latents (Euler, a one-step
  sampler, where the two ways are the same run), 50 dB;
- the original refiner file (`conditioner.embedders.0.model.*`) loads by shape and gives the folder's image;
- the CLI and the A1111 API (refiner_checkpoint, refiner_switch_at) give the pipeline's image; bad input is clear."""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_loading import make_scheduler  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, psnr  # noqa: E402
from test_sdxl import SIZE, _picture, save_sdxl_folder  # noqa: E402
from test_sdxl_single_file import PROJ, TIME_DIM, WIDTHS, sdxl_to_compvis  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.samplers import a1111_settings  # noqa: E402
from imagine.refiner import Handoff  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_refiner_unet(seed: int = 1):
    """A refiner-shaped diffusers U-Net: it cross-attends to bigG's states alone and its added embedding takes the
    pooled vector and five size codes (SDXL refiner: 1280 + 5 x 256 = 2560)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2), use_linear_projection=True,
        cross_attention_dim=WIDTHS[1], addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJ + 5 * TIME_DIM, norm_num_groups=32).eval()
    with torch.no_grad():  # spread the weights out so every path matters
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers base pipeline, diffusers refiner pipeline, root): the refiner shares the base's VAE and bigG
    tower, as SDXL's refiner does (its VAE is the same; its bigG tower is the base's own)."""
    root = tmp_path_factory.mktemp("sdxl")
    base = save_sdxl_folder(root / "base", scheduler="euler")
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=tiny_refiner_unet(), scheduler=make_scheduler("euler"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.set_progress_bar_config(disable=True)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    return base, refiner, root


def _image(pipe, res) -> torch.Tensor:
    return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_the_refiner_alone_is_diffusers_sdxl_img2img(models, negative):
    _, ref, root = models
    with torch.no_grad():
        want = ref(PROMPT, image=_picture(), strength=0.3, negative_prompt=negative, num_inference_steps=10,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0]
    pipe = TextToImagePipeline.from_pretrained(root / "refiner")
    assert pipe.defaults["aesthetic_score"] == (6.0, 2.5) and not pipe.defaults.get("zero_empty_negative")
    assert pipe.size_conditioning(1, 48, 40)["time_ids"].tolist() == [[48, 40, 0, 0, 6.0]]
    assert pipe.size_conditioning(1, 48, 40, negative=True)["time_ids"].tolist() == [[48, 40, 0, 0, 2.5]]
    res = pipe.generate(PROMPT, negative, init_image=_picture(), strength=0.3, steps=10, guidance_scale=CFG,
                        seed=SEED, progress=False, output_type="latent")
    assert psnr(_image(pipe, res), want.float()) >= 50


def _diffusers_ensemble(base, ref, steps: int, switch: float) -> torch.Tensor:
    with torch.no_grad():
        latents = base(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                       denoising_end=switch, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                       output_type="latent").images
        return ref(PROMPT, image=latents, negative_prompt=NEGATIVE, num_inference_steps=steps, denoising_start=switch,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                   output_type="pt").images[0].float()


def test_base_then_refiner_is_diffusers_ensemble_of_experts(models):
    """10 Euler steps, switch at 0.8: diffusers' base runs the timesteps >= 200 (8 of them) and the refiner the
    rest, as imagine's handoff after 8 of 10 steps (A1111's rule, a fraction of the steps, cuts at the same step
    here). 50 dB; the refiner's two steps matter (the base alone is another image)."""
    base, ref, root = models
    want = _diffusers_ensemble(base, ref, 10, 0.8)
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    kw = dict(steps=10, guidance_scale=CFG, seed=SEED, height=SIZE, width=SIZE, progress=False, output_type="latent")
    res = pipe.generate(PROMPT, NEGATIVE, refiner_switch=0.8, **kw)
    got = _image(pipe, res)
    assert psnr(got, want) >= 50
    assert res.parameters["refiner"] == "refiner" and res.parameters["refiner_switch_at"] == 0.8
    alone = _image(pipe, pipe.generate(PROMPT, NEGATIVE, **kw))
    assert psnr(alone, want) < 50 and "refiner" not in pipe.generate(PROMPT, NEGATIVE, **kw).parameters


def test_the_handoff_follows_a1111s_timestep_rule():
    """The refiner denoises where (999 - t) / 1000 >= switch (AUTOMATIC1111's rule, t <= 249 for 0.75), each model
    with its own conditioning keys."""
    seen = []

    def model(name):
        return lambda x, t, **c: (seen.append((name, sorted(c))), x)[1]

    h = Handoff(model("base"), model("refiner"), 0.75)
    x = torch.zeros(1, 1)
    for t in (999.0, 749.0, 250.0, 249.4, 249.0, 100.0, 1.0):
        h(x, torch.tensor([t]), context=x, refiner_context=x, refiner_time_ids=x)
    assert [s[0] for s in seen] == ["base"] * 3 + ["refiner"] * 4 and h.used
    assert seen[0][1] == ["context"] and seen[-1][1] == ["context", "time_ids"]
    with pytest.raises(ValueError, match=r"refiner_switch must be a number in \(0, 1\]"):
        Handoff(model("a"), model("b"), 1.5)


@pytest.mark.parametrize("sampler, steps, switch, base_calls", [
    ("euler", 10, 0.8, 8), ("dpmpp_2m", 10, 0.75, 8), ("heun", 5, 0.8, 8), ("dpm2", 6, 0.5, 6),
    ("restart", 20, 0.3, 12), ("ddim", 7, 0.6, 5), ("plms", 10, 0.5, 5)])
def test_switch_by_sampling_steps_counts_model_calls_as_a1111(sampler, steps, switch, base_calls):
    """AUTOMATIC1111's "Refiner switch by sampling steps" (sd_samplers_common.apply_refiner): its denoiser counts
    its calls from 0 and hands over at the first call k with k / total_steps >= switch, total_steps being the steps
    run, twice for its "second_order" samplers (Heun, DPM2, DPM++ SDE, DPM++ 2S a, Restart): Heun's 5 steps are 10
    to it though it calls 9 times, so at 0.8 the base runs 8 calls; PLMS's first step calls twice and counts once.
    Once swapped, the refiner stays (Restart's jump back up to t = 529 after the handover at t = 204 runs it)."""
    from imagine.sampling import sample
    from imagine.schedules import NoiseSchedule

    seen = []

    def model(name):
        return lambda x, t, **c: (seen.append((name, float(t.max()))), torch.zeros_like(x))[1]

    h = Handoff(model("base"), model("refiner"), switch, by_steps=True)
    sample(h, (1, 1, 2, 2), schedule=NoiseSchedule.from_config("scaled_linear"), prediction_type="epsilon", sampler=sampler,
           steps=steps, seeds=0, progress=False)
    names = [n for n, _ in seen]
    assert names == ["base"] * base_calls + ["refiner"] * (len(names) - base_calls) and h.used
    if sampler == "restart":  # (its restart jumps to higher noise come after the handover)
        ts = [t for _, t in seen]
        assert any(b > a for a, b in zip(ts[base_calls:], ts[base_calls + 1:]))


@pytest.mark.parametrize("label, steps, strength, switch, base_calls", [
    ("DDIM", 30, None, 0.8, 24), ("PLMS", 30, None, 0.8, 24), ("DDIM", 20, 0.5, 0.8, 9), ("UniPC", 20, 0.5, 0.8, 9),
    ("Euler", 20, 0.5, 0.8, 9)])
def test_switch_by_sampling_steps_counts_a1111s_compvis_samplers_steps(label, steps, strength, switch, base_calls):
    """A1111's CompVis samplers (sd_samplers_timesteps) count the steps asked in text to image, though 30 DDIM steps
    lay out 31 levels there, and t_enc + 1 in image to image (launch_sampling(t_enc + 1)) for the t_enc they run; its
    k-diffusion samplers count the steps run (t_enc + 1 of them)."""
    from imagine.sampling import sample
    from imagine.schedules import NoiseSchedule

    seen = []

    def model(name):
        return lambda x, t, **c: (seen.append(name), torch.zeros_like(x))[1]

    s = a1111_settings(label)
    kw = dict(sampler=s["sampler"], sigma_schedule=s["sigma_schedule"], sampler_options=s.get("sampler_options"),
              strength_rule=s["strength_rule"])
    if strength is not None:
        kw.update(init=torch.zeros(1, 1, 2, 2), strength=strength)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (30 DDIM steps: 31 levels, said in a warning)
        sample(Handoff(model("base"), model("refiner"), switch, by_steps=True), (1, 1, 2, 2), seeds=0, steps=steps,
               schedule=NoiseSchedule.from_config("scaled_linear"), prediction_type="epsilon", progress=False, **kw)
    assert seen.count("base") == base_calls and seen[base_calls:] == ["refiner"] * (len(seen) - base_calls)


def test_the_timestep_handoff_stays_with_the_refiner_once_it_has_run():
    """A1111 swaps the weights under the sampler when the rule first holds and never back: a level above the switch
    after the handover (Restart's jump up) is the refiner's."""
    seen = []

    def model(name):
        return lambda x, t, **c: (seen.append(name), x)[1]

    h = Handoff(model("base"), model("refiner"), 0.8)
    for t in (999.0, 500.0, 150.0, 600.0, 50.0):
        h(torch.zeros(1, 1), torch.tensor([t]))
    assert seen == ["base", "base", "refiner", "refiner", "refiner"]
    with pytest.raises(RuntimeError, match="count of model calls"):
        Handoff(model("a"), model("b"), 0.8, by_steps=True)(torch.zeros(1, 1), torch.tensor([1.0]))


def test_karras_noise_levels_switch_at_the_timestep_as_diffusers(models):
    """Euler on Karras noise levels (a one-step sampler: diffusers' two pipelines are one run): the refiner takes
    the steps below t = 200, where diffusers' ensemble hands over, not the last fifth of the steps (here 4 of the
    10 steps are below t = 200, where the steps' rule would give the refiner 2). 50 dB."""
    base, ref, root = models
    from diffusers import EulerDiscreteScheduler

    for p in (base, ref):
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
    try:
        want = _diffusers_ensemble(base, ref, 10, 0.8)
        levels = base.scheduler.timesteps
        assert int((levels < 200).sum()) == 4 and not bool(((levels >= 199.5) & (levels < 200)).any())
    finally:
        for p in (base, ref):
            p.scheduler = make_scheduler("euler")
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    res = pipe.generate(PROMPT, NEGATIVE, refiner_switch=0.8, sigma_schedule="karras", steps=10, guidance_scale=CFG,
                        seed=SEED, height=SIZE, width=SIZE, progress=False, output_type="latent")
    assert psnr(_image(pipe, res), want) >= 50


def test_switch_by_sampling_steps_is_diffusers_ensemble_cut_after_that_many_steps(models):
    """The same Karras levels switched by sampling steps: the refiner takes the last 2 of the 10 steps (8 / 10 >=
    0.8), not the 4 below t = 200; diffusers' ensemble cut there (denoising_end just below the 8th timestep) is the
    same run, 50 dB, and the timestep rule's picture is another."""
    base, ref, root = models
    from diffusers import EulerDiscreteScheduler

    for p in (base, ref):
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
    try:
        base.scheduler.set_timesteps(10)
        levels = base.scheduler.timesteps
        cut = math.floor(float(levels[7]))  # (diffusers' base runs the timesteps >= round(1000 - 1000 d))
        assert cut > float(levels[8])
        want = _diffusers_ensemble(base, ref, 10, 1 - cut / 1000)
    finally:
        for p in (base, ref):
            p.scheduler = make_scheduler("euler")
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    kw = dict(refiner_switch=0.8, sigma_schedule="karras", steps=10, guidance_scale=CFG, seed=SEED, height=SIZE,
              width=SIZE, progress=False, output_type="latent")
    res = pipe.generate(PROMPT, NEGATIVE, refiner_switch_by_steps=True, **kw)
    assert psnr(_image(pipe, res), want) >= 50
    assert res.parameters["refiner_switch_by_steps"] is True
    assert psnr(_image(pipe, pipe.generate(PROMPT, NEGATIVE, **kw)), want) < 50
    with pytest.raises(ValueError, match="refiner_switch_by_steps .* give it with refiner_switch"):
        pipe.generate(PROMPT, steps=2, refiner_switch_by_steps=True, progress=False)


def test_image_to_image_hires_and_lora_tags_with_a_refiner(models, tmp_path):
    """A short image-to-image run still reaches the refiner (its last steps are at low noise); hires. fix runs it in
    the second pass only (A1111's default); a LoRA tag (the base's) does not trouble the refiner; the refiner shares
    the base's VAE and, its weights being equal, its bigG tower."""
    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    assert pipe.refiner.vae is pipe.vae and pipe.refiner.text_encoder.towers[0] is pipe.text_encoder.towers[1]
    kw = dict(guidance_scale=CFG, seed=SEED, progress=False, output_type="latent")
    res = pipe.generate(PROMPT, init_image=_picture(), strength=0.3, steps=10, refiner_switch=0.8, **kw)
    plain = pipe.generate(PROMPT, init_image=_picture(), strength=0.3, steps=10, **kw)
    assert res.parameters["refiner"] == "refiner" and not torch.equal(res.latents, plain.latents)
    from imagine.pipelines.text_to_image import exact_copy

    calls = []
    unet = exact_copy(pipe.refiner.unet)  # (the copy the exact mode runs)
    hook = unet.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape[-2:])))
    try:
        pipe.generate_hires(PROMPT, hires_scale=2.0, steps=6, refiner_switch=0.8, height=16, width=16, **kw)
    finally:
        hook.remove()
    assert calls and set(calls) == {(16, 16)}  # the large pass's 16 x 16 latents only (the small pass is 8 x 8)
    from safetensors.torch import save_file
    from test_sdxl_lora import _kohya_sdxl_lora

    base, _, _ = models
    (tmp_path / "loras").mkdir()
    save_file(_kohya_sdxl_lora(base), str(tmp_path / "loras" / "xl_style.safetensors"))
    pipe.lora_dir = tmp_path / "loras"
    tagged = pipe.generate("<lora:xl_style:0.7> " + PROMPT, steps=4, refiner_switch=0.8, height=16, width=16, **kw)
    assert tagged.parameters["lora"] == "xl_style: 0.7" and tagged.parameters["refiner"] == "refiner"


def test_an_empty_negative_is_zeros_for_the_refiner_where_the_base_zeros_it(models):
    """AUTOMATIC1111 zeros an empty negative prompt for every SDXL model, the refiner included: in a handoff the
    refiner's unconditional text follows the base's rule (its own, used alone, encodes "", as diffusers' refiner
    pipeline does)."""
    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    _, alone = pipe.refiner.conditioning([PROMPT], [None], SIZE, SIZE)
    assert float(alone["context"].abs().max()) > 0
    from imagine.pipelines.text_to_image import exact_copy

    seen = []
    hook = exact_copy(pipe.refiner.unet).register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["context"].clone()), with_kwargs=True)
    try:
        pipe.generate(PROMPT, steps=3, refiner_switch=0.5, height=16, width=16, guidance_scale=CFG, seed=1,
                      progress=False, output_type="latent")
    finally:
        hook.remove()
    assert seen and all(float(c[0].abs().max()) == 0 for c in seen)  # [uncond; cond]: the uncond half is zeros
def write_refiner_single_file(path: Path, ref) -> None:
    """The refiner in sgm's names: SD's U-Net and VAE maps plus label_emb, bigG as conditioner.embedders.0.model."""
    from safetensors.torch import save_file

    state = sdxl_to_compvis(ref.unet.state_dict(), ref.unet.config, ref.vae.state_dict(),
                            len(ref.vae.config.block_out_channels), None, ref.text_encoder_2.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_a_lora_merges_into_the_refiner_alone(models, tmp_path):
    """The refiner loaded as a model of its own takes a kohya LoRA: its U-Net layers, and its one text tower (bigG)
    as lora_te2_, diffusers' text_encoder_2 (it crashed: the refiner was read as having two towers). Each weight
    becomes W + (alpha / r) up @ down."""
    from safetensors.torch import save_file

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "refiner")
    unet_name, unet_mod = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    te = pipe.text_encoder.towers[0].model
    te_name, te_mod = next((n, m) for n, m in te.named_modules() if n.endswith("self_attn.q_proj"))
    g, tensors, want = torch.Generator().manual_seed(0), {}, {}
    te_name = "text_model." + te_name.removeprefix("text_model.")  # (kohya's names: lora_te2_text_model_encoder_...)
    for prefix, name, mod in (("lora_unet_", unet_name, unet_mod), ("lora_te2_", te_name, te_mod)):
        key = prefix + name.replace(".", "_")
        down, up = torch.randn(2, mod.weight.shape[1], generator=g), torch.randn(mod.weight.shape[0], 2, generator=g)
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
        want[mod] = mod.weight.detach().clone() + 0.5 * up @ down
    save_file(tensors, str(tmp_path / "refiner_lora.safetensors"))
    pipe.load_lora(tmp_path / "refiner_lora.safetensors")
    for mod, w in want.items():
        assert torch.allclose(mod.weight, w, atol=1e-5)


def test_the_original_refiner_file_loads_and_gives_the_folders_image(models, tmp_path):
    base, ref, root = models
    path = tmp_path / "sd_xl_refiner_tiny.safetensors"
    write_refiner_single_file(path, ref)
    assert not (path.parent / "tokenizer_2").exists()
    with pytest.raises(FileNotFoundError, match="no tokenizer_2 found"):
        TextToImagePipeline.from_pretrained(path)
    single = TextToImagePipeline.from_pretrained(path, tokenizer_2=root / "refiner" / "tokenizer_2")
    u = single.unet.config
    assert (u.cross_attention_dim, u.projection_class_embeddings_input_dim) == (WIDTHS[1], PROJ + 5 * TIME_DIM)
    assert len(single.text_encoder.towers) == 1 and single.defaults["aesthetic_score"] == (6.0, 2.5)
    kw = dict(init_image=_picture(), strength=0.5, steps=6, guidance_scale=CFG, seed=SEED, progress=False,
              output_type="latent")
    folder = TextToImagePipeline.from_pretrained(root / "refiner")
    assert psnr(_image(single, single.generate(PROMPT, **kw)), _image(folder, folder.generate(PROMPT, **kw))) >= 60
    # a base folder lends its tokenizer_2 to a refiner file
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=path)
    want = _diffusers_ensemble(base, ref, 10, 0.8)
    res = pipe.generate(PROMPT, NEGATIVE, refiner_switch=0.8, steps=10, guidance_scale=CFG, seed=SEED, height=SIZE,
                        width=SIZE, progress=False, output_type="latent")
    assert psnr(_image(pipe, res), want) >= 50


def test_bad_refiner_use_is_a_clear_error(models, tmp_path):
    from test_loading import save_diffusers_folder

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base")
    with pytest.raises(ValueError, match="refiner_switch needs a refiner: load one first"):
        pipe.generate(PROMPT, refiner_switch=0.8, steps=2, progress=False)
    pipe.load_refiner(root / "refiner")
    with pytest.raises(ValueError, match=r"refiner_switch must be a number in \(0, 1\].*got 1.5"):
        pipe.generate(PROMPT, refiner_switch=1.5, steps=2, progress=False)
    v = TextToImagePipeline.from_pretrained(root / "refiner")
    v.prediction_type = "v_prediction"  # (a refiner trained for v-prediction)
    with pytest.raises(ValueError, match="noise schedule or prediction \\(v_prediction\\) is not this model's"):
        pipe.load_refiner(v)
    save_diffusers_folder(tmp_path / "sd1", "sd1")  # SD 1's latents: scaled by 0.18215, not SDXL's 0.13025
    with pytest.raises(ValueError, match="latent space"):
        pipe.load_refiner(TextToImagePipeline.from_pretrained(tmp_path / "sd1"))


def test_the_cli_and_the_a1111_api_run_the_refiner(models, tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings, --a1111-sampling)
    kw = dict(steps=5, guidance_scale=CFG, height=SIZE, width=SIZE, progress=False, **a1111_settings("Euler"))
    want = pipe.generate(PROMPT, NEGATIVE, seed=4, refiner_switch=0.6, **kw).images[0].convert("RGB").tobytes()
    out = tmp_path / "refined.png"
    code = main(["generate", "--model", str(root / "base"), PROMPT, "-n", NEGATIVE, "--refiner", str(root / "refiner"),
                 "--refiner-switch", "0.6", "--steps", "5", "--sampler", "euler", "--a1111-sampling", "--seed", "4",
                 "--height", str(SIZE), "--width", str(SIZE), "--guidance-scale", str(CFG), "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want
    assert "Refiner: refiner, Refiner switch at: 0.6" in img.text["parameters"]
    assert json.loads(img.text["imagine"])["refiner_switch_at"] == 0.6
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        def post(**extra):
            body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 5, "cfg_scale": CFG, "width": SIZE,
                    "height": SIZE, "seed": 4, "sampler_name": "Euler", **extra}
            return httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)

        r = post(refiner_checkpoint="refiner [0123456789]", refiner_switch_at=0.6)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert got.convert("RGB").tobytes() == want
        info = json.loads(r.json()["info"])
        assert info["extra_generation_params"]["Refiner switch at"] == 0.6
        assert "Refiner: refiner, Refiner switch at: 0.6" in info["infotexts"][0]
        listed = httpx.get(f"{srv.url}/sdapi/v1/sd-models").json()
        assert [m["model_name"] for m in listed] == ["base", "refiner"]  # (A1111 lists its refiner among them)
        r = post(refiner_checkpoint="other_refiner")
        assert r.status_code == 422 and "valid: 'refiner'" in r.text
        r = post(refiner_checkpoint="refiner", refiner_switch_at=1.5)
        assert r.status_code == 422 and "refiner_switch_at must be in (0, 1]" in r.text


def test_switch_by_sampling_steps_from_the_cli_the_api_and_an_old_a1111_infotext(models, tmp_path, capsys):
    """A1111's "Refiner switch by sampling steps" through each door: --refiner-switch-by-steps, the API's
    override_settings refiner_switch_by_sample_steps, and an infotext of A1111 before 1.8.0 (its reader turns the
    option on for such pictures) given with --refiner; each the pipeline's picture, which at 0.45 of 5 Euler steps
    differs from the timestep rule's (the refiner takes 2 steps, not 3). The infotext says it; a bad value is a 422;
    without --refiner the infotext's refiner is named as not applied."""
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    kw = dict(steps=5, guidance_scale=CFG, height=SIZE, width=SIZE, progress=False, **a1111_settings("Euler"))
    want = pipe.generate(PROMPT, NEGATIVE, seed=4, refiner_switch=0.45, refiner_switch_by_steps=True, **kw)
    want = want.images[0].convert("RGB").tobytes()
    by_level = pipe.generate(PROMPT, NEGATIVE, seed=4, refiner_switch=0.45, **kw).images[0].convert("RGB").tobytes()
    assert by_level != want
    base_args = ["generate", "--model", str(root / "base"), PROMPT, "-n", NEGATIVE, "--steps", "5", "--sampler",
                 "euler", "--a1111-sampling", "--seed", "4", "--height", str(SIZE), "--width", str(SIZE),
                 "--guidance-scale", str(CFG), "-q"]
    out = tmp_path / "by_steps.png"
    code = main([*base_args, "--refiner", str(root / "refiner"), "--refiner-switch", "0.45",
                 "--refiner-switch-by-steps", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.convert("RGB").tobytes() == want
    assert "Refiner switch by sampling steps: True, Refiner: refiner, Refiner switch at: 0.45" in img.text["parameters"]
    again = tmp_path / "again.png"  # (its own record, run again with the refiner)
    assert main(["generate", "--model", str(root / "base"), "--infotext", str(out), "--refiner", str(root / "refiner"),
                 "-o", str(again), "-q"]) == 0
    assert Image.open(again).convert("RGB").tobytes() == want
    old = tmp_path / "old.txt"  # (A1111 1.7.0-300's text of the same run: Euler's default there, Karras off)
    old.write_text(f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 5, Sampler: Euler, CFG scale: {CFG}, Seed: 4, "
                   f"Size: {SIZE}x{SIZE}, Model: base, Refiner: refiner [0123abcd89], Refiner switch at: 0.45, "
                   "RNG: CPU, Version: v1.7.0-300-g0123abcd")
    from_old = tmp_path / "from_old.png"
    assert main(["generate", "--model", str(root / "base"), "--infotext", str(old), "--refiner", str(root / "refiner"),
                 "-o", str(from_old)]) == 0
    err = capsys.readouterr().err
    assert "A1111 turns on Refiner switch by sampling steps" in err and "not applied" not in err
    assert Image.open(from_old).convert("RGB").tobytes() == want
    assert main([*base_args[:-1], "--infotext", str(old), "-o", str(tmp_path / "no_refiner.png")]) == 0
    assert "not applied: Refiner: refiner [0123abcd89], Refiner switch at: 0.45" in capsys.readouterr().err
    assert main([*base_args, "--refiner-switch-by-steps", "-o", str(tmp_path / "x.png")]) != 0
    assert "--refiner-switch-by-steps needs --refiner" in capsys.readouterr().err
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        def post(overrides):
            body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 5, "cfg_scale": CFG, "width": SIZE,
                    "height": SIZE, "seed": 4, "sampler_name": "Euler", "refiner_checkpoint": "refiner",
                    "refiner_switch_at": 0.45, "override_settings": overrides}
            return httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)

        r = post({"refiner_switch_by_sample_steps": True})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert got.convert("RGB").tobytes() == want
        info = json.loads(r.json()["info"])
        assert info["extra_generation_params"]["Refiner switch by sampling steps"] is True
        assert "Refiner switch by sampling steps: True" in info["infotexts"][0]
        r = post({"refiner_switch_by_sample_steps": "yes"})
        assert r.status_code == 422 and "refiner_switch_by_sample_steps must be true or false" in r.text


# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json (sgm's sd_xl_refiner.yaml: 384 channels, x1 x2 x4
# x4, 4 transformer layers where there is attention, 64-wide heads, 1280-wide context, 2560 added inputs)
REFINER_UNET = dict(sample_size=128, block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
                    cross_attention_dim=1280, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2560)


def test_the_full_size_refiner_layout_loads_on_the_meta_device(tmp_path, monkeypatch):
    """The real refiner's shapes in sgm's names, built on the meta device: every tensor finds its place (the
    loader is strict), the U-Net is diffusers' in names and shapes, and nothing is allocated."""
    from test_loading import write_clip_tokenizer

    monkeypatch.delenv("IMAGINE_CLIP_TOKENIZER_2", raising=False)
    from test_sdxl_single_file import REAL_BIGG, real_sdxl_vae

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**REFINER_UNET)
        vae = real_sdxl_vae()
        te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**REAL_BIGG))
    state = sdxl_to_compvis(unet.state_dict(), unet.config, vae.state_dict(), 4, None, te2.state_dict())
    assert tuple(state["model.diffusion_model.label_emb.0.0.weight"].shape) == (1536, 2560)
    assert "model.diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_k.weight" in state
    assert "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight" in state
    from imagine.loading.sdxl import components_from_state

    c = components_from_state(state, "sd_xl_refiner_1.0.safetensors",
                              tokenizer_2=write_clip_tokenizer(tmp_path / "tok2", "!"))
    assert c.unet.conv_in.weight.is_meta
    assert {k: v.shape for k, v in c.unet.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert sum(p.numel() for p in c.unet.parameters()) == sum(p.numel() for p in unet.parameters())  # 2.26 B
    assert c.text_encoder.dim == 1280 and c.text_encoder.pooled_dim == 1280 and len(c.text_encoder.towers) == 1


def test_long_prompts_and_prompt_editing_reach_the_refiner(models):
    """A long prompt with an edit and a long negative (the A1111 API reads both): the refiner's texts are read in
    chunks too, with the masks the batch needs; each row is its run alone."""
    from test_long_prompts import LONG, NEGATIVE_LONG

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    kw = dict(steps=4, refiner_switch=0.5, height=16, width=16, guidance_scale=CFG, progress=False,
              output_type="latent", long_prompts=True, prompt_editing=True)
    both = pipe.generate([f"[red:{LONG}:2]", "a red circle"], [NEGATIVE_LONG, NEGATIVE_LONG], seeds=[1, 2], **kw)
    alone = pipe.generate("a red circle", NEGATIVE_LONG, seeds=[2], **kw)
    assert both.parameters["refiner"] == "refiner"
    assert torch.allclose(both.latents[1:], alone.latents, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["empty", "v0"])
def test_padded_texts_with_a_refiner(models, mode):
    """A1111's pad options pad the base model's texts; the refiner's own texts (another width) run as they are."""
    from test_long_prompts import LONG

    _, _, root = models
    pipe = TextToImagePipeline.from_pretrained(root / "base", refiner=root / "refiner")
    kw = dict(steps=4, refiner_switch=0.5, height=16, width=16, guidance_scale=CFG, progress=False,
              output_type="latent", long_prompts=True, seed=1)
    padded = pipe.generate(LONG, "the square", pad_conds=mode, **kw)
    plain = pipe.generate(LONG, "the square", **kw)
    assert padded.parameters["refiner"] == "refiner" and padded.parameters["padded_conds"] is True
    assert not torch.equal(padded.latents, plain.latents)
