"""Samplers other than DDPM for DeepFloyd IF's pixel cascade (session 30), against diffusers' IFPipeline and
IFSuperResolutionPipeline with the scheduler swapped as diffusers' users swap it,
`pipe.scheduler = OtherScheduler.from_config(pipe.scheduler.config)`, on the tiny random IF-shaped stages of
test_cascade_if_s29 (same generators).

- dpmpp_2m: DPMSolverMultistepScheduler, which diffusers runs on IF's config as it is (it drops the learned variance
  and thresholds its x_0); the config's keys carried over, those the config lacks (timestep_spacing) at the new class's
  defaults ("linspace"), both checked.
- unipc, euler, euler_a, ddim: diffusers' IF pipelines cannot run them on IF's config (variance_type "learned_range"
  is carried over, so the pipeline hands them 6 channels and the step fails: checked); ours steps the prediction's
  channels, compared with diffusers given the config with variance_type cleared. DDIM: as diffusers' DDIMScheduler
  with use_clipped_model_output=True (the eps read again from the thresholded x_0, guided-diffusion's and ours; the
  pipeline does not pass it). Stage II with Euler: diffusers' pipeline concatenates the upsampled picture before
  scale_model_input and so scales it with the sample; ours gives the picture to the U-Net as it is, compared with
  diffusers' U-Net given the picture unscaled again.
Samples to 1e-4 relative, pictures to >= 50 dB PSNR.
"""

from __future__ import annotations

import functools
import json
import math
import warnings

import pytest
import torch
from PIL import Image

from test_cascade_if_s29 import (  # noqa: F401 (fixture)
    KW, NOISING, PICTURES, PROMPTS, SCHEDULER, TOL, nontrivial, parts, psnr, rel)
from test_cascade_cli_s29 import folders  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")

from imagine.pipelines.cascade import (  # noqa: E402
    SAMPLERS, IFCascade, IFStage, check_sampler, super_resolution, text_to_image, thresholding_rule)
from imagine.samplers import diffusers_plan_layout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ours -> (diffusers' class, what the config needs for diffusers' pipeline to run it: None = IF's config as it is)
CLASSES = {"dpmpp_2m": ("DPMSolverMultistepScheduler", None), "unipc": ("UniPCMultistepScheduler", "no_variance"),
           "euler": ("EulerDiscreteScheduler", "no_variance"), "euler_a": ("EulerAncestralDiscreteScheduler",
                                                                           "no_variance"),
           "ddim": ("DDIMScheduler", "no_variance")}


def swapped(pipe, sampler):
    """pipe with its scheduler swapped by from_config (diffusers' way), the config's variance_type cleared where
    diffusers could not run the class otherwise; DDIM stepping with use_clipped_model_output=True."""
    name, need = CLASSES[sampler]
    config = pipe.scheduler.config  # (a DDPMScheduler's: IF's; from_config reads its _use_default_values)
    if need == "no_variance":
        config = {**dict(config), "variance_type": None}
    scheduler = getattr(diffusers, name).from_config(config)
    if sampler == "ddim":
        scheduler.step = functools.partial(scheduler.step, use_clipped_model_output=True)
    pipe.scheduler = scheduler
    return pipe


@pytest.fixture
def fresh(parts):
    """The pipelines with their DDPM schedulers given back after each test."""
    theirs_1, theirs_2, ours_1, ours_2 = parts
    kept = theirs_1.scheduler, theirs_2.scheduler
    yield parts
    theirs_1.scheduler, theirs_2.scheduler = kept


class _UnscaledPicture(torch.nn.Module):
    """diffusers' stage II U-Net given the upsampled picture unscaled again: the Euler schedulers' scale_model_input
    divides the pipeline's concatenation (sample and picture) by sqrt(sigma^2 + 1)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.unet, self.scheduler = unet, scheduler
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device

    def forward(self, x, t, **kw):
        sigma = float(self.scheduler.sigmas[self.scheduler.step_index])
        c = x.shape[1] // 2
        x = torch.cat([x[:, :c], x[:, c:] * math.sqrt(sigma ** 2 + 1)], dim=1)
        return self.unet(x, t, **kw)


# -- stage I ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", list(CLASSES))
@pytest.mark.parametrize("steps,scale", [(8, 7.0), (20, 1.0)])
def test_stage_1_sampler_is_diffusers(fresh, sampler, steps, scale):
    theirs_1, _, ours_1, _ = fresh
    swapped(theirs_1, sampler)
    kw = dict(guidance_scale=scale)
    expected = theirs_1(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                        output_type="pt", **kw, **KW).images
    got = text_to_image(ours_1, PROMPTS, steps=steps, generator=torch.Generator().manual_seed(5), output_type="pt",
                        progress=False, sampler=sampler, **kw)
    print(f"stage I {sampler} {steps} steps, scale {scale}: rel {rel(got, expected):.2e}")
    assert rel(got, expected) < TOL
    pictures = theirs_1(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(5), **kw,
                        **KW).images
    ours = text_to_image(ours_1, PROMPTS, steps=steps, seed=5, progress=False, sampler=sampler, **kw)
    if SAMPLERS[sampler] is not None:  # (Euler's x_0 is not held: the tiny random model's pixels saturate; the
        nontrivial(pictures)           # samples' relative error above is the check)
    print(f"stage I {sampler} {steps} steps, scale {scale}: {psnr(ours, pictures):.1f} dB")
    assert psnr(ours, pictures) >= 50


def test_stage_1_samplers_differ_from_ddpm(fresh):
    """The sampler reaches the run: each gives other pictures than DDPM (and dpmpp_2m another than unipc)."""
    _, _, ours_1, _ = fresh
    runs = {s: text_to_image(ours_1, PROMPTS, steps=6, seed=2, output_type="pt", progress=False, sampler=s)
            for s in SAMPLERS}
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert float((runs[a] - runs[b]).abs().max()) > 1e-3, (a, b)


def test_diffusers_runs_only_dpm_solver_on_ifs_config(fresh):
    """What diffusers' IFPipeline does with each class on IF's own config (variance_type carried over, so the 6
    channels reach the step): DPMSolverMultistepScheduler runs, the others fail; the reason ours steps the
    prediction's channels for them."""
    theirs_1 = fresh[0]
    config = theirs_1.scheduler.config
    for name, need in CLASSES.values():
        theirs_1.scheduler = getattr(diffusers, name).from_config(config)
        assert theirs_1.scheduler.config.variance_type == "learned_range"  # (carried over to every class)
        run = functools.partial(theirs_1, PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                                output_type="pt", **KW)
        if need is None:
            assert run().images.shape == (2, 3, 16, 16)
        else:
            with pytest.raises(RuntimeError, match="must match the size"):
                run()


# -- stage II ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", list(CLASSES))
def test_stage_2_sampler_is_diffusers(fresh, sampler):
    _, theirs_2, _, ours_2 = fresh
    swapped(theirs_2, sampler)
    unet = theirs_2.unet
    if sampler in ("euler", "euler_a"):
        theirs_2.unet = _UnscaledPicture(unet, theirs_2.scheduler)
    try:
        kw = dict(guidance_scale=4.0, noise_level=250)
        expected = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=8,
                            generator=torch.Generator().manual_seed(3), output_type="pt", **kw, **KW).images
        pictures = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=8,
                            generator=torch.Generator().manual_seed(3), **kw, **KW).images
    finally:
        theirs_2.unet = unet
    got = super_resolution(ours_2, PROMPTS, PICTURES, steps=8, generator=torch.Generator().manual_seed(3),
                           output_type="pt", progress=False, sampler=sampler, **kw)
    print(f"stage II {sampler}: rel {rel(got, expected):.2e}")
    assert got.shape == (2, 3, 32, 32) and rel(got, expected) < TOL
    ours = super_resolution(ours_2, PROMPTS, PICTURES, steps=8, seed=3, progress=False, sampler=sampler, **kw)
    if SAMPLERS[sampler] is not None:  # (as in stage I: Euler's pixels saturate; the samples' check is above)
        nontrivial(pictures)
    print(f"stage II {sampler}: {psnr(ours, pictures):.1f} dB")
    assert psnr(ours, pictures) >= 50


def test_stage_2_euler_picture_scaling_is_diffusers_odd_one(fresh):
    """diffusers' own stage II with Euler (config's variance cleared), the picture scaled by scale_model_input, is not
    ours: the U-Net sees the picture 1 / sqrt(sigma^2 + 1) as bright (1/150 at IF's first level)."""
    _, theirs_2, _, ours_2 = fresh
    swapped(theirs_2, "euler")
    expected = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=6, generator=torch.Generator().manual_seed(3),
                        output_type="pt", **KW).images
    got = super_resolution(ours_2, PROMPTS, PICTURES, steps=6, seed=3, output_type="pt", progress=False,
                           sampler="euler")
    assert rel(got, expected) > 1e-2


# -- the cascade ------------------------------------------------------------------------------------------------------
def test_cascade_with_a_sampler_per_stage_is_diffusers(fresh):
    """IFCascade(sampler=(stage I's, stage II's)) against diffusers' two pipelines with their schedulers swapped, one
    generator through both; one name is both stages'."""
    theirs_1, theirs_2, ours_1, ours_2 = fresh
    swapped(theirs_1, "dpmpp_2m")
    swapped(theirs_2, "unipc")
    g = torch.Generator().manual_seed(11)
    cond, uncond = theirs_1.encode_prompt(PROMPTS, **KW)
    low = theirs_1(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6, generator=g,
                   guidance_scale=7.0, output_type="pt").images
    expected = theirs_2(image=low, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=5,
                        generator=g, guidance_scale=4.0, noise_level=200).images
    cascade = IFCascade(ours_1, ours_2)
    got = cascade(PROMPTS, steps=(6, 5), guidance_scale=(7.0, 4.0), noise_level=200, seed=11, progress=False,
                  sampler=("dpmpp_2m", "unipc"))
    nontrivial(expected)
    print(f"cascade dpmpp_2m + unipc: {psnr(got, expected):.1f} dB")
    assert psnr(got, expected) >= 50
    swapped(theirs_2, "dpmpp_2m")
    g = torch.Generator().manual_seed(11)
    low = theirs_1(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6, generator=g,
                   guidance_scale=7.0, output_type="pt").images
    expected = theirs_2(image=low, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=5,
                        generator=g, guidance_scale=4.0, noise_level=200).images
    got = cascade(PROMPTS, steps=(6, 5), guidance_scale=(7.0, 4.0), noise_level=200, seed=11, progress=False,
                  sampler="DPM++ 2M")
    print(f"cascade dpmpp_2m: {psnr(got, expected):.1f} dB")
    assert psnr(got, expected) >= 50


# -- the plan's layout and the x_0 rule, read from the config ---------------------------------------------------------
def test_plan_layout_is_from_configs_rule(fresh, tmp_path):
    """diffusers_plan_layout: the key carried over where the config has it, the new class's default where it lacks it
    (the file's missing keys, which diffusers records in _use_default_values when it loads the file), as from_config."""
    theirs_1 = fresh[0]
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SCHEDULER))  # (IF's: no timestep_spacing)
    loaded = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert "timestep_spacing" in loaded.config["_use_default_values"]
    for sampler, (name, _) in {**CLASSES, "ddpm": ("DDPMScheduler", None)}.items():
        theirs = getattr(diffusers, name).from_config(loaded.config).config
        assert diffusers_plan_layout(SCHEDULER, sampler).get("timestep_spacing") == theirs.timestep_spacing, sampler
        # a config with the key (as save_pretrained writes it) keeps it for every class
        saved = {**SCHEDULER, "timestep_spacing": "trailing", "steps_offset": 1}
        assert diffusers_plan_layout(saved, sampler) == {"timestep_spacing": "trailing", "steps_offset": 1}
        # a diffusers config object's own record of the keys it took at their defaults
        assert diffusers_plan_layout(dict(loaded.config), sampler)["timestep_spacing"] == theirs.timestep_spacing
    assert diffusers_plan_layout(SCHEDULER, "dpmpp_2m") == {"timestep_spacing": "linspace"}
    assert diffusers_plan_layout({"timestep_spacing": None}, "euler") == {}  # (imagine's own config: the schedule's)


def test_thresholding_per_sampler_is_each_schedulers():
    """Which keys each class keeps from IF's config, and the x_0 rule our run takes from them."""
    base = diffusers.DDPMScheduler(**SCHEDULER).config
    for sampler in ("dpmpp_2m", "ddim", "unipc"):
        c = getattr(diffusers, CLASSES[sampler][0]).from_config(base).config
        assert (c.thresholding, c.dynamic_thresholding_ratio, c.sample_max_value) == (True, 0.95, 1.5)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(base).config
    assert (dpm.algorithm_type, dpm.solver_order, dpm.lower_order_final, dpm.euler_at_final,
            dpm.final_sigmas_type, dpm.variance_type) == ("dpmsolver++", 2, True, False, "zero", "learned_range")
    dynamic = {"thresholding": "dynamic", "threshold_percentile": 0.95, "threshold_max": 1.5}
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "unipc"):
        assert thresholding_rule(SCHEDULER, sampler) == dynamic
    assert thresholding_rule(SCHEDULER, "euler") == thresholding_rule(SCHEDULER, "euler_a") == {}
    plain = {**SCHEDULER, "thresholding": False}  # (clip_sample: DDPM's and DDIM's step clips; DPM++'s, UniPC's don't)
    assert thresholding_rule(plain, "ddim") == {"thresholding": "static", "threshold_range": 1.0}
    assert thresholding_rule(plain, "dpmpp_2m") == thresholding_rule(plain, "unipc") == {}


def test_unsupported_samplers_are_refused_by_name(fresh):
    _, _, ours_1, ours_2 = fresh
    run = dict(steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'nope' for a pixel cascade.*valid: ddpm, ddim, dpmpp_2m, "
                                         "unipc, euler, euler_a"):
        text_to_image(ours_1, PROMPTS, sampler="nope", **run)
    with pytest.raises(ValueError, match=r"sampler 'heun' \(heun\) is not one a pixel cascade .* runs; valid: ddpm"):
        super_resolution(ours_2, PROMPTS, PICTURES, sampler="heun", **run)
    with pytest.raises(ValueError, match="Karras sigmas are not run for a pixel cascade"):
        text_to_image(ours_1, PROMPTS, sampler="DPM++ 2M Karras", **run)
    with pytest.raises(ValueError, match="sampler must be a pair"):
        IFCascade(ours_1, ours_2)(PROMPTS, sampler=("ddpm",), **{**run, "steps": (2, 2)})
    seen = []
    hook = ours_1.model.register_forward_hook(lambda *a: seen.append(1))
    try:
        with pytest.raises(ValueError, match="unknown sampler"):  # (stage II's refused before stage I runs)
            IFCascade(ours_1, ours_2)(PROMPTS, sampler=("ddpm", "bad"), steps=(2, 2), progress=False)
    finally:
        hook.remove()
    assert not seen
    assert check_sampler("DPMSolverMultistepScheduler") == ("dpmpp_2m", False)
    assert check_sampler("Euler a") == ("euler_a", False)


# -- the CLI (test_cascade_cli_s29's folders: diffusers' tiny IF pipelines saved) ---------------------------------------


def diffusers_pipelines(one, two):
    """diffusers' IF stage I and II pipelines loaded from the folders the CLI reads, their progress bars off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = diffusers.IFPipeline.from_pretrained(one, safety_checker=None, watermarker=None,
                                                     feature_extractor=None, requires_safety_checker=False)
        second = diffusers.IFSuperResolutionPipeline.from_pretrained(
            two, safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    return first, second


def test_generate_with_a_sampler_is_diffusers(fresh, folders, tmp_path, capsys):
    """`imagine generate --model IF-I --stage-2 IF-II --sampler "DPM++ 2M"`: both stages with the sampler, as diffusers'
    pipelines loaded from the same folders with DPMSolverMultistepScheduler.from_config; the PNG names it."""
    from imagine.cli import main

    one, two = folders
    out = tmp_path / "cascade.png"
    code = main(["generate", "--model", str(one), "--stage-2", str(two), "a red circle", "--sampler", "DPM++ 2M",
                 "--steps", "5", "--stage-2-steps", "4", "--seed", "11", "-o", str(out), "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    first, second = diffusers_pipelines(one, two)
    for p in (first, second):
        p.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    g = torch.Generator().manual_seed(11)
    low = first("a red circle", num_inference_steps=5, generator=g, output_type="pt", **KW).images
    want = second("a red circle", image=low, num_inference_steps=4, generator=g, **KW).images
    got = Image.open(out)
    print(f"CLI dpmpp_2m: {psnr([got.convert('RGB')], want):.1f} dB")
    assert psnr([got.convert("RGB")], want) >= 50
    record = json.loads(got.text["imagine"])
    assert record["sampler"] == "dpmpp_2m" and record["stage_2"] == "IF-II"


def test_generate_refuses_a_sampler_it_does_not_run(folders, tmp_path, capsys):
    from imagine.cli import main

    one, _ = folders
    code = main(["generate", "--model", str(one), "a cat", "--sampler", "heun", "--steps", "2",
                 "-o", str(tmp_path / "x.png"), "-q"])
    _, err = capsys.readouterr()
    assert code != 0 and "is not one a pixel cascade (DeepFloyd IF) runs; valid: ddpm" in err
    code = main(["generate", "--model", str(one), "a cat", "--sampler", "nope", "-o", str(tmp_path / "x.png"), "-q"])
    _, err = capsys.readouterr()
    assert code != 0 and "unknown sampler 'nope' for a pixel cascade (DeepFloyd IF); valid: ddpm, ddim" in err
    assert not (tmp_path / "x.png").exists()


def test_generate_with_a_sampler_per_stage_is_diffusers(folders, tmp_path, capsys):  # noqa: F811 (fixture)
    """(session 38) `--sampler "DPM++ 2M" --stage-2-sampler ddpm`: stage I with DPM-Solver, stage II with its DDPM,
    as diffusers' two pipelines loaded from the same folders, the first with DPMSolverMultistepScheduler.from_config,
    one generator through both; the record names both samplers; --stage-2-sampler without --stage-2 is refused."""
    from imagine.cli import main

    one, two = folders
    out = tmp_path / "cascade.png"
    code = main(["generate", "--model", str(one), "--stage-2", str(two), "a red circle", "--sampler", "DPM++ 2M",
                 "--stage-2-sampler", "ddpm", "--steps", "5", "--stage-2-steps", "4", "--seed", "11", "-o", str(out),
                 "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    first, second = diffusers_pipelines(one, two)
    first.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(first.scheduler.config)
    g = torch.Generator().manual_seed(11)
    low = first("a red circle", num_inference_steps=5, generator=g, output_type="pt", **KW).images
    want = second("a red circle", image=low, num_inference_steps=4, generator=g, **KW).images
    got = Image.open(out)
    print(f"CLI dpmpp_2m + ddpm: {psnr([got.convert('RGB')], want):.1f} dB")
    assert psnr([got.convert("RGB")], want) >= 50
    record = json.loads(got.text["imagine"])
    assert (record["sampler"], record["stage_2_sampler"]) == ("dpmpp_2m", "ddpm")
    code = main(["generate", "--model", str(one), "a cat", "--stage-2-sampler", "ddim", "-o",
                 str(tmp_path / "x.png"), "-q"])
    assert code != 0 and "give --stage-2 FOLDER too" in capsys.readouterr().err
