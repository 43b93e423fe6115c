"""CFG++ (Chung et al. 2024): DDIM, Euler and Euler a that renoise with the unconditional prediction.

Checked against A1111's "DDIM CFG++" (modules/sd_samplers_timesteps_impl.py, ddim_cfgpp, restated: its CompVis
timesteps, the guided eps from CFG scale / 12.5, x0 from it, the direction from the unconditional eps) and against the
identities that follow from the paper's update: at lambda 0 a CFG++ sampler is its plain sampler run on the
unconditional prediction, and with no guidance at all it is the plain sampler.
"""

from __future__ import annotations

import pytest
import torch

from test_k_diffusion import compvis_setup
from test_samplers_parity import SEEDS, SHAPE, config, make_model

from imagine.samplers import A1111_CFGPP_SCALE, a1111_guidance_scale, a1111_settings
from imagine.sampling import Denoiser, sample
from imagine.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = [config("scaled_linear", "leading", "epsilon"), config("scaled_linear", "leading", "v_prediction")]


def conditioned(cfg):
    """The parity harness's tiny model with a conditioning input: its output shifted and scaled by `c`."""
    inner = make_model(cfg)

    def model(x, t, c):
        c = c.view(-1, 1, 1, 1).to(x.dtype)
        return inner(x + 0.3 * c, t) * (1 + 0.2 * c)

    return model


COND = {"c": torch.tensor([1.0, -0.5])}
UNCOND = {"c": torch.tensor([0.0, 0.0])}


def run(cfg, sampler, steps=8, **kw):
    return sample(conditioned(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), sampler=sampler,
                  steps=steps, seeds=SEEDS, progress=False, **kw)


@torch.no_grad()
def a1111_ddim_cfgpp(cfg, steps, cfg_scale, eta=0.0, init=None, strength=1.0, paint=None):
    """A1111's ddim_cfgpp restated: timesteps clip(range(0, T, T // steps) + 1, 0, T - 1) over the model's float32
    abar, x = each image's unit noise, len - 1 steps down to the lowest timestep's level; at each, eps_c and eps_u from
    the model (v turned into eps at the integer timestep), e = eps_u + (eps_c - eps_u) cfg_scale / 12.5, x0 from e,
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps_u + s z. Image to image (its CompVis sample_img2img): the
    timesteps for its step count, init noised to timesteps[t_enc]'s abar, the loop over timesteps[:t_enc]; with `paint`
    (1 where painted anew) its inpainting: both passes see the clean init where paint is 0, the result blended at the
    end."""
    from test_k_diffusion import a1111_img2img_steps

    model = conditioned(cfg)
    if init is not None:
        steps, t_enc = a1111_img2img_steps(steps, strength)
    timesteps, alphas, alphas_prev, gens, x, eps_of = compvis_setup(cfg, steps)
    if init is not None:
        a = float(NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float()[int(timesteps[t_enc])])
        x = a ** 0.5 * init.double() + (1 - a) ** 0.5 * x
        timesteps = timesteps[:t_enc]

    def eps(x, t, c):
        if paint is not None:
            x = x * paint + init.double() * (1 - paint)
        return eps_of(model, x, t, c["c"])

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t = int(timesteps[index])
        e_c, e_u = eps(x, t, COND), eps(x, t, UNCOND)
        e = e_u + (e_c - e_u) * cfg_scale / 12.5
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        s = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        z = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).double()
        x = a_prev ** 0.5 * x0 + (1 - a_prev - s ** 2) ** 0.5 * e_u + s * z
    return x if paint is None else x * paint + init.double() * (1 - paint)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("steps, cfg_scale, eta", [(5, 7.0, 0.0), (12, 12.5, 0.0), (9, 5.0, 0.5), (20, 1.0, 0.0)])
def test_ddim_cfgpp_equals_a1111s(cfg, steps, cfg_scale, eta):
    theirs = a1111_ddim_cfgpp(cfg, steps, cfg_scale, eta)
    settings = a1111_settings("DDIM CFG++")
    ours = run(cfg, settings.pop("sampler"), steps, cond=COND, uncond=UNCOND, eta=eta,
               guidance_scale=a1111_guidance_scale("DDIM CFG++", cfg_scale), **settings)
    err = float((ours.double() - theirs).abs().max())
    assert err < 1e-4, f"{steps} steps, CFG {cfg_scale}: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("strength, eta", [(0.75, 0.0), (1.0, 0.5)])
def test_ddim_cfgpp_inpainting_equals_a1111s(cfg, strength, eta):
    """A1111's DDIM CFG++ inpainting (its CompVis img2img and its blend before denoising: both passes see the clean
    init where the mask keeps it; x0 and the renoising direction from that eps at the sampler's own x)."""
    import math

    from test_k_diffusion import paint_mask

    init, paint = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE), paint_mask()
    theirs = a1111_ddim_cfgpp(cfg, 20, 7.0, eta, init=init, strength=strength, paint=paint)
    settings = a1111_settings("DDIM CFG++")
    ours = run(cfg, settings.pop("sampler"), 20, cond=COND, uncond=UNCOND, eta=eta, init=init, strength=strength,
               mask=paint, guidance_scale=a1111_guidance_scale("DDIM CFG++", 7.0), **settings)
    err = float((ours.double() - theirs).abs().max())
    assert err < 1e-4, f"strength {strength}, eta {eta}: max |ours - A1111's| = {err:.2e}"


def test_a1111_maps_cfg_to_lambda():
    assert A1111_CFGPP_SCALE == pytest.approx(1 / 12.5)
    assert a1111_guidance_scale("DDIM CFG++", 7.5) == pytest.approx(0.6)
    assert a1111_guidance_scale("ddim_cfgpp", 12.5) == pytest.approx(1.0)
    assert a1111_guidance_scale("DDIM", 7.5) == 7.5
    # (our other CFG++ samplers, reached through the A1111 API or --a1111-sampling, are mapped the same way)
    assert a1111_guidance_scale("Euler CFG++", 7.5) == pytest.approx(0.6)
    assert a1111_guidance_scale("euler_a_cfgpp", 12.5) == pytest.approx(1.0)


@pytest.mark.parametrize("cfgpp, plain, kw", [("ddim_cfgpp", "ddim", {}), ("ddim_cfgpp", "ddim", {"eta": 0.7}),
                                              ("euler_cfgpp", "euler", {}), ("euler_a_cfgpp", "euler_a", {}),
                                              ("euler_a_cfgpp", "euler_a", {"eta": 0.5})])
def test_lambda_zero_is_the_unconditional_sampler(cfgpp, plain, kw):
    """At lambda 0 the guided prediction is the unconditional one, and the step renoises with it too: the plain
    sampler run on the unconditional inputs alone (its draws the same)."""
    cfg = CONFIGS[0]
    ours = run(cfg, cfgpp, cond=COND, uncond=UNCOND, guidance_scale=0.0, **kw)
    want = run(cfg, plain, cond=UNCOND, **kw)
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cfgpp, plain", [("ddim_cfgpp", "ddim"), ("euler_cfgpp", "euler"),
                                          ("euler_a_cfgpp", "euler_a")])
def test_lambda_one_still_renoises_with_the_unconditional_prediction(cfgpp, plain):
    """lambda 1 goes to the conditional x0 but along the unconditional direction: not the plain sampler's conditional
    run (which skips the unconditional pass at scale 1); without an uncond there is nothing else to renoise with, and
    it is the plain sampler."""
    cfg = CONFIGS[0]
    calls = []
    inner = conditioned(cfg)

    def counting(x, t, c):
        calls.append(x.shape[0])
        return inner(x, t, c)

    schedule = NoiseSchedule.from_diffusers_config(cfg)
    ours = sample(counting, SHAPE, schedule=schedule, sampler=cfgpp, steps=8, seeds=SEEDS, progress=False, cond=COND,
                  uncond=UNCOND, guidance_scale=1.0)
    assert sum(calls) == 2 * SHAPE[0] * 8  # (both passes at every step)
    plain_run = run(cfg, plain, cond=COND, guidance_scale=1.0)
    gap = float((ours - plain_run).abs().max())
    assert gap > 1e-2, gap
    torch.testing.assert_close(run(cfg, cfgpp, cond=COND), plain_run, rtol=0, atol=2e-5)


def test_pipeline_runs_the_unconditional_pass_at_scale_one(tmp_path):
    """generate() encodes the negative prompt for a CFG++ sampler at guidance 1 too (diffusers and our pipelines skip
    it at 1 for plain CFG): the image differs from the plain sampler's at 1."""
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    kw = dict(seed=3, steps=6, guidance_scale=1.0, progress=False, output_type="latent")
    cfgpp = pipe.generate("a red circle", "blue", sampler="ddim_cfgpp", **kw).latents
    plain = pipe.generate("a red circle", "blue", sampler="ddim", **kw).latents
    assert float((cfgpp - plain).abs().max()) > 1e-4


def test_errors_name_the_problem():
    from imagine.samplers import SAMPLERS

    schedule = NoiseSchedule.from_config("scaled_linear")
    plan = schedule.plan(4, rule="ddim")
    with pytest.raises(ValueError, match="needs an imagine.sampling.Denoiser"):
        SAMPLERS["ddim_cfgpp"](lambda x, i: x, torch.zeros(SHAPE), plan, progress=False)
    cfg = CONFIGS[0]

    def rule(model, x, t, cond, uncond, scale, rescale=0.0):  # a guidance rule of the caller's, without `parts`
        return model(x, t, **cond)

    with pytest.raises(ValueError, match="takes no `parts`"):
        run(cfg, "euler_cfgpp", cond=COND, uncond=UNCOND, guidance_scale=0.5, guidance=rule)
    with pytest.raises(ValueError, match="deterministic and takes no eta"):
        run(cfg, "euler_cfgpp", eta=0.5)
    # the denoiser keeps the unconditional x0 only when a CFG++ sampler asks
    denoise = Denoiser(conditioned(cfg), plan, "epsilon", COND, UNCOND, 0.5)
    denoise(torch.zeros(SHAPE), 0)
    assert denoise.uncond_x0 is None


@torch.no_grad()
def comfyui_euler_cfgpp(cfg, steps, lam, eta):
    """ComfyUI's euler_cfg_pp / euler_ancestral_cfg_pp (comfy/k_diffusion/sampling.py, for an eps model) restated over
    k-diffusion's layout: in VE terms at our plan's levels, D = D_u + lam (D_c - D_u), d = (x - D_u) / sigma,
    x = D + d sigma_down, then sigma_up z from each image's generator (k-diffusion's ancestral split)."""
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    plan = schedule.plan(steps, rule="karras")
    model = conditioned(cfg)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]

    def draw():
        return torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).double()

    sig = plan.sigmas.tolist()
    x = draw() * (sig[0] ** 2 + 1) ** 0.5  # (diffusers' leading-spacing start, which ours keeps)
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        a = 1 / (1 + s * s) ** 0.5
        t = torch.full((SHAPE[0],), float(plan.timesteps[i]))
        d_c = x - s * model((x * a).float(), t, COND["c"]).double()
        d_u = x - s * model((x * a).float(), t, UNCOND["c"]).double()
        denoised = d_u + lam * (d_c - d_u)
        up = min(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        down = (s_next ** 2 - up ** 2) ** 0.5
        x = denoised + (x - d_u) / s * down
        if eta > 0 and s_next > 0:
            x = x + up * draw()
    return x


@pytest.mark.parametrize("sampler, eta", [("euler_cfgpp", 0.0), ("euler_a_cfgpp", 1.0), ("euler_a_cfgpp", 0.5)])
@pytest.mark.parametrize("lam", [0.5, 0.8])
def test_euler_cfgpp_equals_comfyuis(sampler, eta, lam):
    cfg = CONFIGS[0]
    theirs = comfyui_euler_cfgpp(cfg, 8, lam, eta)
    ours = run(cfg, sampler, cond=COND, uncond=UNCOND, guidance_scale=lam, **({"eta": eta} if eta else {}))
    err = float((ours.double() - theirs).abs().max())
    assert err < 1e-4, f"{sampler}, lambda {lam}: max |ours - ComfyUI's| = {err:.2e}"


@pytest.mark.parametrize("sampler", ["ddim_cfgpp", "euler_cfgpp"])
def test_matched_start_keeps_the_unconditional_x0(sampler):
    """start="matched" evaluates the first step's D before the sampler runs; the unconditional x0 of that call is kept
    with it, and the sampler's first step reads that pair (not the uncond x0 of a later call, nor none)."""
    cfg = CONFIGS[0]
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    plan = schedule.plan(6, rule="ddim" if sampler == "ddim_cfgpp" else "karras")
    denoise = Denoiser(conditioned(cfg), plan, "epsilon", COND, UNCOND, 0.6, schedule=schedule)
    denoise.keep_uncond = True
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    moved = denoise.matched_start(x)
    held = denoise.uncond_x0.clone()
    denoise.uncond_x0 = None  # (as if something in between had cleared it: the held pair must restore it)
    first = denoise(moved, 0)
    assert torch.equal(denoise.uncond_x0, held) and first is not None
    out = run(cfg, sampler, cond=COND, uncond=UNCOND, guidance_scale=0.6, start="matched")
    plain = run(cfg, sampler.replace("_cfgpp", ""), cond=COND, uncond=UNCOND, guidance_scale=0.6, start="matched")
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_instruct_pix2pix_runs_its_three_passes_for_cfgpp():
    """InstructPix2Pix's diffusers-style gate runs guidance only for s_T > 1; CFG++'s lambda is below 1, so for CFG++
    the three passes always run and the unconditional pass is e(z, 0, 0)."""
    import functools

    from imagine.guidance import instruct_pix2pix_guidance

    calls = []

    def model(x, t, concat, c):
        calls.append(x.shape[0])
        return torch.tanh(x + concat + c.view(-1, 1, 1, 1))

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((SHAPE[0],), 500.0)
    concat = torch.ones(SHAPE)
    cond, uncond = {"concat": concat, "c": COND["c"]}, {"concat": concat, "c": UNCOND["c"]}
    rule = functools.partial(instruct_pix2pix_guidance, image_scale=1.5)
    parts = {}
    out = rule(model, x, t, cond, uncond, 0.6, parts=parts)
    nothing = model(x, t, torch.zeros_like(concat), UNCOND["c"])
    torch.testing.assert_close(parts["uncond"], nothing)
    assert not torch.allclose(out, model(x, t, concat, COND["c"]))  # (guided: not the conditional pass alone)
    calls.clear()
    rule(model, x, t, cond, uncond, 0.6, parts={})
    assert sum(calls) == 3 * SHAPE[0]  # (the three passes, for CFG++)
    calls.clear()
    rule(model, x, t, cond, uncond, 0.6)
    assert calls == [SHAPE[0]]  # (without parts the gate still applies below scale 1: the conditional pass alone)


def test_defaults_and_refusals(tmp_path):
    """A CFG++ sampler with no guidance scale takes the model's default CFG / 12.5; a scale above 2 warns (a CFG
    scale where lambda is meant); final_step "heun" is refused; the infotext writes DDIM CFG++'s lambda back as A1111's
    CFG scale."""
    from imagine.images import a1111_parameters
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "tiny"))  # (its default guidance: 3)
    kw = dict(seed=3, steps=4, progress=False, output_type="latent")
    default = pipe.generate("a red circle", sampler="ddim_cfgpp", **kw)
    assert default.parameters["guidance_scale"] == pytest.approx(3.0 / 12.5)
    torch.testing.assert_close(default.latents, pipe.generate("a red circle", sampler="ddim_cfgpp",
                                                              guidance_scale=0.24, **kw).latents)
    with pytest.warns(UserWarning, match="CFG\\+\\+'s lambda"):
        pipe.generate("a red circle", sampler="euler_cfgpp", guidance_scale=7.5, **kw)
    with pytest.raises(ValueError, match="final_step='heun'"):
        run(CONFIGS[0], "ddim_cfgpp", cond=COND, uncond=UNCOND, guidance_scale=0.5, final_step="heun")
    text = a1111_parameters({"prompt": "p", "steps": 20, "sampler": "ddim_cfgpp", "guidance_scale": 0.6})
    # (the fields' line: "..., CFG scale: x," then the noise source, "RNG: CPU")
    assert "Sampler: DDIM CFG++, CFG scale: 7.5, RNG" in text
    assert "CFG scale: 7.5, RNG" in a1111_parameters({"prompt": "p", "sampler": "euler_cfgpp", "guidance_scale": 0.6})
    assert "CFG scale: 0.6, RNG" in a1111_parameters({"prompt": "p", "sampler": "euler", "guidance_scale": 0.6})
