"""A super-resolution stage of a cascade: Stable Diffusion's x4 upscaler (diffusers' StableDiffusionUpscalePipeline).

Cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image Generation", sec. 3) samples a
high-resolution image with a model conditioned on a low-resolution one, here by concatenating the low-resolution
picture to the U-Net's input channels: the upscaler's latents are a quarter of the output's size (its VAE downsamples
by 4), the size of the picture itself, so the picture's 3 RGB channels join the 4 latent ones (7 inputs). The
picture is first noised to level `noise_level` of a schedule of its own (conditioning augmentation, sec. 4.1:
z = sqrt(abar_s) x_lr + sqrt(1 - abar_s) eps, at s = noise_level), and s enters the U-Net as its class label, so
one model serves clean and degraded inputs; more noise lets the model invent more detail. Guidance, samplers and the
VAE decode are the text-to-image pipeline's.
"""

from __future__ import annotations

import torch
from PIL import Image

NOISE_LEVEL = 20  # diffusers' default for SD's x4 upscaler


def upscale(pipe, prompt: str | list[str], image, negative_prompt: str | list[str] | None = None, *,
            noise_level: int = NOISE_LEVEL, steps: int | None = None, guidance_scale: float | None = None,
            sampler: str | None = None, seed: int | None = None, seeds: list[int] | None = None,
            num_images_per_prompt: int = 1, eta: float | None = None, karras: bool | None = None,
            sigma_schedule: str | None = None, rho: float | None = None, final_step: str | None = None,
            sampler_options: dict | None = None, emphasis: bool = False, long_prompts: bool = False, callback=None,
            progress: bool = True, output_type: str = "pil"):
    """`image` (a PIL picture, or one per prompt) made `pipe.scale` times larger, as the prompt describes it.
    `noise_level`: the conditioning augmentation's level, 0 to the model's max_noise_level (350 for SD's x4).
    steps, guidance_scale, sampler and the noise levels' options (karras, sigma_schedule, rho, final_step,
    sampler_options): as for generate, the model's defaults where not given. Each image's generator
    (its seed) draws the picture's noise first, then the start noise, as diffusers' pipeline draws them. Returns a
    GenerationResult whose images are `pipe.scale` times the picture's size."""
    from imagine.diffusion import augment, check_level
    from imagine.sampling import PerSampleNoise

    schedule = pipe.c.low_res_schedule
    if schedule is None:
        raise ValueError(f"{pipe.c.source or 'this model'} is not a super-resolution model (SD's x4 upscaler: a "
                         "U-Net reading the picture beside its latents, and a low_res_scheduler); use generate()")
    noise_level = check_level(noise_level, int(pipe.defaults.get("max_noise_level", 350)),
                              " (this model's max_noise_level)")
    prompts, negatives, pictures, seeds = pipe._picture_batch(prompt, negative_prompt, image, num_images_per_prompt,
                                                              seed, seeds)
    if len({im.size for im in pictures}) > 1:
        raise ValueError(f"the pictures are upscaled together: give pictures of one size (got "
                         f"{sorted({im.size for im in pictures})})")
    if min(pictures[0].size) < pipe.scale:  # (diffusers: "height and width must be > 0" once brought to the factor)
        raise ValueError(f"a picture of {pictures[0].size[0]}x{pictures[0].size[1]} is under the VAE's factor "
                         f"{pipe.scale} on a side: give a picture of at least {pipe.scale}x{pipe.scale}")
    w, h = pipe.factor_size(pictures[0])
    if (w, h) != pictures[0].size:  # sides down to the VAE's factor, bicubic, as diffusers' pipeline takes them
        pictures = [im.resize((w, h), Image.BICUBIC) for im in pictures]
    height, width = h * pipe.scale, w * pipe.scale
    pipe.check_size(height, width)

    def condition(generators):  # CDM's conditioning augmentation, the level as the U-Net's class label
        x = pipe._pixels(pictures, w, h)
        low_res = augment(x, noise_level, schedule, PerSampleNoise(generators).draw(tuple(x.shape)))
        label = torch.full((len(prompts),), noise_level, dtype=torch.long)
        return label, label, low_res

    return pipe._picture_run(prompts, negatives, seeds, height, width, condition, steps=steps,
                             guidance_scale=guidance_scale, sampler=sampler, eta=eta, karras=karras,
                             sigma_schedule=sigma_schedule, rho=rho, final_step=final_step,
                             sampler_options=sampler_options, emphasis=emphasis, long_prompts=long_prompts,
                             callback=callback, progress=progress, output_type=output_type, noise_level=noise_level,
                             upscaled_from=f"{w}x{h}")


