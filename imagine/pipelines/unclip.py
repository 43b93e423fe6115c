"""unCLIP's image-embedding condition: text to image through a diffusion prior (diffusers' StableUnCLIPPipeline
folders: Karlo's prior and SD 2.1 unCLIP's decoder), and image variations (StableUnCLIPImg2ImgPipeline folders).

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", sec. 2.1) generates
an image from a CLIP image embedding z_i: its decoder adds a projection of z_i to the timestep embedding. SD 2.1
unCLIP is such a decoder built on SD 2.1: its U-Net's class embedding ("projection") reads [z_i noised; the noise
level's sinusoidal code], 2 x 1024 wide. Here z_i is the embedding of a picture (`ImageEmbedder`), so the result is a
variation of it, optionally steered by a prompt. The embedding is normalized by the statistics of the training
embeddings, noised to `noise_level` of its own schedule (conditioning augmentation, as Ho et al. 2022 "Cascaded
Diffusion Models" sec. 4.1 noises a cascade's low-resolution input: `imagine.diffusion.augment`), and
un-normalized; more noise keeps less of the picture. Guidance's unconditional side gets zeros in place of the
whole condition. The text, samplers and VAE are the text-to-image pipeline's.

From text, z_i comes from unCLIP's prior P(z_i | y) (sec. 2.2; `imagine.models.prior`): a diffusion over the
embedding itself, run with the same samplers (Karlo's: DDPM predicting x_0, clipped to [-5, 5]) and classifier-free
guidance against the empty caption, then taken back to CLIP's space by its training statistics.
"""

from __future__ import annotations

import math
import numbers

import torch
from PIL import Image


def image_condition(embedder, embeds: torch.Tensor, noise: torch.Tensor, level: int, schedule) -> torch.Tensor:
    """[z noised to `level`; the level's code] [B, 2D] for the U-Net's class embedding: z normalized, taken to the
    level by the forward process, un-normalized, then the sinusoidal code of the level (cosines first, LDM's
    spacing) appended."""
    from imagine.diffusion import augment
    from imagine.models.embeddings import timestep_embedding

    z = embedder.unnormalize(augment(embedder.normalize(embeds), level, schedule, noise))
    code = timestep_embedding(torch.full((embeds.shape[0],), int(level)), embeds.shape[-1], flip_sin_to_cos=True,
                              freq_shift=0.0)
    return torch.cat([z, code.to(z.dtype)], dim=1)


def embedding_condition(embed, embedder, schedule, level: int):
    """The `condition(generators)` of a run on CLIP image embeddings (`TextToImagePipeline._picture_run`):
    `embed(generators)` gives them (a picture's, or the prior's, drawing its noise first), each image's generator then
    draws the noise that takes them to `level` (`image_condition`); guidance's unconditional side gets zeros."""
    from imagine.sampling import PerSampleNoise

    def condition(generators):
        embeds = embed(generators)
        label = image_condition(embedder, embeds, PerSampleNoise(generators).draw(tuple(embeds.shape)), level, schedule)
        return label, torch.zeros_like(label), None

    return condition


def variations(pipe, image, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
               noise_level: int = 0, steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, seed: int | None = None, seeds: list[int] | None = None,
               num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
               eta: float | None = None, karras: bool | None = None, sigma_schedule: str | None = None,
               rho: float | None = None, final_step: str | None = None, sampler_options: dict | None = None,
               emphasis: bool = False, long_prompts: bool = False, callback=None, progress: bool = True,
               output_type: str = "pil"):
    """Images like `image` (a PIL picture, or one per prompt), at the model's own size unless height/width are
    given, steered by `prompt` (none given: "" for each picture, as diffusers'). `noise_level`: 0 (the embedding as it is) to the
    embedding schedule's last step. Each image's generator (its seed) draws its embedding's noise first, then the
    start noise, as diffusers' pipeline draws them for one image (for a batch diffusers draws one embedding noise
    for all; here each image has its own, so an image does not depend on its batch). The other options are
    generate's."""
    from imagine.diffusion import check_level
    from imagine.models.image_encoder import flatten_picture

    embedder, schedule = pipe.c.image_embedder, pipe.c.image_noise_schedule
    if embedder is None:
        raise ValueError(f"{pipe.c.source or 'this model'} takes no image embedding (an unCLIP model, e.g. SD 2.1 "
                         "unCLIP, has image_encoder/ and image_normalizer/); use generate()")
    noise_level = check_level(noise_level, schedule.num_train_timesteps - 1)
    # (a picture's transparency on white, as CLIP's image processor lays it in diffusers' pipeline: the batch's own
    # RGB conversion would keep the colours under transparent pixels)
    if isinstance(image, Image.Image):
        image = flatten_picture(image)
    elif isinstance(image, (list, tuple)):
        image = [flatten_picture(im) if isinstance(im, Image.Image) else im for im in image]
    if prompt is None:  # (one empty prompt a picture, as diffusers' StableUnCLIPImg2ImgPipeline)
        prompt = [""] * len(image) if isinstance(image, (list, tuple)) else ""
    prompts, negatives, pictures, seeds = pipe._picture_batch(prompt, negative_prompt, image, num_images_per_prompt,
                                                              seed, seeds)
    height, width = pipe.output_size(height, width, None)
    pipe.check_size(height, width)

    condition = embedding_condition(lambda generators: embedder.embed(pictures), embedder, schedule, noise_level)
    return pipe._picture_run(prompts, negatives, seeds, int(height), int(width), condition, steps=steps,
                             guidance_scale=guidance_scale, sampler=sampler, eta=eta, karras=karras,
                             sigma_schedule=sigma_schedule, rho=rho, final_step=final_step,
                             sampler_options=sampler_options, emphasis=emphasis, long_prompts=long_prompts,
                             callback=callback, progress=progress, output_type=output_type, noise_level=noise_level)


# diffusers' StableUnCLIPPipeline defaults: the prior's steps and guidance
PRIOR_STEPS, PRIOR_GUIDANCE = 25, 4.0


def prior_text(pipe, prompt: str, emphasis: bool | str, long_prompts: bool) -> str:
    """The caption as the prior reads it: plain text, without the syntax that the decoder's text encoder reads
    (AUTOMATIC1111's LoRA tags, which must name merged LoRAs; with emphasis, its brackets and weights; with
    long_prompts, BREAK): the prior has its own CLIP tower, which no weight or chunk reaches."""
    from imagine.emphasis import BREAK, emphasis_mode, parse_emphasis

    text = pipe._without_lora_tags(prompt)
    if emphasis_mode(emphasis) != "None":
        text = "".join(" " if w is None else piece for piece, w in parse_emphasis(text, breaks=True))
    elif long_prompts:
        text = BREAK.sub(" ", text)
    return " ".join(text.split())


def prior_embeddings(prior, prompts: list[str], generators, seeds, *, steps: int, guidance_scale: float,
                     sampler: str, progress: bool = True, callback=None, guided: bool | None = None,
                     encoded: tuple | None = None) -> torch.Tensor:
    """unCLIP's prior (Ramesh et al. 2022, sec. 2.2): a CLIP image embedding [B, D] per prompt, sampled from P(z_i | y)
    with classifier-free guidance against the empty caption (as the prior was trained, and as diffusers' pipeline
    guides it), each image's noise from its own generator, then un-normalized. guided: None, guidance where the scale
    is > 1 (diffusers' StableUnCLIPPipeline's gate); True, at the scale given, below 1 too (its UnCLIPPipeline guides
    both stages once either scale is > 1), the conditional pass alone at exactly 1. `callback` hears each step as
    {"stage": "prior", "step", "total", "t", "sigma"}: no x or denoised (embeddings, not latents to preview); it may
    raise to stop the run, as for the decoder's steps. encoded: (the prompts', the empty captions') encodings by the
    prior's text encoder, where the caller has them (Karlo's decoder reads the same tower's)."""
    from imagine.sampling import sample

    def as_cond(enc):
        return {"proj_embedding": enc.pooled, "context": enc.states, "context_mask": enc.mask}

    text, empty = encoded if encoded is not None else (prior.text_encoder.encode(prompts), None)
    # (diffusers' gate: a scale at or below 1 runs the caption alone; at 1 the guided result is the caption's)
    guided = guidance_scale > 1.0 if guided is None else bool(guided) and guidance_scale != 1.0
    if guided and empty is None:
        empty = prior.text_encoder.encode([""] * len(prompts))
    uncond = as_cond(empty) if guided else None
    c = prior.scheduler_config
    z = sample(prior.model, (len(prompts), prior.model.embedding_dim), schedule=prior.schedule, sampler=sampler,
               steps=steps, cond=as_cond(text), uncond=uncond, guidance_scale=guidance_scale if guided else 1.0,
               thresholding="static" if prior.clip_range else None, threshold_range=prior.clip_range or 1.0,
               timestep_spacing=prior.timestep_spacing, steps_offset=c.get("steps_offset"),
               generator=generators, noise_seeds=seeds, progress=progress,
               callback=None if callback is None else lambda info: callback(
                   {"stage": "prior", **{k: info[k] for k in ("step", "total", "t", "sigma")}}))
    return prior.model.unnormalize(z)


def text_to_image(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                  prior_steps: int | None = None, prior_guidance_scale: float | None = None,
                  prior_sampler: str | None = None, noise_level: int = 0, steps: int | None = None,
                  guidance_scale: float | None = None, sampler: str | None = None, seed: int | None = None,
                  seeds: list[int] | None = None, num_images_per_prompt: int = 1, height: int | None = None,
                  width: int | None = None, eta: float | None = None, karras: bool | None = None,
                  sigma_schedule: str | None = None, rho: float | None = None, final_step: str | None = None,
                  sampler_options: dict | None = None, emphasis: bool = False, long_prompts: bool = False,
                  callback=None, progress: bool = True, output_type: str = "pil"):
    """unCLIP text to image (Ramesh et al. 2022, sec. 2): the prior's CLIP image embedding for each prompt
    (`prior_steps`, default 25, of its own sampler at `prior_guidance_scale`, default 4: diffusers' defaults; the
    caption as `prior_text` gives it; `callback` hears its steps first, with stage "prior"), noised
    to `noise_level` of the decoder's embedding schedule, then the decoder from it and the prompt. Each image's
    generator (its seed) draws, in diffusers' order for one image: the prior's start and step noise, the embedding's
    noise, the decoder's start noise. The other options are generate's."""
    from imagine.diffusion import check_level

    prior, embedder, schedule = pipe.c.prior, pipe.c.image_embedder, pipe.c.image_noise_schedule
    if prior is None:
        raise ValueError(f"{pipe.c.source or 'this model'} has no diffusion prior (an unCLIP text-to-image model, "
                         "e.g. SD 2.1 unCLIP with Karlo's prior, has prior/ and image_normalizer/); use generate()")
    noise_level = check_level(noise_level, schedule.num_train_timesteps - 1)
    prior_steps = PRIOR_STEPS if prior_steps is None else prior_steps
    if isinstance(prior_steps, bool) or not isinstance(prior_steps, numbers.Integral) or prior_steps < 1:
        raise ValueError(f"prior_steps must be a whole number of at least 1; got {prior_steps!r}")
    prior_guidance_scale = PRIOR_GUIDANCE if prior_guidance_scale is None else prior_guidance_scale
    if (isinstance(prior_guidance_scale, bool) or not isinstance(prior_guidance_scale, numbers.Real)
            or not math.isfinite(prior_guidance_scale)):
        raise ValueError(f"prior_guidance_scale must be a finite number; got {prior_guidance_scale!r}")
    prior_steps, prior_guidance_scale = int(prior_steps), float(prior_guidance_scale)
    prior_sampler = prior_sampler or prior.sampler
    prompts, negatives, _, seeds = pipe._picture_batch(prompt, negative_prompt, None, num_images_per_prompt, seed,
                                                       seeds, picture=False)
    height, width = pipe.output_size(height, width, None)
    pipe.check_size(height, width)

    texts = [prior_text(pipe, p, emphasis, long_prompts) for p in prompts]

    condition = embedding_condition(
        lambda generators: prior_embeddings(prior, texts, generators, seeds, steps=prior_steps,
                                            guidance_scale=prior_guidance_scale, sampler=prior_sampler,
                                            progress=progress, callback=callback), embedder, schedule, noise_level)
    return pipe._picture_run(prompts, negatives, seeds, int(height), int(width), condition, steps=steps,
                             guidance_scale=guidance_scale, sampler=sampler, eta=eta, karras=karras,
                             sigma_schedule=sigma_schedule, rho=rho, final_step=final_step,
                             sampler_options=sampler_options, emphasis=emphasis, long_prompts=long_prompts,
                             callback=callback, progress=progress, output_type=output_type, noise_level=noise_level,
                             prior_steps=prior_steps, prior_guidance_scale=prior_guidance_scale,
                             prior_sampler=prior_sampler)
