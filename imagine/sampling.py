"""The one sampling entry point: start noise, step plan, guidance, and the sampler loop.

    x0 = sample(model, (B, C, H, W), schedule=schedule, sampler="dpmpp_2m", steps=20,
                cond={"context": states}, uncond={"context": empty_states}, guidance_scale=7.5, seeds=42)

`model(x_t, t, **cond)` follows docs/DESIGN.md: x_t the VP sample, t a float tensor [B] in training
timestep units. Each sample has its own torch.Generator (seeds s, s+1, ... for an int seed, as
AUTOMATIC1111 does), which draws its start noise `torch.randn((1, *shape), generator=g)` and then
its ancestral noise, so a seed gives the same image at any batch size. The start noise is scaled as
diffusers' scheduler of the same family scales it (`init_noise_sigma`), and the model sees the
timesteps that scheduler would pass: the same seed and weights give diffusers' image.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from imagine.diffusion import check_prediction_type, predict_eps, predict_x0
from imagine.guidance import (
    THRESHOLDINGS,
    apply_threshold,
    check_cond,
    cond_at,
    check_threshold_max,
    check_threshold_range,
    classifier_eps_shift,
    classifier_gradient,
    classifier_mean_shift,
    guided_model_output,
    split_variance,
)
from imagine.samplers import (CFG_PP_SAMPLERS, COMPVIS_SAMPLERS, TIMESTEP_RULE, TWO_CALL_SAMPLERS, VE_RESULT_SAMPLERS,
                              check_plan, final_heun_step, invert_ddim, resolve_sampler)
from imagine.schedules import COMPVIS_SCHEDULES, NoiseSchedule, SamplingPlan, compvis_timesteps, nearest_timestep

CLASSIFIER_FORMS = {"eps": "eps", "ddim": "eps", "epsilon": "eps", "mean": "mean", "ddpm": "mean"}


# where a seed's normal draws come from: ImageNoiseStream ("cpu", "nv"), or ComfyUI's one stream for a batch
RNG_SOURCES = ("cpu", "nv", "comfyui")


class ImageNoiseStream:
    """One image's random stream from its seed, as AUTOMATIC1111's ImageRNG keeps each image's. rng: "cpu", torch's
    CPU generator (A1111's "CPU" source, and its default "GPU" on a machine without one; the stream a torch.Generator
    seeded so gives), or "nv", the draws torch.randn makes on an NVIDIA GPU (imagine.philox; A1111's "NV", which A1111
    gives so that any machine makes the pictures its default makes on an NVIDIA card). seed_delta (A1111's "Eta noise seed delta",
    ENSD): not 0, the draws after the start noise come from the stream of seed + seed_delta, as ImageRNG.first()
    seeds the images' generators anew after drawing the start noise (`started`, which PerSampleNoise.draw_start
    calls; a draw before it, diffusers' VAE posterior, comes from the seed's stream)."""

    device = torch.device("cpu")

    def __init__(self, seed: int, rng: str = "cpu", seed_delta: int = 0):
        check_rng(rng, seed_delta)
        self.seed, self.rng, self.seed_delta = int(seed), rng, int(seed_delta)
        self._stream, self._started = self._new(self.seed), False

    def _new(self, seed: int):
        if self.rng == "nv":
            from imagine.philox import PhiloxGenerator

            return PhiloxGenerator(seed)
        return torch.Generator().manual_seed(seed)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.rng == "nv":
            return self._stream.randn(shape, dtype)
        return torch.randn(shape, generator=self._stream, dtype=dtype)

    def started(self) -> None:
        """The start noise is drawn: with a seed delta, the stream goes on from seed + delta (once)."""
        if not self._started and self.seed_delta:
            self._stream = self._new((self.seed + self.seed_delta) % 2**64)
        self._started = True


class BatchNoiseStream:
    """ComfyUI's noise for a batch: one seed for all its images. The start noise is one draw of the whole batch
    from torch's CPU generator seeded so (its prepare_noise: image 0 is the seed's, the others follow on in the same
    stream), and the steps' noise (its ancestral samplers' default_noise_sampler) draws the whole batch from a fresh
    generator of seed + 1 (`started`; ComfyUI adds the 1 where the sample is on the CPU, as here). The SDE samplers'
    Brownian path is one tree over the whole batch seeded with the seed itself (PerSampleNoise.brownian).
    An image depends on its place in the batch: ComfyUI's batches are made so (EmptyLatentImage's batch_size).
    `indices` (a latent's batch_index, LatentFromBatch's): image i's start noise is the indices[i]-th of single-image
    draws made in turn up to the largest index, so a picture taken out of a batch gets its noise in it."""

    device = torch.device("cpu")
    rng = "cpu"

    def __init__(self, seed: int, indices: list[int] | None = None):
        self.seed = int(seed)
        self._stream = torch.Generator().manual_seed(self.seed)
        self.indices = None if indices is None else [int(i) for i in indices]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.indices is not None:  # (the start draw only: its prepare_noise with noise_inds)
            if len(self.indices) != shape[0] or min(self.indices) < 0:
                raise ValueError(f"batch indices {self.indices} for a batch of {shape[0]}: one index >= 0 per image")
            indices, self.indices = self.indices, None
            draws = [torch.randn((1, *shape[1:]), generator=self._stream, dtype=dtype) for _ in range(max(indices) + 1)]
            return torch.cat([draws[i] for i in indices])
        return torch.randn(shape, generator=self._stream, dtype=dtype)

    def started(self) -> None:
        """The start noise is drawn: the steps' noise comes from a fresh stream of seed + 1."""
        self._stream = torch.Generator().manual_seed((self.seed + 1) % 2**64)


def check_rng(rng: str, seed_delta: int = 0) -> None:
    if rng not in RNG_SOURCES:
        raise ValueError(f"rng must be one of {', '.join(map(repr, RNG_SOURCES))} (torch's CPU generator, the "
                         f"draws of an NVIDIA GPU as AUTOMATIC1111's 'NV' source, or ComfyUI's one stream for a "
                         f"batch); got {rng!r}")
    if isinstance(seed_delta, bool) or not isinstance(seed_delta, int) or seed_delta < 0:
        raise ValueError(f"seed_delta (AUTOMATIC1111's eta noise seed delta, ENSD) must be an int >= 0; got "
                         f"{seed_delta!r}")


def stream_rng(generators) -> str:
    """The rng of the images' streams: "nv" where they are ImageNoiseStreams drawing so, else "cpu"."""
    if isinstance(generators, (list, tuple)) and generators and isinstance(generators[0], ImageNoiseStream):
        return generators[0].rng
    return "cpu"


class PerSampleNoise:
    """Standard normal noise with one generator per sample: row i of every draw comes from
    generators[i] as torch.randn((1, *shape), generator=generators[i]) (diffusers' randn_tensor with a
    list of generators). A single generator draws the whole batch at once, as diffusers does;
    None uses torch's global generator."""

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator] | None,
                 tree_seeds: Sequence[int] | None = None, levels: tuple[float, float] | None = None):
        self.generators = generators
        # the SDE samplers' Brownian paths (imagine.brownian): seeded with tree_seeds (else ImageNoiseStreams' own
        # seeds, or one draw from each sample's generator when first asked for), over the noise levels `levels` (else
        # the asking sampler's)
        self.tree_seeds, self.levels, self._paths = tree_seeds, levels, None

    def brownian(self, like: torch.Tensor, levels: tuple[float, float]):
        """The samples' Brownian paths (imagine.brownian.BrownianTreeNoise), built once."""
        if self._paths is None:
            from imagine.brownian import BrownianTreeNoise, tree_seeds

            if isinstance(self.generators, BatchNoiseStream):  # (ComfyUI's: one tree over the batch, of its seed)
                tree = BrownianTreeNoise([self.generators.seed], like.shape, *(self.levels or levels))
                self._paths = lambda sigma, sigma_next: tree(sigma, sigma_next)[0]
                return self._paths
            given = self.tree_seeds
            if given is None and isinstance(self.generators, (list, tuple)) and self.generators and \
                    all(isinstance(g, ImageNoiseStream) for g in self.generators):
                given = [g.seed for g in self.generators]  # (A1111 seeds each image's tree with the image's seed)
            seeds = tree_seeds(like.shape[0], given, self.generators)
            self._paths = BrownianTreeNoise(seeds, like.shape[1:], *(self.levels or levels),
                                            rng=stream_rng(self.generators))
        return self._paths

    def __call__(self, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.draw(tuple(like.shape), dtype).to(device=like.device, dtype=like.dtype)

    def draw_start(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The samples' start noise: a draw, after which each ImageNoiseStream goes on as A1111's after its start
        noise (ImageNoiseStream.started: its eta noise seed delta)."""
        out = self.draw(shape)
        self.started()
        return out

    def started(self) -> None:
        """The start noise is drawn (here, or given): the ImageNoiseStreams go on as after it."""
        streams = self.generators if isinstance(self.generators, (list, tuple)) else [self.generators]
        for g in streams:
            if isinstance(g, (ImageNoiseStream, BatchNoiseStream)):
                g.started()

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.generators
        if isinstance(g, (list, tuple)):
            if len(g) != shape[0]:
                raise ValueError(f"{len(g)} generators for a batch of {shape[0]}: give one per sample")
            return torch.cat([gi.randn((1, *shape[1:]), dtype) if isinstance(gi, ImageNoiseStream) else
                              torch.randn((1, *shape[1:]), generator=gi, device=gi.device, dtype=dtype).cpu()
                              for gi in g])
        if g is None:
            return torch.randn(shape, dtype=dtype)
        if isinstance(g, BatchNoiseStream):
            return g.randn(shape, dtype)
        return torch.randn(shape, generator=g, device=g.device, dtype=dtype).cpu()


def variation_noise(strength: float, noise: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's variation seed: one sample's start noise [C, H, W] moved towards another seed's by spherical
    interpolation (Shoemake 1985), as its `slerp`: with the norms taken along dim 1 (the rows), angle omega per
    (channel, column), result = sin((1 - s) omega) / sin omega * noise + sin(s omega) / sin omega * other; where the two
    are nearly parallel (mean cosine > 0.9995) A1111's linear fallback, noise * s + other * (1 - s), as it writes it.
    s = 0 gives the noise itself, bit for bit."""
    if not 0 <= strength <= 1:
        raise ValueError(f"subseed_strength must be in [0, 1]; got {strength}")
    if strength == 0:
        return noise
    a, b = noise.double(), other.double()
    dot = (a / a.norm(dim=1, keepdim=True) * (b / b.norm(dim=1, keepdim=True))).sum(1)
    if float(dot.mean()) > 0.9995:
        return (a * strength + b * (1 - strength)).to(noise.dtype)
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    out = (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * a + (torch.sin(strength * omega) / so).unsqueeze(1) * b
    return out.to(noise.dtype)


def seed_resized_noise(noise: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "resize seed from width/height": `first` [C, h, w], the noise the seed gave at the size it was
    first used at, put in the middle of `noise` [C, H, W], this size's own noise from the same seed, so that the
    picture keeps its composition at a new size. Where `first` is larger its middle is cut out; the offsets are
    A1111's, floor halves of the size differences (so an odd margin puts the extra row or column at the end)."""
    (height, width), (h, w) = noise.shape[-2:], first.shape[-2:]
    dx, dy = (width - w) // 2, (height - h) // 2
    cw, ch = (w if dx >= 0 else w + 2 * dx), (h if dy >= 0 else h + 2 * dy)
    out = noise.clone()
    out[..., max(dy, 0):max(dy, 0) + ch, max(dx, 0):max(dx, 0) + cw] = \
        first[..., max(-dy, 0):max(-dy, 0) + ch, max(-dx, 0):max(-dx, 0) + cw]
    return out


def start_noise(shape: tuple[int, ...], generators: list[torch.Generator], seeds: list[int],
                subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                first_size: tuple[int, int] | None = None, own: torch.Tensor | None = None,
                rng: str = "cpu") -> torch.Tensor:
    """Each image's start noise [B, C, H, W] as AUTOMATIC1111 draws it (its ImageRNG.first) with its two seed
    options: `own`, drawn from the images' generators (drawn here if not given; the steps' noise follows on from
    them), is the noise; with `first_size` (h, w) in latent cells (A1111's seed_resize_from_h/w over the VAE's factor)
    and not (H, W), the noise the seeds give at that size (fresh generators of `seeds`) goes in its middle
    (`seed_resized_noise`); with subseed_strength > 0, the noise at the seed's size is first moved towards the
    variation seeds' (`subseeds`) at that size (`variation_noise`). rng: the source of those fresh streams'
    draws (ImageNoiseStream)."""
    if subseed_strength and subseeds is None:
        raise ValueError(f"subseed_strength {subseed_strength} needs subseeds, the variation seeds (one per image)")
    if first_size is not None and (len(tuple(first_size)) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in first_size)):
        raise ValueError(f"first_size must be (h, w) in latent cells, ints >= 0; got {first_size!r}")
    own = PerSampleNoise(generators).draw_start(shape) if own is None else own
    resized = first_size is not None and tuple(first_size) != tuple(shape[-2:])
    if not resized and not subseed_strength:
        return own
    size = (*shape[:-2], *first_size) if resized else shape
    seeded = PerSampleNoise(make_generators(shape[0], list(seeds), rng=rng)).draw(size) if resized else own
    if subseed_strength:
        other = PerSampleNoise(make_generators(shape[0], list(subseeds), rng=rng)).draw(size)
        seeded = torch.stack([variation_noise(float(subseed_strength), a, b) for a, b in zip(seeded, other)])
    return torch.stack([seed_resized_noise(a, b) for a, b in zip(own, seeded)]) if resized else seeded


STARTS = ("noise", "matched", "sigma_max", "comfyui")
# Which steps an image-to-image run takes (`_img2img_plan`)
STRENGTH_RULES = ("diffusers", "a1111", "a1111_fixed_steps")
KEEP_RULES = ("replace", "denoised", "input", "comfyui")  # how inpainting keeps the known part: Denoiser.keep_known


class Denoiser:
    """The x_0-denoiser D(x_t, i) a sampler steps with, for one run over `plan`:
    model -> classifier-free guidance (+ rescale) -> x_0 -> classifier guidance (eps form) -> thresholding.

    The model sees t = plan.timesteps[i]; its output becomes x_0 with plan.alphas_cumprod[i]. A NaN or
    inf in the model's output raises FloatingPointError naming the step. `at_sigma` evaluates the same
    chain at a noise level between the plan's (the midpoints of DPM2 and DPM++ 2S); it needs `schedule`,
    the training schedule, whose sigma table maps such a level to the model's timestep.
    """

    def __init__(self, model: Callable[..., torch.Tensor], plan: SamplingPlan, prediction_type: str,
                 cond: dict[str, Any] | None = None, uncond: dict[str, Any] | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 classifier: Callable[..., torch.Tensor] | None = None, classifier_scale: float = 0.0,
                 classifier_form: str = "eps", thresholding: str | None = None, threshold_percentile: float = 0.995,
                 threshold_range: float = 1.0, guidance: Callable[..., torch.Tensor] | None = None,
                 schedule: NoiseSchedule | None = None, threshold_max: float | None = None,
                 quantize: bool = False):
        self.model, self.plan, self.schedule = model, plan, schedule
        if quantize and schedule is None:
            raise ValueError("quantize reads each level's nearest training timestep off the training schedule: "
                             "Denoiser(..., schedule=...)")
        # (the table of log sigma the nearest timestep is read off, once for the run)
        self._log_sigmas = schedule.kdiffusion_log_sigmas() if quantize else None
        # how cond and uncond combine: classifier-free guidance, or another rule (InstructPix2Pix's three passes)
        self.guidance = guidance or guided_model_output
        self.prediction_type = check_prediction_type(prediction_type)
        self.cond, self.uncond = cond or {}, uncond
        self.guidance_scale, self.guidance_rescale = float(guidance_scale), float(guidance_rescale)
        self.classifier, self.classifier_scale = classifier, float(classifier_scale)
        self.classifier_form = classifier_form
        self.thresholding, self.threshold_percentile = thresholding, threshold_percentile
        self.threshold_range = float(threshold_range)
        self.threshold_max = check_threshold_max(threshold_max)  # (dynamic thresholding's cap on s, in units of R)
        self.calls = 0
        # (D(x_T), and its unconditional x_0) computed by matched_start, for the first step
        self._held: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.known: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None = None  # see keep_known
        self.evaluations: int | None = None  # the run's model evaluations where a step takes more than one
        # the run's steps as AUTOMATIC1111's denoiser counts them (its total_steps: the plan's steps, twice for a
        # sampler of two calls a step), which a model that follows the call count is told with it (`at_call`)
        self.counted_steps = len(plan)
        # its state.sampling_steps: the same without the doubling (the steps its callback counts, i after step i)
        self.sampling_steps = len(plan)
        # CFG++ (keep_unconditional): the unconditional x_0 of the last evaluation, beside the guided one it returns
        self.keep_uncond, self.uncond_x0, self._uncond_out = False, None, None
        # a model with a learned variance (twice x's channels out): its variance output of the last evaluation, in
        # [-1, 1] (Improved DDPM eq. 15's v, as 2v - 1); None for a model without
        self.variance: torch.Tensor | None = None

    def keep_known(self, x0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, rule: str = "replace") -> None:
        """Inpainting: keep the known x_0 where `mask` is 0 (1: painted anew), by one of three rules.

        "replace": the replacement method (Song et al. 2021, "Score-based generative modeling", appendix G;
        Lugmayr et al. 2022, RePaint eq. 8; diffusers' inpainting with a 4-channel U-Net): where `mask` is 0 the
        model sees the known x_0 at every step's noise level,

            x_t <- mask * x_t + (1 - mask) * (sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps),

        with `eps` the run's start noise, from the second model call on (the first sees the start as it
        is: pure noise at strength 1, as diffusers starts). The samplers step each element on its own, so
        where mask is 1 their state is the one diffusers' pipeline carries, which writes the same mix
        into its state after every step.
        "denoised": AUTOMATIC1111's for its k-diffusion samplers (its CFGDenoiser's blend after denoising): every
        prediction becomes x_0 where mask is 0, D <- mask * D + (1 - mask) * x_0, so the samplers step towards it.
        "input": A1111's for its CompVis samplers, DDIM, PLMS and UniPC (its blend before denoising): the model sees
        the clean x_0 where mask is 0, x_in = mask * x_t + (1 - mask) * x_0, and its output, read as eps at x_in,
        gives the prediction at the sampler's own x_t.
        "comfyui": ComfyUI's (its KSamplerX0Inpaint): both, at every model call, the model's input mixed with the known
        latent at the call's level and the prediction with the known latent, x_in = mask x + (1 - mask) (sqrt(abar)
        x_0 + sqrt(1 - abar) eps), D <- mask D + (1 - mask) x_0, x_0 its latent as given (noise left in it too).
        `sample` sets the result to x_0 where mask is 0 (so do diffusers and A1111), but for "comfyui", whose last
        prediction has it."""
        if rule not in KEEP_RULES:
            raise ValueError(f"rule must be one of {', '.join(map(repr, KEEP_RULES))}; got {rule!r}")
        self.known = (x0, eps, mask, rule)

    def matched_start(self, x: torch.Tensor) -> torch.Tensor:
        """The start sample moved to the first moment of q(x_T), which a schedule with non-zero terminal
        SNR (SD's abar_T = 0.0047) does not centre at 0:

            q(x_T) has mean sqrt(abar_T) E[x_0], so  x_T <- sqrt(abar_T) D(x_T) + sqrt(1 - abar_T) x_T

        with E[x_0] estimated per sample by the model's own D(x_T) (near the data mean at the top level).
        An ODE sampler carries a start error to x_0 unchanged (the plateau of docs/samplers.md); this
        removes its first-moment part. D(x_T) is kept and used again for the first step, so the start
        costs no model call: the shift moves D by O(abar_T) (its slope in x is ~ sqrt(abar_T) Cov[x_0])."""
        abar = float(self.plan.alphas_cumprod[0])
        x0 = self(x, 0)
        self._held = (x0, self.uncond_x0)
        return (math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * x).to(x.dtype)

    def _t(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)

    def model_output(self, x: torch.Tensor, i: int, t: float | None = None,
                     sigma: float | None = None) -> torch.Tensor:
        """The (guided) model output for step i's x, at the step's timestep or at `t` (an off-grid evaluation, at
        noise level `sigma`)."""
        t = float(self.plan.timesteps[i]) if t is None else t
        level = float(self.plan.sigmas[i]) if sigma is None else sigma
        for told in (self.model, self.cond, self.uncond):  # a model or conditioning that follows the noise level
            at_level = getattr(told, "at_level", None)  # (ControlNets' and ComfyUI's conditionings' windows)
            if at_level is not None:
                at_level(level)
        at_step = getattr(self.model, "at_step", None)
        if at_step is not None:  # a model whose inputs follow the step (ControlNets' guidance window)
            # counted in model evaluations where a step takes two (Heun: 2N - 1, as diffusers' doubled timesteps)
            at_step(*((self.calls, self.evaluations) if self.evaluations else (i, len(self.plan))))
        at_call = getattr(self.model, "at_call", None)
        if at_call is not None:  # (A1111's counts: SDXL's refiner by sampling steps, ControlNet windows)
            at_call(self.calls, self.counted_steps, i, self.sampling_steps)
        # (the conditioning of step i, or for a sampler of two evaluations a step of the model call's count, as
        # AUTOMATIC1111 counts its prompt editing's steps: prompt editing changes it during the run)
        k = self.calls if self.evaluations else i
        parts = {} if self.keep_uncond else None
        try:
            out = self.guidance(self.model, x, self._t(x, t), cond_at(self.cond, k), cond_at(self.uncond, k),
                                self.guidance_scale, rescale=self.guidance_rescale,
                                **({"parts": parts} if parts is not None else {}))
        except TypeError as e:
            if parts is not None and "parts" in str(e):
                raise ValueError("the CFG++ samplers need the unconditional output: this guidance rule takes no "
                                 "`parts` (see imagine.guidance.guided_model_output)") from e
            raise
        self.calls += 1
        out, self.variance = split_variance(out, x)  # (a learned variance: sample_ddpm's "learned_range" reads it)
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if parts is not None:
            self._uncond_out = parts["uncond"][:, : x.shape[1]]
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"the model returned NaN or inf at step {i + 1} of {len(self.plan)} "
                                     f"(t = {t:g})")
        return out

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0 and self._held is not None:
            (held, self.uncond_x0), self._held = self._held, None
            return held
        t = nearest_timestep(self._log_sigmas, float(self.plan.sigmas[i])) if self._log_sigmas is not None else \
            float(self.plan.timesteps[i])
        return self._denoise(x, i, t, float(self.plan.alphas_cumprod[i]), known=i > 0, on_grid=True,
                             sigma=float(self.plan.sigmas[i]))

    def at_sigma(self, x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        """D(x; sigma) at a noise level off the plan's grid, evaluated within step i (its conditioning is that of
        the model call's count where the sampler counts calls, `evaluations`, else step i's):
        x is the VP sample at abar = 1 / (1 + sigma^2), and the model sees the fractional timestep of that level,
        interpolated linearly in log sigma between neighbouring training timesteps (`NoiseSchedule.sigma_to_t`, as
        k-diffusion's sigma_to_t and diffusers' KDPM2 schedulers map their midpoints). Guidance, classifier guidance,
        thresholding and inpainting's known part are applied as for an on-grid step."""
        if self.schedule is None:
            raise ValueError("evaluating the denoiser between the plan's noise levels needs the training schedule: "
                             "Denoiser(..., schedule=...)")
        t = nearest_timestep(self._log_sigmas, float(sigma)) if self._log_sigmas is not None else \
            float(self.schedule.sigma_to_t(float(sigma)))
        return self._denoise(x, i, t, 1.0 / (1.0 + float(sigma) ** 2), known=True, sigma=float(sigma))

    def _denoise(self, x: torch.Tensor, i: int, t: float, abar: float, known: bool,
                 on_grid: bool = False, sigma: float | None = None) -> torch.Tensor:
        # model -> guidance -> x_0 -> classifier guidance (eps form) -> thresholding, at timestep t and level abar
        rule, x_in = None, x
        if self.known is not None:
            x0_known, eps, mask, rule = self.known
            if (rule == "replace" and known) or rule == "comfyui":
                x = x_in = torch.lerp((math.sqrt(abar) * x0_known + math.sqrt(1.0 - abar) * eps).to(x.dtype), x,
                                      mask.to(x.dtype))
            elif rule == "input":
                x_in = torch.lerp(x0_known.to(x.dtype), x, mask.to(x.dtype))
        out, kind = self.model_output(x_in, i, t, sigma), self.prediction_type
        uncond_out = self._uncond_out if self.keep_uncond else None
        read_abar = abar  # (the output read as eps at the model's own input, where that is not the sample)
        if on_grid and kind == "v_prediction" and self.plan.v_alphas_cumprod is not None:
            # (v read as eps at the plan's other abar: plan.v_alphas_cumprod; linear in v, so guidance commutes)
            read_abar = float(self.plan.v_alphas_cumprod[i])
        if (read_abar != abar and kind == "v_prediction") or x_in is not x:
            out, kind = predict_eps(out, x_in, read_abar, kind), "epsilon"
            uncond_out = None if uncond_out is None else predict_eps(uncond_out, x_in, read_abar,
                                                                       self.prediction_type)
        if uncond_out is not None:  # (CFG++: the model's own unconditional x_0, without classifier guidance or thresholds)
            self.uncond_x0 = predict_x0(uncond_out, x, abar, kind)
        if self.classifier is not None and self.classifier_scale and self.classifier_form == "eps" and abar > 0:
            # Dhariwal & Nichol 2021, Alg. 2: eps_hat = eps - sqrt(1 - abar) s grad, and x_0 from eps_hat
            grad = classifier_gradient(self.classifier, x, self._t(x, t)).to(out.dtype)
            eps = classifier_eps_shift(predict_eps(out, x, abar, kind), grad, abar, self.classifier_scale)
            x0 = predict_x0(eps, x, abar, "epsilon")
        else:
            x0 = predict_x0(out, x, abar, kind)
        x0 = apply_threshold(x0, self.thresholding, self.threshold_percentile, self.threshold_range,
                             self.threshold_max)
        if rule in ("denoised", "comfyui"):
            x0 = torch.lerp(x0_known.to(x0.dtype), x0, mask.to(x0.dtype))
        return x0

    def mean_shift(self, x: torch.Tensor, i: int, variance: float):
        """Dhariwal & Nichol 2021, Alg. 1 (the DDPM sampler asks for it): s * Sigma * grad log p(y | x_t)."""
        if self.classifier is None or not self.classifier_scale or self.classifier_form != "mean":
            return 0.0
        grad = classifier_gradient(self.classifier, x, self._t(x, float(self.plan.timesteps[i])))
        return classifier_mean_shift(grad, variance, self.classifier_scale).to(x.dtype)


class ConcatChannels(torch.nn.Module):
    """`model` conditioned by channel concatenation: it sees cat([x_t, extra], dim=1). LDM's inpainting
    models take the mask and the masked image's latents so (Rombach et al. 2022, sec. 4.5; SD's 9-channel
    U-Nets), as CDM's super-resolution stages take the upsampled low-resolution image (Ho et al. 2022,
    sec. 2). `extra` [B, C', ...] is fixed for the run; a guidance batch of k * B rows sees it k times, and
    a model that shares the guidance batch (docs/DESIGN.md) still gets x_t once."""

    def __init__(self, model: Callable[..., torch.Tensor], extra: torch.Tensor):
        super().__init__()
        self.model, self.extra = model, extra
        self.shares_guidance_batch = bool(getattr(model, "shares_guidance_batch", False))
        self.takes_guidance_half = bool(getattr(model, "takes_guidance_half", False))  # passed on in cond
        self.config = getattr(model, "config", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        extra = self.extra.to(device=x.device, dtype=x.dtype)
        if extra.shape[0] != x.shape[0]:
            if x.shape[0] % extra.shape[0]:
                raise ValueError(f"{extra.shape[0]} rows of concatenated conditioning for a batch of {x.shape[0]}")
            extra = torch.cat([extra] * (x.shape[0] // extra.shape[0]))
        return self.model(torch.cat([x, extra], dim=1), t, **cond)


class ConcatFromCond(torch.nn.Module):
    """`model` conditioned by channel concatenation, the extra channels coming with each call's conditioning as
    cond["concat"] [B, C', ...]: InstructPix2Pix's picture latents (Brooks et al. 2023, sec. 3.4), which its guidance
    gives to two of its three passes and zeroes for the third (imagine.guidance.instruct_pix2pix_guidance)."""

    def __init__(self, model: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, concat: torch.Tensor, **cond) -> torch.Tensor:
        return self.model(torch.cat([x, concat.to(device=x.device, dtype=x.dtype)], dim=1), t, **cond)


def make_generators(batch: int, seeds=None, generator=None, rng: str = "cpu",
                    seed_delta: int = 0) -> torch.Generator | list[torch.Generator | ImageNoiseStream] | None:
    """seeds: int s -> s, s+1, ..., s+B-1 (AUTOMATIC1111); list -> one each. generator: one, or a list.
    rng "nv" or a seed_delta: the seeds' ImageNoiseStreams (a torch.Generator each otherwise)."""
    if seeds is not None and generator is not None:
        raise ValueError("give seeds or generator, not both")
    check_rng(rng, seed_delta)
    if (rng != "cpu" or seed_delta) and seeds is None:
        raise ValueError(f"rng {rng!r} and seed_delta {seed_delta} make each image's stream from its seed: give seeds, "
                         "not generators")
    if seeds is not None:
        if isinstance(seeds, bool):
            raise TypeError("seeds must be an int or a list of ints")
        counted = isinstance(seeds, int)
        if counted:  # (ComfyUI's one seed is the batch's)
            seeds = [seeds + (0 if rng == "comfyui" else i) for i in range(batch)]
        seeds = list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}: give one seed per sample (or one int)")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise TypeError(f"seeds must be ints; got {seeds!r}")
        low = 0 if rng == "nv" else -2**63  # (torch's generator takes a 64-bit seed, signed or not; Philox's a key)
        out = [s for s in seeds if not low <= s <= 2**64 - 1]
        if out:
            raise ValueError(f"seed {out[0]} is outside the {rng!r} source's range [{'0' if low == 0 else '-2^63'}, "
                             f"2^64 - 1]"
                             f"{' (an int seed counts up: seed + i for image i)' if counted and batch > 1 else ''}")
        if rng == "comfyui":  # (one seed for the batch: ComfyUI's KSampler has one)
            if len(set(seeds)) != 1 or seed_delta:
                more = "..." if len(seeds) > 4 else ""
                raise ValueError(f"rng 'comfyui' draws a batch from one seed (ComfyUI's): give the same seed for "
                                 f"every image and no seed_delta; got seeds {seeds[:4]}{more}")
            return BatchNoiseStream(seeds[0])
        if rng != "cpu" or seed_delta:
            return [ImageNoiseStream(s, rng, seed_delta) for s in seeds]
        return [torch.Generator().manual_seed(s) for s in seeds]
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}: give one per sample")
        return list(generator)
    if generator is not None and not isinstance(generator, (torch.Generator, BatchNoiseStream)):
        raise TypeError(f"generator must be a torch.Generator or a list of them; got {type(generator).__name__}")
    return generator


def posterior_generators(seeds: Sequence[int]) -> list[ImageNoiseStream]:
    """The streams a run under AUTOMATIC1111's rules draws the VAE's posterior q(z | x) from, apart from the images'
    own, so that each image's stream gives its start noise first, as A1111's ImageRNG does (A1111 draws the posterior
    from its global generator, which no setting of it reproduces): Philox streams (imagine.philox) keyed by
    seed + 2^32, a key no image seed (< 2^32) has under either source (torch's CPU generator reads only a seed's low
    32 bits, so seed + 2^32 there would be the image's own stream)."""
    return [ImageNoiseStream((int(s) + 2**32) % 2**64, "nv") for s in seeds]


def comfyui_window(plan: SamplingPlan, start_step: int, last_step: int, full_denoise: bool) -> SamplingPlan | None:
    """The plan of ComfyUI's KSamplerAdvanced (common_ksampler): the levels up to `last_step` (its sigmas[:last + 1]),
    the last set to 0 when they were cut and `full_denoise`, then from `start_step` on; None where no step is left.
    A run of its own (k-diffusion's samplers start and end on the levels given): no lead or follow."""
    n = len(plan)
    t, s, a = plan.timesteps, plan.sigmas.clone(), plan.alphas_cumprod.clone()
    if last_step < n:
        t, s, a = t[:last_step], s[:last_step + 1], a[:last_step + 1]
        if full_denoise:
            s[-1], a[-1] = 0.0, 1.0
    if start_step >= len(t):
        return None
    t, s, a = t[start_step:], s[start_step:], a[start_step:]
    return replace(plan, timesteps=t, sigmas=s, alphas_cumprod=a, follow=0, lead=0, v_alphas_cumprod=None,
                   end_ve=float(s[-1]) > 0)


def levels_plan(schedule: NoiseSchedule, levels: Sequence[float], rule: str = "karras") -> SamplingPlan | None:
    """The plan of explicit noise levels (ComfyUI's SIGMAS): each step at its level's fractional timestep (the nearest
    under `quantize`), ending at the last level (VE hand-on above 0, as a KSamplerAdvanced window's); None for fewer
    than two levels (no step: ComfyUI gives the latent back)."""
    sig = torch.tensor([float(v) for v in levels], dtype=torch.float64)
    if len(sig) < 2:
        return None
    if not bool(torch.isfinite(sig).all()) or bool((sig[:-1] <= 0).any()) or float(sig[-1]) < 0 \
            or bool((sig.diff() >= 0).any()):
        raise ValueError(f"noise levels must fall strictly, all above 0 but the last (0 or above); got "
                         f"{[round(v, 6) for v in sig.tolist()]}")
    t = torch.as_tensor(schedule.sigma_to_t(sig[:-1].numpy()), dtype=torch.float64)
    return SamplingPlan(timesteps=t, sigmas=sig, alphas_cumprod=1.0 / (1.0 + sig**2), rule=rule,
                        end_ve=float(sig[-1]) > 0)


def comfyui_max_denoise(schedule: NoiseSchedule, plan: SamplingPlan) -> bool:
    """ComfyUI's max_denoise: whether the run's first level is at the model's sigma_max (its float32 table's last,
    within a relative 1e-5) or above it; its start then scales the noise by sqrt(1 + sigma^2), else by sigma."""
    top = schedule.held_sigma_max()
    first = float(plan.sigmas[0])
    return math.isclose(top, first, rel_tol=1e-5) or first > top


def initial_noise_scale(plan: SamplingPlan, start: str = "noise") -> float:
    """What unit noise is multiplied by to give x_T in VP terms, as diffusers' `init_noise_sigma` sets it:
    1 for the VP schedulers (DDPM, DDIM, DPM-Solver); for Euler/Heun, x_VE = z * sigma_max with
    linspace/trailing spacing and z * sqrt(sigma_max^2 + 1) with leading, i.e. x_T = z * sigma_max /
    sqrt(1 + sigma_max^2) or z. start="sigma_max": x_VE = z * sigma_0 for every sampler (k-diffusion's and
    AUTOMATIC1111's start), i.e. z sqrt(1 - abar_0)."""
    if start == "sigma_max":
        return math.sqrt(1.0 - float(plan.alphas_cumprod[0]))
    if plan.rule != "karras":
        return 1.0
    s = float(plan.sigmas.max())
    return s / math.sqrt(1 + s * s) if plan.spacing in ("linspace", "trailing") else 1.0


def _validate_guidance(guidance_scale, guidance_rescale, uncond, classifier, classifier_scale, form, thresholding,
                       threshold_percentile, canonical, threshold_range=1.0, threshold_max=None):
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale}")
    if guidance_scale != 1 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond (the unconditional / negative-prompt inputs "
                         f"for classifier-free guidance); pass uncond=... or guidance_scale=1")
    if not 0 <= float(guidance_rescale) <= 1:
        raise ValueError(f"guidance_rescale (phi of Lin et al. 2023) must be in [0, 1]; got {guidance_rescale}")
    if thresholding not in THRESHOLDINGS:
        raise ValueError(f"thresholding must be one of {THRESHOLDINGS}; got {thresholding!r}")
    if not 0 < float(threshold_percentile) <= 1:
        raise ValueError(f"threshold_percentile must be in (0, 1]; got {threshold_percentile}")
    check_threshold_range(threshold_range)
    if check_threshold_max(threshold_max) is not None and thresholding != "dynamic":
        raise ValueError(f"threshold_max caps dynamic thresholding's s; it needs thresholding='dynamic' (got "
                         f"thresholding={thresholding!r})")
    if form not in CLASSIFIER_FORMS:
        raise ValueError(f"classifier_guidance_form must be one of {sorted(CLASSIFIER_FORMS)}; got {form!r}")
    if classifier_scale and classifier is None:
        raise ValueError(f"classifier_scale={classifier_scale} needs a classifier")
    if classifier is not None and not callable(classifier):
        raise TypeError("classifier must be callable: (x_t, t) -> log p(y | x_t) of shape [B]")
    if classifier is not None and classifier_scale and CLASSIFIER_FORMS[form] == "mean" and canonical != "ddpm":
        raise ValueError(f"classifier guidance in its DDPM form (shifting the posterior mean, Dhariwal & Nichol "
                         f"Alg. 1) only exists for the ddpm sampler, not {canonical!r}; use "
                         f"classifier_guidance_form='eps' (Alg. 2) with other samplers")


def sampler_plan(schedule, sampler, steps, timestep_spacing=None, steps_offset=None, karras=False, rule=None,
                 sigma_schedule=None, rho=None, sigma_range="spaced", discard_penultimate_sigma=False):
    """(the sampler's canonical name, its function, the SamplingPlan it runs `steps` steps on): its timestep rule
    (TIMESTEP_RULE) unless `rule` is given, a name's Karras hint ("... Karras") with `karras`. ValueError where the
    sampler and the schedule type cannot go together."""
    canonical, fn, karras_hint = resolve_sampler(sampler)
    # (ComfyUI's levels do not depend on the sampler: one rule for all, unless asked, its LCM model sampling's)
    rule = rule or ("karras" if sigma_range == "comfyui" else TIMESTEP_RULE[canonical])
    plan = schedule.plan(steps, rule=rule, spacing=timestep_spacing,
                         steps_offset=steps_offset, karras=bool(karras) or karras_hint,
                         sigma_schedule=sigma_schedule, rho=rho, sigma_range=sigma_range or "spaced",
                         discard_penultimate_sigma=bool(discard_penultimate_sigma))
    return canonical, fn, plan


def _prepare(model, schedule, prediction_type, sampler, steps, timestep_spacing, steps_offset, karras, rule=None,
             sigma_schedule=None, rho=None, sigma_range="spaced", discard_penultimate_sigma=False):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be an imagine.schedules.NoiseSchedule; got {type(schedule).__name__}")
    if not callable(model):
        raise TypeError("model must be callable as model(x_t, t, **cond)")
    prediction_type = check_prediction_type(schedule.prediction_type if prediction_type is None else prediction_type)
    canonical, fn, plan = sampler_plan(schedule, sampler, steps, timestep_spacing, steps_offset, karras, rule,
                                       sigma_schedule, rho, sigma_range, discard_penultimate_sigma)
    if prediction_type == "epsilon" and bool((plan.alphas_cumprod[:-1] == 0).any()):
        raise ValueError("an epsilon-predicting model cannot denoise at zero terminal SNR (abar = 0 at "
                         f"t = {float(plan.timesteps[0]):g}: x_0 is undefined from eps); use v_prediction "
                         "(Lin et al. 2023) or a spacing that avoids the last timestep")
    return prediction_type, canonical, fn, plan


def sample(model: Callable[..., torch.Tensor], shape_or_noise: Sequence[int] | torch.Tensor, *,
           schedule: NoiseSchedule, prediction_type: str | None = None, sampler: str, steps: int,
           cond: dict[str, Any] | None = None, uncond: dict[str, Any] | None = None, guidance_scale: float = 1.0,
           guidance_rescale: float = 0.0, classifier: Callable[..., torch.Tensor] | None = None,
           classifier_scale: float = 0.0, classifier_guidance_form: str = "eps", thresholding: str | None = None,
           threshold_percentile: float = 0.995, threshold_range: float = 1.0, threshold_max: float | None = None,
           timestep_spacing: str | None = None, steps_offset: int | None = None,
           karras: bool | None = False, eta: float | None = None, seeds: int | Sequence[int] | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, progress: bool = True, final_step: str = "euler",
           sampler_options: dict[str, Any] | None = None, sigma_schedule: str | None = None,
           rho: float | None = None, start: str = "noise", init: torch.Tensor | None = None, strength: float = 1.0,
           mask: torch.Tensor | None = None, guidance: Callable[..., torch.Tensor] | None = None,
           noise_seeds: int | Sequence[int] | None = None, sigma_range: str = "spaced",
           discard_penultimate_sigma: bool = False, strength_rule: str = "diffusers", rng: str = "cpu",
           seed_delta: int = 0, dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None, lcm_strength: bool = False,
           quantize: bool = False, window: tuple[int, int, bool] | None = None,
           levels: Sequence[float] | None = None, rule: str | None = None) -> torch.Tensor:
    """Sample a batch with one of the samplers (see `imagine.samplers`) and return x_0.

    model: model(x_t, t, **cond); one with `at_run` (imagine.refiner.Handoff) is told before its first call how the
        run reads a fractional timestep: at_run(rule=..., num_train_timesteps=..., schedule=...), "diffusers" under
        strength_rule "diffusers", else AUTOMATIC1111's, "a1111_timesteps" for its CompVis samplers (COMPVIS_SAMPLERS),
        "a1111" for the others.
    shape_or_noise: the full shape (B, C, H, W), or a start-noise tensor of unit variance [B, ...]
        (scaled by the sampler's initial noise scale, as diffusers treats `latents=`).
    schedule / prediction_type: the model's training schedule and output type (default: the schedule's).
    sampler: a name from `imagine.samplers.sampler_names()` or an alias ("DPM++ 2M Karras", "Euler a"...).
    timestep_spacing, steps_offset: default to the schedule's settings ("leading", 0 unless configured).
    karras: Karras et al. sigmas (also implied by a "... Karras" sampler name).
    sigma_schedule, rho: the noise levels' spacing instead of the timestep spacing's own: "karras",
        "exponential" (even in log-SNR), "polyexponential" or "beta" (schedules.spaced_sigmas), A1111's schedule types;
        sigma_range: what they span, "spaced" (diffusers') or "model" (A1111's: the whole trained range; plan()).
        Also "kl_optimal", and the types read off the model's own levels: "uniform" / "normal", "sgm_uniform",
        "simple", "ddim_uniform", "compvis" (schedules.model_levels; the last two may lay out more levels than steps:
        a warning says when the run takes more steps than asked).
    discard_penultimate_sigma: steps + 1 levels with the last before the end left out (A1111's
        discard_next_to_last_sigma, its way for DPM2, DPM2 a and DPM++ 3M SDE; NoiseSchedule.plan).
    eta: DDIM's eta (ddim, ddim_cfgpp; default 0), or the noise scale of euler_a / euler_a_cfgpp / dpm2_a /
    dpmpp_2s_a / dpmpp_sde / dpmpp_2m_sde / dpmpp_2m_sde_heun / dpmpp_3m_sde (default 1), or of dpm_fast /
    dpm_adaptive (default 0; A1111 runs 1).
    cond / uncond: keyword tensors for the model, batch-first; classifier-free guidance runs when
        guidance_scale != 1 (uncond required then) with guidance_rescale = phi of Lin et al. 2023.
    guidance: another rule for combining them, called as guided_model_output is (e.g.
        functools.partial(guidance.instruct_pix2pix_guidance, image_scale=1.5)).
    classifier, classifier_scale, classifier_guidance_form: classifier guidance with
        `classifier(x_t, t) -> log p(y | x_t)` [B] (see guidance.classifier_log_prob); form "eps"
        (Alg. 2, any sampler) or "mean" (Alg. 1, ddpm only).
    thresholding: None, "static" or "dynamic" (Imagen) on every x_0 prediction; threshold_range R: the data's
        range [-R, R] the rules hold x_0 to (1: pixels, Imagen's case; a latent's range: guidance.latent_threshold_range).
    threshold_max: a cap M >= 1 on dynamic thresholding's s (s in [R, M R]; None: no cap), diffusers' DDPMScheduler
        sample_max_value with thresholding=True (DeepFloyd IF: percentile 0.95, M = 1.5).
    seeds / generator: reproducible noise, one generator per sample (see module doc).
    rng, seed_delta (with seeds): each sample's stream as AUTOMATIC1111 keeps it (ImageNoiseStream): "cpu" (torch's
        CPU generator, as a generator seeded so) or "nv" (an NVIDIA GPU's draws, A1111's "NV" source, for its Brownian
        trees too); seed_delta, A1111's ENSD: the draws after the start noise from seed + seed_delta.
    noise_seeds: the seeds of the samples' Brownian paths (an int s for s, s+1, ...), for the SDE samplers' default
        sde_noise "brownian" (imagine.brownian; A1111 seeds each image's with the image's seed): default `seeds`, else
        a draw from each sample's generator. The paths span the noise levels of the whole plan (an image-to-image
        run's too).
    callback(info): after each step; info has step, total, t, sigma, x, denoised (and sigma_hat, the level x is at,
        on a step S_churn raised). Raise to stop.
    final_step: "euler" (x_0 = D(x) from the last level, as every diffusers scheduler does) or "heun"
        (the trapezoidal last step, samplers.final_heun_step: same model calls, less narrowing of the
        modes; see docs/samplers.md).
    sampler_options: further keywords of the sampler function, e.g. {"order": 3, "variant": "bh1"} for unipc.
    start: "noise" (x_T is the scaled start noise, as diffusers starts) or "matched" (moved to the mean of
        q(x_T) by the model's own x_0 estimate, Denoiser.matched_start: no extra model call; it matters
        where the schedule's terminal SNR is not zero; docs/samplers.md) or "sigma_max" (x_T = z sigma_max in VE
        terms, z sqrt(1 - abar) in VP terms, for every sampler: k-diffusion's and AUTOMATIC1111's start; diffusers
        scales z so for its Euler-family samplers with linspace or trailing spacing only). An image-to-image run
        starts from q(x_t | x_0) with "noise" or "sigma_max" alike. "comfyui": ComfyUI's rule (its noise_scaling
        with max_denoise), which looks at the first level run: at the model's sigma_max (within 1e-5) or above,
        x_VE = x_0 + z sqrt(1 + sigma^2), i.e. x_T = sqrt(abar) x_0 + z (z alone for text to image, whose x_0, its
        empty latent, is 0), else x_VE = x_0 + z sigma, q(x_t | x_0) (z sqrt(1 - abar) from an empty latent).
    window: (start_at_step, end_at_step, full_denoise), ComfyUI's KSamplerAdvanced (its common_ksampler's start_step,
        last_step and force_full_denoise): the plan's levels from start_at_step to end_at_step, the last set to 0 where
        the window cut the plan and full_denoise; from `init`, a latent in VE terms (a run ending above 0 hands one on:
        ComfyUI's leftover noise), with the start noise (zeros: its add_noise "disable") scaled by the "comfyui" start
        rule. A window with no step left gives `init` back.
    levels: the run's noise levels themselves (ComfyUI's SIGMAS: its SamplerCustom), falling, ending at 0 or above
        (then the VE sample there is handed on); run from `init` as a window is (`levels_plan`); `steps` is ignored.
    rule: the timestep rule of the plan in place of the sampler's (schedules.TIMESTEP_RULES; "lcm" with a schedule type:
        its levels over the LCM distillation timesteps, ComfyUI's LCM model sampling under sigma_range "comfyui").
    quantize: the model sees each level's nearest training timestep (nearest in log sigma, in float32: k-diffusion's
        quantize=True, and ComfyUI's every run) instead of the fractional one.
    init, strength: image-to-image (SDEdit, Meng et al. 2022): x_0 to start from, [B, ...] of the sample's shape;
        the plan's last int(steps * strength) steps run from x_0 taken to their first level by q(x_t | x_0) =
        N(sqrt(abar) x_0, (1 - abar) I) with the samples' own noise (drawn after any draws the caller made with
        the same generators), as diffusers' img2img pipelines start. strength in (0, 1]. A start-noise tensor
        given as `shape_or_noise` is that noise (unit variance, init's shape).
    strength_rule: which steps an image-to-image run takes: "diffusers" (above), "a1111" (AUTOMATIC1111's img2img:
        the last int(min(strength, 0.999) * steps) + 1 of the plan) or "a1111_fixed_steps" (its hires. fix pass and
        its "img2img_fix_steps" setting: `steps` steps, the last of a plan laid out for int(steps / min(strength,
        0.999)) steps); both A1111 rules start from q(x_t | x_0), at strength 1 too. Over the schedule types of its
        CompVis samplers (DDIM, PLMS, UniPC: "compvis", "compvis_time_uniform") they run its CompVis image to image,
        which starts the sampler a level below the image's (_compvis_img2img).
    lcm_strength: the lcm sampler's image to image as an LCM pipeline runs it (diffusers'
        LatentConsistencyModelImg2ImgPipeline: all `steps` laid out over the distillation timesteps below the strength,
        NoiseSchedule._lcm_plan) rather than diffusers' img2img cut (int(steps * strength) of the full plan).
    mask: inpainting with init (Denoiser.keep_known: the replacement method; with an A1111 strength rule A1111's
        blend, before denoising for DDIM, PLMS, DDIM CFG++ and UniPC on their CompVis schedule types, after it for every
        other run): [B or 1, 1 or C, ...] in [0, 1],
        1 where the sample is generated, 0 where it keeps init; the result is init where mask is 0. At strength
        1 the run starts from pure noise, as diffusers' inpainting pipeline does (below 1, from q(x_t | init)).
    """
    if strength_rule not in STRENGTH_RULES:
        raise ValueError(f"strength_rule must be one of {', '.join(map(repr, STRENGTH_RULES))}; got {strength_rule!r}")
    plan_steps = _plan_steps(schedule, steps, init is not None and window is None, strength, strength_rule)
    prediction_type, canonical, fn, plan = _prepare(model, schedule, prediction_type, sampler, plan_steps,
                                                    timestep_spacing, steps_offset, karras, rule=rule,
                                                    sigma_schedule=sigma_schedule, rho=rho, sigma_range=sigma_range,
                                                    discard_penultimate_sigma=discard_penultimate_sigma)
    if final_step not in ("euler", "heun"):
        raise ValueError(f"final_step must be 'euler' or 'heun'; got {final_step!r}")
    whole = (sampler_options or {}).get("last_step", True)
    if whole is False and final_step != "euler":
        raise ValueError("final_step='heun' replaces the plan's last step; last_step=False leaves it out (the CompVis "
                         "loop): give one of them")
    steps_run = len(plan) - (0 if whole else 1)
    if init is None and steps_run > steps:  # (the DDIM schedule type lays out more where T / steps is not whole)
        import warnings

        warnings.warn(f"{sigma_schedule} lays out {len(plan)} levels for {steps} steps (A1111's and ComfyUI's rule "
                      f"for it): the run takes {steps_run} steps", stacklevel=2)
    if start == "matched" and (sampler_options or {}).get("s_churn"):
        raise ValueError("start='matched' holds D(x_T) for the first step, which s_churn's fresh noise moves off; "
                         "give one of them")
    if canonical == "restart" and final_step != "euler":
        raise ValueError("final_step='heun' is for the samplers that end on one step to sigma = 0; restart lays out "
                         "its own last steps (Heun's, but to sigma = 0 Euler's): leave final_step 'euler'")
    if canonical in ("dpm_fast", "dpm_adaptive") and final_step != "euler":
        raise ValueError(f"final_step='heun' is for the samplers that end on one step to sigma = 0; {canonical} "
                         "integrates to a last level above 0 and stops there: leave final_step 'euler'")
    if canonical in CFG_PP_SAMPLERS and final_step != "euler":
        raise ValueError(f"final_step='heun' steps with the guided prediction alone; {canonical} renoises along the "
                         "unconditional one (CFG++) at every step: leave final_step 'euler'")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}; got {start!r}")
    _validate_guidance(guidance_scale, guidance_rescale, uncond, classifier, classifier_scale,
                       classifier_guidance_form, thresholding, threshold_percentile, canonical, threshold_range,
                       threshold_max)
    if isinstance(shape_or_noise, torch.Tensor):
        if shape_or_noise.ndim < 2:
            raise ValueError(f"start noise must be batch-first [B, ...]; got shape {tuple(shape_or_noise.shape)}")
        if not bool(torch.isfinite(shape_or_noise).all()):
            raise ValueError("the start noise has NaN or inf values")
        batch = shape_or_noise.shape[0]
    else:
        shape = tuple(shape_or_noise)
        if len(shape) < 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"shape must be a tuple of positive ints (B, C, ...) including the batch; got {shape!r}")
        batch = shape[0]
    generators = make_generators(batch, seeds, generator, rng, seed_delta)  # (checks the seeds first)
    if noise_seeds is not None or seeds is not None:
        from imagine.brownian import tree_seeds

        noise_seeds = tree_seeds(batch, seeds if noise_seeds is None else noise_seeds)
    spanned = [v for v in plan.sigmas.tolist() if v > 0]
    # (A1111's trees span the whole plan's levels; ComfyUI's the levels its sampler is given: the run's)
    noise = PerSampleNoise(generators, noise_seeds, (min(spanned), max(spanned)) if len(spanned) > 1 and not
                           isinstance(generators, BatchNoiseStream) else None)
    cond = check_cond(cond, batch, "cond")
    uncond = check_cond(uncond, batch, "uncond") if uncond is not None else None
    if mask is not None and init is None:
        raise ValueError("mask needs init: the x_0 to keep where mask is 0 (inpainting)")
    if window is not None or levels is not None:
        if init is None or strength != 1.0 or (window is not None and levels is not None):
            raise ValueError("window (ComfyUI's KSamplerAdvanced steps) or levels (its SamplerCustom's sigmas) run "
                             "from a latent: give init (zeros for an empty one), no strength and one of them")
        plan, start_abar = (comfyui_window(plan, *window) if levels is None else
                            levels_plan(schedule, levels, plan.rule)), None
        if plan is None:  # (ComfyUI gives the latent back)
            return init.clone()
    elif init is not None:
        plan, start_abar = _img2img_run(schedule, canonical, plan, sigma_schedule, strength, start, strength_rule,
                                        steps, plan_steps, lcm_strength)
    if init is not None:
        shape = tuple(shape_or_noise.shape) if isinstance(shape_or_noise, torch.Tensor) else shape
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != shape:
            raise ValueError(f"init must be a tensor of the sample's shape {shape}; got "
                             f"{tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__}")
        if not bool(torch.isfinite(init).all()):  # (else the model's first output is blamed for it)
            raise ValueError("init has NaN or inf values: the x_0 to start from must be finite")
        device = _model_device(model) if device is None else device
        full = start == "comfyui" and comfyui_max_denoise(schedule, plan)
        # drawn in float32, as diffusers draws it
        if isinstance(shape_or_noise, torch.Tensor):
            noise.started()
        eps = (shape_or_noise if isinstance(shape_or_noise, torch.Tensor) else noise.draw_start(shape)).to(torch.float64).cpu()
        if full:  # (ComfyUI's max_denoise: the latent plus z sqrt(1 + sigma^2) in VE terms)
            x = (math.sqrt(float(plan.alphas_cumprod[0])) * init.to(torch.float64).cpu() + eps).to(device=device,
                                                                                                   dtype=dtype)
        elif mask is not None and strength == 1 and strength_rule == "diffusers":
            # (diffusers' inpainting starts from noise at strength 1; A1111's from q(x_t | x_0) with t its first)
            x = (eps * initial_noise_scale(plan, start)).to(device=device, dtype=dtype)
        else:
            abar = float(plan.alphas_cumprod[0]) if start_abar is None else start_abar  # (the first level run)
            x = (math.sqrt(abar) * init.to(torch.float64).cpu() + math.sqrt(1 - abar) * eps).to(device=device,
                                                                                              dtype=dtype)
        if mask is not None:
            mask = _check_mask(mask, shape)
    else:
        if isinstance(shape_or_noise, torch.Tensor):
            z = shape_or_noise
            noise.started()
            device = z.device if device is None else device
        else:
            z = noise.draw_start(shape)
            device = _model_device(model) if device is None else device
        if start == "comfyui":  # (from its empty latent: z sqrt(1 + sigma^2) or z sigma in VE terms)
            scale = 1.0 if comfyui_max_denoise(schedule, plan) else initial_noise_scale(plan, "sigma_max")
        else:
            scale = initial_noise_scale(plan, start)
        x = (z.to(torch.float64) * scale).to(device=device, dtype=dtype)
    variance_type = schedule.variance_type
    denoise = Denoiser(model, plan, prediction_type, cond, uncond, guidance_scale, guidance_rescale, classifier,
                       classifier_scale, CLASSIFIER_FORMS[classifier_guidance_form], thresholding,
                       threshold_percentile, threshold_range, guidance, schedule=schedule,
                       threshold_max=threshold_max, quantize=quantize)
    if canonical in TWO_CALL_SAMPLERS:
        # (their last step, to sigma = 0, is one Euler evaluation; to a level above it, two)
        denoise.evaluations = 2 * len(plan) - (float(plan.sigmas[-1]) == 0)
        denoise.counted_steps = 2 * len(plan)  # (A1111's "second_order" samplers: these, Restart included)
    elif canonical in COMPVIS_SAMPLERS and strength_rule != "diffusers":
        # (A1111's CompVis samplers count the steps asked, and in image to image t_enc + 1 for the t_enc they run:
        # sd_samplers_timesteps' launch_sampling)
        denoise.counted_steps = denoise.sampling_steps = steps if init is None else len(plan) + 1
    kwargs = {"variance_type": variance_type} if canonical == "ddpm" else {}
    kwargs.update(_sampler_options(canonical, sampler_options))
    if init is not None and kwargs.get("ends") == "model":  # (A1111's img2img runs DPM-Solver over the steps run)
        kwargs["ends"] = "plan"
    elif canonical == "dpm_fast" and kwargs.get("ends") == "model":  # (A1111's txt2img: K = the steps asked)
        kwargs.setdefault("calls", steps)
    denoise.keep_uncond = canonical in CFG_PP_SAMPLERS  # (set before a matched start's first model call)
    at_run = getattr(model, "at_run", None)
    if at_run is not None:  # (a model that follows the run's rules, SDXL's refiner handoff: imagine.refiner)
        at_run(rule="diffusers" if strength_rule == "diffusers" else
               "a1111_timesteps" if canonical in COMPVIS_SAMPLERS else "a1111",
               num_train_timesteps=schedule.num_train_timesteps, schedule=schedule)
    if mask is not None:
        known = init.to(device=x.device, dtype=torch.float64)
        # (A1111's rules: its blend after denoising for its k-diffusion samplers, before it for its CompVis ones)
        keep = "comfyui" if start == "comfyui" else "replace" if strength_rule == "diffusers" else \
            "input" if start_abar is not None else "denoised"
        if keep == "replace" and not bool(((mask == 0) | (mask == 1)).all()):
            # (the replacement is diffusers' only for a 0/1 mask, which its pipelines make by rounding at 0.5: it
            # blends the model's input, diffusers the sampler's state, the same where the mask is 0 or 1)
            raise ValueError("mask: values between 0 and 1 under diffusers' rules (strength_rule 'diffusers', which "
                             "keeps the known part by replacement); give a mask of 0 and 1, or run A1111's rules "
                             "(strength_rule 'a1111'), which blend a soft mask")
        denoise.keep_known(known, eps.to(x.device), mask.to(device=x.device, dtype=torch.float64), keep)
    with torch.no_grad():
        if start == "matched":
            x = denoise.matched_start(x)
        if final_step == "euler":
            x = fn(denoise, x, plan, noise=noise, eta=eta, callback=callback, progress=progress, **kwargs)
        else:
            if float(plan.sigmas[-1]) != 0:
                raise ValueError("final_step='heun' needs a plan that ends at sigma = 0; DDIM with "
                                 "set_alpha_to_one=False and the continuous-time schedule types (time_uniform, ...) "
                                 "end at abar_0, KL Optimal under sigma_range 'model' (A1111's) at sigma_min")
            if len(plan) > 1:  # every step but the last as the sampler does them, then the trapezoid to sigma = 0
                x = fn(denoise, x, plan.head(len(plan) - 1), noise=noise, eta=eta, callback=callback,
                       progress=progress, **kwargs)
            x = final_heun_step(denoise, x, plan, callback=callback)
    if plan.end_ve and float(plan.sigmas[-1]) > 0 and canonical not in VE_RESULT_SAMPLERS:  # (x / alpha)
        x = (x.double() * math.sqrt(1.0 + float(plan.sigmas[-1]) ** 2)).to(x.dtype)
    if mask is not None and start != "comfyui":  # the known part is x_0 itself (diffusers' last blend is with the
        # clean latents; ComfyUI's last prediction is blended, and a window's end above 0 keeps its noise)
        x = torch.lerp(known.to(x.dtype), x, mask.to(x.dtype))
    return x


def _check_mask(mask, shape: tuple[int, ...]) -> torch.Tensor:
    """An inpainting mask [B or 1, 1 or C, *spatial] with values in [0, 1] -> float64 of the sample's shape."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != len(shape) or mask.shape[0] not in (1, shape[0]) \
            or mask.shape[1] not in (1, shape[1]) or tuple(mask.shape[2:]) != tuple(shape[2:]):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor [{shape[0]} or 1, 1 or {shape[1]}, {', '.join(map(str, shape[2:]))}] "
                         f"(the sample's size; 1 = generate, 0 = keep init); got {got}")
    mask = mask.detach().to(torch.float64).cpu()
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask values must be in [0, 1] (1 = generate, 0 = keep init)")
    return mask.expand(shape)


def _check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (1: from pure noise, as text-to-image); got {strength!r}")


def _plan_steps(schedule: NoiseSchedule, steps: int, img2img: bool, strength, strength_rule: str) -> int:
    # the steps the plan is laid out for: `steps`, but for A1111's fixed-steps rule, which runs them as the last of more
    if not (img2img and strength_rule == "a1111_fixed_steps"):
        return steps
    _check_strength(strength)
    plan_steps = int(steps / min(strength, 0.999))
    if plan_steps > schedule.num_train_timesteps:
        raise ValueError(f"strength_rule 'a1111_fixed_steps' runs {steps} steps as the last of "
                         f"int({steps} / {strength}) = {plan_steps}, more than the model's "
                         f"{schedule.num_train_timesteps} timesteps; raise the strength or lower the steps")
    return plan_steps


def _img2img_run(schedule: NoiseSchedule, canonical: str, plan: SamplingPlan, sigma_schedule, strength, start: str,
                 strength_rule: str, steps: int, plan_steps: int,
                 lcm_strength: bool = False) -> tuple[SamplingPlan, float | None]:
    # (the plan an image-to-image run takes, the abar its image is noised to where that is not the plan's first:
    # A1111's CompVis samplers, a level below; lcm_strength: an LCM pipeline's rule, every step of `steps` laid out
    # below the strength, NoiseSchedule._lcm_plan)
    if lcm_strength and canonical == "lcm" and sigma_schedule is None and strength_rule == "diffusers":
        _check_strength(strength)
        if start == "matched":
            raise ValueError("start='matched' moves pure noise; an image-to-image run starts from the image")
        return schedule._lcm_plan(steps, None, plan.spacing, strength=float(strength)), None
    if strength_rule != "diffusers" and sigma_schedule in COMPVIS_SCHEDULES and canonical in COMPVIS_SAMPLERS:
        return _compvis_img2img(schedule, plan, sigma_schedule, strength, start, strength_rule, steps)
    return _img2img_plan(plan, strength, start, strength_rule, steps, plan_steps), None


def run_plan(schedule: NoiseSchedule, sampler: str, steps: int, *, img2img: bool = False, strength: float = 1.0,
             strength_rule: str = "diffusers", start: str = "noise", timestep_spacing=None, steps_offset=None,
             karras=False, sigma_schedule=None, rho=None, sigma_range="spaced",
             discard_penultimate_sigma=False, lcm_strength: bool = False) -> SamplingPlan:
    """The SamplingPlan `sample` runs `sampler` over for these settings (an image-to-image run's: the part it takes),
    laid out without a model: a ValueError where the settings, or the sampler on that plan (samplers.check_plan),
    cannot run, as `sample` would raise it, so that a caller can refuse a later run before doing any work (a hires
    fix's second pass before its first)."""
    if strength_rule not in STRENGTH_RULES:
        raise ValueError(f"strength_rule must be one of {', '.join(map(repr, STRENGTH_RULES))}; got {strength_rule!r}")
    plan_steps = _plan_steps(schedule, steps, img2img, strength, strength_rule)
    canonical, _, plan = sampler_plan(schedule, sampler, plan_steps, timestep_spacing, steps_offset, karras, None,
                                      sigma_schedule, rho, sigma_range, discard_penultimate_sigma)
    if img2img:
        plan, _ = _img2img_run(schedule, canonical, plan, sigma_schedule, strength, start, strength_rule, steps,
                               plan_steps, lcm_strength)
    check_plan(canonical, plan)
    return plan


def _img2img_plan(plan: SamplingPlan, strength: float, start: str, rule: str = "diffusers",
                  steps: int | None = None, plan_steps: int | None = None) -> SamplingPlan:
    """The steps an image-to-image run takes, the last of the plan laid out for N steps (N = len(plan) but for the
    schedule types that lay out more, `plan_steps`): int(N * strength) of them (diffusers' rule); from level
    N - t_enc - 1 on, t_enc = int(min(strength, 0.999) * N) (A1111's img2img: sigmas[N - t_enc - 1:]); or from
    N - steps on (A1111's fixed steps, the plan laid out for more: see `sample`)."""
    _check_strength(strength)
    if start == "matched":
        raise ValueError("start='matched' moves pure noise; an image-to-image run starts from the image")
    n = len(plan)
    if rule == "diffusers":
        first = n - min(int(n * strength), n)
    else:
        asked = plan_steps or n
        first = asked - (int(min(strength, 0.999) * asked) + 1 if rule == "a1111" else steps)
        first = min(max(first, 0), n)
    if first >= n:
        raise ValueError(f"strength {strength} of {n} steps leaves no step to run (int(steps * strength) = 0); "
                         f"raise the strength or the steps (at least {math.ceil(1 / strength)})")
    return plan.tail(first)


def _compvis_img2img(schedule: NoiseSchedule, plan: SamplingPlan, kind: str, strength: float, start: str, rule: str,
                     steps: int) -> tuple[SamplingPlan, float]:
    """(plan, abar the image is noised to): AUTOMATIC1111's image to image for its CompVis samplers, DDIM, PLMS and
    UniPC (its sd_samplers_timesteps.py, over the "compvis" and "compvis_time_uniform" schedule types): of the CompVis
    timesteps ts = 1, 1 + k, ... for N = `steps` (k = T // N), t_enc = int(min(strength, 0.999) N) (its fixed-steps
    rule, "a1111_fixed_steps": N = int(steps / min(strength, 0.999)) and t_enc = steps - 1); the image goes by q(x_t |
    x_0) to ts[t_enc]'s level, and the sampler runs over ts[:t_enc], from ts[t_enc - 1]'s level: a level below the
    sample's own, as A1111 runs it (DDIM and PLMS over the tail of `plan`, t_enc - 1 steps with last_step False; UniPC
    time-uniform over t_enc steps from t = (ts[t_enc - 1] + 1) / T)."""
    _check_strength(strength)
    if start == "matched":
        raise ValueError("start='matched' moves pure noise; an image-to-image run starts from the image")
    fixed = rule == "a1111_fixed_steps"
    n = int(steps / min(strength, 0.999)) if fixed else steps
    t_enc = steps - 1 if fixed else int(min(strength, 0.999) * steps)
    T = schedule.num_train_timesteps
    ts = compvis_timesteps(T, n).tolist()
    if t_enc < (2 if kind == "compvis" else 1):  # (DDIM and PLMS run t_enc - 1 steps, UniPC t_enc)
        rule_text = "steps - 1" if fixed else "int(min(strength, 0.999) * steps)"
        runs = "DDIM and PLMS run t_enc - 1 steps" if kind == "compvis" else "UniPC runs t_enc steps"
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run (AUTOMATIC1111's t_enc = "
                         f"{rule_text} = {t_enc}, and its {runs}); raise the strength or the steps")
    abar = float(schedule.alphas_cumprod[ts[t_enc]])
    if kind == "compvis":
        return plan.tail(len(plan) - t_enc), abar
    return schedule.vp_time_plan(kind, t_enc, top=ts[t_enc - 1], rule=plan.rule, spacing=plan.spacing), abar


def _sampler_options(canonical: str, options: dict[str, Any] | None) -> dict[str, Any]:
    from imagine.samplers import option_names

    options = dict(options or {})
    accepted = option_names(canonical)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {canonical!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(accepted) or 'none'}")
    return options


def invert(model: Callable[..., torch.Tensor], x0: torch.Tensor, *, schedule: NoiseSchedule,
           prediction_type: str | None = None, steps: int, cond: dict[str, Any] | None = None,
           uncond: dict[str, Any] | None = None, guidance_scale: float = 1.0, timestep_spacing: str | None = None,
           steps_offset: int | None = None, karras: bool = False, callback=None, progress: bool = True) -> torch.Tensor:
    """DDIM inversion (samplers.invert_ddim): the x_T from which `sample(..., sampler="ddim", eta=0)`
    with the same settings returns (approximately) x0. Pass the result as `shape_or_noise`."""
    prediction_type, _, _, plan = _prepare(model, schedule, prediction_type, "ddim", steps, timestep_spacing,
                                           steps_offset, karras)
    _validate_guidance(guidance_scale, 0.0, uncond, None, 0.0, "eps", None, 0.995, "ddim")
    cond = check_cond(cond, x0.shape[0], "cond")
    uncond = check_cond(uncond, x0.shape[0], "uncond") if uncond is not None else None
    denoise = Denoiser(model, plan, prediction_type, cond, uncond, guidance_scale)
    with torch.no_grad():
        return invert_ddim(denoise, x0, plan, callback=callback, progress=progress)


def _model_device(model) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None
