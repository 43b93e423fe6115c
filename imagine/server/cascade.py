"""Pixel cascades behind the server (`imagine serve --model CASCADE`): Imagen, Karlo's unCLIP, DeepFloyd IF.

The server's worker and app drive a TextToImagePipeline: `generate` (prompts, seeds and the run's settings -> a
GenerationResult), `decode` (a step's x_0 estimate -> pixels, for live previews and interrupted jobs), `check_size`,
`defaults`. `CascadeServing` gives those calls for a pixel cascade, each image from its own seed, so a served picture
is the one `imagine generate --model CASCADE` makes from that seed (at any batch size): `ImagenServing` for an
ImagenPipeline or ElucidatedImagenPipeline folder (ImagenPipeline.sample; every stage at the request's steps and
guidance), `KarloServing` for a diffusers UnCLIPPipeline folder (imagine.pipelines.karlo; the request's steps and
guidance are the decoder's), `IFServing` for DeepFloyd IF's stage I and II folders (imagine.pipelines.cascade; the
request's are stage I's).

What a cascade does not run is refused by name (a 422 from the server), not ignored: negative prompts where it guides
against a learned null text (Imagen, Karlo; IF reads them: it guides against an encoded text), AUTOMATIC1111's AND and
[from:to:when] syntax, variation seeds, ControlNet, hires. fix, sampler options. Imagen reads A1111's emphasis
`(word:1.3)` (the text encoder weights the states as for the latent models; Karlo and IF refuse it) and runs its
img2img as image to image at stage 1 (ImagenPipeline.sample's init_image / strength), and with a mask as RePaint."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

# generate's keywords a cascade does not run, named as the request names them (the server's 422)
NOT_RUN = {
    "subseeds": "variation seeds (subseed_strength)", "subseed_strength": "variation seeds (subseed_strength)",
    "mask_image": "inpainting (a mask)", "masked_content": "inpainting (a mask)",
    "latent_noise_seeds": "inpainting (a mask)",
    "control_image": "ControlNet units", "controlnet_scale": "ControlNet units",
    "refiner_switch": "a refiner", "image_guidance_scale": "an instruct-pix2pix picture guidance",
    "seed_resize_from_h": "seed_resize_from_h / _w", "seed_resize_from_w": "seed_resize_from_h / _w",
    "rng": "randn_source other than CPU", "noise_seed_delta": "eta_noise_seed_delta (ENSD)",
    "zero_terminal_snr": "the Zero Terminal SNR noise schedule",
    "downcast_alphas_cumprod": "use_downcasted_alpha_bar", "pad_conds": "pad_cond_uncond",
    "sigma_range": "AUTOMATIC1111's k-diffusion levels", "start": "AUTOMATIC1111's k-diffusion levels",
    "discard_penultimate_sigma": "AUTOMATIC1111's k-diffusion levels",
    "strength_rule": "AUTOMATIC1111's image-to-image step rule", "init_image": "img2img (an init picture)",
}
# the eta a cascade's sampler runs at (ImagenPipeline's samplers take no eta: DDPM and Euler a draw fresh noise at
# every step, the others none); a client's eta equal to it is accepted, another refused
SAMPLER_ETA = {"ddpm": 1.0, "euler_a": 1.0, "dpmpp_2s_a": 1.0}


class CascadeServing:
    """A pixel cascade with the TextToImagePipeline calls the server makes. A subclass says what its cascade runs:
    `_run` (the pictures), `stage_steps` (the steps each stage takes, for the progress), its samplers, schedule
    types, size and defaults, and whether it reads emphasis and takes an init picture."""

    own_levels = True  # (the app runs the cascade's samplers on its own grids, not AUTOMATIC1111's levels)
    scale = 1  # (pixels: no latent factor)
    controlnets: dict = {}
    reads_emphasis = False
    takes_init = False  # (img2img, and inpainting with a mask)
    takes_negative = False  # (a negative prompt: guidance against a second text, not the learned null text)
    picture_model = None  # (a cascade that makes variations of a picture and nothing else names itself here)

    def __init__(self, source: str | None, size: int, description: str, sampler_names, schedule_types,
                 defaults: dict):
        self.size = int(size)
        self.c = SimpleNamespace(source=str(source or ""), low_res_schedule=None, prior=None, image_embedder=None,
                                 image_noise_schedule=None, vae_source=None)
        self.description = description
        self.sampler_names = list(sampler_names)
        self.schedule_types = tuple(schedule_types)
        self.defaults = {"height": self.size, "width": self.size, **defaults}

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != (self.size, self.size):
            raise ValueError(f"{self.description} makes {self.size}x{self.size} pictures (its last stage's size); "
                             f"got {width}x{height}")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """A stage's x_0 estimate (pixels in [-1, 1], at that stage's size) as the picture it shows."""
        return x.float().clamp(-1.0, 1.0)

    def generate(self, prompts: list[str], negative_prompts: list | None = None, *, seeds: list[int], steps: int,
                 guidance_scale: float, sampler: str, height: int, width: int, sigma_schedule: str | None = None,
                 eta: float | None = None, sampler_options: dict | None = None,
                 callback: Callable[[dict], None] | None = None, progress: bool = False,
                 emphasis: bool | str = False, long_prompts: bool = False, prompt_editing: bool = False,
                 composable: bool = False, old_prompt_editing: bool = False, init_image=None,
                 strength: float | None = None, resize_mode: str = "just_resize", mask_image=None,
                 masked_content: str = "original", variation_of: list | None = None, **others):
        """The cascade's pictures of `prompts`, one per seed (each from its own: the same picture at any batch).
        long_prompts: the text encoder's one window either way (a longer prompt is cut with a warning).
        init_image / strength: image to image, the pictures first brought to the cascade's size by `resize_mode`
        (imagine.images.fit_picture, as AUTOMATIC1111's img2img); with mask_image (white: painted anew, as A1111's and
        diffusers'), inpainting, the masks brought to the size the same way. variation_of: the pictures a variation
        cascade varies (`variations`)."""
        from imagine.pipelines.text_to_image import GenerationResult

        if (variation_of is None) == (self.picture_model is not None):
            raise ValueError(f"{self.description} makes variations of a picture (variations), not pictures from text"
                             if variation_of is None else f"{self.description} makes no variations of a picture")

        if init_image is not None and not self.takes_init:
            others["init_image"] = init_image
        if mask_image is not None and not self.takes_init:
            others["mask_image"] = mask_image
        if masked_content != "original":  # (A1111's inpainting_fill other than "original")
            others["masked_content"] = masked_content
        if others:
            named = sorted({NOT_RUN.get(k, k) for k in others})
            raise ValueError(f"{self.description} does not run {', '.join(named)}; it takes the prompt, seed, steps, "
                             f"guidance scale, sampler ({', '.join(self.sampler_names)})"
                             + (" and schedule type, and an init picture with a denoising strength"
                                if self.takes_init else ""))
        self.check_size(height, width)
        if any(negative_prompts or []) and not self.takes_negative:
            raise ValueError(f"{self.description} takes no negative prompt: its guidance runs against the learned "
                             "null text it was trained with, not against a second text")
        self._check_prompts(prompts, steps, emphasis, composable, prompt_editing)
        if sampler_options:
            raise ValueError(f"sampler options {sorted(dict(sampler_options))}: {self.description}'s samplers take "
                             "their settings from the model")
        ran = SAMPLER_ETA.get(sampler, 0.0)
        if eta is not None and float(eta) != ran:
            raise ValueError(f"eta {eta}: {self.description}'s {sampler} runs at eta {ran:g}")
        if sigma_schedule not in (None, *self.schedule_types):
            raise ValueError(f"schedule type {sigma_schedule!r}: {self.description}'s stages run on "
                             f"{' or '.join(map(repr, self.schedule_types))} levels")
        if (init_image is None) != (strength is None):
            raise ValueError("image to image needs both the init pictures and a denoising strength")
        if mask_image is not None and init_image is None:
            raise ValueError("a mask needs the picture whose black part is kept (inpainting)")
        from imagine.images import fit_picture

        pictures, keep = variation_of, None  # (a variation's pictures as given: CLIP's processor sizes them itself)
        if init_image is not None:
            pictures = [fit_picture(p.convert("RGB"), self.size, self.size, resize_mode) for p in init_image]
        if mask_image is not None:
            from imagine.inpainting import prepare_masks

            fitted = [fit_picture(m, self.size, self.size, resize_mode) for m in mask_image]
            keep = prepare_masks(fitted, self.size, self.size)[:, 0] == 0
        run = self.stage_steps(int(steps), None if strength is None else float(strength), keep is not None)
        images, parameters = self._run(list(prompts), [n or "" for n in negative_prompts or [None] * len(prompts)],
                                       list(seeds), int(steps), float(guidance_scale), sampler, sigma_schedule,
                                       emphasis, pictures, strength, keep, _overall(callback, run))
        parameters = {"steps": int(steps), "sampler": sampler, "guidance_scale": float(guidance_scale),
                      "height": self.size, "width": self.size, **parameters,
                      **({"schedule_type": sigma_schedule} if sigma_schedule else {}),
                      **({"strength": float(strength)} if strength is not None else {})}
        return GenerationResult(images=images, seeds=list(seeds), parameters=parameters)

    def generate_hires(self, *args, **kwargs):
        raise ValueError(f"{self.description} makes its large picture with its own super-resolution stages: hires. "
                         "fix is for latent models; leave enable_hr off")

    def variations(self, image, prompts, negative_prompts=None, *, noise_level: int = 0, **kwargs):
        """Variations of the pictures `image` (one per seed), where the cascade makes them (picture_model): the
        server's call for OpenAI's variations; the caption empty."""
        if self.picture_model is None:
            raise ValueError(f"{self.description} makes no variations of a picture (an unCLIP decoder does)")
        if noise_level:
            raise ValueError(f"noise_level {noise_level}: {self.description} reads the picture's CLIP embedding as it "
                             "is (its decoder was trained without noise on it): give 0")
        if any(prompts):
            raise ValueError(f"{self.description} takes no prompt: a variation reads the picture's CLIP embedding "
                             "alone (the caption is empty)")
        return self.generate(prompts, negative_prompts, variation_of=list(image), **kwargs)

    def _check_prompts(self, prompts: list[str], steps: int, emphasis, composable: bool, prompt_editing: bool) -> None:
        """AUTOMATIC1111's emphasis (where the cascade does not read it), AND and prompt editing: refused where a
        prompt uses them (a prompt without them reads the same either way)."""
        for p in prompts:
            if emphasis and not self.reads_emphasis:
                from imagine.emphasis import parse_emphasis

                if any(w not in (1.0, None) for _, w in parse_emphasis(p, breaks=True)):
                    raise ValueError(f"{self.description} does not read AUTOMATIC1111's emphasis ((word:1.3), "
                                     f"[word]): write the prompt without it, or send the emphasis option 'None'; got "
                                     f"{p!r}")
            if composable:
                from imagine.composable import split_and

                if len(split_and(p)) > 1:
                    raise ValueError(f"{self.description} does not run AUTOMATIC1111's AND (composable diffusion): "
                                     f"write the prompt without it; got {p!r}")
            if prompt_editing:
                from imagine.prompt_editing import prompt_schedule

                if len(prompt_schedule(p, int(steps))) > 1:
                    raise ValueError(f"{self.description} does not run AUTOMATIC1111's prompt editing ([from:to:when]"
                                     f", [a|b]): write the prompt without it; got {p!r}")


class ImagenServing(CascadeServing):
    """An ImagenPipeline (or ElucidatedImagenPipeline) folder: every stage at the request's steps and guidance, as
    `imagine generate` runs them; emphasis read (ImagenPipeline.sample's); img2img as image to image at stage 1, and
    with a mask as RePaint at every stage (INPAINT_RESAMPLE_TIMES passes a step, imagen-pytorch's default), from the
    picture noised at the denoising strength where it is below 1."""

    reads_emphasis = True
    takes_init = True

    def __init__(self, pipe, source: str | None = None, max_steps: int | None = None):
        from imagine.commands.generate import IMAGEN_GUIDANCE

        self.pipe = pipe
        steps = pipe.defaults.get("steps") or pipe.default_steps(0)  # (a folder's, else stage 1's trained count)
        super().__init__(source, pipe.image_sizes[-1],
                         f"an {type(pipe).__name__.removesuffix('Pipeline')} cascade", pipe.samplers,
                         pipe.schedule_types,
                         {"sampler": pipe.default_sampler, "steps": int(min(steps, max_steps) if max_steps else steps),
                          "guidance_scale": float(pipe.defaults.get("guidance_scale", IMAGEN_GUIDANCE))})

    def stage_steps(self, steps: int, strength: float | None, inpainting: bool = False) -> dict:
        # (RePaint's passes each report their step: counted as one)
        run = {k + 1: steps for k in range(len(self.pipe.unets))}
        if strength is not None and (not inpainting or strength < 1):
            run[1] = int(steps * strength)  # (the last steps of stage 1's grid: sample's SDEdit rule)
        return run

    def _run(self, prompts, negatives, seeds, steps, guidance, sampler, schedule, emphasis, pictures, strength, keep,
             callback):
        from imagine.pipelines.imagen import INPAINT_RESAMPLE_TIMES

        start = pictures if keep is None or float(strength) < 1 else None  # (inpainting at 1: the painted part anew)
        images = self.pipe.sample(prompts, seeds=seeds, cond_scale=guidance, steps=steps, sampler=sampler,
                                  schedule_type=schedule, output_type="pil", progress=False, callback=_once(callback),
                                  emphasis=emphasis, init_image=start,
                                  **({"strength": float(strength)} if start is not None else {}),
                                  **({"inpaint_images": pictures, "inpaint_masks": keep} if keep is not None else {}))
        return images, {"stages": len(self.pipe.unets),
                        **({"inpaint_resample_times": INPAINT_RESAMPLE_TIMES} if keep is not None else {})}


class KarloServing(CascadeServing):
    """Karlo's unCLIP cascade (a diffusers UnCLIPPipeline folder, imagine.pipelines.karlo): the request's steps and
    guidance scale are the decoder's (as `imagine generate`'s --steps and --guidance-scale), the prior and the
    super-resolution stage at diffusers' defaults; DDPM throughout (UnCLIPScheduler's). Karlo's image-variation folder
    (UnCLIPImageVariationPipeline: no prior) makes variations of a picture alone (OpenAI's variations endpoint)."""

    def __init__(self, pipe, source: str | None = None):
        from imagine.pipelines import karlo

        self.pipe = pipe
        varies = pipe.prior is None
        super().__init__(source, pipe.super_res_first.config.sample_size,
                         "Karlo's image-variation cascade" if varies else "Karlo's unCLIP cascade", ["ddpm"], (),
                         {"sampler": "ddpm", "steps": karlo.DECODER_STEPS,
                          "guidance_scale": karlo.DECODER_GUIDANCE})
        self.settings = {"super_res_steps": karlo.SUPER_RES_STEPS}
        if varies:
            self.picture_model = "Karlo's image-variation cascade (DALL-E 2's decoder, from a picture's CLIP embedding)"
            self.c.image_embedder = pipe.image_embedder
        else:
            self.settings.update(prior_steps=karlo.PRIOR_STEPS, prior_guidance_scale=karlo.PRIOR_GUIDANCE)

    def stage_steps(self, steps: int, strength: float | None, inpainting: bool = False) -> dict:
        return {"decoder": steps, "super_res": self.settings["super_res_steps"]}  # (the prior's are not counted)

    def _run(self, prompts, negatives, seeds, steps, guidance, sampler, schedule, emphasis, pictures, strength, keep,
             callback):
        if steps < 2:
            raise ValueError(f"steps {steps}: Karlo's decoder runs 2 or more (UnCLIPScheduler's spacing)")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if self.picture_model is not None:  # (`pictures`: the ones to vary)
            images = self.pipe.variations(pictures, generator=generators, decoder_steps=steps,
                                          decoder_guidance_scale=guidance, progress=False, callback=callback,
                                          **self.settings)
        else:
            images = self.pipe(prompts, generator=generators, decoder_steps=steps, decoder_guidance_scale=guidance,
                               progress=False, callback=callback, **self.settings)
        return images, dict(self.settings)


class IFServing(CascadeServing):
    """DeepFloyd IF (a diffusers IFPipeline folder, with an IFSuperResolutionPipeline folder as stage II:
    imagine.pipelines.cascade): the request's steps, guidance scale and sampler are stage I's (as `imagine generate`'s
    --steps, --guidance-scale, --sampler), stage II runs diffusers' defaults (50 steps, guidance 4, noise level 250)
    with the same sampler; negative prompts are read (IF guides against the encoded negative, "" by default)."""

    takes_negative = True

    def __init__(self, first, second=None, source: str | None = None):
        from imagine.pipelines import cascade

        self.first, self.second = first, second
        super().__init__(source, (second or first).sample_size, "DeepFloyd IF" + (" (stages I and II)" if second
                                                                                  else " (stage I)"),
                         list(cascade.SAMPLERS), (), {"sampler": "ddpm", "steps": cascade.STAGE_1_STEPS,
                                                      "guidance_scale": cascade.STAGE_1_GUIDANCE})
        self.settings = {} if second is None else {"stage_2_steps": cascade.STAGE_2_STEPS,
                                                   "stage_2_guidance_scale": cascade.STAGE_2_GUIDANCE,
                                                   "noise_level": cascade.NOISE_LEVEL}

    def stage_steps(self, steps: int, strength: float | None, inpainting: bool = False) -> dict:
        return {1: steps, **({2: self.settings["stage_2_steps"]} if self.second is not None else {})}

    def _run(self, prompts, negatives, seeds, steps, guidance, sampler, schedule, emphasis, pictures, strength, keep,
             callback):
        from imagine.pipelines import cascade

        states = cascade.encode_prompts(self.first.encoder, prompts, negatives)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]  # (stage I draws first, then stage II)
        low = cascade.text_to_image(self.first, states, steps=steps, guidance_scale=guidance, generator=generators,
                                    output_type="pt" if self.second is not None else "pil", progress=False,
                                    callback=_tagged(callback, 1), sampler=sampler)
        if self.second is None:
            return low, {}
        s = self.settings
        images = cascade.super_resolution(self.second, states, low, steps=s["stage_2_steps"],
                                          guidance_scale=s["stage_2_guidance_scale"], noise_level=s["noise_level"],
                                          generator=generators, progress=False, callback=_tagged(callback, 2),
                                          sampler=sampler)
        return images, dict(s)


def _tagged(callback, stage):
    return None if callback is None else (lambda info: callback({**info, "stage": stage}))


def _once(callback: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """A stage's reports with RePaint's repeated passes of a step heard once (the first pass of each step)."""
    if callback is None:
        return None
    seen: set = set()

    def report(info: dict) -> None:
        key = (info.get("stage"), info.get("step"))
        if key not in seen:
            seen.add(key)
            callback(info)

    return report


def _overall(callback: Callable[[dict], None] | None, run: dict) -> Callable[[dict], None] | None:
    """The stages' step reports as one count over the whole cascade (`run`: the steps each counted stage is expected
    to take, by its "stage" in the reports, in order; a stage's own report of its total replaces the guess): step k of
    a stage is k plus the steps of the stages before it, out of all of them. A stage not in `run` (Karlo's prior)
    reports as it is."""
    if callback is None:
        return None
    run = dict(run)
    order = list(run)

    def report(info: dict) -> None:
        stage = info.get("stage")
        if stage not in run:
            callback(info)
            return
        if info.get("total"):
            run[stage] = int(info["total"])
        before = sum(run[k] for k in order[:order.index(stage)])
        callback({**info, "step": before + int(info.get("step", 0)), "total": sum(run.values())})

    return report
