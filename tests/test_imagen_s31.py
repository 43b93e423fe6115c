"""Imagen as imagen-pytorch (2.1.0) samples it: the continuous-time schedules and VDM's posterior (imagine.schedules,
imagine.samplers.sample_ddpm), its guidance (imagine.guidance.projected_guidance) and the cascade
(imagine.pipelines.imagen), each against imagen-pytorch's own functions and Imagen.sample on the same weights, or a
closed form."""

from __future__ import annotations

import fractions
import math
import os

import pytest
import torch

import imagen_peer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ip = imagen_peer.load()
ipm = ip.imagen_pytorch

from imagine.guidance import classifier_free_guidance, projected_guidance  # noqa: E402
from imagine.pipelines.imagen import ImagenPipeline, read_checkpoint  # noqa: E402
from imagine.samplers import sample_ddpm  # noqa: E402
from imagine.schedules import alpha_sigma, continuous_plan, log_snr  # noqa: E402

TEXT_DIM = 16
SIZES = (8, 16)
# ours against the peer's pictures in [0, 1] after a cascade: float32 rounding only (the kernels' sums differ by CPU:
# up to 1.1e-4 measured on an AVX-512 Zen 4 at guidance 3 in session 33, under 1e-4 on the AVX2 Zen 3 of sessions
# 31-32); a wrong draw or formula moves them by 1e-2 or more
PICTURE_ATOL = 2e-4
TIMESTEPS = (6, 5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:  # pictures in [0, 1]
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# -- schedules and the posterior ------------------------------------------------------------------------------------
TIMES = torch.cat([torch.linspace(0, 1, 1001), torch.rand(500, generator=torch.Generator().manual_seed(0))])


@pytest.mark.parametrize("kind, theirs", [("cosine", ipm.alpha_cosine_log_snr), ("linear", ipm.beta_linear_log_snr)])
def test_log_snr_matches_peer(kind, theirs):
    ours, peer = log_snr(kind, TIMES), theirs(TIMES)
    assert ours.dtype == torch.float32
    assert rel(ours, peer) < 1e-6, rel(ours, peer)
    a, s = alpha_sigma(ours)
    pa, ps = ipm.log_snr_to_alpha_sigma(peer)
    assert rel(a, pa) < 1e-6 and rel(s, ps) < 1e-6


def test_log_snr_closed_forms():
    t = TIMES.double().clamp(max=0.999)  # (float64: the closed forms themselves)
    s = 0.008
    assert rel(torch.sigmoid(log_snr("cosine", t)), torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2) < 1e-12
    assert rel(torch.sigmoid(log_snr("linear", t)), torch.exp(-(1e-4 + 10 * t**2))) < 1e-12
    lam = log_snr("cosine", t)
    a, sig = alpha_sigma(lam)
    assert rel(a**2 + sig**2, torch.ones_like(a)) < 1e-15 and rel(a**2 / sig**2, lam.exp()) < 1e-12


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddpm_step_on_continuous_plan_is_vdm_posterior(kind):
    """sample_ddpm's step over continuous_plan: the mean and variance of q(z_s | z_t, x) (VDM eq. 33) as
    imagen-pytorch's q_posterior computes them, at every step of a 1000-step grid and of a 7-step one, and the closed
    form beta_tilde = sigma_s^2 c. Ours in float64 (the sample's dtype), the peer's in float32, as it samples."""
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    for T in (1000, 7):
        plan, peer = continuous_plan(kind, T), ipm.GaussianDiffusionContinuousTimes(noise_schedule=kind, timesteps=T)
        times = torch.linspace(1.0, 0.0, T + 1)
        worst_mean = worst_var = 0.0
        for i in range(T):
            step = plan.tail(i).head(1)
            run = lambda z: sample_ddpm(lambda x, j: x0, xt, step, noise=lambda x: z, progress=False)  # noqa: E731
            zero, one = run(torch.zeros_like(xt)), run(torch.ones_like(xt))
            t, t_next = times[i].expand(2), times[i + 1].expand(2)
            mean, variance, _ = peer.q_posterior(x0.float(), xt.float(), t, t_next=t_next)
            a_s, a_t = float(plan.alphas_cumprod[i + 1]), float(plan.alphas_cumprod[i])
            lam_s, lam_t = math.log(a_s / (1 - a_s)), math.log(a_t / (1 - a_t))
            if i == 0 and kind == "cosine":
                # from t = 1 (lambda -33.9) imagen-pytorch's float32 c = -expm1(lambda_t - lambda_s) rounds to 1, and
                # the posterior mean's term alpha_s (1 - c) z_t / alpha_t (1 - c = exp(lambda_t - lambda_s)) with it
                kept = math.sqrt(a_s / a_t) * math.exp(lam_t - lam_s) * xt
                lost = float(kept.abs().max() / mean.abs().max())
                worst_mean = max(worst_mean, rel(zero - kept, mean))
            else:
                worst_mean = max(worst_mean, rel(zero, mean))
            if i < T - 1:  # (the step to t = 0 adds no noise, under final_noise=False only)
                worst_var = max(worst_var, rel((one - zero)[0, 0, 0, 0] ** 2, variance[0, 0, 0, 0]))
            beta_tilde = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            assert abs(beta_tilde / ((1 - a_s) * -math.expm1(lam_t - lam_s)) - 1) < 1e-9
        print(f"{kind} T={T}: posterior mean rel {worst_mean:.1e}, variance rel {worst_var:.1e}"
              + (f"; the term float32 loses from t = 1: {lost:.1e} of the mean" if kind == "cosine" else ""))
        assert worst_mean < 1e-6 and worst_var < 1e-6, (T, worst_mean, worst_var)
    last = plan.tail(T - 1)
    end = sample_ddpm(lambda x, j: x0, xt, last, noise=lambda x: torch.ones_like(x), progress=False, final_noise=False)
    assert torch.equal(end, sample_ddpm(lambda x, j: x0, xt, last, noise=torch.zeros_like, progress=False))
    assert not torch.equal(end, sample_ddpm(lambda x, j: x0, xt, last, noise=torch.ones_like, progress=False))
    with pytest.raises(TypeError, match="final_noise"):
        sample_ddpm(lambda x, j: x0, xt, last, final_noise="no", progress=False)


# -- guidance -------------------------------------------------------------------------------------------------------
def test_projected_guidance():
    g = torch.Generator().manual_seed(2)
    uncond, cond = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    for scale in (1.0, 3.0, 7.5):
        out = projected_guidance(uncond, cond, scale)
        if scale != 1:  # the update kept is orthogonal to cond, per sample
            kept, c = ((out - cond) / (scale - 1)).double().flatten(1), cond.double().flatten(1)
            cosine = (kept * c).sum(1) / (kept.norm(dim=1) * c.norm(dim=1))
            assert float(cosine.abs().max()) < 1e-6
        assert rel(projected_guidance(uncond, cond, scale, 1.0), classifier_free_guidance(uncond, cond, scale)) < 1e-6
        for fraction in (0.0, 0.3):  # imagen-pytorch's forward_with_cond_scale on these outputs
            parallel, orthogonal = ipm.project(cond - uncond, cond)
            peer = cond + (orthogonal + parallel * fraction) * (scale - 1)
            assert rel(projected_guidance(uncond, cond, scale, fraction), peer) < 1e-6


# -- the cascade -----------------------------------------------------------------------------------------------------
class PeerUNet(torch.nn.Module):
    """imagen-pytorch's Unet behind EfficientUNet's call: text_dropped rows take its cond_drop_prob=1 output."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.self_cond = unet, unet.self_cond

    def forward(self, x, noise_cond, *, text_embeds=None, text_mask=None, lowres_cond_img=None,
                lowres_noise_cond=None, self_cond=None, text_dropped=None):
        kw = dict(text_embeds=text_embeds, text_mask=text_mask, lowres_cond_img=lowres_cond_img,
                  lowres_noise_times=lowres_noise_cond, self_cond=self_cond)
        kept = self.unet(x, noise_cond, cond_drop_prob=0.0, **kw)
        if text_dropped is None or not bool(text_dropped.any()):
            return kept
        return torch.where(text_dropped.view(-1, 1, 1, 1), self.unet(x, noise_cond, cond_drop_prob=1.0, **kw), kept)


UNETS = [dict(dim=16, dim_mults=(1, 2), num_resnet_blocks=1, layer_attns=(False, True), layer_cross_attns=(False, True),
              attn_heads=2, attn_dim_head=8, text_embed_dim=TEXT_DIM, max_text_len=8, attn_pool_num_latents=4),
         dict(dim=16, dim_mults=(1, 2), num_resnet_blocks=(1, 2), layer_attns=False, layer_cross_attns=(False, True),
              attn_heads=2, attn_dim_head=8, text_embed_dim=TEXT_DIM, max_text_len=8, attn_pool_num_latents=4,
              memory_efficient=True, self_cond=True)]


def spread(module: torch.nn.Module, seed: int) -> None:
    """imagen-pytorch zero-initialises its final convolution (and more): give every all-zero tensor small random
    values, so that each stage's output depends on all of its layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def build_imagen(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        imagen = ip.ImagenConfig(unets=UNETS, image_sizes=SIZES, timesteps=TIMESTEPS, text_embed_dim=TEXT_DIM,
                                 cond_drop_prob=0.5, **kw).create()
        spread(imagen, 1)
    return imagen.eval()


def ours_of(imagen, **kw) -> ImagenPipeline:
    return ImagenPipeline([PeerUNet(u) for u in imagen.unets], image_sizes=imagen.image_sizes,
                          timesteps=tuple(s.num_timesteps for s in imagen.noise_schedulers),
                          pred_objectives=imagen.pred_objectives, text_embed_dim=TEXT_DIM,
                          cond_drop_prob=imagen.cond_drop_prob, **kw)


def texts(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(batch, 6, TEXT_DIM, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False  # (the padding zeroed, as t5_encode_text gives it)
    return embeds.masked_fill(~mask[..., None], 0.0), mask


def peer_sample(imagen, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return imagen.sample(use_tqdm=False, **kw)


@pytest.fixture(scope="module", params=["noise", "v"])
def imagen(request):
    return build_imagen(pred_objectives=request.param)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cascade_matches_imagen_sample(imagen, scale):
    embeds, mask = texts()
    theirs = peer_sample(imagen, 5, text_embeds=embeds, text_masks=mask, cond_scale=scale)
    torch.manual_seed(5)  # (no seeds: torch's global generator, drawn in imagen-pytorch's order)
    ours = ours_of(imagen).sample(text_embeds=embeds, text_masks=mask, cond_scale=scale, progress=False)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    print(f"{imagen.pred_objectives[0]} cond_scale {scale}: max abs {float((ours - theirs).abs().max()):.2e}, "
          f"PSNR {psnr(ours, theirs):.1f} dB")
    assert float((ours - theirs).abs().max()) < PICTURE_ATOL
    assert float(theirs.std()) > 0.05  # (a picture, not a constant)


def test_per_image_seeds_are_peer_batch_1(imagen):
    """seeds: image i is what imagen-pytorch samples at batch 1 after torch.manual_seed(seeds[i]), in any batch; the
    first stage alone (stop_at_unet_number) is its first stage's."""
    embeds, mask = texts()
    ours = ours_of(imagen)
    both = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=3.0, seeds=[21, 22], progress=False)
    for i, seed in enumerate((21, 22)):
        theirs = peer_sample(imagen, seed, text_embeds=embeds[i:i + 1], text_masks=mask[i:i + 1], cond_scale=3.0)
        assert float((both[i:i + 1] - theirs).abs().max()) < PICTURE_ATOL
    alone = ours.sample(text_embeds=embeds[1:], text_masks=mask[1:], cond_scale=3.0, seeds=[22], progress=False)
    assert float((alone - both[1:]).abs().max()) < PICTURE_ATOL  # (float rounding of batch 1 vs 2 only)
    first = ours.sample(text_embeds=embeds, text_masks=mask, seeds=[21, 22], stop_at_unet_number=1, progress=False)
    theirs = peer_sample(imagen, 21, text_embeds=embeds[:1], text_masks=mask[:1], stop_at_unet_number=1)
    assert first.shape == (2, 3, 8, 8) and float((first[:1] - theirs).abs().max()) < PICTURE_ATOL


def test_coarser_grid_and_static_clipping():
    """steps=3 on a model trained at T = 6 / 5: the sampler over linspace(1, 0, 4), which is what imagen-pytorch runs
    for the same weights declared with 3 timesteps; dynamic thresholding off (x_0 clipped), PIL output."""
    imagen = build_imagen()
    embeds, mask = texts()
    ours = ours_of(imagen, dynamic_thresholding=False).sample(text_embeds=embeds, text_masks=mask, cond_scale=3.0,
                                                              seeds=[1, 2], steps=3, progress=False)
    coarse = ip.Imagen(list(imagen.unets), image_sizes=SIZES, timesteps=3, text_embed_dim=TEXT_DIM, cond_drop_prob=0.5,
                       dynamic_thresholding=False).eval()
    for i in range(2):
        theirs = peer_sample(coarse, i + 1, text_embeds=embeds[i:i + 1], text_masks=mask[i:i + 1], cond_scale=3.0)
        assert float((ours[i:i + 1] - theirs).abs().max()) < PICTURE_ATOL
    pil = ours_of(imagen, dynamic_thresholding=False).sample(
        text_embeds=embeds, text_masks=mask, cond_scale=3.0, seeds=[1, 2], steps=3, output_type="pil", progress=False)
    assert [p.size for p in pil] == [(16, 16)] * 2
    assert torch.equal(torch.tensor(list(pil[0].getdata())).T.reshape(3, 16, 16),
                       (ours[0] * 255).to(torch.uint8).long())  # (torchvision's ToPILImage: 255 x, truncated)


# -- checkpoints ---------------------------------------------------------------------------------------------------
def trainer_checkpoint(imagen, **extra) -> dict:
    """What ImagenTrainer.save writes for an Imagen built from an ImagenConfig (no optimiser state)."""
    return {"model": imagen.state_dict(), "version": ip.version.__version__, "steps": torch.zeros(2, dtype=torch.long),
            "imagen_type": "original", "imagen_params": imagen._config, **extra}


def test_trainer_checkpoint_loads_and_samples(tmp_path):
    pytest.importorskip("imagine.models.efficient_unet")
    imagen = build_imagen(pred_objectives="v")
    path = tmp_path / "checkpoint.0.pt"
    torch.save(trainer_checkpoint(imagen), path)
    ours = ImagenPipeline.from_imagen_pytorch(path)
    assert ours.image_sizes == SIZES and ours.timesteps == TIMESTEPS and ours.pred_objectives == ("v", "v")
    embeds, mask = texts()
    theirs = peer_sample(imagen, 7, text_embeds=embeds, text_masks=mask, cond_scale=3.0)
    torch.manual_seed(7)
    got = ours.sample(text_embeds=embeds, text_masks=mask, cond_scale=3.0, progress=False)
    print(f"EfficientUNet from a trainer checkpoint: max abs {float((got - theirs).abs().max()):.2e}, "
          f"PSNR {psnr(got, theirs):.1f} dB")
    # (EfficientUNet's own float32 arithmetic, its attention by scaled_dot_product_attention, carried through 11 steps)
    assert float((got - theirs).abs().max()) < 5e-4 and psnr(got, theirs) > 80


def test_bad_checkpoints_and_inputs(tmp_path):
    imagen = build_imagen()
    good = trainer_checkpoint(imagen)
    with pytest.raises(ValueError, match="no 'model'"):
        read_checkpoint({k: v for k, v in good.items() if k != "model"})
    with pytest.raises(ValueError, match="the ElucidatedImagen config has keys imagine does not know: .*'timesteps'"):
        ImagenPipeline.from_imagen_pytorch({**good, "imagen_type": "elucidated"})  # (an Imagen config called elucidated)
    with pytest.raises(ValueError, match="imagen_type 'video' is not one imagine samples"):
        ImagenPipeline.from_imagen_pytorch({**good, "imagen_type": "video"})
    with pytest.raises(ValueError, match="2 unets for 1 image sizes"):
        ImagenPipeline.from_imagen_pytorch({**good, "imagen_params": {**good["imagen_params"], "image_sizes": [8]}})
    with pytest.raises(ValueError, match="no 'imagen_params'"):
        ImagenPipeline.from_imagen_pytorch({k: v for k, v in good.items() if k != "imagen_params"})
    path = tmp_path / "pickled.pt"
    torch.save({"model": {}, "lr": fractions.Fraction(1, 3)}, path)  # (an object weights_only does not rebuild)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="2 unets for 1 image sizes"):
        ImagenPipeline([PeerUNet(u) for u in imagen.unets], image_sizes=(8,), text_embed_dim=TEXT_DIM)
    ours = ours_of(imagen)
    embeds, mask = texts()
    with pytest.raises(ValueError, match=f"24 wide; this Imagen's unets read {TEXT_DIM}"):
        ours.sample(text_embeds=torch.randn(2, 6, 24), progress=False)
    with pytest.raises(ValueError, match="text_masks must be"):
        ours.sample(text_embeds=embeds, text_masks=mask[:, :3], progress=False)
    with pytest.raises(ValueError, match="stop_at_unet_number"):
        ours.sample(text_embeds=embeds, stop_at_unet_number=3, progress=False)
    with pytest.raises(ValueError, match="cond_drop_prob 0"):
        ours_of(imagen).__class__([PeerUNet(u) for u in imagen.unets], image_sizes=SIZES, text_embed_dim=TEXT_DIM,
                                  cond_drop_prob=0.0).sample(text_embeds=embeds, cond_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="no text encoder"):
        ours.sample(["a red circle"], progress=False)


def test_prompts_through_t5_as_t5_encode_text():
    """Prompts encoded by imagine's T5TextEncoder (256 tokens, cut to the longest, padding zeroed) give imagen-pytorch's
    t5_encode_text states and mask (its tokenizer padding='longest') on the same tiny T5."""
    from test_cascade_if_s29 import T5_DIM, t5, tokenizer

    from imagine.models.text_encoders import T5TextEncoder

    model, tok = t5(), tokenizer()
    ipm_t5 = ip.t5
    # (imagen-pytorch calls tokenizer.batch_encode_plus(texts, ...), which transformers 5 folded into tokenizer(texts,
    # ...): the same call, given back to the peer's tokenizer under its old name)
    peer_tok = tokenizer()
    peer_tok.batch_encode_plus = peer_tok.__call__
    ipm_t5.T5_CONFIGS["tiny-t5"] = {"model": model, "tokenizer": peer_tok}
    try:
        prompts = ["a red circle on the left", "a cat"]
        theirs, their_mask = ipm_t5.t5_encode_text(prompts, name="tiny-t5", return_attn_mask=True)
    finally:
        del ipm_t5.T5_CONFIGS["tiny-t5"]
    ours = ImagenPipeline([lambda *a, **k: None], image_sizes=8, text_embed_dim=T5_DIM,
                          text_encoder=T5TextEncoder(model, tok, 256, "tiny-t5"))
    states, mask = ours.encode_text(prompts)
    assert torch.equal(mask, their_mask) and states.shape == theirs.shape
    assert rel(states, theirs) < 1e-6
    # (any encoder of the unets' width serves a cascade trained here; imagen-pytorch's T5 reads 256 tokens, which
    # from_imagen_pytorch builds it with) a wrong width is refused
    with pytest.raises(ValueError, match=f"states are {T5_DIM} wide; the unets read {T5_DIM + 1}"):
        ImagenPipeline([lambda *a, **k: None], image_sizes=8, text_embed_dim=T5_DIM + 1,
                       text_encoder=T5TextEncoder(model, tok, 256, "tiny-t5"))


# -- other samplers on a stage's log-SNR grid, against the probability-flow ODE's closed form ------------------------
class GaussianDataUnet:
    """The exact noise prediction for data x_0 ~ N(mu, s^2 I): E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 +
    sigma^2), read from the log-SNR the pipeline conditions on (alpha^2 = sigmoid(lambda)). Text is ignored."""

    mu, s = 0.1, 0.2

    def __call__(self, x, noise_cond, **_):
        a2 = torch.sigmoid(noise_cond.double()).view(-1, 1, 1, 1)
        alpha, sigma = a2.sqrt(), (1 - a2).sqrt()
        return (sigma * (x.double() - alpha * self.mu) / (a2 * self.s**2 + sigma**2)).to(x.dtype)


@pytest.mark.parametrize("sampler,tol", [("ddim", 1.5e-2), ("euler", 1.5e-2), ("dpmpp_2m", 3e-3), ("unipc", 1e-3)])
def test_ode_samplers_land_where_the_probability_flow_ode_does(sampler, tol):
    """For Gaussian data the probability-flow ODE keeps z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so a
    start x_T ends at x_0 = alpha_0 mu + sqrt(alpha_0^2 s^2 + sigma_0^2) z (t = 0 of the grid, finite SNR): the ODE
    solvers on the cosine log-SNR grid converge there as the steps grow (measured, max |error| at 20 / 200 steps:
    DDIM and Euler 8.1e-2 / 8.5e-3, DPM++ 2M 9.2e-2 / 1.6e-3, UniPC 3.4e-2 / 2.3e-4: the grid's first steps span
    lambda from -33.9 up, where the first-order steps err most); DDPM, a sampler of the SDE, ends elsewhere."""
    from imagine.pipelines.imagen import ImagenPipeline
    from imagine.sampling import PerSampleNoise, make_generators
    from imagine.schedules import alpha_sigma, log_snr

    unet = GaussianDataUnet()
    pipe = ImagenPipeline([unet], image_sizes=[8], text_embed_dim=4, dynamic_thresholding=False, timesteps=1000)
    text = torch.randn(1, 3, 4)
    x_T = PerSampleNoise(make_generators(1, [7], None)).draw((1, 3, 8, 8)).double()  # (the stage's first draw)
    (a_T, s_T), (a_0, s_0) = (alpha_sigma(log_snr("cosine", torch.tensor([t])).double()) for t in (1.0, 0.0))
    z = (x_T - a_T * unet.mu) / (a_T**2 * unet.s**2 + s_T**2).sqrt()
    expected = (a_0 * unet.mu + (a_0**2 * unet.s**2 + s_0**2).sqrt() * z).clamp(-1, 1)

    def error(steps, name=sampler):
        got = pipe.sample(text_embeds=text, seeds=[7], steps=steps, sampler=name, progress=False)
        return float(((got.double() * 2 - 1) - expected).abs().max())

    coarse, fine = error(20), error(200)
    assert fine < tol and fine < coarse / 4, (sampler, coarse, fine)
    assert error(200, "ddpm") > 10 * tol  # (the SDE's end is another point)


def test_sampler_names_are_checked():
    from imagine.pipelines.imagen import ImagenPipeline

    pipe = ImagenPipeline([GaussianDataUnet()], image_sizes=[8], text_embed_dim=4)
    with pytest.raises(ValueError, match="does not run on an Imagen stage's log-SNR grid here; valid: ddpm, ddim"):
        pipe.sample(text_embeds=torch.randn(1, 3, 4), sampler="dpmpp_2m_sde", steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        pipe.sample(text_embeds=torch.randn(1, 3, 4), sampler="nope", steps=2, progress=False)
