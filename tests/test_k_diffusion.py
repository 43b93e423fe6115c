"""AUTOMATIC1111's samplers as A1111 runs them, against k-diffusion's own functions, the code A1111 calls.

A1111 (1.10, modules/sd_samplers_kdiffusion.py and sd_schedulers.py) wraps the model in k-diffusion's CompVisDenoiser
(CompVisVDenoiser for v-prediction), takes its noise levels from the schedule type "Automatic" picks for the sampler
(or the one asked for), lays out one level more and drops the penultimate for DPM2, DPM2 a and DPM++ 3M SDE, starts
from x_T = z sigma_max with each image's generator, draws ancestral noise from the same generators and SDE noise from
one Brownian tree per image seed, and calls k-diffusion's sample_* function. `run_a1111` below does exactly that with
k-diffusion 0.1.1's sampling.py and external.py (loaded from the installed wheel: its package __init__ imports
torchvision, which does not work beside this machine's torch, so the two modules are loaded on their own with a
one-line append_dims in place of its utils). Ours runs `sample(**samplers.a1111_settings(label, scheduler))`: the
settings the AUTOMATIC1111 API uses. The model, seeds and shapes are test_samplers_parity.py's.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from test_samplers_parity import SEEDS, SHAPE, config, make_model

from imagine.samplers import A1111_AUTOMATIC, A1111_DISCARD, a1111_settings
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # (k-diffusion reads its tree at float32 levels an ulp past its ends, and torchsde says so; the DDIM
              # schedule type warns when it lays out more levels than steps)
              pytest.mark.filterwarnings("ignore:Should have:UserWarning"),
              pytest.mark.filterwarnings("ignore:.* lays out .* levels for:UserWarning")]

TOL = 1e-4
# DPM adaptive's step-size control (its error ratio to the power -1/order picks each next step) carries float32 rounding
# into the steps it takes: on an AVX2 CPU ours and k-diffusion's end 2e-5 apart over most schedules and 1.03e-4 over
# KL-optimal's levels (3e-5 of the sample's range 3.3), where AVX-512 kernels gave under 1e-4
ADAPTIVE_TOL = 3e-4

# A1111's k-diffusion samplers, restated from its source: label -> (k-diffusion function, its keywords, the schedule
# type "Automatic" gives it, discard_next_to_last_sigma, Brownian-tree noise)
A1111 = {
    "DPM++ 2M": ("sample_dpmpp_2m", {}, "karras", False, False),
    "DPM++ SDE": ("sample_dpmpp_sde", {}, "karras", False, True),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {}, "exponential", False, True),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "exponential", False, True),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {}, "karras", False, False),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", {}, "exponential", True, True),
    "Euler a": ("sample_euler_ancestral", {}, None, False, False),
    "Euler": ("sample_euler", {}, None, False, False),
    "LMS": ("sample_lms", {}, None, False, False),
    "Heun": ("sample_heun", {}, None, False, False),
    "DPM2": ("sample_dpm_2", {}, "karras", True, False),
    "DPM2 a": ("sample_dpm_2_ancestral", {}, "karras", True, False),
    "Restart": ("restart", {}, "karras", False, False),  # (A1111's own, modules/sd_samplers_extra.py: `a1111_restart`)
    # (eta 1: A1111 passes its eta_ancestral to every sampler that takes an eta; these two default to 0)
    "DPM fast": ("sample_dpm_fast", {"eta": 1.0}, None, False, False),
    "DPM adaptive": ("sample_dpm_adaptive", {"eta": 1.0}, None, False, False),
}
DPM_SOLVERS = ("sample_dpm_fast", "sample_dpm_adaptive")
CONFIGS = [config("scaled_linear", "leading", "epsilon"), config("scaled_linear", "leading", "v_prediction")]


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling and external modules (see the module doc)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:  # (CI installs it: there a missing reference is a failure, not a skip)
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling",
                                             "k_diffusion.external")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    package.utils = utils
    try:
        for name in ("sampling", "external"):
            s = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(s)
            sys.modules[s.name] = module
            s.loader.exec_module(module)
            setattr(package, name, module)
        yield types.SimpleNamespace(sampling=package.sampling, external=package.external)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class CompVisModel:
    """What CompVisDenoiser wraps: a model with alphas_cumprod (float32, as A1111's) and apply_model(x, t, cond)."""

    def __init__(self, cfg):
        self.model = make_model(cfg)
        self.alphas_cumprod = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float()

    def apply_model(self, x, t, cond=None):
        return self.model(x, t)


def a1111_sigmas(kd, denoiser, scheduler: str, n: int) -> torch.Tensor:
    """n + 1 levels (the last 0) as A1111's sd_schedulers.py lays them out for schedule type `scheduler` ("uniform"
    is also what "Automatic" gives a sampler with no schedule of its own: k-diffusion's get_sigmas), with the model's
    whole range, sigma_min/max = denoiser.sigmas[0]/[-1]. "kl_optimal" stops at sigma_min: its samplers end there and
    hand on the VE sample."""
    lo, hi = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    T = len(denoiser.sigmas)
    zero = torch.zeros(1)
    if scheduler in ("uniform", "normal"):
        return denoiser.get_sigmas(n)
    if scheduler == "karras":
        return kd.sampling.get_sigmas_karras(n, lo, hi)
    if scheduler == "exponential":
        return kd.sampling.get_sigmas_exponential(n, lo, hi)
    if scheduler == "sgm_uniform":
        start, end = denoiser.sigma_to_t(torch.tensor(hi)), denoiser.sigma_to_t(torch.tensor(lo))
        return torch.cat([torch.stack([denoiser.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]), zero])
    if scheduler == "simple":
        ss = T / n
        return torch.tensor([float(denoiser.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if scheduler == "ddim_uniform":
        ss, x, sigs = max(T // n, 1), 1, []
        while x < T:
            sigs.append(float(denoiser.sigmas[x]))
            x += ss
        return torch.tensor(sigs[::-1] + [0.0])
    if scheduler == "align_your_steps":  # (get_align_your_steps_sigmas: NVIDIA's levels, log-linear in between)
        levels = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n != len(levels):
            xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
            levels = list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])
        return torch.FloatTensor(levels + [0.0])
    if scheduler == "kl_optimal":  # (sd_schedulers.kl_optimal: n + 1 levels over i / n, no 0 after sigma_min)
        u = torch.arange(n + 1) / n
        return torch.tan(u * torch.arctan(torch.tensor(lo)) + (1.0 - u) * torch.arctan(torch.tensor(hi)))
    raise AssertionError(scheduler)


def a1111_restart(kd, model, x, sigmas, extra_args=None, disable=None, noise_sampler=None):
    """A1111's "Restart" sampler (modules/sd_samplers_extra.py, restart_sampler with restart_list None), restated over
    k-diffusion's get_sigmas_karras: from 20 steps the range is laid out again for N - k m Karras steps, with m
    restarts (k = 9, m = 1; from 36 steps k = N // 4, m = 2) at the level nearest 0.1 back up to the one nearest 2,
    down k Karras steps each time; every segment a Heun step (Euler to 0), a jump up preceded by noise
    sqrt(s^2 - last^2) z."""
    n = len(sigmas) - 1
    plan, restarts = sigmas, {}
    if n >= 20:
        k, m = (n // 4, 2) if n >= 36 else (9, 1)
        plan = kd.sampling.get_sigmas_karras(n - k * m, sigmas[-2].item(), sigmas[0].item())
        restarts = {0.1: (k + 1, m, 2)}
    where = {int(torch.argmin((plan - key).abs())): v for key, v in restarts.items()}
    pairs = []
    for i in range(len(plan) - 1):
        pairs.append((plan[i], plan[i + 1]))
        if i + 1 in where:
            count, times, top = where[i + 1]
            hi = int(torch.argmin((plan - top).abs()))
            if hi < i + 1:
                ladder = kd.sampling.get_sigmas_karras(count, plan[i + 1].item(), plan[hi].item())[:-1]
                pairs += list(zip(ladder[:-1], ladder[1:])) * times
    s_in, last = x.new_ones([x.shape[0]]), None
    for a, b in pairs:
        if last is not None and last < a:
            x = x + noise_sampler(last, a) * (a ** 2 - last ** 2) ** 0.5
        d = (x - model(x, a * s_in, **extra_args)) / a
        x_euler = x + d * (b - a)
        if b == 0:
            x = x_euler
        else:
            x = x + (d + (x_euler - model(x_euler, b * s_in, **extra_args)) / b) / 2 * (b - a)
        last = b
    return x


class BlendAfterDenoising:
    """A1111's CFGDenoiser with a mask, for its k-diffusion samplers (mask_before_denoising False): every prediction
    blended with the clean init latents, denoised * nmask + init * mask (nmask: 1 where painted anew)."""

    def __init__(self, inner, init, paint):
        self.inner, self.init, self.paint = inner, init, paint

    def __call__(self, x, sigma, **kwargs):
        return self.inner(x, sigma, **kwargs) * self.paint + self.init * (1 - self.paint)


def _run_a1111(kd, cfg, label, total, first=0, init=0.0, scheduler=None, seeds=SEEDS, img2img=False, paint=None,
               inner=None, options=None):
    """A1111's run of k-diffusion sampler `label` over the levels of a `total`-step plan from level `first` on,
    starting at x = init + z sigma_first (z each image's first draw); Brownian trees over the whole plan. DPM fast
    and DPM adaptive get their ends from the model's range in txt2img, from the levels run in img2img. With `paint`
    (a latent mask, 1 where painted anew: A1111's nmask) its inpainting: the blend after denoising, and the result
    blended with the init at the end (its processing's samples * nmask + init_latent * mask). `inner`: what the
    denoiser wraps (default CompVisModel(cfg)). `options`: more keywords for the k-diffusion function."""
    funcname, kwargs, automatic, discard, brownian = A1111[label]
    kwargs = {**kwargs, **(options or {})}
    wrapper = kd.external.CompVisVDenoiser if cfg["prediction_type"] == "v_prediction" else kd.external.CompVisDenoiser
    denoiser = wrapper(CompVisModel(cfg) if inner is None else inner)
    sigmas = a1111_sigmas(kd, denoiser, scheduler or automatic or "uniform", total + 1 if discard else total)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    sched = sigmas[first:]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = init + torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]) * sched[0]
    if brownian:
        noise_sampler = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    else:
        def noise_sampler(sigma, sigma_next):
            return torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    fn = functools.partial(a1111_restart, kd) if funcname == "restart" else getattr(kd.sampling, funcname)
    if "noise_sampler" in inspect.signature(fn).parameters:
        kwargs = {**kwargs, "noise_sampler": noise_sampler}
    levels = (sched,)
    if funcname in DPM_SOLVERS:  # txt2img: the model's whole range, n the steps asked; img2img: sigma_sched[-2]
        # and [0], n its steps
        ends = (sched[-2], sched[0]) if img2img else (denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
        levels = (*ends, len(sched) - 1 if img2img else total) if funcname == "sample_dpm_fast" else ends
    model = denoiser if paint is None else BlendAfterDenoising(denoiser, init, paint)
    with torch.no_grad():
        out = fn(model, x, *levels, extra_args={"cond": None}, disable=True, **kwargs)
    if paint is not None:
        out = out * paint + init * (1 - paint)
    return out, len(sched) - 1


def run_a1111(kd, cfg, label, steps, scheduler=None, seeds=SEEDS):
    """A1111's txt2img: the whole plan from x_T = z sigma_max."""
    return _run_a1111(kd, cfg, label, steps, scheduler=scheduler, seeds=seeds)


def run_ours(cfg, label, steps, scheduler=None, seeds=SEEDS):
    settings = a1111_settings(label, scheduler)
    return sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=seeds,
                  progress=False, **settings)


def run_a1111_img2img(kd, cfg, label, steps, strength, init, fixed=False, seeds=SEEDS, paint=None):
    """A1111's img2img with a k-diffusion sampler (sd_samplers_kdiffusion.sample_img2img and
    sd_samplers_common.setup_img2img_steps, restated): t_enc = int(min(strength, 0.999) * steps) over a `steps` plan,
    or, fixed (its hires. fix pass), t_enc = steps - 1 over a plan of int(steps / min(strength, 0.999)); the run
    takes sigmas[total - t_enc - 1:] from x = init + z sigma there, z each image's first draw; the Brownian trees span
    the whole plan."""
    total = int(steps / min(strength, 0.999)) if fixed else steps
    t_enc = steps - 1 if fixed else int(min(strength, 0.999) * steps)
    return _run_a1111(kd, cfg, label, total, total - t_enc - 1, init, seeds=seeds, img2img=True, paint=paint)


def compvis_setup(cfg, steps, seeds=SEEDS):
    """What A1111's CompVis samplers start from (sd_samplers_timesteps.py): timesteps clip(range(0, T, T // steps) + 1,
    0, T - 1), their float32 abar and the previous one's (abar[0] below the first), each image's generator and unit
    noise x; and eps_of(model, x, t, *args), the model's eps at integer timestep t (v turned into eps there)."""
    abar = NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float()
    timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    alphas = abar[timesteps].double()
    alphas_prev = abar[torch.nn.functional.pad(timesteps[:-1], (1, 0))].double()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).double()

    def eps_of(model, x, t, *args):
        out = model(x.float(), torch.full((x.shape[0],), float(t)), *args).double()
        if cfg["prediction_type"] == "v_prediction":
            a = float(abar[t])
            out = a ** 0.5 * out + (1 - a) ** 0.5 * x
        return out

    return timesteps, alphas, alphas_prev, gens, x, eps_of


def a1111_img2img_steps(steps, strength, fixed=False):
    """A1111's sd_samplers_common.setup_img2img_steps: (the steps its timesteps are laid out for, t_enc)."""
    if fixed:
        return int(steps / min(strength, 0.999)), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def run_a1111_timesteps(cfg, label, steps, eta=0.0, seeds=SEEDS, init=None, strength=1.0, fixed=False, paint=None):
    """A1111's DDIM and PLMS, its CompVis samplers (modules/sd_samplers_timesteps.py and sd_samplers_timesteps_impl.py,
    restated): timesteps clip(range(0, T, T // steps) + 1, 0, T - 1) with the model's float32 abar; x = each image's
    unit noise; len - 1 steps from the highest down to the lowest timestep's abar (none below it); eps from the model
    (v turned into eps at the integer timestep); DDIM's eta noise drawn every step, PLMS's warm-up the pseudo improved
    Euler step and Adams-Bashforth 2, 3, then 4. Image to image (its CompVisSampler.sample_img2img): the timesteps laid
    out for setup_img2img_steps' count, the init taken to timesteps[t_enc]'s abar with that unit noise, and the loop
    over timesteps[:t_enc] (from timesteps[t_enc - 1], a level below). With `paint` (1 where painted anew) its
    inpainting for these samplers: the model sees the clean init where paint is 0 (its CFGDenoiserTimesteps'
    blend before denoising; its output, eps at that input, is used with the sampler's own x), and the result blended
    with the init at the end."""
    model = make_model(cfg)
    if init is not None:
        steps, t_enc = a1111_img2img_steps(steps, strength, fixed)
    timesteps, alphas, alphas_prev, gens, x, eps_of = compvis_setup(cfg, steps, seeds)
    if init is not None:
        a = float(NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod.float()[int(timesteps[t_enc])])
        x = a ** 0.5 * init.double() + (1 - a) ** 0.5 * x
        timesteps = timesteps[:t_enc]

    def eps(x, t):
        if paint is not None:  # (the model, and the reading of v as eps, at the blended input)
            x = x * paint + init.double() * (1 - paint)
        return eps_of(model, x, t)

    def transfer(x, e, index):
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        pred = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        return a_prev ** 0.5 * pred + (1 - a_prev) ** 0.5 * e

    old = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e = eps(x, int(timesteps[index]))
        if label == "DDIM":
            a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            pred = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            z = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).double()
            x = a_prev ** 0.5 * pred + (1 - a_prev - sigma ** 2) ** 0.5 * e + sigma * z
            continue
        if not old:
            e_prime = (e + eps(transfer(x, e, index), int(timesteps[max(index - 1, 0)]))) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = transfer(x, e_prime, index)
        old = (old + [e])[-3:]
    if paint is not None:
        x = x * paint + init.double() * (1 - paint)
    return x, len(timesteps) - 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("label, eta", [("DDIM", 0.0), ("DDIM", 0.5), ("PLMS", 0.0)])
@pytest.mark.parametrize("steps", [2, 3, 5, 9, 20, 30, 36, 600])
def test_a1111_ddim_and_plms(cfg, label, eta, steps):
    """DDIM and PLMS with a1111_settings (A1111's timesteps, the "compvis" schedule type, stopping at t = 1's level)
    against A1111's loops restated. Both run one step fewer than the timesteps: 4 for 5, 19 for 20; 30 steps lay out
    31 timesteps and run 30; where T // steps divides 999 the last timestep is held to 999 (3 steps: 999, 667, 334, 1;
    600: 999 twice)."""
    theirs, n = run_a1111_timesteps(cfg, label, steps, eta)
    settings = a1111_settings(label)
    calls = []
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, callback=lambda d: calls.append(d["step"]), **({"eta": eta} if eta else {}),
                  **settings)
    assert len(calls) == n == len(range(0, 1000, 1000 // steps)) - 1
    err = (ours.double() - theirs).abs().max().item()
    assert err < TOL, f"{label}, {steps} steps: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("label, eta", [("DDIM", 0.0), ("DDIM", 0.5), ("PLMS", 0.0)])
@pytest.mark.parametrize("steps, strength, fixed", [(20, 0.75, False), (30, 0.5, False), (9, 1.0, False),
                                                    (10, 0.6, True), (7, 0.3, False)])
def test_a1111_ddim_and_plms_img2img(cfg, label, eta, steps, strength, fixed):
    """Image to image with a1111_settings ("a1111" strength rule over the compvis schedule type; "a1111_fixed_steps",
    its hires. fix pass) against A1111's CompVis img2img restated: t_enc - 1 model calls (14 for 20 steps at 0.75),
    from the init noised to timesteps[t_enc]'s level, the sampler starting at timesteps[t_enc - 1]'s."""
    init = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    theirs, n = run_a1111_timesteps(cfg, label, steps, eta, init=init, strength=strength, fixed=fixed)
    settings = a1111_settings(label)
    if fixed:
        settings["strength_rule"] = "a1111_fixed_steps"
    calls = []
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, callback=lambda d: calls.append(d["step"]), init=init, strength=strength,
                  **({"eta": eta} if eta else {}), **settings)
    assert len(calls) == n == a1111_img2img_steps(steps, strength, fixed)[1] - 1
    err = (ours.double() - theirs).abs().max().item()
    assert err < TOL, f"{label}, {steps} steps at {strength}: max |ours - A1111's| = {err:.2e}"


def test_last_step_options_are_checked():
    cfg = CONFIGS[0]
    kw = dict(schedule=NoiseSchedule.from_diffusers_config(cfg), seeds=SEEDS, progress=False, sampler="ddim")
    with pytest.raises(ValueError, match="final_step='heun' replaces the plan's last step; last_step=False"):
        sample(make_model(cfg), SHAPE, steps=4, final_step="heun", sampler_options={"last_step": False}, **kw)
    with pytest.raises(ValueError, match="last_step must be True or False"):
        sample(make_model(cfg), SHAPE, steps=4, sampler_options={"last_step": "no"}, **kw)
    with pytest.raises(ValueError, match="take more steps .* a higher strength"):
        sample(make_model(cfg), SHAPE, steps=1, sampler_options={"last_step": False}, **kw)


def test_the_settings_table_is_a1111s():
    """a1111_settings names the schedule and discard A1111's table (above) gives each of its k-diffusion samplers."""
    for label, (_, kwargs, automatic, discard, _) in A1111.items():
        s = a1111_settings(label)
        assert s["sigma_schedule"] == (automatic or "uniform"), label
        assert s["discard_penultimate_sigma"] == discard, label
        assert s["sigma_range"] == "model" and s["start"] == "sigma_max"
    assert set(A1111_AUTOMATIC) == {a1111_settings(label)["sampler"] for label in A1111}
    assert set(A1111_DISCARD) == {a1111_settings(label)["sampler"] for label in A1111 if A1111[label][3]}
    # an old "... Karras" label, and the schedule type asked for
    assert a1111_settings("DPM++ 2M Karras")["sigma_schedule"] == "karras"
    assert a1111_settings("Euler", "sgm_uniform")["sigma_schedule"] == "sgm_uniform"
    with pytest.raises(ValueError, match="Karras"):
        a1111_settings("DPM++ 2M Karras", "exponential")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("label", list(A1111))
@pytest.mark.parametrize("steps", [6, 11])
def test_a1111_sampler_equals_k_diffusion(kd, cfg, label, steps):
    theirs, n = run_a1111(kd, cfg, label, steps)
    ours = run_ours(cfg, label, steps)
    assert n == steps  # (the discarding samplers too take the steps asked for)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label}, {steps} steps: max |ours - k-diffusion| = {err:.2e}"


@pytest.mark.parametrize("steps", [20, 36, 40])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
def test_restart_equals_a1111s(kd, cfg, steps):
    """Restart from 20 steps (one restart; from 36, two) against A1111's restart_sampler restated; below 20 it is
    Heun on the plan (the main test's 6 and 11 steps)."""
    theirs, _ = run_a1111(kd, cfg, "Restart", steps)
    ours = run_ours(cfg, "Restart", steps)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"Restart, {steps} steps: max |ours - A1111's| = {err:.2e}"
    from imagine.samplers import restart_segments

    plan = NoiseSchedule.from_diffusers_config(cfg).plan(steps, rule="karras", sigma_schedule="karras",
                                                         sigma_range="model")
    segments = restart_segments(plan.sigmas.tolist())
    # as many segments as steps; each starts where the last ended, but at a restart, which starts higher
    assert len(segments) == steps
    gaps = [(end, start) for (_, end), (start, _) in zip(segments[:-1], segments[1:]) if start != end]
    assert len(gaps) == (2 if steps >= 36 else 1) and all(start > end for end, start in gaps)


@pytest.mark.parametrize("label, steps", [("Euler", 8), ("Euler a", 8), ("DPM++ 2M", 8), ("DPM++ SDE", 8),
                                         ("DPM++ 3M SDE", 8), ("DPM2", 8), ("Restart", 8), ("Restart", 24)])
@pytest.mark.parametrize("strength, fixed", [(0.5, False), (0.75, False), (1.0, False), (0.6, True)])
def test_a1111_img2img_equals_k_diffusion(kd, label, steps, strength, fixed):
    """Image to image with strength_rule "a1111" (A1111's img2img: int(min(strength, 0.999) * steps) + 1 steps) and
    "a1111_fixed_steps" (its hires. fix pass: all the steps, the last of a longer plan) against A1111's way (Restart
    at 24 steps: with its restart, in the steps run or not)."""
    cfg = CONFIGS[0]
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    theirs, n = run_a1111_img2img(kd, cfg, label, steps, strength, init, fixed)
    settings = {**a1111_settings(label), **({"strength_rule": "a1111_fixed_steps"} if fixed else {})}
    runs = []
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, init=init, strength=strength, callback=lambda d: runs.append(d["step"]), **settings)
    assert len(set(runs)) == n == (steps if fixed else int(min(strength, 0.999) * steps) + 1)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label}, strength {strength}: max |ours - k-diffusion| = {err:.2e}"


def paint_mask():
    """A latent inpainting mask: 1 (painted anew) over the left half and one cell of the right, 0 (kept) elsewhere."""
    paint = torch.zeros((1, 1, *SHAPE[2:]))
    paint[..., : SHAPE[-1] // 2] = 1.0
    paint[..., 0, -1] = 1.0
    return paint


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("label", ["Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DPM2", "Heun"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_a1111_inpainting_equals_k_diffusion(kd, cfg, label, strength):
    """Inpainting with A1111's rules (a1111_settings: its strength rule, so its blend): every prediction is the clean
    init where the mask keeps it (its CFGDenoiser's blend after denoising), the result blended with the init at the
    end, against k-diffusion's samplers run so."""
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    paint = paint_mask()
    theirs, _ = run_a1111_img2img(kd, cfg, label, 8, strength, init, paint=paint)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=8, seeds=SEEDS,
                  progress=False, init=init, strength=strength, mask=paint, **a1111_settings(label))
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label}, strength {strength}: max |ours - k-diffusion| = {err:.2e}"
    assert torch.equal(ours[..., 1:, -1], init[..., 1:, -1].to(ours.dtype))  # (the kept part is the init's own)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["prediction_type"])
@pytest.mark.parametrize("label, eta", [("DDIM", 0.0), ("DDIM", 0.5), ("PLMS", 0.0)])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_a1111_ddim_and_plms_inpainting(cfg, label, eta, strength):
    """A1111's inpainting with its CompVis samplers: the model sees the clean init where the mask keeps it (its blend
    before denoising), its eps used with the sampler's own x, against its loops restated."""
    init = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    paint = paint_mask()
    theirs, _ = run_a1111_timesteps(cfg, label, 20, eta, init=init, strength=strength, paint=paint)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=20, seeds=SEEDS,
                  progress=False, init=init, strength=strength, mask=paint, **({"eta": eta} if eta else {}),
                  **a1111_settings(label))
    err = (ours.double() - theirs).abs().max().item()
    assert err < TOL, f"{label} at {strength}: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("label", ["DPM fast", "DPM adaptive"])
@pytest.mark.parametrize("strength, fixed", [(0.5, False), (0.75, False), (0.6, True)])
def test_a1111_img2img_with_dpm_solver_equals_k_diffusion(kd, label, strength, fixed):
    """DPM fast and DPM adaptive in image to image: A1111 passes the steps' first level, the last above 0
    (sigma_sched[-2]) and their count; ours takes the same from the plan's tail."""
    cfg = CONFIGS[0]
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    theirs, _ = run_a1111_img2img(kd, cfg, label, 10, strength, init, fixed)
    settings = {**a1111_settings(label), **({"strength_rule": "a1111_fixed_steps"} if fixed else {})}
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=10, seeds=SEEDS,
                  progress=False, init=init, strength=strength, **settings)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label}, strength {strength}: max |ours - k-diffusion| = {err:.2e}"


def a1111_lcm_denoiser(kd, cfg):
    """A1111's LCMCompVisDenoiser (modules/sd_samplers_lcm.py), restated over k-diffusion's DiscreteEpsDDPMDenoiser: the
    schedule of the 50 distillation timesteps 19, 39, ..., 999 (float32 abar), levels n evenly in timestep from 999
    to 19 through its t_to_sigma, the model at sigma_to_t = the nearest distillation timestep (argmin in log sigma),
    and LCM's boundary scalings c_skip, c_out of 10 t (sigma_data 0.5) on the x_0 and the VE input."""
    inner = CompVisModel(cfg)
    skip = 1000 // 50
    valid = torch.stack([inner.alphas_cumprod[1000 - 1 - j * skip] for j in range(50)]).flip(0)

    class LCMDenoiser(kd.external.DiscreteEpsDDPMDenoiser):
        def get_sigmas(self, n=None):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return kd.sampling.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * skip + (skip - 1)

        def t_to_sigma(self, timestep):
            t = torch.clamp(((timestep - (skip - 1)) / skip).float(), min=0, max=len(self.sigmas) - 1)
            return super().t_to_sigma(t)

        def get_eps(self, *args, **kwargs):
            return self.inner_model.apply_model(*args, **kwargs)

        def forward(self, input, sigma, **kwargs):
            c_out, c_in = [x[:, None, None, None] for x in self.get_scalings(sigma)]
            x0 = input + self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out
            t = self.sigma_to_t(sigma)[:, None, None, None] * 10.0
            return t / (t ** 2 + 0.25) ** 0.5 * x0 + 0.25 / (t ** 2 + 0.25) * input

    return LCMDenoiser(inner, valid, quantize=None)


def run_a1111_lcm(kd, cfg, steps, init=None, strength=1.0, seeds=SEEDS, scheduler=None):
    """A1111's sample_lcm over its LCM denoiser's levels (x = D(x), then + sigma_next z from each image's generator),
    from x_T = z sigma_max, or in image to image from init + z sigma at level steps - t_enc - 1; with a schedule type,
    A1111's recipe for it over the LCM denoiser (a1111_sigmas)."""
    denoiser = a1111_lcm_denoiser(kd, cfg)
    sigmas = denoiser.get_sigmas(steps) if scheduler is None else a1111_sigmas(kd, denoiser, scheduler, steps)
    if init is not None:
        sigmas = sigmas[steps - int(min(strength, 0.999) * steps) - 1:]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]) * sigmas[0]
    if init is not None:
        x = x + init
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            x = denoiser(x, sigmas[i] * x.new_ones([x.shape[0]]), cond=None)
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 20])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_a1111_lcm_equals_its_own(kd, steps, strength):
    """A1111's "LCM" (its own code, k-diffusion style) with a1111_settings: levels evenly in timestep over the
    distillation timesteps' levels (4 steps: 999, 672, 346, 19 in timestep, the model at the nearest distillation
    timestep), from x_T = z sigma_max, image to image by its k-diffusion rule. (An epsilon model: A1111's LCM reads any
    model's output as eps.)"""
    cfg = CONFIGS[0]
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1) if strength < 1 else None
    if init is not None and int(0.75 * steps) == 0:
        pytest.skip("no step to run")
    theirs = run_a1111_lcm(kd, cfg, steps, init, strength)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, init=init, strength=strength, **a1111_settings("LCM"))
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"LCM, {steps} steps at {strength}: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("scheduler", ["karras", "sgm_uniform", "simple", "exponential", "kl_optimal"])
@pytest.mark.parametrize("steps", [4, 5, 20])
def test_a1111_lcm_schedule_types(kd, scheduler, steps):
    """A1111's LCM with a schedule type: A1111's recipe for it over its LCM denoiser (sigma_min / max its table's ends,
    the sgm_uniform and simple recipes over its sigma_to_t / t_to_sigma and its 50 levels), its sample_lcm."""
    cfg = CONFIGS[0]
    x = run_a1111_lcm(kd, cfg, steps, scheduler=scheduler)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, **a1111_settings("LCM", scheduler))
    err = (ours.float() - x).abs().max().item()
    assert err < TOL, f"LCM / {scheduler}, {steps} steps: max |ours - A1111's| = {err:.2e}"


@pytest.mark.parametrize("label", ["DPM fast", "DPM adaptive", "Euler a", "Restart"])
@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_a1111_kl_optimal_img2img(kd, label, strength):
    """Image to image over A1111's KL Optimal levels (which stop at sigma_min): DPM fast and DPM adaptive integrate
    from the first level run to the one before the last (its sigma_sched[-2])."""
    cfg = CONFIGS[0]
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    steps = 8
    t_enc = int(strength * steps)
    theirs, _ = _run_a1111(kd, cfg, label, steps, steps - t_enc - 1, init, scheduler="kl_optimal", img2img=True)
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, init=init, strength=strength, **a1111_settings(label, "kl_optimal"))
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label} / kl_optimal at {strength}: max |ours - k-diffusion| = {err:.2e}"


class PerImageTorch:
    """A1111's TorchHijack: k-diffusion's `torch` with randn_like drawn from each image's generator in turn."""

    def __init__(self, gens):
        self.gens = gens

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in self.gens]).to(x.dtype)


@pytest.mark.parametrize("label", ["Euler", "Heun", "DPM2"])
@pytest.mark.parametrize("churn", [dict(s_churn=1.0), dict(s_churn=4.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)])
def test_churn_equals_k_diffusion(kd, label, churn):
    """Karras et al. 2022's S_churn (Algorithm 2) on Euler, Heun and DPM2, as k-diffusion's functions take it (A1111
    passes s_churn, s_tmin, s_tmax, s_noise to them), the fresh noise from each image's generator as A1111 draws it."""
    cfg = CONFIGS[0]
    funcname, _, automatic, discard, _ = A1111[label]
    denoiser = kd.external.CompVisDenoiser(CompVisModel(cfg))
    steps = 8
    sigmas = a1111_sigmas(kd, denoiser, automatic or "uniform", steps + 1 if discard else steps)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]) * sigmas[0]
    saved = kd.sampling.torch
    kd.sampling.torch = PerImageTorch(gens)
    try:
        with torch.no_grad():
            theirs = getattr(kd.sampling, funcname)(denoiser, x, sigmas, extra_args={"cond": None}, disable=True,
                                                   **churn)
    finally:
        kd.sampling.torch = saved
    settings = a1111_settings(label)
    settings["sampler_options"] = {**settings.get("sampler_options", {}), **churn}
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, **settings)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label} with {churn}: max |ours - k-diffusion| = {err:.2e}"
    plain = run_ours(cfg, label, steps)
    assert (ours.float() - plain.float()).abs().max().item() > 1e-2  # (the churn does move the result)


@pytest.mark.parametrize("label", ["DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                                   "DPM++ 3M SDE", "DPM fast", "DPM adaptive"])
def test_s_noise_equals_k_diffusion(kd, label):
    """The fresh noise's scale s_noise ("Sigma noise") on the stochastic samplers A1111 passes it to (its
    sampler_extra_params: DPM fast, DPM2 a, DPM++ 2S a / SDE / 2M SDE / 3M SDE) and DPM adaptive, as k-diffusion
    scales it. (Euler a is not among them: A1111 never passes it s_noise, and its sampler takes none.)"""
    cfg, steps = CONFIGS[0], 8
    theirs, _ = _run_a1111(kd, cfg, label, steps, options={"s_noise": 0.8})
    settings = a1111_settings(label)
    settings["sampler_options"] = {**settings.get("sampler_options", {}), "s_noise": 0.8}
    ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
                  progress=False, **settings)
    err = (ours.float() - theirs).abs().max().item()
    assert err < TOL, f"{label} with s_noise 0.8: max |ours - k-diffusion| = {err:.2e}"
    assert (ours.float() - run_ours(cfg, label, steps).float()).abs().max().item() > 1e-2  # (s_noise does act)
    with pytest.raises(ValueError, match="s_noise .* must be a number >= 0"):
        sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=steps, seeds=SEEDS,
               progress=False, **{**settings, "sampler_options": {**settings["sampler_options"], "s_noise": -1}})


def test_churn_options_are_checked_and_count_steps():
    """Bad churn options are errors naming them; a matched start does not mix with churn (its held first prediction
    would be at the unchurned level); the two-call samplers' evaluation count covers a last step above sigma 0 (A1111's
    KL Optimal), as ControlNet windows and prompt editing read it."""
    cfg = CONFIGS[0]
    kw = dict(schedule=NoiseSchedule.from_diffusers_config(cfg), seeds=SEEDS, progress=False, steps=4)
    with pytest.raises(ValueError, match="euler: s_churn must be a finite number >= 0"):
        sample(make_model(cfg), SHAPE, sampler="euler", sampler_options={"s_churn": -1}, **kw)
    with pytest.raises(ValueError, match="need s_tmin <= s_tmax"):
        sample(make_model(cfg), SHAPE, sampler="heun", sampler_options={"s_churn": 1, "s_tmin": 2, "s_tmax": 1}, **kw)
    with pytest.raises(ValueError, match="start='matched' .* s_churn"):
        sample(make_model(cfg), SHAPE, sampler="dpm2", start="matched", sampler_options={"s_churn": 1}, **kw)
    infos = []  # (a churned step reports the level its sample is at, sigma_hat = sigma (1 + gamma))
    sample(make_model(cfg), SHAPE, sampler="euler", sampler_options={"s_churn": 1.0, "s_tmin": 1.0},
           callback=infos.append, **kw)
    for info in infos:
        if info["sigma"] >= 1.0:
            assert info["sigma_hat"] == pytest.approx(info["sigma"] * (1 + 1.0 / 4))
        else:
            assert "sigma_hat" not in info
    assert {"sigma_hat" in info for info in infos} == {True, False}
    inner, seen = make_model(cfg), []

    def model(x, t, **cond):
        return inner(x, t, **cond)

    model.at_step = lambda call, total: seen.append((call, total))
    for label in ("Heun", "DPM2", "Restart"):
        seen.clear()
        sample(model, SHAPE, **{**kw, "steps": 8}, **a1111_settings(label, "kl_optimal"))
        assert seen[-1][0] == seen[-1][1] - 1 and len(seen) == seen[-1][1], (label, seen[-1], len(seen))


def test_restart_options_and_calls():
    """Restart makes 2N - 1 model calls (with a matched start too, whose first call it reuses); its options are
    checked by name."""
    cfg = CONFIGS[0]
    base = make_model(cfg)
    calls = []

    def model(x, t, **cond):
        calls.append(1)
        return base(x, t)

    kw = dict(schedule=NoiseSchedule.from_diffusers_config(cfg), steps=20, seeds=SEEDS, progress=False,
              sampler="restart", sigma_schedule="karras", sigma_range="model")
    for start in ("noise", "matched"):
        calls.clear()
        sample(model, SHAPE, start=start, **kw)
        assert len(calls) == 2 * 20 - 1, start
    for options, message in (({"restart_list": {0.1: (3,)}}, "restart_list must map a noise level"),
                             ({"restart_list": {"low": (3, 1, 2.0)}}, "restart_list must map a noise level"),
                             ({"s_noise": -1}, "s_noise .* must be a number >= 0")):
        with pytest.raises(ValueError, match=message):
            sample(model, SHAPE, sampler_options=options, **kw)
    with pytest.raises(ValueError, match="restart takes no eta"):
        sample(model, SHAPE, eta=0.5, **kw)
    with pytest.raises(ValueError, match="final_step='heun' is for the samplers"):
        sample(model, SHAPE, final_step="heun", **kw)
    # a restart list of one's own: two restarts from 0.5 up to 3 over 4 levels
    plan = NoiseSchedule.from_diffusers_config(cfg).plan(12, rule="karras", sigma_schedule="karras",
                                                         sigma_range="model")
    from imagine.samplers import restart_segments

    segments = restart_segments(plan.sigmas.tolist(), {0.5: (4, 2, 3.0)})
    assert len(segments) == 12 + 2 * 3
    calls.clear()
    sample(model, SHAPE, **{**kw, "steps": 12}, sampler_options={"restart_list": {0.5: (4, 2, 3.0)}})
    assert len(calls) == 2 * len(segments) - 1


def test_a1111_img2img_with_a_schedule_that_lays_out_more():
    """ddim_uniform lays out 31 levels for 30 steps; A1111's img2img counts from the steps asked (sigmas[30 - t_enc -
    1:]), so at strength 0.5 it runs t_enc + 2 = 17 of them."""
    from imagine.sampling import _img2img_plan

    plan = NoiseSchedule.from_config("scaled_linear").plan(30, rule="karras", sigma_schedule="ddim_uniform")
    assert len(plan) == 31
    assert len(_img2img_plan(plan, 0.5, "noise", "a1111", 30, 30)) == 17
    assert len(_img2img_plan(plan, 0.5, "noise", "diffusers", 30, 30)) == 15


def test_strength_rules():
    """Which steps each rule runs, from the end of the plan; the fixed rule's plan too long for the model is refused."""
    from imagine.sampling import _img2img_plan

    plan = NoiseSchedule.from_config("scaled_linear").plan(20, rule="karras")
    for strength, diffusers, a1111 in ((0.5, 10, 11), (0.75, 15, 16), (1.0, 20, 20), (0.04, 0, 1)):
        for rule, run in (("diffusers", diffusers), ("a1111", a1111)):
            if run == 0:
                with pytest.raises(ValueError, match="leaves no step to run"):
                    _img2img_plan(plan, strength, "noise", rule)
                continue
            tail = _img2img_plan(plan, strength, "noise", rule)
            assert len(tail) == run and torch.equal(tail.sigmas, plan.sigmas[20 - run:])
    cfg = CONFIGS[0]
    with pytest.raises(ValueError, match="strength_rule must be one of"):
        sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=4, sampler="euler",
               init=torch.zeros(SHAPE), strength=0.5, strength_rule="comfy")
    with pytest.raises(ValueError, match="more than the model's 1000 timesteps"):
        sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=50, sampler="euler",
               init=torch.zeros(SHAPE), strength=0.04, strength_rule="a1111_fixed_steps")


@pytest.mark.parametrize("scheduler", ["uniform", "normal", "karras", "exponential", "sgm_uniform", "simple",
                                       "ddim_uniform", "kl_optimal", "align_your_steps"])
@pytest.mark.parametrize("label", ["Euler", "DPM++ 2M", "DPM2", "DPM fast", "DPM adaptive", "DPM++ SDE",
                                   "DPM++ 3M SDE", "Restart"])
def test_a1111_schedule_types_equal_theirs(kd, scheduler, label):
    """(DPM fast and DPM adaptive: A1111's text to image spans the model's range whatever the schedule type, which
    only scales the start noise, by its first level; DPM fast takes the steps asked, though DDIM's lays out more)"""
    cfg = CONFIGS[0]
    steps = 7  # (1000 / 7 is not whole: DDIM's schedule type gives 8 levels, simple's floor shows)
    theirs, n = run_a1111(kd, cfg, label, steps, scheduler)
    ours = run_ours(cfg, label, steps, scheduler)
    err = (ours.float() - theirs).abs().max().item()
    assert err < (ADAPTIVE_TOL if label == "DPM adaptive" else TOL), \
        f"{label} / {scheduler}: max |ours - k-diffusion| = {err:.2e}"


@pytest.mark.parametrize("scheduler", ["uniform", "sgm_uniform", "simple", "ddim_uniform", "kl_optimal"])
@pytest.mark.parametrize("steps", [1, 7, 20, 30])
def test_schedule_levels_equal_theirs(kd, scheduler, steps):
    """The levels themselves, our plan's against A1111's recipe over k-diffusion's discrete schedule."""
    cfg = CONFIGS[0]
    denoiser = kd.external.CompVisDenoiser(CompVisModel(cfg))
    theirs = a1111_sigmas(kd, denoiser, scheduler, steps).double()
    plan = NoiseSchedule.from_diffusers_config(cfg).plan(steps, rule="karras", sigma_schedule=scheduler,
                                                         sigma_range="model")
    assert plan.sigmas.shape == theirs.shape
    torch.testing.assert_close(plan.sigmas, theirs, rtol=1e-5, atol=1e-6)
    # and the model sees each level's timestep as k-diffusion's sigma_to_t gives it
    t = denoiser.sigma_to_t(theirs[:-1].float()).double()
    torch.testing.assert_close(plan.timesteps, t, rtol=0, atol=2e-3)


def test_ddim_uniform_gives_more_steps_where_a1111_does():
    schedule = NoiseSchedule.from_config("scaled_linear")
    assert len(schedule.plan(30, rule="karras", sigma_schedule="ddim_uniform")) == 31
    assert len(schedule.plan(20, rule="karras", sigma_schedule="ddim_uniform")) == 20


def test_discard_penultimate_sigma():
    """steps + 1 levels with the one before the end left out: the same levels otherwise, the last step longer."""
    schedule = NoiseSchedule.from_config("scaled_linear")
    for rule, kw in (("karras", {"sigma_schedule": "karras", "sigma_range": "model"}), ("dpm_solver", {}),
                     ("ddim", {})):
        full = schedule.plan(9, rule=rule, **kw)
        cut = schedule.plan(8, rule=rule, discard_penultimate_sigma=True, **kw)
        assert len(cut) == 8
        assert torch.equal(cut.sigmas, torch.cat([full.sigmas[:-2], full.sigmas[-1:]]))
        assert torch.equal(cut.timesteps, full.timesteps[:-1])
    with pytest.raises(ValueError, match="at most 999 steps"):
        schedule.plan(1000, rule="karras", discard_penultimate_sigma=True)
    with pytest.raises(ValueError, match="lcm"):
        schedule.plan(4, rule="lcm", discard_penultimate_sigma=True)


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "dpmpp_3m_sde"])
def test_warmup_differs_only_where_k_diffusion_differs(sampler):
    """The 3M solvers' two warm-ups take the same first step (1st order) and part at the second (diffusers' midpoint
    form of the 2nd-order step vs k-diffusion's phi_2 weight)."""
    cfg = CONFIGS[0]
    kw = dict(schedule=NoiseSchedule.from_diffusers_config(cfg), seeds=SEEDS, progress=False, sampler=sampler,
              sigma_schedule="exponential", steps=8)
    model = make_model(cfg)
    seen = {}
    for warmup in ("diffusers", "k_diffusion"):
        xs = seen[warmup] = []
        sample(model, SHAPE, **kw, sampler_options={"warmup": warmup},
               callback=lambda info, xs=xs: xs.append(info["x"].clone()))
    a, b = seen["diffusers"], seen["k_diffusion"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # (x before steps 0 and 1: the first step alike)
    assert (a[2] - b[2]).abs().max() > 1e-4  # (after the second step)
    with pytest.raises(ValueError, match="warmup must be one of"):
        sample(model, SHAPE, **kw, sampler_options={"warmup": "comfy"})


def test_a1111_schedule_names():
    """A1111's names and labels of the schedule types, and the CLI's --schedule-type, cover SIGMA_SCHEDULES."""
    from imagine.commands.generate import SCHEDULE_NAMES, add_arguments
    from imagine.samplers import a1111_schedule
    from imagine.schedules import SIGMA_SCHEDULES

    for name, ours in (("Karras", "karras"), ("SGM Uniform", "sgm_uniform"), ("SGMUniform", "sgm_uniform"),
                       ("DDIM", "ddim_uniform"), ("KL Optimal", "kl_optimal"), ("Align Your Steps", "align_your_steps"),
                       ("Automatic", None), ("uniform", "uniform"), (None, None)):
        assert a1111_schedule(name) == ours, name
    with pytest.raises(ValueError, match="valid: automatic, karras, .*ddim"):
        a1111_schedule("cosine")
    with pytest.raises(ValueError, match="scheduler 'cosine' is not supported"):
        a1111_settings("Euler", "cosine")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # (the CLI's names, kept without importing torch, are the library's; its labels are a1111_schedule's)
    assert SCHEDULE_NAMES == SIGMA_SCHEDULES
    for name, ours in (("karras", "karras"), ("KL Optimal", "kl_optimal"), ("Automatic", None), ("DDIM", "ddim_uniform")):
        assert parser.parse_args(["--schedule-type", name]).sigma_schedule == ours, name


def test_start_at_sigma_max():
    """start="sigma_max": x_T = z sigma_0 in VE terms (sigma_0 the plan's first level), whatever the sampler;
    diffusers' own start for Euler with trailing spacing only, so there the two starts agree."""
    cfg = config("scaled_linear", "trailing", "epsilon")
    model, schedule = make_model(cfg), NoiseSchedule.from_diffusers_config(cfg)
    z = torch.cat([torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(s)) for s in SEEDS]).double()
    for sampler, rule, spacing, same in (("euler", "karras", "trailing", True), ("euler", "karras", "leading", False),
                                          ("dpmpp_2m", "dpm_solver", "trailing", False)):
        seen = {}
        for start in ("noise", "sigma_max"):
            def first(info, start=start):
                if info["step"] == 0:
                    seen[start] = info["x"].double().clone()

            sample(model, SHAPE, schedule=schedule, steps=4, seeds=SEEDS, progress=False, sampler=sampler,
                   timestep_spacing=spacing, start=start, callback=first)
        s0 = float(schedule.plan(4, rule=rule, spacing=spacing).sigmas[0])
        torch.testing.assert_close(seen["sigma_max"], z * (s0 / math.sqrt(1 + s0 * s0)), rtol=1e-6, atol=1e-6)
        assert torch.allclose(seen["noise"], seen["sigma_max"]) == same, (sampler, spacing)


# -- a whole generation -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    ref = save_diffusers_folder(folder, "sd1")
    return ref, TextToImagePipeline.from_pretrained(folder)


def a1111_generation(kd, ref, label: str, steps: int) -> torch.Tensor:
    """A1111's txt2img assembled from its parts on the tiny SD 1.x model: the prompt's CLIP states (diffusers'
    encode_prompt: A1111's for a plain prompt, 77 tokens padded with the end token, weights 1), classifier-free
    guidance on the denoised outputs as A1111's CFGDenoiser.combine_denoised forms it, k-diffusion's sampler set up as
    `run_a1111` does over diffusers' U-Net, and the VAE's decode. Returns the image in [0, 1]."""
    from test_loading import SD_SCHEDULE
    from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE

    funcname, kwargs, automatic, discard, brownian = A1111[label]
    with torch.no_grad():
        cond = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]
        uncond = ref.encode_prompt(NEGATIVE, "cpu", 1, False)[0]

    class Model:  # what CompVisDenoiser wraps: the LDM's float32 alphas_cumprod (of float64 betas) and apply_model
        alphas_cumprod = NoiseSchedule.from_config(**{k: v for k, v in SD_SCHEDULE.items()
                                                      if k in ("beta_start", "beta_end")},
                                                   kind="scaled_linear").alphas_cumprod.float()

        @staticmethod
        def apply_model(x, t, cond):
            return ref.unet(x, t, encoder_hidden_states=cond).sample

    denoiser = kd.external.CompVisDenoiser(Model())

    def guided(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + (c - u) * CFG

    n = steps + 1 if discard else steps
    sigmas = a1111_sigmas(kd, denoiser, automatic or "uniform", n)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    f = ref.vae_scale_factor
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, 4, SIZE // f, SIZE // f), generator=g) * sigmas[0]
    if brownian:
        kwargs = {**kwargs, "noise_sampler": kd.sampling.BrownianTreeNoiseSampler(
            x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[SEED])}
    elif "noise_sampler" in inspect.signature(getattr(kd.sampling, funcname)).parameters:
        kwargs = {**kwargs, "noise_sampler": lambda s, t: torch.randn(x.shape, generator=g)}
    levels = (sigmas,)
    if funcname in DPM_SOLVERS:  # (txt2img: the model's whole range, and for DPM fast the steps)
        ends = (denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
        levels = (*ends, steps) if funcname == "sample_dpm_fast" else ends
    with torch.no_grad():
        latents = getattr(kd.sampling, funcname)(guided, x, *levels, disable=True, **kwargs)
        image = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample[0]
    return ((image + 1) / 2).clamp(0, 1).float()


def our_generation(pipe, label: str, steps: int, **settings) -> torch.Tensor:
    from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE

    res = pipe.generate(PROMPT, NEGATIVE, steps=steps, guidance_scale=CFG, seed=SEED, height=SIZE, width=SIZE,
                        progress=False, output_type="latent", **(settings or a1111_settings(label)))
    return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()


@pytest.mark.parametrize("label", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 3M SDE", "DPM2", "DPM fast"])
def test_a1111_generation_equals_k_diffusion_over_diffusers_parts(kd, sd, label):
    """A whole generation (guidance 7.5, 12 steps): ours with a1111_settings against A1111's way assembled from
    diffusers' U-Net and VAE and k-diffusion's sampler: >= 50 dB, test_sd_parity.py's bar; the same sampler run
    diffusers' way (its levels, start and warm-up) does not reach it."""
    from test_sd_parity import psnr

    ref, pipe = sd
    want = a1111_generation(kd, ref, label, 12)
    assert want.std() > 0.02
    assert psnr(our_generation(pipe, label, 12), want) >= 50
    assert psnr(our_generation(pipe, label, 12, sampler=label), want) < 50


if __name__ == "__main__":  # the figures: worst |ours - k-diffusion| per sampler, and the generations' PSNR
    from test_sd_parity import psnr

    fixture = kd.__wrapped__()
    k = next(fixture)
    for label in A1111:
        worst = max((run_ours(cfg, label, steps).float() - run_a1111(k, cfg, label, steps)[0]).abs().max().item()
                    for cfg in CONFIGS for steps in (6, 11))
        print(f"{label:18s} worst {worst:.1e}")
    for scheduler in ("uniform", "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform",
                      "kl_optimal"):
        worst = max((run_ours(CONFIGS[0], label, 7, scheduler).float()
                     - run_a1111(k, CONFIGS[0], label, 7, scheduler)[0]).abs().max().item()
                    for label in ("Euler", "DPM++ 2M", "DPM2"))
        print(f"schedule {scheduler:13s} worst {worst:.1e}")
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)
    worst = 0.0
    for label in ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 3M SDE", "DPM2", "DPM fast", "DPM adaptive"):
        for strength, fixed in ((0.5, False), (0.75, False), (1.0, False), (0.6, True)):
            settings = {**a1111_settings(label), **({"strength_rule": "a1111_fixed_steps"} if fixed else {})}
            ours = sample(make_model(CONFIGS[0]), SHAPE, schedule=NoiseSchedule.from_diffusers_config(CONFIGS[0]),
                          steps=8, seeds=SEEDS, progress=False, init=init, strength=strength, **settings)
            theirs = run_a1111_img2img(k, CONFIGS[0], label, 8, strength, init, fixed)[0]
            worst = max(worst, (ours.float() - theirs).abs().max().item())
    print(f"img2img (8 samplers, 4 strengths/rules) worst {worst:.1e}")
    worst = max((run_ours(cfg, "Restart", n).float() - run_a1111(k, cfg, "Restart", n)[0]).abs().max().item()
                for cfg in CONFIGS for n in (20, 36, 40))
    print(f"Restart (20, 36, 40 steps, eps and v) worst {worst:.1e}")
    worst = 0.0
    for cfg in CONFIGS:
        for label, eta in (("DDIM", 0.0), ("DDIM", 0.5), ("PLMS", 0.0)):
            for n in (2, 3, 5, 9, 20, 30, 36, 600):
                ours = sample(make_model(cfg), SHAPE, schedule=NoiseSchedule.from_diffusers_config(cfg), steps=n,
                              seeds=SEEDS, progress=False, **({"eta": eta} if eta else {}), **a1111_settings(label))
                worst = max(worst, (ours.double() - run_a1111_timesteps(cfg, label, n, eta)[0]).abs().max().item())
    print(f"DDIM/PLMS (A1111's CompVis loops, eps and v, 8 step counts) worst {worst:.1e}")
    import tempfile
    from pathlib import Path as _Path

    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    with tempfile.TemporaryDirectory() as d:
        ref = save_diffusers_folder(_Path(d) / "folder", "sd1")
        pipe = TextToImagePipeline.from_pretrained(_Path(d) / "folder")
        for label in ("Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM2", "DPM2 a",
                      "DPM fast", "DPM adaptive"):
            want = a1111_generation(k, ref, label, 12)
            print(f"generation {label:14s} a1111_settings {psnr(our_generation(pipe, label, 12), want):6.1f} dB, "
                  f"diffusers' way {psnr(our_generation(pipe, label, 12, sampler=label), want):5.1f} dB")
