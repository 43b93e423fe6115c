"""An Imagen cascade behind the server (`imagine serve --model CASCADE`).

The server's worker and app drive a TextToImagePipeline: `generate` (prompts, seeds and the run's settings -> a
GenerationResult), `decode` (a step's x_0 estimate -> pixels, for live previews and interrupted jobs), `check_size`,
`defaults`. `ImagenServing` gives those calls for an ImagenPipeline or ElucidatedImagenPipeline folder, each run by
`ImagenPipeline.sample` with per-image seeds, so a served picture is the one `imagine generate --model CASCADE` makes
from the same seed (at any batch size). Every stage runs the request's steps and guidance, as `imagine generate` runs
them.

What a cascade does not run is refused by name (a 422 from the server), not ignored: negative prompts (Imagen's
guidance runs against its learned null text), AUTOMATIC1111's AND and [from:to:when] syntax, variation seeds,
inpainting, ControlNet, hires. fix, sampler options. A1111's emphasis `(word:1.3)` is read (the text encoder weights
the states as for the latent models), and its img2img runs as the cascade's image to image at stage 1
(ImagenPipeline.sample's init_image / strength)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

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
    "strength_rule": "AUTOMATIC1111's image-to-image step rule",
}
# the eta a cascade's sampler runs at (ImagenPipeline's samplers take no eta: DDPM and Euler a draw fresh noise at
# every step, the others none); a client's eta equal to it is accepted, another refused
SAMPLER_ETA = {"ddpm": 1.0, "euler_a": 1.0, "dpmpp_2s_a": 1.0}


class ImagenServing:
    """An ImagenPipeline (or ElucidatedImagenPipeline) with the TextToImagePipeline calls the server makes."""

    own_levels = True  # (the app runs the cascade's samplers on its own grids, not AUTOMATIC1111's levels)
    scale = 1  # (pixels: no latent factor)
    controlnets: dict = {}

    def __init__(self, pipe, source: str | None = None, max_steps: int | None = None):
        self.pipe = pipe
        self.size = int(pipe.image_sizes[-1])
        self.c = SimpleNamespace(source=str(source or ""), low_res_schedule=None, prior=None, image_embedder=None,
                                 vae_source=None)
        self.description = f"an {type(pipe).__name__.removesuffix('Pipeline')} cascade"
        self.sampler_names = list(pipe.samplers)
        self.schedule_types = tuple(pipe.schedule_types)
        steps = pipe.defaults.get("steps") or pipe.default_steps(0)  # (a folder's, else stage 1's trained count)
        from imagine.commands.generate import IMAGEN_GUIDANCE

        self.defaults = {"height": self.size, "width": self.size, "sampler": pipe.default_sampler,
                         "steps": int(min(steps, max_steps) if max_steps else steps),
                         "guidance_scale": float(pipe.defaults.get("guidance_scale", IMAGEN_GUIDANCE))}

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != (self.size, self.size):
            raise ValueError(f"this Imagen cascade makes {self.size}x{self.size} pictures (its last stage's size); "
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
                 strength: float | None = None, resize_mode: str = "just_resize", **others):
        """The cascade's pictures of `prompts`, one per seed, every stage at `steps` and `guidance_scale`.
        long_prompts: the text encoder's one window either way (MiniLM and T5 read a padding mask; a longer prompt is
        cut with a warning). init_image / strength: image to image at stage 1, the pictures first brought to the
        cascade's size by `resize_mode` (imagine.images.fit_picture, as AUTOMATIC1111's img2img)."""
        from imagine.pipelines.text_to_image import GenerationResult

        if others:
            named = sorted({NOT_RUN.get(k, k) for k in others})
            raise ValueError(f"{self.description} does not run {', '.join(named)}; it takes the prompt, seed, steps, "
                             f"guidance scale, sampler ({', '.join(self.sampler_names)}) and schedule type, and an "
                             "init picture with a denoising strength")
        self.check_size(height, width)
        if any(negative_prompts or []):
            raise ValueError(f"{self.description} takes no negative prompt: its guidance runs against the learned "
                             "null text it was trained with (imagen-pytorch's), not against a second text")
        self._check_prompts(prompts, steps, composable, prompt_editing)
        if sampler_options:
            raise ValueError(f"sampler options {sorted(dict(sampler_options))}: {self.description}'s samplers take "
                             "their settings from the model (an ElucidatedImagen's S_churn, S_tmin, ... in its folder)")
        ran = SAMPLER_ETA.get(sampler, 0.0)
        if eta is not None and float(eta) != ran:
            raise ValueError(f"eta {eta}: {self.description}'s {sampler} runs at eta {ran:g}")
        if sigma_schedule not in (None, *self.schedule_types):
            raise ValueError(f"schedule type {sigma_schedule!r}: {self.description}'s stages run on "
                             f"{' or '.join(map(repr, self.schedule_types))} levels")
        if (init_image is None) != (strength is None):
            raise ValueError("image to image needs both the init pictures and a denoising strength")
        pictures = None
        if init_image is not None:
            from imagine.images import fit_picture

            pictures = [fit_picture(p.convert("RGB"), self.size, self.size, resize_mode) for p in init_image]
        n = len(self.pipe.unets)
        run = [int(steps)] * n
        if pictures is not None:
            run[0] = int(int(steps) * float(strength))  # (the last steps of stage 1's grid: sample's SDEdit rule)
        images = self.pipe.sample(list(prompts), seeds=list(seeds), cond_scale=float(guidance_scale), steps=int(steps),
                                  sampler=sampler, schedule_type=sigma_schedule, output_type="pil", progress=progress,
                                  callback=_overall(callback, run), init_image=pictures,
                                  emphasis=emphasis, **({"strength": float(strength)} if pictures else {}))
        parameters: dict[str, Any] = {"steps": int(steps), "sampler": sampler, "guidance_scale": float(guidance_scale),
                                      "height": self.size, "width": self.size, "stages": n}
        if sigma_schedule:
            parameters["schedule_type"] = sigma_schedule
        if pictures is not None:
            parameters["strength"] = float(strength)
        return GenerationResult(images=images, seeds=list(seeds), parameters=parameters)

    def generate_hires(self, *args, **kwargs):
        raise ValueError(f"{self.description} makes its large picture with its own super-resolution stages: hires. "
                         "fix is for latent models; leave enable_hr off")

    def variations(self, *args, **kwargs):
        raise ValueError(f"{self.description} makes no variations of a picture (an unCLIP decoder does); use img2img")

    def _check_prompts(self, prompts: list[str], steps: int, composable: bool, prompt_editing: bool) -> None:
        """AUTOMATIC1111's AND and prompt editing, which a cascade does not run: refused where a prompt uses them (a
        prompt without them reads the same either way)."""
        for p in prompts:
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


def _overall(callback: Callable[[dict], None] | None, run: list[int]) -> Callable[[dict], None] | None:
    """The stages' step reports as one count over the whole cascade (`run`: the steps each stage is expected to take;
    a stage's own report of its total replaces its guess): step k of stage s is step sum(run[:s-1]) + k of
    sum(run)."""
    if callback is None:
        return None
    run = list(run)

    def report(info: dict) -> None:
        s = int(info["stage"]) - 1
        if info.get("total"):
            run[s] = int(info["total"])
        callback({**info, "step": sum(run[:s]) + int(info.get("step", 0)), "total": sum(run)})

    return report
