"""A pixel-space cascade: DeepFloyd IF, the public Imagen-style model (diffusers' IFPipeline and
IFSuperResolutionPipeline).

Imagen (Saharia et al. 2022) and cascaded diffusion (Ho et al. 2022, CDM) sample an image in pixels in stages: a
base model turns text into a small picture (IF's stage I: 64 px), and super-resolution models, each conditioned on
the previous stage's picture and the text, make it larger (stage II: 256 px). Here:

- the text: the prompt lower-cased and stripped (IF's text preprocessing with clean_caption=False), T5 tokens padded to
  77 (IF's training length) with their attention mask, the frozen T5 encoder's states read with that mask
  (imagine.models.text_encoders.T5TextEncoder); the U-Net attends to all 77 states, as diffusers' pipelines call it
  (no mask is passed to the U-Net). The negative prompt is "" by default.
- sampling: classifier-free guidance (Imagen sec. 2.2; diffusers' rule: on when the scale is > 1) keeping the
  conditional pass's learned variance (Improved DDPM's "learned_range": the U-Net has twice the channels out), and
  a sampler over the scheduler config's timesteps (imagine.sampling.sample): DDPM by default (the learned variance
  read), or another (SAMPLERS) as diffusers runs it after `OtherScheduler.from_config(scheduler.config)`: the plan
  laid out by the config's keys and the new scheduler's defaults for the keys it lacks
  (imagine.samplers.diffusers_plan_layout), the prediction's channels alone stepped. x_0 held by the scheduler
  config's rule as that sampler's diffusers scheduler applies it (`thresholding_rule`): dynamic thresholding (Imagen
  sec. 2.3; IF: percentile 0.95, its s capped at sample_max_value 1.5) where `thresholding` is set, else clipping to
  [-clip_sample_range, clip_sample_range] where `clip_sample` is (DDPM, DDIM); DPM++ 2M and UniPC threshold but never
  clip; Euler neither.
- super-resolution (CDM sec. 2 and 4.1; Imagen sec. 2.5, noise conditioning augmentation): the low-resolution picture
  is upsampled to the stage's size (bilinear, corners aligned, as diffusers' F.interpolate call), taken to level
  `noise_level` of the stage's own image_noising_scheduler by q(x_s | x_0) (imagine.diffusion.augment) and concatenated
  to the noisy sample as input channels (imagine.sampling.ConcatChannels); the level is the U-Net's class label, so
  one model serves clean and degraded pictures. The same idea in latent space is SD's x4 upscaler
  (imagine.pipelines.upscale).
- random draws as diffusers makes them from the generator (one for the batch, or one per image): stage I the start
  noise, then each step's; stage II the start noise, then the augmentation noise, then each step's. A cascade passes
  one generator through both stages, as diffusers' IF documentation passes the same generator to each pipeline.

A stage's model is any callable model(x, t, **cond) (cond keys: context, class_labels), so a stage runs on imagine's
U-Net (IFStage.from_pretrained) or on any other network behind an adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

MAX_LENGTH = 77  # IF's T5 was trained with 77 tokens (diffusers' encode_prompt)
STAGE_1_STEPS, STAGE_1_GUIDANCE = 100, 7.0  # diffusers' IFPipeline defaults
STAGE_2_STEPS, STAGE_2_GUIDANCE, NOISE_LEVEL = 50, 4.0, 250  # IFSuperResolutionPipeline's
OUTPUT_TYPES = ("pil", "pt")

# diffusers' DDPMScheduler defaults for the keys a scheduler config may leave out (DDIMScheduler's,
# DPMSolverMultistepScheduler's and UniPCMultistepScheduler's are the same for the keys they have)
_DDPM_DEFAULTS = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                  "clip_sample": True, "clip_sample_range": 1.0}
# The samplers a stage runs, and how the diffusers scheduler that runs each holds x_0 ("threshold_or_clip": its step
# thresholds if `thresholding` is set, else clips if `clip_sample` is; "threshold": thresholds if set, never clips;
# None: neither). diffusers' IF pipelines give the scheduler the learned variance too when its config's variance_type
# is "learned" / "learned_range" (IF's, which from_config carries to any class): DDPMScheduler reads it and
# DPMSolverMultistepScheduler drops it; DDIMScheduler, UniPCMultistepScheduler and the Euler schedulers take the 6
# channels for 3 and fail. Here they step the prediction's channels (the variance left out, as diffusers runs them
# when the config's variance_type is cleared): SAMPLERS_DIFFUSERS_RUNS are the ones diffusers runs on IF's config.
SAMPLERS = {"ddpm": "threshold_or_clip", "ddim": "threshold_or_clip", "dpmpp_2m": "threshold", "unipc": "threshold",
            "euler": None, "euler_a": None}
SAMPLERS_DIFFUSERS_RUNS = ("ddpm", "dpmpp_2m")


def preprocess_text(text: str | Sequence[str]) -> list[str]:
    """IF's text preprocessing without caption cleaning (diffusers' _text_preprocessing, clean_caption=False): each
    prompt lower-cased and stripped."""
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"prompts must be strings (one, or a list); got {[type(t).__name__ for t in texts]}")
    return [t.lower().strip() for t in texts]


def thresholding_rule(config: dict[str, Any], sampler: str = "ddpm") -> dict[str, Any]:
    """The x_0 rule a scheduler config asks of `sampler`, as `sample` keywords, as the diffusers scheduler that runs it
    applies it (SAMPLERS): DDPMScheduler.step and DDIMScheduler.step apply dynamic thresholding (`thresholding`:
    percentile dynamic_thresholding_ratio, s in [1, sample_max_value]) if set, else clip to +-clip_sample_range if
    clip_sample is set (their default), else nothing; DPMSolverMultistepScheduler (dpmsolver++) and
    UniPCMultistepScheduler threshold their x_0 if set and have no clipping; the Euler schedulers do neither."""
    rule = SAMPLERS[check_sampler(sampler)[0]]
    from imagine.samplers import stored_scheduler_keys

    sc = stored_scheduler_keys(config)  # (a key absent from the file: the class's default, as diffusers)
    c = {**_DDPM_DEFAULTS, **{k: v for k, v in sc.items() if k in _DDPM_DEFAULTS and v is not None}}
    if rule is None:
        return {}
    if c["thresholding"]:
        return {"thresholding": "dynamic", "threshold_percentile": float(c["dynamic_thresholding_ratio"]),
                "threshold_max": float(c["sample_max_value"])}
    if c["clip_sample"] and rule == "threshold_or_clip":
        return {"thresholding": "static", "threshold_range": float(c["clip_sample_range"])}
    return {}


def check_sampler(sampler) -> tuple[str, bool]:
    """(canonical name, Karras sigmas implied: always False) of a sampler a cascade stage runs (SAMPLERS; imagine's
    aliases too, e.g. "DPM++ 2M", "DPMSolverMultistepScheduler"); a ValueError naming them otherwise."""
    from imagine.samplers import resolve_sampler

    valid = ", ".join(SAMPLERS)
    try:
        canonical, _, karras = resolve_sampler(sampler)
    except (TypeError, ValueError):
        raise ValueError(f"unknown sampler {sampler!r} for a pixel cascade (DeepFloyd IF); valid: {valid} (diffusers "
                         f"runs IF with {' and '.join(SAMPLERS_DIFFUSERS_RUNS)})") from None
    if canonical not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} ({canonical}) is not one a pixel cascade (DeepFloyd IF) runs; valid: "
                         f"{valid} (diffusers runs IF with {' and '.join(SAMPLERS_DIFFUSERS_RUNS)})")
    if karras:  # (diffusers truncates the Karras levels' timesteps to int on IF's cosine schedule, which ours don't)
        raise ValueError(f"sampler {sampler!r}: Karras sigmas are not run for a pixel cascade (DeepFloyd IF): on its "
                         f"cosine schedule diffusers truncates their timesteps to whole ones and imagine keeps them "
                         f"fractional, so the pictures would not be diffusers'; give one of {valid}")
    return canonical, karras


@dataclass
class PromptStates:
    """A batch's T5 states for a cascade, made once and shared by its stages (as diffusers' IF documentation passes
    stage I's prompt_embeds and negative_prompt_embeds to stage II): cond and uncond [B, 77, D]."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __post_init__(self):
        if self.cond.ndim != 3 or self.cond.shape != self.uncond.shape:
            raise ValueError(f"prompt states must be [B, L, D] and the negative's of the same shape; got "
                             f"{tuple(self.cond.shape)} and {tuple(self.uncond.shape)}")

    def __len__(self) -> int:
        return self.cond.shape[0]

    def repeat(self, n: int) -> "PromptStates":
        """Each row n times in a row (diffusers' num_images_per_prompt)."""
        return self if n == 1 else PromptStates(self.cond.repeat_interleave(n, 0), self.uncond.repeat_interleave(n, 0))


def encode_prompts(encoder, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
                   ) -> PromptStates:
    """The prompts' and negative prompts' T5 states as IF reads them (`preprocess_text`, 77 tokens padded, the
    encoder run with the attention mask). negative_prompt: None ("" for each prompt), one for all, or one per prompt."""
    prompts = preprocess_text(prompt)
    if not prompts:
        raise ValueError("give at least one prompt (a string, or a list of them)")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    else:
        negatives = preprocess_text(negative_prompt)
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one negative prompt, "
                             f"or one per prompt")
    if getattr(encoder, "max_length", MAX_LENGTH) != MAX_LENGTH:
        raise ValueError(f"IF's text encoder reads {MAX_LENGTH} tokens; this one reads {encoder.max_length} "
                         f"(build it with max_length={MAX_LENGTH})")
    both = encoder.encode(prompts + negatives)
    return PromptStates(both.states[: len(prompts)], both.states[len(prompts):])


@dataclass
class IFStage:
    """One stage of IF's cascade. model(x, t, context=..., [class_labels=...]) -> [B, 2 channels, H, W] (the
    prediction and the learned variance; the input has `channels` channels, twice that for a super-resolution stage,
    whose model sees the upsampled picture after the sample). scheduler_config: the stage's diffusers
    scheduler_config.json (its DDPM schedule, variance type and thresholding). noising_config: a super-resolution
    stage's image_noising_scheduler config (None: a base stage). encoder: a T5TextEncoder of 77 tokens (None: the
    stage takes PromptStates, made by another stage's encoder). sample_size: the default side in pixels."""

    model: Callable[..., torch.Tensor]
    scheduler_config: dict[str, Any]
    sample_size: int
    channels: int = 3
    noising_config: dict[str, Any] | None = None
    encoder: Any = None
    source: str = ""
    schedule: Any = field(init=False, repr=False)
    noising_schedule: Any = field(init=False, repr=False)

    def __post_init__(self):
        from imagine.schedules import NoiseSchedule

        if not callable(self.model):
            raise TypeError("model must be callable as model(x_t, t, **cond)")
        self.schedule = NoiseSchedule.from_diffusers_config(dict(self.scheduler_config))
        self.noising_schedule = (None if self.noising_config is None
                                 else NoiseSchedule.from_diffusers_config(dict(self.noising_config)))

    @property
    def super_resolution(self) -> bool:
        return self.noising_config is not None

    def sampling(self, sampler: str = "ddpm") -> dict[str, Any]:
        """`sample`'s keywords for running this stage with `sampler` as diffusers runs it after
        `OtherScheduler.from_config(scheduler.config)`: the sampler, its plan's layout (diffusers_plan_layout) and
        its x_0 rule (thresholding_rule)."""
        from imagine.samplers import diffusers_plan_layout

        check_sampler(sampler)
        return {"sampler": sampler, **diffusers_plan_layout(self.scheduler_config, sampler),
                **thresholding_rule(self.scheduler_config, sampler)}

    def encode(self, prompt, negative_prompt=None) -> PromptStates:
        if self.encoder is None:
            raise ValueError(f"{self.source or 'this stage'} has no text encoder: give PromptStates (encode_prompts "
                             f"with stage I's encoder), as diffusers' IF stage II takes stage I's prompt_embeds")
        return encode_prompts(self.encoder, prompt, negative_prompt)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32, encoder=None) -> "IFStage":
        """A diffusers IF folder (IF-I-*: unet/, scheduler/, text_encoder/, tokenizer/; IF-II-*: also
        image_noising_scheduler/, text encoder optional): imagine's U-Net from unet/, T5 from text_encoder/ and
        tokenizer/ unless `encoder` (e.g. stage I's) is given or the folder has none."""
        from imagine.models.text_encoders import T5TextEncoder
        from imagine.models.unet import UNet2DConditionModel

        root = Path(folder)
        if not (root / "unet").is_dir() or not (root / "scheduler").is_dir():
            raise ValueError(f"{root} is not a diffusers IF folder: it needs unet/ and scheduler/ (and text_encoder/, "
                             f"tokenizer/ for stage I; image_noising_scheduler/ for a super-resolution stage)")
        unet = UNet2DConditionModel.from_pretrained(root / "unet", dtype=dtype)

        def config(name):
            path = root / name / "scheduler_config.json"
            return json.loads(path.read_text()) if path.is_file() else None

        noising = config("image_noising_scheduler")
        if encoder is None and (root / "text_encoder").is_dir():
            encoder = T5TextEncoder.from_folder(root / "text_encoder", root / "tokenizer", max_length=MAX_LENGTH,
                                                dtype=dtype)
        in_channels = int(unet.config.in_channels)
        return cls(unet, config("scheduler"), int(unet.config.sample_size),
                   in_channels // 2 if noising is not None else in_channels, noising, encoder, str(root))


def _states(stage: IFStage, prompt, negative_prompt, n: int) -> PromptStates:
    if isinstance(prompt, PromptStates):
        if negative_prompt is not None:
            raise ValueError("give the negative prompt to encode_prompts with the prompt, not beside PromptStates")
        states = prompt
    else:
        states = stage.encode(prompt, negative_prompt)
    return states.repeat(_check_count(n))


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1; got {n!r}")
    return n


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    return steps


def _size(stage: IFStage, height, width) -> tuple[int, int]:
    # (None: the stage's size; a 0 given is refused, not taken for None)
    height = stage.sample_size if height is None else height
    width = stage.sample_size if width is None else width
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (pixels; default the stage's {stage.sample_size}); "
                             f"got {v!r}")
    return height, width


def _generator(batch: int, generator, seed):
    from imagine.sampling import make_generators

    if seed is not None:
        if generator is not None:
            raise ValueError("give seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        return torch.Generator().manual_seed(seed)  # (one generator for the batch, as torch.manual_seed(seed))
    return make_generators(batch, None, generator)


def _check_scale(guidance_scale) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (> 1: classifier-free guidance; at or below 1 the "
                         f"conditional pass alone, as diffusers' IF pipelines); got {guidance_scale!r}")
    return float(guidance_scale)


def _check_noise_level(stage: IFStage, noise_level) -> int:
    from imagine.diffusion import check_level

    top = stage.noising_schedule.num_train_timesteps - 1
    return check_level(noise_level, top, " (a timestep of the stage's image_noising_scheduler)")


def _run(stage: IFStage, model, start: torch.Tensor | tuple, states: PromptStates, extra: dict[str, torch.Tensor],
         steps: int, guidance_scale: float, generator, progress: bool, callback, sampler: str = "ddpm"
         ) -> torch.Tensor:
    from imagine.sampling import sample

    guidance_scale = _check_scale(guidance_scale)
    guided = guidance_scale > 1.0  # (diffusers' IF pipelines: guidance only above 1)
    cond = {"context": states.cond, **extra}
    uncond = {"context": states.uncond, **extra} if guided else None
    # (a sampler but DDPM steps the guided prediction's channels: the Denoiser splits the learned variance off)
    return sample(model, start, schedule=stage.schedule, steps=steps, cond=cond, uncond=uncond,
                  guidance_scale=guidance_scale if guided else 1.0, generator=generator, progress=progress,
                  callback=callback, **stage.sampling(sampler))


def pictures(x: torch.Tensor) -> list:
    """A stage's samples as diffusers' IF pipelines give them: (x / 2 + 0.5) clamped to [0, 1], 8-bit pictures."""
    from imagine.images import to_pil

    return [to_pil(row) for row in x.float().cpu()]


def _output(x: torch.Tensor, output_type: str):
    """"pt": the samples themselves (as a next stage takes them); "pil": `pictures`."""
    return x if output_type == "pt" else pictures(x)


def _check_output(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")


def text_to_image(stage: IFStage, prompt: str | Sequence[str] | PromptStates,
                  negative_prompt: str | Sequence[str] | None = None, *, steps: int = STAGE_1_STEPS,
                  guidance_scale: float = STAGE_1_GUIDANCE, num_images_per_prompt: int = 1, height: int | None = None,
                  width: int | None = None, generator=None, seed: int | None = None, output_type: str = "pil",
                  progress: bool = True, callback=None, sampler: str = "ddpm"):
    """IF's stage I (diffusers' IFPipeline): the prompts' pictures at the stage's size (64 px for IF-I). prompt: text
    (one or a list) or PromptStates. guidance_scale: classifier-free guidance when > 1 (at or below 1, the conditional
    pass alone, as diffusers). generator: one torch.Generator for the batch or one per image (seed: an int, for
    torch.Generator().manual_seed(seed)). output_type "pil" (pictures) or "pt" (the samples in [-1, 1], unclamped,
    what stage II takes). sampler: one of SAMPLERS ("ddpm", IF's own; "dpmpp_2m" as diffusers' IFPipeline with
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config); see the module doc)."""
    if stage.super_resolution:
        raise ValueError(f"{stage.source or 'this stage'} is a super-resolution stage (it reads a picture): use "
                         f"super_resolution()")
    _check_output(output_type)
    check_sampler(sampler)
    states = _states(stage, prompt, negative_prompt, num_images_per_prompt)
    height, width = _size(stage, height, width)
    shape = (len(states), stage.channels, height, width)
    x = _run(stage, stage.model, shape, states, {}, _check_steps(steps), guidance_scale,
             _generator(shape[0], generator, seed), progress, callback, sampler)
    return _output(x, output_type)


def _pictures(image, batch: int) -> torch.Tensor:
    """Stage II's input pictures as a tensor [B, 3, h, w] in [-1, 1]: PIL pictures (v / 127.5 - 1), or stage I's
    "pt" samples (a [B, 3, h, w] tensor, or a list of [3, h, w] / [1, 3, h, w] ones)."""
    from PIL import Image

    from imagine.images import from_pil

    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("image: give a picture per prompt (PIL, or stage I's tensor output)")
    if all(isinstance(i, Image.Image) for i in items):
        if len({i.size for i in items}) > 1:
            raise ValueError(f"the pictures are upscaled together: give pictures of one size (got "
                             f"{sorted({i.size for i in items})})")
        x = torch.stack([from_pil(i) for i in items])
    elif all(isinstance(i, torch.Tensor) for i in items):
        try:
            x = torch.cat([i if i.ndim == 4 else i.unsqueeze(0) for i in items])
        except RuntimeError as e:
            raise ValueError(f"image tensors must be [B, 3, h, w] or [3, h, w] of one size: {e}") from None
    else:
        raise TypeError(f"image must be a PIL picture, a tensor [B, 3, h, w] in [-1, 1], or a list of either; got "
                        f"{sorted({type(i).__name__ for i in items})}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image tensors must be [B, 3, h, w] RGB in [-1, 1]; got {tuple(x.shape)}")
    if not x.is_floating_point():  # (8-bit values 0..255 would be read as far outside [-1, 1])
        raise ValueError(f"image tensors must be floating point in [-1, 1]; got {x.dtype} (8-bit pixels: give PIL "
                         f"pictures, or v / 127.5 - 1)")
    if x.shape[0] != batch:
        raise ValueError(f"{x.shape[0]} pictures for {batch} prompts: give one picture per prompt")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image has NaN or inf values")
    return x


def super_resolution(stage: IFStage, prompt: str | Sequence[str] | PromptStates, image,
                     negative_prompt: str | Sequence[str] | None = None, *, steps: int = STAGE_2_STEPS,
                     guidance_scale: float = STAGE_2_GUIDANCE, noise_level: int = NOISE_LEVEL,
                     num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                     generator=None, seed: int | None = None, output_type: str = "pil", progress: bool = True,
                     callback=None, sampler: str = "ddpm"):
    """IF's stage II (diffusers' IFSuperResolutionPipeline): `image` (one picture per prompt: PIL, or stage I's "pt"
    tensor in [-1, 1]) made at the stage's size (256 px for IF-II), as the prompt describes it. noise_level: the
    noise conditioning augmentation's level s, 0 <= s < the noising schedule's timesteps (Imagen sec. 2.5: the
    upsampled picture is taken to q(x_s | x_0) and s is the U-Net's class label). Other arguments: as
    text_to_image's. (The upsampled picture reaches the U-Net as it is with every sampler; diffusers' pipeline
    concatenates it before scale_model_input, so its Euler schedulers would scale it with the sample by
    1 / sqrt(sigma^2 + 1): see docs/cascades.md.)"""
    from imagine.diffusion import augment
    from imagine.sampling import ConcatChannels, PerSampleNoise

    if not stage.super_resolution:
        raise ValueError(f"{stage.source or 'this stage'} is not a super-resolution stage (no "
                         f"image_noising_scheduler): use text_to_image()")
    _check_output(output_type)
    check_sampler(sampler)
    noise_level = _check_noise_level(stage, noise_level)
    n = _check_count(num_images_per_prompt)
    states = _states(stage, prompt, negative_prompt, 1)
    pictures = _pictures(image, len(states)).repeat_interleave(n, 0)
    states = states.repeat(n)
    height, width = _size(stage, height, width)
    batch = len(states)
    generator = _generator(batch, generator, seed)
    draws = PerSampleNoise(generator)
    start = draws.draw((batch, stage.channels, height, width))  # (diffusers' order: the start noise first,
    low = F.interpolate(pictures.float(), (height, width), mode="bilinear", align_corners=True)
    low = augment(low, noise_level, stage.noising_schedule, draws.draw(tuple(low.shape)))  # then the picture's)
    label = torch.full((batch,), noise_level, dtype=torch.long)
    x = _run(stage, ConcatChannels(stage.model, low), start, states, {"class_labels": label}, _check_steps(steps),
             guidance_scale, generator, progress, callback, sampler)
    return _output(x, output_type)


class IFCascade:
    """IF's stage I then stage II: text -> 64 px -> 256 px (Imagen's cascade, Saharia et al. 2022 sec. 2.5). The
    prompts are encoded once by stage I's T5 and the states given to both stages; one generator (or one per image)
    runs through both, stage I's draws first, and stage I's samples ("pt") are stage II's pictures, as diffusers' IF
    documentation chains IFPipeline and IFSuperResolutionPipeline."""

    def __init__(self, stage_1: IFStage, stage_2: IFStage):
        if stage_1.super_resolution or not stage_2.super_resolution:
            raise ValueError("IFCascade takes a base stage (text to image) and then a super-resolution stage")
        if stage_1.encoder is None:
            raise ValueError("stage I needs its T5 text encoder: the cascade encodes the prompts with it")
        self.stage_1, self.stage_2 = stage_1, stage_2

    @classmethod
    def from_pretrained(cls, stage_1_folder, stage_2_folder, dtype: torch.dtype = torch.float32) -> "IFCascade":
        first = IFStage.from_pretrained(stage_1_folder, dtype)
        return cls(first, IFStage.from_pretrained(stage_2_folder, dtype, encoder=first.encoder))

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 steps: tuple[int, int] = (STAGE_1_STEPS, STAGE_2_STEPS),
                 guidance_scale: tuple[float, float] = (STAGE_1_GUIDANCE, STAGE_2_GUIDANCE),
                 noise_level: int = NOISE_LEVEL, num_images_per_prompt: int = 1, generator=None,
                 seed: int | None = None, output_type: str = "pil", progress: bool = True,
                 sampler: str | tuple[str, str] = "ddpm"):
        """The prompts' pictures at stage II's size. steps, guidance_scale: (stage I's, stage II's). generator / seed:
        as text_to_image's, shared by both stages. sampler: one name for both stages, or (stage I's, stage II's)."""
        _check_output(output_type)
        # (stage II's settings checked too before stage I runs)
        samplers = (sampler, sampler) if isinstance(sampler, str) else _pair(sampler, "sampler")
        for name in samplers:
            check_sampler(name)
        steps = tuple(_check_steps(s) for s in _pair(steps, "steps"))
        scales = tuple(_check_scale(s) for s in _pair(guidance_scale, "guidance_scale"))
        noise_level = _check_noise_level(self.stage_2, noise_level)
        states = encode_prompts(self.stage_1.encoder, prompt, negative_prompt).repeat(
            _check_count(num_images_per_prompt))
        generator = _generator(len(states), generator, seed)
        low = text_to_image(self.stage_1, states, steps=steps[0], guidance_scale=scales[0], generator=generator,
                            output_type="pt", progress=progress, sampler=samplers[0])
        return super_resolution(self.stage_2, states, low, steps=steps[1], guidance_scale=scales[1],
                                noise_level=noise_level, generator=generator, output_type=output_type,
                                progress=progress, sampler=samplers[1])


def _pair(value, name: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (stage I's, stage II's); got {value!r}")
    return tuple(value)
