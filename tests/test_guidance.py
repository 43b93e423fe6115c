"""Guidance and thresholding against hand computations and formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagine.guidance import (
    classifier_gradient,
    classifier_log_prob,
    concat_cond,
    dynamic_threshold,
    guided_model_output,
    latent_threshold_range,
    rescale_guidance,
    static_threshold,
)
from imagine.sampling import Denoiser, sample
from imagine.samplers import sample_ddpm
from imagine.schedules import NoiseSchedule


class CountingModel:
    """out = x * (1 + context.mean) + t/1000: depends on x, t and the conditioning."""

    def __init__(self):
        self.calls, self.batches = 0, []

    def __call__(self, x, t, context=None, flag=None):
        self.calls += 1
        self.batches.append((x.shape[0], t.shape[0], context.shape[0]))
        c = context.mean(dim=(1, 2)).view(-1, *([1] * (x.ndim - 1)))
        return x * (1 + c) + (t / 1000).view(-1, *([1] * (x.ndim - 1)))


def test_cfg_is_one_batched_forward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.full((3,), 500.0)
    cond = {"context": torch.randn(3, 5, 8, generator=g), "flag": True}
    uncond = {"context": torch.zeros(3, 5, 8), "flag": True}
    m = CountingModel()
    out = guided_model_output(m, x, t, cond, uncond, scale=7.5)
    assert m.calls == 1 and m.batches == [(6, 6, 6)]
    ref = CountingModel()
    c, u = ref(x, t, **cond), ref(x, t, **uncond)
    assert torch.allclose(out, u + 7.5 * (c - u), atol=1e-5)  # Ho & Salimans 2022, eq. 6
    # order in the batch: uncond first (as diffusers)
    both = concat_cond(uncond, cond)
    assert torch.equal(both["context"][:3], uncond["context"]) and both["flag"] is True
    # scale 1 is the conditional model alone, one forward of B
    m1 = CountingModel()
    assert torch.allclose(guided_model_output(m1, x, t, cond, uncond, scale=1.0), c)
    assert m1.batches == [(3, 3, 3)]


def test_guidance_rescale_formula():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 3, 4, 4, generator=g)
    guided = 3 * torch.randn(2, 3, 4, 4, generator=g) + 1
    phi = 0.7
    out = rescale_guidance(guided, cond, phi)
    for i in range(2):  # Lin et al. 2023, eq. 15-16, std over each sample (unbiased, as torch/diffusers)
        sd_pos = np.std(cond[i].numpy(), ddof=1)
        sd_cfg = np.std(guided[i].numpy(), ddof=1)
        expect = phi * guided[i].numpy() * sd_pos / sd_cfg + (1 - phi) * guided[i].numpy()
        assert np.allclose(out[i].numpy(), expect, atol=1e-5)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    # phi = 1 matches the conditional's std exactly
    assert torch.allclose(rescale_guidance(guided, cond, 1.0).flatten(1).std(1), cond.flatten(1).std(1))


def test_dynamic_threshold_by_hand():
    x = torch.tensor([[[[0.5, -2.0], [1.5, 3.0]]], [[[0.2, -0.4], [0.9, -0.1]]]])
    # p = 1: s = max |x| = 3 for sample 0 -> x / 3; sample 1 has s = 0.9 < 1 -> s = 1: plain clip (no change)
    out = dynamic_threshold(x, 1.0)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.5, -2.0, 1.5, 3.0]) / 3)
    assert torch.equal(out[1], x[1])
    # p = 0.5: the median of |x| = (0.5, 1.5, 2, 3) interpolates to 1.75: clip to [-1.75, 1.75], divide by 1.75
    out = dynamic_threshold(x, 0.5)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.5, -1.75, 1.5, 1.75]) / 1.75)
    assert torch.equal(out[1], x[1])
    assert torch.equal(static_threshold(x)[0].flatten(), torch.tensor([0.5, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="threshold_percentile"):
        dynamic_threshold(x, 0.0)


def test_threshold_range_is_the_papers_rule_in_units_of_r():
    x = torch.tensor([[[[0.5, -3.0], [6.0, 2.0]]], [[[0.2, -1.5], [1.9, -0.1]]]])
    # by hand, R = 2, p = 1: sample 0 has s = max(6, 2) = 6 -> x * 2 / 6; sample 1 has s = 1.9 < R: s = R, no change
    out = dynamic_threshold(x, 1.0, bound=2.0)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.5, -3.0, 6.0, 2.0]) / 3)
    assert torch.equal(out[1], x[1])
    assert torch.equal(static_threshold(x, 2.0)[0].flatten(), torch.tensor([0.5, -2.0, 2.0, 2.0]))
    # the identity the generalisation rests on: rule_R(x) = R * rule_1(x / R), for both rules
    g = torch.Generator().manual_seed(0)
    y = 4 * torch.randn(3, 4, 8, 8, generator=g)
    for r in (0.5, 3.0, 4.84):
        assert torch.allclose(dynamic_threshold(y, 0.995, r), r * dynamic_threshold(y / r, 0.995), atol=1e-6)
        assert torch.allclose(static_threshold(y, r), r * static_threshold(y / r), atol=1e-6)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="threshold_range must be a positive finite number"):
            dynamic_threshold(y, 0.995, bad)


def test_latent_threshold_range_by_hand():
    z = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, 0.0, 0.0, -10.0]])
    assert latent_threshold_range(z, 1.0) == 10.0  # the largest |z| of any sample
    # p = 0.5: medians of |z| interpolate to 2.5 and 0: the larger is R
    assert latent_threshold_range(z, 0.5) == 2.5
    # with R so chosen, dynamic thresholding rescales none of these samples
    r = latent_threshold_range(z, 0.995)
    assert torch.allclose(dynamic_threshold(z, 0.995, r), z.clamp(-r, r))
    with pytest.raises(ValueError, match="non-empty batch"):
        latent_threshold_range(torch.zeros(0, 4))


def test_pipeline_thresholds_to_the_models_range(tmp_path):
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    def run(pipe, **kw):
        return pipe.generate("a red circle", seed=5, progress=False, output_type="latent", **kw)

    plain = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "plain"))
    top = float(run(plain).latents.abs().max())
    r = top / 2  # a range the unthresholded sample exceeds, so the test can fail
    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path / "ranged", defaults={"threshold_range": r}))
    static = run(pipe, thresholding="static")
    # the last x_0 is the output (euler's last step): static thresholding holds it to the model's [-R, R]
    assert float(static.latents.abs().max()) <= r + 1e-6
    assert static.parameters["thresholding"] == "static" and static.parameters["threshold_range"] == r
    assert torch.equal(static.latents, run(pipe, thresholding="static", threshold_range=r).latents)
    assert float(run(pipe, thresholding="static", threshold_range=1.0).latents.abs().max()) <= 1.0 + 1e-6
    dyn = run(pipe, thresholding="dynamic")
    assert torch.equal(dyn.latents, run(plain, thresholding="dynamic", threshold_range=r).latents)
    assert not torch.equal(dyn.latents, run(plain, thresholding="dynamic").latents)  # R = 1 without a model range
    assert "thresholding" not in run(pipe).parameters
    with pytest.raises(ValueError, match="threshold_range must be a positive finite number"):
        run(pipe, thresholding="dynamic", threshold_range=-2.0)


def test_thresholding_reaches_the_sampler():
    s = NoiseSchedule.from_config("linear")
    seen = []

    def model(x, t):
        return torch.zeros_like(x)  # eps = 0: x_0 = x_t / sqrt(abar), large at high noise

    sample(model, (1, 1, 4, 4), schedule=s, sampler="ddim", steps=5, seeds=0, thresholding="static", progress=False,
           callback=lambda d: seen.append(d["denoised"].abs().max().item()))
    assert max(seen) <= 1.0
    seen.clear()
    sample(model, (1, 1, 4, 4), schedule=s, sampler="ddim", steps=5, seeds=0, progress=False,
           callback=lambda d: seen.append(d["denoised"].abs().max().item()))
    assert max(seen) > 10


def test_classifier_gradient_and_both_forms():
    mu = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)

    def log_prob(x, t):  # log N(x; mu, I) up to a constant: grad = mu - x
        return -0.5 * ((x - mu) ** 2).flatten(1).sum(1)

    x = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(classifier_gradient(log_prob, x, torch.zeros(3)), mu - x)

    s = NoiseSchedule.from_config("linear")
    plan = s.plan(4, rule="ddpm")
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = Denoiser(zero, plan, "epsilon")
    eps_form = Denoiser(zero, plan, "epsilon", classifier=log_prob, classifier_scale=2.0, classifier_form="eps")
    a = plan.alphas_cumprod[1].item()
    # Dhariwal & Nichol Alg. 2: eps_hat = eps - sqrt(1 - abar) s grad, so x_0 moves by (1 - abar)/sqrt(abar) s grad
    assert torch.allclose(eps_form(x, 1) - plain(x, 1), (1 - a) / math.sqrt(a) * 2.0 * (mu - x), atol=1e-5)
    # Alg. 1: the DDPM mean moves by s * Sigma * grad
    mean_form = Denoiser(zero, plan, "epsilon", classifier=log_prob, classifier_scale=2.0, classifier_form="mean")
    assert torch.allclose(mean_form.mean_shift(x, 1, 0.3), 2.0 * 0.3 * (mu - x))
    assert plain.mean_shift(x, 1, 0.3) == 0.0
    # in the sampler: one ddpm step between two noisy levels (zero noise drawn), the guided mean is the plain
    # mean plus s * beta_tilde * grad
    step = plan.head(1)
    a_t, a_prev = plan.alphas_cumprod[0].item(), plan.alphas_cumprod[1].item()
    beta_tilde = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    no_noise = torch.zeros_like
    diff = sample_ddpm(mean_form, x, step, noise=no_noise, progress=False) - \
        sample_ddpm(plain, x, step, noise=no_noise, progress=False)
    assert beta_tilde > 0.01
    assert torch.allclose(diff, 2.0 * beta_tilde * (mu - x), atol=1e-5)


def test_classifier_guidance_pulls_samples_to_the_class():
    """With a classifier for 'x near mu', guided samples end nearer mu than unguided ones, in both forms."""
    s = NoiseSchedule.from_config("linear")
    mu = 0.8

    def model(x, t):  # exact eps for data N(0, 0.25 I)
        abar = s.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        var = 0.25 * abar + (1 - abar)
        return (1 - abar).sqrt() * x / var

    def log_prob(x, t):
        return -0.5 * ((x - mu) ** 2).flatten(1).sum(1)

    kw = dict(schedule=s, steps=20, seeds=list(range(8)), progress=False)
    base = sample(model, (8, 1, 4, 4), sampler="ddpm", **kw).mean().item()
    for sampler, form in (("ddpm", "mean"), ("ddpm", "eps"), ("ddim", "eps"), ("dpmpp_2m", "eps")):
        guided = sample(model, (8, 1, 4, 4), sampler=sampler, classifier=log_prob, classifier_scale=3.0,
                        classifier_guidance_form=form, **kw).mean().item()
        assert guided > base + 0.2, (sampler, form, guided, base)


def test_classifier_log_prob_wrapper():
    logits_net = lambda x, t: torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)  # noqa: E731
    lp = classifier_log_prob(logits_net, torch.tensor([0, 1]))
    x = torch.tensor([[1.0], [2.0]])
    want = torch.log_softmax(logits_net(x, None), 1)[[0, 1], [0, 1]]
    assert torch.allclose(lp(x, torch.zeros(2)), want)
