"""ComfyUI's further samplers and schedulers in the sampling core, against their code in ComfyUI (comfy/k_diffusion/
sampling.py, deis.py, extra_samplers/uni_pc.py, samplers.py) restated here over k-diffusion's layout and run as its
KSampler runs them (the harness of test_comfyui_sampling_s35: its noise, its start, its quantized timesteps, its
"normal" levels from k-diffusion's DiscreteEpsDDPMDenoiser.get_sigmas), with classifier-free guidance as its CFGGuider
applies it (D = D_u + cfg (D_c - D_u), the unconditional D kept for the CFG++ samplers). Each restatement is written
from ComfyUI's code, step for step, in the VE terms its samplers use; the library's samplers are written differently
(VP in and out, shared loops), so agreement is not a copy agreeing with itself.

Then: the closed form of the probability-flow ODE on Gaussian data (the iPNDM and DEIS orders show), the schedulers'
levels against ComfyUI's formulas, the names ComfyUI's KSampler offers, and a graph through a real server.
"""

import math

import numpy as np
import pytest
import torch

from imagine.samplers import SAMPLERS, deis_coefficients
from imagine.sampling import sample
from imagine.schedules import NoiseSchedule
from test_k_diffusion import kd  # noqa: F401 (the fixture)

SCHEDULE = NoiseSchedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012)
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
SHAPE, SEED = (3, 4, 8, 8), 2**63 + 12345
COND = {"c": torch.tensor([1.0, -0.5, 0.25])}
UNCOND = {"c": torch.tensor([0.0, 0.0, 0.0])}
CFG = 3.0


def eps_model(x, t, c=None, **kw):
    # (an eps model that moves with t by more than a timestep's worth, and with its conditioning c)
    t = t.float().view(-1, 1, 1, 1)
    c = torch.zeros(x.shape[0]) if c is None else c
    c = c.view(-1, 1, 1, 1).to(x.dtype)
    return torch.tanh(torch.einsum("oc,bchw->bohw", W, x) + x * (t / 700.0) + torch.sin(t / 3.0) + 0.3 * c) * (
        1 + 0.2 * c)


class Inner(torch.nn.Module):
    def forward(self, x, t, c=None, **kw):
        return eps_model(x, t, c)


class Guided:
    """ComfyUI's CFGGuider over k-diffusion's quantized eps denoiser: model(x, sigma) -> D, with `uncond` the
    unconditional D of the last call (its post-CFG hook's args["uncond_denoised"])."""

    def __init__(self, kd, cfg=CFG):
        self.den = kd.external.DiscreteEpsDDPMDenoiser(Inner(), SCHEDULE.alphas_cumprod.float(), quantize=True)
        self.cfg, self.uncond = cfg, None

    def __call__(self, x, sigma):
        d_c = self.den(x, sigma, c=COND["c"])
        self.uncond = self.den(x, sigma, c=UNCOND["c"])
        return self.uncond + self.cfg * (d_c - self.uncond)


def comfy_start(model, steps, seed=SEED):
    sigmas = model.den.get_sigmas(steps)
    z = torch.randn(SHAPE, generator=torch.manual_seed(seed))
    return sigmas, z * torch.sqrt(1 + sigmas[0] ** 2)  # (normal starts at sigma_max: its max_denoise start)


def step_noise(shape, seed=SEED):
    g = torch.Generator().manual_seed(seed + 1)  # (its default_noise_sampler on a CPU)
    return lambda: torch.randn(shape, generator=g)


def ours(name, steps, **kw):
    return sample(eps_model, SHAPE, schedule=SCHEDULE, sampler=name, steps=steps, seeds=[SEED] * SHAPE[0],
                  rng="comfyui", start="comfyui", quantize=True, sigma_schedule=kw.pop("schedule", "normal"),
                  sigma_range="comfyui", cond=COND, uncond=UNCOND, guidance_scale=CFG, progress=False, **kw)


def close(got, ref):
    err = float((got.float() - ref.float()).abs().max())
    assert err < 2e-4 * float(ref.abs().max()), err


def ancestral(s, s_next, eta):
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - up**2) ** 0.5, up


# -- ComfyUI's samplers restated (x in VE terms, model(x, sigma) -> D) ---------------------------------------------
def c_ipndm(model, x, sigmas, variable=False, max_order=4):
    buf = []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t)
        d = (x - denoised) / t
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t) * d
        elif not variable:
            ab = {2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[order]
            den = {2: 2, 3: 12, 4: 24}[order]
            x_next = x + (t_next - t) * (ab[0] * d + sum(a * b for a, b in zip(ab[1:], reversed(buf)))) / den
        else:
            hn, hn1 = t_next - t, t - sigmas[i - 1]
            if order == 2:
                c1, c2 = (2 + hn / hn1) / 2, -(hn / hn1) / 2
                x_next = x + (t_next - t) * (c1 * d + c2 * buf[-1])
            else:
                hn2 = sigmas[i - 1] - sigmas[i - 2]
                tmp = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
                if order == 3:
                    c1 = (2 + hn / hn1) / 2 + tmp
                    c2 = -(hn / hn1) / 2 - (1 + hn1 / hn2) * tmp
                    c3 = tmp * hn1 / hn2
                    x_next = x + (t_next - t) * (c1 * d + c2 * buf[-1] + c3 * buf[-2])
                else:
                    hn3 = sigmas[i - 2] - sigmas[i - 3]
                    t2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))
                          ) * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
                    q = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
                    c1 = (2 + hn / hn1) / 2 + tmp + t2
                    c2 = -(hn / hn1) / 2 - (1 + hn1 / hn2) * tmp - (1 + hn1 / hn2 + q) * t2
                    c3 = tmp * hn1 / hn2 + (hn1 / hn2 + q * (1 + hn2 / hn3)) * t2
                    c4 = -t2 * q * hn1 / hn2
                    x_next = x + (t_next - t) * (c1 * d + c2 * buf[-1] + c3 * buf[-2] + c4 * buf[-3])
        buf = (buf + [d])[-(max_order - 1):]
        x = x_next
    return x


def c_deis_coefficients(t_steps, max_order=3, n=10000):
    """deis.get_deis_coeff_list, "tab": EDM's levels to the VP time of linear beta through sigma 0.002 and 80 at
    eps_s 1e-3 (edm2t), the integrand by autograd of log alpha, Lagrange basis in t, summed over n points."""
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64)
    eps_s, s_min, s_max = 1e-3, torch.tensor(0.002, dtype=torch.float64), torch.tensor(80.0, dtype=torch.float64)
    beta_d = 2 * (torch.log(s_min**2 + 1) / eps_s - torch.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = torch.log(s_max**2 + 1) - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (t_steps**2 + 1).log()).sqrt() - beta_min) / beta_d
    b0, b1 = beta_min, beta_d + beta_min
    out = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), n, dtype=torch.float64).requires_grad_(True)
        with torch.enable_grad():  # (as its cal_intergrand, inside the sampler's no_grad)
            alpha = torch.exp(-0.5 * taus**2 * (b1 - b0) - taus * b0)
            alpha.log().sum().backward()
        integrand = (-0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))).detach()
        taus = taus.detach()
        prev = t[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(float(torch.sum(integrand * poly) * (t[i + 1] - t[i]) / n))
        out.append(row)
    return out


def c_deis(model, x, sigmas, max_order=3):
    coeff = c_deis_coefficients(sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas, max_order)
    buf = []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t)
        d = (x - denoised) / t
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + (t_next - t) * d
        else:
            x = x + coeff[i][0] * d + sum(c * b for c, b in zip(coeff[i][1:], reversed(buf)))
        buf = (buf + [d])[-(max_order - 1):]
    return x


def c_heunpp2(model, x, sigmas):
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = (x_3 - model(x_3, sigmas[i + 2])) / sigmas[i + 2]
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def c_res_multistep(model, x, sigmas, eta=0.0, cfg_pp=False):
    noise = step_noise(x.shape)
    old_down = old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        u = model.uncond if cfg_pp else None
        down, up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0 or old is None:
            if cfg_pp:
                x = denoised + (x - u) / sigmas[i] * down
            else:
                x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (-torch.log(torch.as_tensor(v)) for v in (sigmas[i], old_down, down,
                                                                                sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if cfg_pp:
                x = x + (denoised - u)
                x = torch.exp(-h) * x + h * (b1 * u + b2 * old)
            else:
                x = torch.exp(-h) * x + h * (b1 * denoised + b2 * old)
        if sigmas[i + 1] > 0:
            x = x + noise() * up
        old, old_down = (u if cfg_pp else denoised), down
    return x


def c_gradient_estimation(model, x, sigmas, cfg_pp=False, gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - (model.uncond if cfg_pp else denoised)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def c_dpmpp_2m_cfg_pp(model, x, sigmas):
    old_u = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        u = model.uncond
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = torch.log(sigmas[i] / sigmas[i + 1])
            if old_u is None:
                mix = -torch.exp(-h) * u
            else:
                r = torch.log(sigmas[i - 1] / sigmas[i]) / h
                mix = -torch.exp(-h) * u - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_u)
            x = denoised + mix + torch.exp(-h) * x
        old_u = u
    return x


def c_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, eta=1.0):
    noise = step_noise(x.shape)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        u = model.uncond
        guidance = denoised - u
        down, up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - u) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -torch.log(sigmas[i]), -torch.log(torch.as_tensor(down))
            h = t_next - t
            s = t + h / 2
            x_2 = (torch.exp(-s) / torch.exp(-t)) * x - torch.expm1(-h / 2) * u
            model(x_2, torch.exp(-s))
            x = (torch.exp(-t_next) / torch.exp(-t)) * x - torch.expm1(-h) * model.uncond
        if sigmas[i + 1] > 0:
            x = x + noise() * up
        x = x + guidance
    return x


def c_er_sde(model, x, sigmas, max_stage=3):
    noise = step_noise(x.shape)
    scaler = lambda v: v * ((v**0.3).exp() + 10.0)  # noqa: E731
    pts = torch.arange(0, 200.0)
    lam = sigmas  # (lambda_VE = sigma / alpha with alpha = 1)
    old = old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            ls, lt = lam[i], lam[i + 1]
            r = scaler(lt) / scaler(ls)
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200.0
                pos = lt + pts * step
                sc = scaler(pos)
                d = (denoised - old) / (ls - lam[i - 1])
                x = x + (dt + torch.sum(1 / sc) * step * scaler(lt)) * d
                if stage >= 3:
                    s_u = torch.sum((pos - ls) / sc) * step
                    x = x + ((dt**2) / 2 + s_u * scaler(lt)) * (d - old_d) / ((ls - lam[i - 2]) / 2)
                old_d = d
            x = x + noise() * (lt**2 - ls**2 * r**2).sqrt().nan_to_num(nan=0.0)
        old = denoised
    return x


def c_seeds(model, x, sigmas, three=False, eta=1.0, r=0.5):
    """sample_seeds_2 (r 0.5, phi_1) / sample_seeds_3 (r_1 1/3, r_2 2/3) for an eps model (alpha = 1)."""
    noise = step_noise(x.shape)
    phi1 = torch.expm1
    phi2 = lambda h: (torch.expm1(h) - h) / h  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        ls, lt = -torch.log(sigmas[i]), -torch.log(sigmas[i + 1])
        h = lt - ls
        h_eta = h * (eta + 1)
        r1 = 1 / 3 if three else r
        s1 = torch.exp(-torch.lerp(ls, lt, r1))
        x2 = s1 / sigmas[i] * (-r1 * h * eta).exp() * x - phi1(-r1 * h_eta) * denoised
        sde = (-2 * r1 * h * eta).expm1().neg().sqrt() * noise()
        x2 = x2 + sde * s1
        d2 = model(x2, s1)
        if not three:
            d = torch.lerp(denoised, d2, 1 / (2 * r))
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - phi1(-h_eta) * d
            seg = (r - 1) * h * eta
        else:
            r2 = 2 / 3
            s2 = torch.exp(-torch.lerp(ls, lt, r2))
            a32 = r2 / r1 * phi2(-r2 * h_eta)
            a31 = phi1(-r2 * h_eta) - a32
            x3 = s2 / sigmas[i] * (-r2 * h * eta).exp() * x - (a31 * denoised + a32 * d2)
            seg = (r1 - r2) * h * eta
            sde = sde * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise()
            d3 = model(x3 + sde * s2, s2)
            b3 = phi2(-h_eta) / r2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - ((phi1(-h_eta) - b3) * denoised + b3 * d3)
            seg = (r2 - 1) * h * eta
        sde = sde * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise()
        x = x + sde * sigmas[i + 1]
    return x


def c_sa_coeffs(lambdas, lam_s, lam_t, tau):
    """sa_solver.compute_stochastic_adams_b_coeffs (VE: alpha_t = 1) in torch, as its code computes it."""
    n = lambdas.shape[0]
    mul, h = 1 + tau**2, lam_t - lam_s
    p = torch.arange(n, dtype=lambdas.dtype)
    terms = lam_t**p - lam_s**p * (-mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    logf = (p + 1).lgamma()
    m = logf.unsqueeze(1) - logf.unsqueeze(0)
    if tau > 0:
        m = m - depth * math.log(mul)
    m = (m.exp() * torch.where(depth % 2 == 0, 1.0, -1.0)).tril()
    return torch.linalg.solve(torch.vander(lambdas, n, increasing=True).T, m @ terms)


def c_sa_solver(model, x, sigmas, pece=False, start=None, end=None):
    noise = step_noise(x.shape)
    lambdas = -sigmas.log()
    x_pred, h, tau_t, z, preds = x, 0.0, 0.0, 0.0, []
    to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i])
        preds = (preds + [denoised])[-4:]
        po = min(3, len(preds))
        co = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(4, len(preds))
        if to_end:
            po, co = min(po, len(sigmas) - 2 - i), min(co, len(sigmas) - 1 - i)
        if co == 0:
            x = x_pred
        else:
            b = c_sa_coeffs(lambdas[i - co + 1:i + 1], lambdas[i - 1], lambdas[i], tau_t)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + torch.tensordot(
                torch.stack(preds[-co:], dim=1), b, dims=([1], [0]))
            if tau_t > 0:
                x = x + z
            if pece:
                denoised = model(x, sigmas[i])
                preds[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = 1.0 if start >= sigmas[i + 1].item() >= end else 0.0
            b = c_sa_coeffs(lambdas[i - po + 1:i + 1], lambdas[i], lambdas[i + 1], tau_t)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + torch.tensordot(
                torch.stack(preds[-po:], dim=1), b, dims=([1], [0]))
            if tau_t > 0:
                z = noise() * sigmas[i + 1] * (-2 * tau_t**2 * h).expm1().neg().sqrt()
                x_pred = x_pred + z
    return x_pred


def sa_window():
    from test_comfyui_controlnet_s36 import percent_sigma

    class Pipe:  # (percent_sigma reads the model's schedule off a pipeline)
        schedule = SCHEDULE
    return percent_sigma(Pipe, 0.2), percent_sigma(Pipe, 0.8)


def c_ddpm(model, x, sigmas):
    noise = step_noise(x.shape)
    for i in range(len(sigmas) - 1):
        s, s_prev = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        a_t, a_prev = 1 / (s * s + 1), 1 / (s_prev * s_prev + 1)
        alpha = a_t / a_prev
        eps = (x - denoised) / s
        mu = (1.0 / alpha).sqrt() * (x / torch.sqrt(1.0 + s**2) - (1 - alpha) * eps / (1 - a_t).sqrt())
        if s_prev > 0:
            mu = mu + ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt() * noise()
            mu = mu * torch.sqrt(1.0 + s_prev**2)
        x = mu
    return x


def c_lcm(model, x, sigmas):
    noise = step_noise(x.shape)
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise()  # (its noise_scaling for an eps model: sigma z + latent)
    return x


def c_uni_pc(model, x, sigmas, variant):
    """extra_samplers/uni_pc.py's sample_unipc: the UniPC code (multistep_uni_pc_bh_update, data prediction) on
    its SigmaConvert schedule, the last level 0 read as t = 0.001, order min(3, steps - 1), VP inside."""
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    alpha = lambda s: 1 / torch.sqrt(s * s + 1)  # noqa: E731
    std = lambda s: torch.sqrt(1 - alpha(s) ** 2)  # noqa: E731
    lam = lambda s: torch.log(alpha(s)) - torch.log(std(s))  # noqa: E731
    x0_of = lambda xv, s: model(xv / alpha(s), s)  # noqa: E731 (x_0 = D of the VE sample)
    steps, order = len(ts) - 1, min(3, len(ts) - 2)

    def update(x, ms, tl, t, k, corrector):
        h = lam(t) - lam(tl[-1])
        rks, d1s = [], []
        for j in range(1, k):
            rk = (lam(tl[-(j + 1)]) - lam(tl[-1])) / h
            rks.append(rk)
            d1s.append((ms[-(j + 1)] - ms[-1]) / rk)
        rks = torch.tensor(rks + [1.0], dtype=torch.float64)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rr, b, fact = [], [], 1
        for j in range(1, k + 1):
            rr.append(rks ** (j - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        rr, b = torch.stack(rr), torch.tensor(b, dtype=torch.float64)
        x_t_ = (std(t) / std(tl[-1])) * x - (alpha(t) * h_phi_1) * ms[-1]
        x_t = x_t_
        if d1s:
            rho_p = torch.tensor([0.5], dtype=torch.float64) if k == 2 else torch.linalg.solve(rr[:-1, :-1], b[:-1])
            x_t = x_t_ - alpha(t) * b_h * sum(r * d for r, d in zip(rho_p, d1s))
        if not corrector:
            return x_t, None
        rho_c = torch.tensor([0.5], dtype=torch.float64) if k == 1 else torch.linalg.solve(rr, b)
        m_t = x0_of(x_t, t)
        corr = sum((r * d for r, d in zip(rho_c[:-1], d1s)), torch.zeros_like(x))
        return x_t_ - alpha(t) * b_h * (corr + rho_c[-1] * (m_t - ms[-1])), m_t

    x = x / torch.sqrt(1.0 + ts[0] ** 2)
    ms, tl = [x0_of(x, ts[0])], [ts[0]]
    for step in range(1, steps + 1):
        k = step if step < order else min(order, steps + 1 - step)
        x, m = update(x, ms, tl, ts[step], k, step < steps)
        ms, tl = (ms + [m])[-order:], (tl + [ts[step]])[-order:]
    return x / alpha(ts[-1])


RESTATED = {
    "ipndm": (lambda m, x, s: c_ipndm(m, x, s), {}),
    "ipndm_v": (lambda m, x, s: c_ipndm(m, x, s, variable=True), {}),
    "deis": (c_deis, {}),
    "heunpp2": (c_heunpp2, {}),
    "res_multistep": (c_res_multistep, {}),
    "res_multistep_a": (lambda m, x, s: c_res_multistep(m, x, s, eta=1.0), {}),
    "res_multistep_cfgpp": (lambda m, x, s: c_res_multistep(m, x, s, cfg_pp=True), {}),
    "res_multistep_a_cfgpp": (lambda m, x, s: c_res_multistep(m, x, s, eta=1.0, cfg_pp=True), {}),
    "gradient_estimation": (c_gradient_estimation, {}),
    "gradient_estimation_cfgpp": (lambda m, x, s: c_gradient_estimation(m, x, s, cfg_pp=True), {}),
    "dpmpp_2m_cfgpp": (c_dpmpp_2m_cfg_pp, {}),
    "dpmpp_2s_a_cfgpp": (c_dpmpp_2s_ancestral_cfg_pp, {}),
    "er_sde": (c_er_sde, {}),
    "seeds_2": (c_seeds, {}),
    "seeds_3": (lambda m, x, s: c_seeds(m, x, s, three=True), {}),
    "sa_solver": (lambda m, x, s: c_sa_solver(m, x, s, False, *sa_window()), {}),
    "sa_solver_pece": (lambda m, x, s: c_sa_solver(m, x, s, True, *sa_window()), {}),
    "ddpm": (c_ddpm, {}),
    "lcm": (c_lcm, {}),
    "unipc": (lambda m, x, s: c_uni_pc(m, x, s, "bh1"), {"sampler_options": {"order": 3, "variant": "bh1",
                                                                              "floor": 0.001}}),
    "unipc_bh2": (lambda m, x, s: c_uni_pc(m, x, s, "bh2"), {"sampler_options": {"order": 3, "variant": "bh2",
                                                                                  "floor": 0.001}}),
}


@pytest.mark.parametrize("name", list(RESTATED))
def test_a_sampler_is_comfyuis_run_as_its_ksampler_runs_it(kd, name):
    fn, kw = RESTATED[name]
    model = Guided(kd)
    sigmas, x = comfy_start(model, 7)
    with torch.no_grad():
        ref = fn(model, x, sigmas)
    got = ours(name.replace("_bh2", ""), 7, **kw)
    close(got, ref)


def test_the_cfgpp_samplers_read_the_unconditional_prediction(kd):
    """Mutation check of the harness: the CFG++ restatements with the guided D where the unconditional one belongs
    are far from ours (so the agreement above needs the unconditional x_0 at the right places)."""

    class Plain(Guided):
        def __call__(self, x, sigma):
            d = super().__call__(x, sigma)
            self.uncond = d
            return d

    model = Plain(kd)
    sigmas, x = comfy_start(model, 7)
    for name in ("dpmpp_2m_cfgpp", "gradient_estimation_cfgpp", "res_multistep_cfgpp"):
        with torch.no_grad():
            wrong = RESTATED[name][0](model, x, sigmas)
        got = ours(name, 7)
        assert float((got.float() - wrong.float()).abs().max()) > 1e-2 * float(wrong.abs().max()), name


def test_uni_pc_stops_at_its_floor(kd):
    """ComfyUI's uni_pc reads the run's end as t = 0.001: without the floor ours returns x_0 itself, which is further
    from its result than the tolerance; a 1-step run (which its code hands back unstepped) is refused."""
    model = Guided(kd)
    sigmas, x = comfy_start(model, 7)
    with torch.no_grad():
        ref = c_uni_pc(model, x, sigmas, "bh1")
    plain = ours("unipc", 7, sampler_options={"order": 3, "variant": "bh1"})
    assert float((plain.float() - ref.float()).abs().max()) > 1e-3 * float(ref.abs().max())
    with pytest.raises(ValueError, match="at least 2 steps"):
        ours("unipc", 1, sampler_options={"order": 3, "floor": 0.001})


def test_dpm_fast_and_adaptive_run_as_comfyui_calls_k_diffusion(kd):
    """ComfyUI's dpm_fast / dpm_adaptive: k-diffusion's functions from the first level to the last above 0, dpm_fast
    in len(sigmas) - 1 calls (its samplers.ksampler wrappers)."""
    model = Guided(kd)
    sigmas, x = comfy_start(model, 7)
    with torch.no_grad():
        fast = kd.sampling.sample_dpm_fast(model, x, sigmas[-2], sigmas[0], len(sigmas) - 1, disable=True)
        adaptive = kd.sampling.sample_dpm_adaptive(model, x, sigmas[-2], sigmas[0], disable=True)
    close(ours("dpm_fast", 7, sampler_options={"ends": "plan"}), fast)
    close(ours("dpm_adaptive", 7, sampler_options={"ends": "plan"}), adaptive)


# -- the closed form: Gaussian data -----------------------------------------------------------------------------------
class GaussianDenoiser:
    """The exact D for data N(0, v I): D(x_VE; sigma) = v / (v + sigma^2) x_VE, whose probability-flow ODE carries
    x(sigma_0) to x(sigma) = x(sigma_0) sqrt((v + sigma^2) / (v + sigma_0^2)). No guidance: the unconditional x_0 (for
    the CFG++ samplers) is the x_0."""

    v, keep_uncond = 0.5, True

    def __init__(self, plan):
        self.plan, self.uncond_x0 = plan, None

    def __call__(self, x, i):
        return self.at_sigma(x, float(self.plan.sigmas[i]), i)

    def at_sigma(self, x, s, i):
        self.uncond_x0 = self.v / (self.v + s * s) * x * math.sqrt(1 + s * s)
        return self.uncond_x0


def ode_error(name, plan, **options):
    """The sampler's error at the run's last level above 0 (the callback's x there: the last step's jump to x_0 = D
    errs by O(sigma_min^2) whatever the sampler), relative to the closed form."""
    s0, last = float(plan.sigmas[0]), float(plan.sigmas[-2])
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = {}
    SAMPLERS[name](GaussianDenoiser(plan), z * s0 / math.sqrt(1 + s0 * s0), plan, progress=False,
                   callback=lambda info: seen.update(x=info["x"]), **options)
    exact = z * s0 * math.sqrt((GaussianDenoiser.v + last**2) / (GaussianDenoiser.v + s0 * s0))
    return float((seen["x"] * math.sqrt(1 + last**2) - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("name,ratio", [("ipndm", 3.5), ("deis", 6.0), ("res_multistep", 3.5),
                                        ("res_multistep_cfgpp", 3.5), ("dpmpp_2m_cfgpp", 3.5), ("heunpp2", 1.8),
                                        ("gradient_estimation", 1.8), ("gradient_estimation_cfgpp", 1.8)])
def test_the_samplers_converge_to_the_ode_solution(name, ratio):
    """Doubling the Karras steps from 40 to 80 divides the error against the closed form by at least 2^order (x 0.9):
    iPNDM, RES and DPM++ 2M are 2nd order or better on these uneven levels, DEIS (3rd-order Lagrange in its time)
    near 3rd; Heun++ 2 and gradient estimation, whose weights are not a higher-order rule's, 1st."""
    err = [ode_error(name, SCHEDULE.plan(n, rule="karras", sigma_schedule="karras", sigma_range="model"))
           for n in (40, 80)]
    assert err[0] / err[1] > ratio, err


def test_ipndm_v_is_ipndm_on_equal_steps_to_order_3():
    """iPNDM-v's variable-step coefficients reduce to Adams-Bashforth's on equal steps in sigma up to order 3, and
    differ on Karras' uneven ones. (Its order-4 formula, ComfyUI's as diff-solvers', gives 57/24, -65/24, 43/24,
    -11/24 on equal steps, not Adams-Bashforth's 55/24, -59/24, 37/24, -9/24: the restatement test holds ours to it.)"""
    from imagine.schedules import SamplingPlan

    sig = torch.cat([torch.linspace(8.0, 0.5, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    plan = SamplingPlan(timesteps=torch.zeros(9, dtype=torch.float64), sigmas=sig, alphas_cumprod=1 / (1 + sig**2),
                        rule="karras")
    assert abs(ode_error("ipndm_v", plan, max_order=3) - ode_error("ipndm", plan, max_order=3)) < 1e-12
    assert abs(ode_error("ipndm_v", plan) - ode_error("ipndm", plan)) > 1e-4  # (order 4)
    karras = SCHEDULE.plan(12, rule="karras", sigma_schedule="karras", sigma_range="model")
    assert abs(ode_error("ipndm_v", karras, max_order=3) - ode_error("ipndm", karras, max_order=3)) > 1e-4


def test_deis_weights_integrate_polynomials_of_the_vp_time_exactly():
    """The tAB-DEIS weights are integrals of the Lagrange basis in DEIS's time t times dsigma/dt: applied to slopes
    that are a polynomial p(t) of degree < order they give int p(t(sigma)) dsigma, here by quadrature of our own in
    sigma (to the 1e-4 of ComfyUI's 10000-point sum); and they are ComfyUI's (autograd integrand) to 1e-9."""
    sig = SCHEDULE.plan(9, rule="karras", sigma_schedule="karras", sigma_range="model").sigmas.tolist()
    ours_w = deis_coefficients(sig, 3)
    theirs = c_deis_coefficients(sig[:-1], 3)
    for a, b in zip(ours_w, theirs):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-12)
    eps_s, s_min, s_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(s_min**2 + 1) / eps_s - math.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(s_max**2 + 1) - 0.5 * beta_d
    t_of = lambda s: (np.sqrt(beta_min**2 + 2 * beta_d * np.log(s * s + 1)) - beta_min) / beta_d  # noqa: E731
    p = lambda t: 1.0 + 2.0 * t - 3.0 * t * t  # noqa: E731 (degree 2: exact at order 3)
    for i in range(2, len(sig) - 2):
        w = ours_w[i]
        got = sum(wj * p(t_of(sig[i - j])) for j, wj in enumerate(w))
        grid = np.linspace(sig[i], sig[i + 1], 200001)
        want = float(np.sum((p(t_of(grid[1:])) + p(t_of(grid[:-1]))) / 2 * np.diff(grid)))
        assert abs(got - want) < 1e-3 * abs(want) + 1e-6, (i, got, want)


# -- the schedulers ---------------------------------------------------------------------------------------------------
def comfy_kl_optimal(n, s_min, s_max):
    """Its kl_optimal_scheduler: n levels tan(u atan sigma_min + (1 - u) atan sigma_max), u = i / (n - 1), then 0."""
    u = torch.arange(n, dtype=torch.float64) / (n - 1)
    return torch.cat([(u * math.atan(s_min) + (1 - u) * math.atan(s_max)).tan(), torch.zeros(1, dtype=torch.float64)])


def comfy_linear_quadratic(n, s_max, threshold=0.025):
    """Its linear_quadratic_schedule (Mochi's): the ramp's complement times sigma_max."""
    if n == 1:
        ramp = [0.0, 1.0]
    else:
        m = n // 2
        diff = m - threshold * n
        qc = diff / (m * (n - m) ** 2)
        lc = threshold / m - 2 * diff / ((n - m) ** 2)
        ramp = [i * threshold / m for i in range(m)] + [qc * i * i + lc * i + qc * m * m for i in range(m, n)] + [1.0]
    return torch.tensor([1.0 - r for r in ramp], dtype=torch.float64) * s_max


def test_kl_optimal_and_linear_quadratic_are_comfyuis_levels():
    """ComfyUI's kl_optimal_scheduler (n levels tan(u atan sigma_min + (1 - u) atan sigma_max), u = i / (n - 1), then
    0: not A1111's n + 1 down to sigma_min) and linear_quadratic_schedule (Mochi's ramp times sigma_max), over the
    model's float32 range."""
    table = SCHEDULE.kdiffusion_log_sigmas().exp()
    s_min, s_max = float(table[0]), float(table[-1])
    for n in (1, 2, 5, 12):
        plan = SCHEDULE.plan(n, sigma_schedule="kl_optimal", sigma_range="comfyui")
        if n > 1:  # (one level: its formula divides by n - 1 = 0)
            assert torch.allclose(plan.sigmas, comfy_kl_optimal(n, s_min, s_max), rtol=1e-6), n
        assert not plan.end_ve and float(plan.sigmas[-1]) == 0
        a1111 = SCHEDULE.plan(n, rule="karras", sigma_schedule="kl_optimal", sigma_range="model")
        assert a1111.end_ve and float(a1111.sigmas[-1]) > 0  # (A1111's: down to sigma_min)
    for n in (1, 2, 3, 8, 25):
        plan = SCHEDULE.plan(n, sigma_schedule="linear_quadratic", sigma_range="comfyui")
        assert torch.allclose(plan.sigmas, comfy_linear_quadratic(n, s_max), rtol=1e-6, atol=1e-9), n


def test_comfyui_levels_are_the_same_for_every_sampler():
    """ComfyUI lays out its scheduler's levels whatever the sampler: its lcm and ddpm run on the model's own levels
    (not the LCM distillation timesteps of our lcm rule, nor DDPM's integer timesteps)."""
    from imagine.sampling import sampler_plan

    ref = sampler_plan(SCHEDULE, "euler", 6, sigma_schedule="karras", sigma_range="comfyui")[2]
    for name in ("lcm", "ddpm", "unipc", "dpmpp_2m", "ipndm"):
        plan = sampler_plan(SCHEDULE, name, 6, sigma_schedule="karras", sigma_range="comfyui")[2]
        assert torch.equal(plan.sigmas, ref.sigmas) and torch.equal(plan.timesteps, ref.timesteps), name
    with pytest.raises(ValueError, match="give sigma_schedule"):
        sampler_plan(SCHEDULE, "euler", 6, sigma_range="comfyui")


def test_comfyuis_ksampler_offers_its_names():
    from imagine.server import comfyui

    names = list(comfyui.SAMPLERS)
    assert names[:4] == ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp"]
    assert names[-3:] == ["ddim", "uni_pc", "uni_pc_bh2"]
    for name in ("heunpp2", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "ddpm", "lcm",
                 "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
                 "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
                 "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"):
        assert comfyui.SAMPLERS[name][0] in SAMPLERS, name
    assert list(comfyui.SCHEDULERS) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                        "normal", "linear_quadratic", "kl_optimal"]


# -- through a real server --------------------------------------------------------------------------------------------
from test_comfyui_api_s35 import close as close_pixels, comfy_reference, graph, pictures, pipe, run, server  # noqa


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sampler,scheduler,restated", [
    ("uni_pc_bh2", "kl_optimal", lambda m, x, s: c_uni_pc(m, x, s, "bh2")),
    ("ipndm", "linear_quadratic", c_ipndm),
    ("res_multistep_ancestral", "karras", lambda m, x, s: c_res_multistep(m, x, s, eta=1.0)),
    ("lcm", "sgm_uniform", c_lcm)])
def test_a_graph_with_comfyuis_further_samplers_and_schedulers(server, pipe, kd, sampler, scheduler, restated):
    """KSampler -> VAEDecode -> SaveImage through the server with these names gives ComfyUI's pictures: its sampler
    restated above, on its scheduler's levels over the model's range (k-diffusion's sgm_uniform, the formulas above),
    over the model's own U-Net, text encoder and VAE (test_comfyui_api_s35's reference, its truncation to 8 bits)."""
    levels = {"kl_optimal": lambda kd, den, n: comfy_kl_optimal(n, float(den.sigma_min), float(den.sigma_max)).float(),
              "linear_quadratic": lambda kd, den, n: comfy_linear_quadratic(n, float(den.sigma_max)).float(),
              "karras": lambda kd, den, n: kd.sampling.get_sigmas_karras(n, float(den.sigma_min),
                                                                         float(den.sigma_max)),
              "sgm_uniform": lambda kd, den, n: torch.cat([den.t_to_sigma(torch.linspace(len(den.sigmas) - 1, 0,
                                                                                         n + 1)[:-1]),
                                                           torch.zeros(1)])}[scheduler]
    _, entry = run(server, graph(server.name, seed=SEED, steps=6, cfg=4.0, sampler=sampler, scheduler=scheduler,
                                 batch=2, text="a green triangle"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    want = comfy_reference(kd, pipe, "a green triangle", SEED, 6, 4.0, restated, levels, 2)
    assert all(close_pixels(a, b) for a, b in zip(pictures(server, entry), want))
