"""ComfyUI's sampling rules in the sampling core, against k-diffusion's sampler functions (which ComfyUI vendors in
comfy/k_diffusion/sampling.py) run as ComfyUI's KSampler runs them:

- its noise (comfy/sample.py prepare_noise): one torch.manual_seed(seed) draw of the whole batch; the ancestral steps'
  noise from a fresh CPU generator of seed + 1 (its default_noise_sampler on a CPU), the SDE samplers' from one
  Brownian tree over the whole batch seeded with the seed (BrownianTreeNoiseSampler with an int seed);
- its start (model_sampling.noise_scaling): x = latent + z sqrt(1 + sigma_0^2) where sigma_0 is the model's sigma_max,
  else latent + z sigma_0;
- its model's timestep (model_sampling.timestep): the nearest training timestep in log sigma, k-diffusion's
  DiscreteEpsDDPMDenoiser(quantize=True);
- its "normal" scheduler: k-diffusion's get_sigmas (timesteps evenly spaced from T - 1 to 0).
"""

import pytest
import torch

from imagine.sampling import BatchNoiseStream, make_generators, sample
from imagine.schedules import NoiseSchedule
from test_k_diffusion import kd  # noqa: F401 (the fixture)

SCHEDULE = NoiseSchedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012)
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3


def eps_model(x, t, **kw):
    # (an eps model whose output moves with t by more than a timestep's worth: quantizing t shows)
    t = t.float().view(-1, 1, 1, 1)
    return torch.tanh(torch.einsum("oc,bchw->bohw", W, x) + x * (t / 700.0) + torch.sin(t / 3.0))


class Inner(torch.nn.Module):
    def forward(self, x, t, **kw):
        return eps_model(x, t)


def comfy_run(kd, fn, shape, seed, steps, latent=None, denoise=1.0, sde=False, ancestral=False):
    den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), SCHEDULE.alphas_cumprod.float(), quantize=True)
    if denoise < 1:  # (its KSampler.set_steps: int(steps / denoise) levels laid out, the last steps + 1 run)
        sigmas = den.get_sigmas(int(steps / denoise))[-(steps + 1):]
    else:
        sigmas = den.get_sigmas(steps)
    z = torch.randn(shape, generator=torch.manual_seed(seed))
    latent = torch.zeros(shape) if latent is None else latent
    top = float(den.sigma_max)
    full = abs(float(sigmas[0]) - top) <= 1e-5 * top or float(sigmas[0]) > top
    x = latent + z * (torch.sqrt(1 + sigmas[0] ** 2) if full else sigmas[0])
    kw = {}
    if sde:
        kw["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
    elif ancestral:
        g = torch.Generator().manual_seed(seed + 1)
        kw["noise_sampler"] = lambda s, s_next: torch.randn(shape, generator=g)
    return fn(den, x, sigmas, disable=True, **kw)


def ours(name, shape, seed, steps, quantize=True, **kw):
    return sample(eps_model, shape, schedule=SCHEDULE, sampler=name, steps=steps, seeds=[seed] * shape[0],
                  rng="comfyui", start="comfyui", quantize=quantize, sigma_schedule="normal", sigma_range="model",
                  progress=False, **kw)


@pytest.mark.parametrize("name,fn,kind", [("euler", "sample_euler", ""), ("euler_a", "sample_euler_ancestral", "a"),
                                           ("dpmpp_2m", "sample_dpmpp_2m", ""),
                                           ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", "sde"),
                                           ("heun", "sample_heun", "")])
def test_a_comfyui_batch_is_k_diffusion_run_as_its_ksampler_runs_it(kd, name, fn, kind):
    shape, seed, steps = (3, 4, 8, 8), 2**63 + 12345, 6  # (ComfyUI's seeds go to 2^64 - 1)
    ref = comfy_run(kd, getattr(kd.sampling, fn), shape, seed, steps, sde=kind == "sde", ancestral=kind == "a")
    got = ours(name, shape, seed, steps)
    err = (got.float() - ref).abs().max()
    assert err < 2e-4 * ref.abs().max()
    # (the timestep rule shows: with fractional timesteps the result is off)
    loose = ours(name, shape, seed, steps, quantize=False)
    assert (loose.float() - ref).abs().max() > max(50 * err, 1e-3 * ref.abs().max())


def test_image_to_image_takes_the_last_steps_of_a_longer_plan_from_latent_plus_noise(kd):
    shape, seed, steps = (2, 4, 8, 8), 7, 5
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for denoise in (0.6, 1.0):  # (1.0: the latent plus z sqrt(1 + sigma_max^2), not q(x_T | x_0))
        ref = comfy_run(kd, kd.sampling.sample_euler_ancestral, shape, seed, steps, latent=latent, denoise=denoise,
                        ancestral=True)
        got = ours("euler_a", shape, seed, steps, init=latent, strength=denoise, strength_rule="a1111_fixed_steps")
        assert (got.float() - ref).abs().max() < 2e-4 * ref.abs().max(), denoise


def test_a_start_below_sigma_max_is_scaled_by_sigma(kd):
    # (ComfyUI's ddim_uniform levels start below the model's sigma_max: sigmas[1 + k * (T // steps)], reversed; its
    # start is then latent + z sigma_0)
    shape, seed, steps = (2, 4, 8, 8), 11, 6
    den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), SCHEDULE.alphas_cumprod.float(), quantize=True)
    levels = [float(den.sigmas[x]) for x in range(1, 1000, 1000 // steps)][::-1] + [0.0]
    sigmas = torch.tensor(levels, dtype=torch.float32)
    x = torch.randn(shape, generator=torch.manual_seed(seed)) * sigmas[0]
    ref = kd.sampling.sample_euler(den, x, sigmas, disable=True)
    with pytest.warns(UserWarning, match="lays out 7 levels"):
        got = sample(eps_model, shape, schedule=SCHEDULE, sampler="euler", steps=steps, seeds=seed, rng="comfyui",
                     start="comfyui", quantize=True, sigma_schedule="ddim_uniform", sigma_range="model",
                     progress=False)
    assert (got.float() - ref).abs().max() < 2e-4 * ref.abs().max()


def test_batch_noise_is_one_draw_of_the_batch_and_steps_draw_from_seed_plus_one():
    g = make_generators(3, 5, rng="comfyui")
    assert isinstance(g, BatchNoiseStream)
    first = g.randn((3, 2, 4))
    assert torch.equal(first, torch.randn((3, 2, 4), generator=torch.manual_seed(5)))
    g.started()
    assert torch.equal(g.randn((3, 2, 4)), torch.randn((3, 2, 4), generator=torch.manual_seed(6)))
    with pytest.raises(ValueError, match="one seed"):
        make_generators(2, [5, 6], rng="comfyui")


def test_sde_image_to_image_takes_its_tree_over_the_levels_it_runs(kd):
    # (ComfyUI's BrownianTreeNoiseSampler spans the sigmas its sampler is given: an image-to-image run's own)
    shape, seed, steps = (2, 4, 8, 8), 21, 5
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    ref = comfy_run(kd, kd.sampling.sample_dpmpp_2m_sde, shape, seed, steps, latent=latent, denoise=0.6, sde=True)
    got = ours("dpmpp_2m_sde", shape, seed, steps, init=latent, strength=0.6, strength_rule="a1111_fixed_steps")
    assert (got.float() - ref).abs().max() < 2e-4 * ref.abs().max()


def advanced_reference(kd, fn, shape, seed, steps, latent, start, end, full, add_noise, ancestral=False):
    """ComfyUI's KSamplerAdvanced (common_ksampler with start_step, last_step, force_full_denoise, disable_noise)."""
    den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), SCHEDULE.alphas_cumprod.float(), quantize=True)
    sigmas = den.get_sigmas(steps)
    if end < len(sigmas) - 1:
        sigmas = sigmas[:end + 1].clone()
        if full:
            sigmas[-1] = 0
    sigmas = sigmas[start:]
    z = torch.randn(shape, generator=torch.manual_seed(seed)) if add_noise else torch.zeros(shape)
    top = float(den.sigma_max)
    scale = torch.sqrt(1 + sigmas[0] ** 2) if abs(float(sigmas[0]) - top) <= 1e-5 * top else sigmas[0]
    kw = {}
    if ancestral:
        g = torch.Generator().manual_seed(seed + 1)
        kw["noise_sampler"] = lambda s, s_next: torch.randn(shape, generator=g)
    return fn(den, latent + z * scale, sigmas, disable=True, **kw)


@pytest.mark.parametrize("name,fn,ancestral", [("euler_a", "sample_euler_ancestral", True),
                                               ("dpmpp_2m", "sample_dpmpp_2m", False)])
def test_ksampler_advanced_windows_chain_as_comfyuis(kd, name, fn, ancestral):
    # (its two-pass form: the first pass stops at step 5 with its leftover noise, the second takes that latent on
    # without adding noise; a refiner graph's shape)
    shape, seed, steps = (2, 4, 8, 8), 99, 8
    empty = torch.zeros(shape)
    f = getattr(kd.sampling, fn)
    first = advanced_reference(kd, f, shape, seed, steps, empty, 0, 5, False, True, ancestral)
    second = advanced_reference(kd, f, shape, seed, steps, first, 5, 10000, True, False, ancestral)

    def run(init, window, add_noise):
        return sample(eps_model, shape if add_noise else torch.zeros(shape), schedule=SCHEDULE, sampler=name,
                      steps=steps, seeds=[seed] * 2, rng="comfyui", start="comfyui", quantize=True,
                      sigma_schedule="normal", sigma_range="model", progress=False, init=init, window=window)

    got_first = run(empty, (0, 5, False), True)
    assert (got_first.float() - first).abs().max() < 2e-4 * first.abs().max()  # (a VE latent with noise left)
    got_second = run(got_first.float(), (5, 10000, True), False)
    assert (got_second.float() - second).abs().max() < 2e-4 * second.abs().max()
    # a window cut at step 5 with full denoise ends at sigma 0; one with no step left gives the latent back
    cut = advanced_reference(kd, f, shape, seed, steps, empty, 0, 5, True, True, ancestral)
    assert (run(empty, (0, 5, True), True).float() - cut).abs().max() < 2e-4 * cut.abs().max()
    assert torch.equal(run(first, (8, 10000, True), False), first)


@pytest.mark.parametrize("name,fn,ancestral", [("euler_a", "sample_euler_ancestral", True),
                                               ("dpmpp_2m", "sample_dpmpp_2m", False)])
@pytest.mark.parametrize("denoise", [1.0, 0.7])
def test_a_noise_mask_keeps_the_latent_as_comfyuis_ksampler_x0_inpaint(kd, name, fn, ancestral, denoise):
    """ComfyUI's KSamplerX0Inpaint: at every call the model sees x where the mask is 1 and the latent noised with the
    start noise at the call's level (latent + z sigma) where it is 0, and its prediction is the latent there."""
    shape, seed, steps = (2, 4, 8, 8), 5, 6
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1.0
    mask = torch.nn.functional.interpolate(mask, size=(8, 8), mode="bilinear")  # (a soft edge is kept soft)
    mask[1, :, 5:] = 0.5
    den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), SCHEDULE.alphas_cumprod.float(), quantize=True)
    n = int(steps / denoise) if denoise < 1 else steps
    sigmas = den.get_sigmas(n)[-(steps + 1):]
    z = torch.randn(shape, generator=torch.manual_seed(seed))
    m = mask.expand(shape)

    def inpaint(x, sigma, **kw):
        s = sigma.view(-1, 1, 1, 1)
        out = den(x * m + (latent + z * s) * (1 - m), sigma)
        return out * m + latent * (1 - m)

    top = float(den.sigma_max)
    x = latent + z * (torch.sqrt(1 + sigmas[0] ** 2) if abs(float(sigmas[0]) - top) <= 1e-5 * top else sigmas[0])
    kw = {}
    if ancestral:
        g = torch.Generator().manual_seed(seed + 1)
        kw["noise_sampler"] = lambda s, s_next: torch.randn(shape, generator=g)
    ref = getattr(kd.sampling, fn)(inpaint, x, sigmas, disable=True, **kw)
    got = ours(name, shape, seed, steps, init=latent, strength=denoise, strength_rule="a1111_fixed_steps", mask=mask)
    assert (got.float() - ref).abs().max() < 2e-4 * ref.abs().max()
