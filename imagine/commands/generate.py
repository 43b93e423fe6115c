"""Generate images from a prompt: `imagine generate [--model PATH] "prompt"`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path

from imagine.images import RESIZE_MODES, save_png
from imagine.hardware import PRECISION_HELP



# (schedules.SIGMA_SCHEDULES, with no torch import to parse arguments)
SCHEDULE_NAMES = ("karras", "exponential", "polyexponential", "beta", "kl_optimal", "align_your_steps",
                  "align_your_steps_sdxl", "linear_quadratic", "uniform", "normal", "sgm_uniform", "simple",
                  "ddim_uniform", "compvis", "time_uniform", "time_quadratic", "logsnr", "compvis_time_uniform")


def _schedule_name(text: str) -> str | None:
    """--schedule-type's value: imagine's name, or A1111's label for it (samplers.a1111_schedule: "Karras", "KL
    Optimal", "DDIM" for ddim_uniform; "Automatic": None, the sampler's own)."""
    if str(text) in SCHEDULE_NAMES:
        return str(text)
    from imagine.samplers import a1111_schedule

    try:
        return a1111_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(_suggesting(str(e), text, _schedule_candidates(), _name_key)) from None


def _name_key(name: str) -> str:
    """A name as the libraries compare names (samplers' key: case, spaces, hyphens and underscores aside)."""
    from imagine.samplers import _key

    return _key(name)


def _schedule_candidates() -> list[str]:
    from imagine.schedules import SCHEDULE_LABELS

    return ["automatic", *SCHEDULE_NAMES, *SCHEDULE_LABELS.values()]


def _sampler_candidates(a1111_first: bool = False) -> list[str]:
    """The sampler names a near miss is matched against: ours, A1111's labels and their '... Karras' forms (A1111's
    first where the name given is spelled as A1111 spells them, with capitals or spaces)."""
    from imagine.samplers import A1111_SAMPLERS, SAMPLERS, resolve_sampler

    labels = [label for label, _, _ in A1111_SAMPLERS]
    names = [*labels, *SAMPLERS] if a1111_first else [*SAMPLERS, *labels]
    for label, _, _ in A1111_SAMPLERS:
        try:
            resolve_sampler(f"{label} Karras")
            names.append(f"{label} Karras")
        except ValueError:
            pass
    return names


def _suggesting(message: str, name, candidates, key=None) -> str:
    """`message` (a library's refusal of `name`, which it quotes) with the near misses of `name` after it."""
    from imagine.cli import did_you_mean

    hint = did_you_mean(str(name), candidates, key=key)
    quoted = repr(str(name))
    if not hint:
        return message
    return message.replace(quoted, quoted + hint, 1) if quoted in message else message + hint


def _check_sampler(flag: str, name: str | None) -> None:
    """A sampler name checked before the model loads, with its near misses: "--sampler: unknown sampler 'eulr' (did you
    mean 'euler'?); valid names: ..."."""
    from imagine.samplers import resolve_sampler

    if name is None:
        return
    try:
        resolve_sampler(name)
    except ValueError as e:
        a1111 = name != name.lower() or " " in name
        raise ValueError(f"{flag}: " + _suggesting(str(e), name, _sampler_candidates(a1111), _name_key)) from None


def _finite(text: str) -> float:
    """A float flag's value: a finite number (NaN or inf would run, and draw NaN pictures or none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


class _NegativePrompt(argparse.Action):
    """-n / --negative-prompt. `-n 4` is the negative prompt "4" here (README), where other tools' -n is a count of
    images: a bare whole number after -n is refused, saying so (--negative-prompt "4" still gives it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "-n" and str(values).strip().isdigit():
            raise argparse.ArgumentError(self, f"-n is the negative prompt here, and {values!r} is a number: for "
                                               f"{values.strip()} images per prompt give --num-images "
                                               f"{values.strip()} (a negative prompt of digits: --negative-prompt)")
        setattr(namespace, self.dest, values)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="what to draw (or use --from-file)")
    p.add_argument("--model", "-m", help="model folder (ours or diffusers') or single-file checkpoint, or an "
                                         "imagen-pytorch trainer checkpoint (see --text-encoder); default: the "
                                         "embedded shapes model")
    p.add_argument("--text-encoder", default=None, metavar="FOLDER",
                   help="an imagen-pytorch checkpoint's T5 (its google/t5-v1_1-base, unless trained with another): a "
                        "local T5 encoder folder with its tokenizer; needed for its prompts (nothing is downloaded)")
    p.add_argument("--ema-weights", action="store_true",
                   help="an imagen-pytorch checkpoint: sample with the trainer's EMA unets ('ema', which its "
                        "trainer samples with) instead of its 'model' weights")
    p.add_argument("--start-image", default=None, metavar="PATH",
                   help="an Imagen cascade: enlarge this picture with its super-resolution stages instead of making "
                        "one (imagen-pytorch's start_image_or_video; square, resized to the size of the stage before "
                        "--start-at-stage)")
    p.add_argument("--start-at-stage", type=int, default=None, metavar="K",
                   help="an Imagen cascade: the stage that takes --start-image (imagen-pytorch's start_at_unet_number; "
                        "default 2 with --start-image)")
    p.add_argument("--vae", default=None,
                   help="a VAE file (.safetensors / .ckpt, original or diffusers names) or folder to decode with "
                        "instead of the model's own (AUTOMATIC1111's SD VAE), e.g. vae-ft-mse-840000-ema-pruned")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH[:UNET]]",
                   help="a LoRA file to merge (kohya-ss/A1111 or diffusers/peft names), repeatable; STRENGTH as "
                        "A1111's <lora:name:STRENGTH> (default 1); a second number is the U-Net's, STRENGTH then the "
                        "text encoders' (A1111's <lora:name:te:unet>)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="a folder of LoRA files that prompts ask for as AUTOMATIC1111's <lora:name:STRENGTH>")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:WORD]",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds), repeatable; "
                        "its word is WORD, else the one the file names, else the file's name (as in A1111)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a ControlNet (a diffusers ControlNet folder, or lllyasviel's .pth/.safetensors file), "
                        "repeatable; SCALE is its weight (default 1, diffusers' controlnet_conditioning_scale, "
                        "A1111's control weight). Each needs a --control-image")
    p.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="the picture a ControlNet reads (a map already made, or a photo for --control-preprocessor), "
                        "repeatable: one per --controlnet, in the same order; fitted to the image's size "
                        "(--control-resize), which is the first picture's when --height/--width are not given")
    p.add_argument("--control-preprocessor", action="append", default=[], metavar="NAME[:A[:B]]",
                   help="make the control map from the picture, as AUTOMATIC1111's ControlNet extension: 'canny' "
                        "(A, B: its low and high thresholds, default 100 and 200), 'invert', 'none' (default); one "
                        "for all --controlnet, or one each in order")
    p.add_argument("--control-resolution", type=int, default=None, metavar="N",
                   help="the preprocessor's resolution, the short side it runs at (default: the image's scale, the "
                        "extension's 'pixel perfect')")
    p.add_argument("--control-mode", choices=["balanced", "prompt", "controlnet", "guess"], default=None,
                   help="balanced (default); A1111's 'My prompt is more important' (prompt) or 'ControlNet is more "
                        "important' (controlnet); or diffusers' guess mode (guess)")
    p.add_argument("--control-resize", choices=["just_resize", "crop_and_resize", "resize_and_fill"],
                   default=None,
                   help="how a control map of another shape meets the image's: stretched (default, as diffusers), "
                        "scaled to cover and cut at the centre (the extension's default), or scaled to fit and the "
                        "rest filled with its border's colour")
    p.add_argument("--control-start", type=_finite, default=None, metavar="F",
                   help="the fraction of the steps before the ControlNets act (default 0; diffusers' "
                        "control_guidance_start, A1111's starting control step)")
    p.add_argument("--control-end", type=_finite, default=None, metavar="F",
                   help="the fraction of the steps after which the ControlNets stop (default 1; diffusers' "
                        "control_guidance_end, A1111's ending control step)")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="SDXL's refiner (a diffusers folder or the original sd_xl_refiner file) for the last steps: "
                        "the sampler's run goes on with it after --refiner-switch of the steps (AUTOMATIC1111's "
                        "Refiner)")
    p.add_argument("--refiner-switch", type=_finite, default=None, metavar="F",
                   help="the fraction of the steps after which the refiner takes over (default 0.8, AUTOMATIC1111's "
                        "'switch at')")
    p.add_argument("--refiner-switch-by-steps", action="store_true",
                   help="hand over to the refiner at that fraction of the sampler's model calls, not of the noise "
                        "levels (AUTOMATIC1111's 'Refiner switch by sampling steps', its rule before 1.8.0)")
    p.add_argument("--emphasis", action=argparse.BooleanOptionalAction, default=None,
                   help="read AUTOMATIC1111's emphasis in the prompts: (word) x1.1, [word] /1.1, (word:1.3) x1.3 "
                        "(default: brackets are text, as in diffusers)")
    p.add_argument("--emphasis-mode", default=None, choices=["Original", "No norm", "Ignore", "None"],
                   help="AUTOMATIC1111's emphasis setting by name (implies --emphasis): 'Original' (its default: the "
                        "weights, the mean restored), 'No norm' (the weights alone), 'Ignore' (the syntax read, no "
                        "weights), 'None' (brackets are text)")
    p.add_argument("--prompt-editing", action=argparse.BooleanOptionalAction, default=None,
                   help="read AUTOMATIC1111's prompt editing: [from:to:when] (when: a step, or with a '.' a fraction "
                        "of the steps) and [a|b] (alternating every step); default: brackets are text or emphasis")
    p.add_argument("--old-prompt-editing", action=argparse.BooleanOptionalAction, default=False,
                   help="with prompt editing, A1111's 'Old prompt editing timelines' (before its 1.6; an infotext from "
                        "then turns it on): a when under 1 is a fraction of the steps, else a step, and hires. fix's "
                        "second pass reads the first pass's steps")
    p.add_argument("--composable", action=argparse.BooleanOptionalAction, default=None,
                   help="read AUTOMATIC1111's AND: 'a cat AND a dog :0.8', several prompts guiding one image "
                        "(composable diffusion), each part's trailing :w its weight")
    p.add_argument("--a1111-prompts", action="store_true",
                   help="read prompts as AUTOMATIC1111 does: --emphasis, --long-prompts, --prompt-editing and "
                        "--composable together (what the server's A1111 API reads)")
    p.add_argument("--long-prompts", action=argparse.BooleanOptionalAction, default=None,
                   help="read a prompt past CLIP's 77-token window in 75-token chunks, as AUTOMATIC1111 and ComfyUI "
                        "do (with --emphasis, BREAK starts a new chunk); default: cut at the window with a warning, "
                        "as diffusers")
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="image to image (SDEdit; AUTOMATIC1111's img2img): start from this picture; its size unless "
                        "--height/--width are given")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting (with --init-image): a mask picture, white where the picture is painted anew, "
                        "black where it is kept (grey counts as white from 50%%); resized to the image's size. "
                        "Its result is diffusers' inpainting pipeline's (no blur, no paste back of the picture)")
    p.add_argument("--inpaint-resample-times", type=int, default=None, metavar="N",
                   help="an Imagen cascade's inpainting (--init-image with --mask): RePaint's passes a step (Lugmayr "
                        "et al. 2022; default 5, imagen-pytorch's; 1: the replacement method)")
    p.add_argument("--invert-mask", action=argparse.BooleanOptionalAction, default=False,
                   help="with --mask: paint the black part anew and keep the white (A1111's 'Inpaint not masked')")
    p.add_argument("--masked-content", default=None, choices=["original", "latent_noise", "latent_nothing"],
                   help="with --mask, below strength 1: what the part painted anew starts from, the picture "
                        "(default), the run's start noise or zeros (A1111's 'masked content')")
    p.add_argument("--resize-mode", default=None, choices=list(RESIZE_MODES),
                   help="with --init-image and --height/--width of another shape: stretch it (just_resize, the "
                        "default), cover and cut (crop_and_resize), fit and fill the bands with its edges "
                        "(resize_and_fill), or encode it at its own size and resize the latents (latent_upscale, "
                        "no --mask); AUTOMATIC1111's img2img resize modes")
    p.add_argument("--prior-steps", type=int, default=None, metavar="N",
                   help="an unCLIP model with a diffusion prior (SD 2.1 unCLIP with Karlo's prior, or a Karlo "
                        "UnCLIPPipeline folder): the prior's steps (default 25)")
    p.add_argument("--prior-guidance-scale", type=_finite, default=None, metavar="S",
                   help="an unCLIP model with a diffusion prior: the prior's guidance against the empty caption "
                        "(default 4)")
    p.add_argument("--interpolate-to", default=None, metavar="PATH",
                   help="Karlo's image-variation folder: frames from --init-image to this picture (DALL-E 2's "
                        "interpolations: their CLIP embeddings slerped, every frame from --seed's noise)")
    p.add_argument("--text-diff", nargs=2, default=None, metavar=("DESCRIPTION", "TARGET"),
                   help="Karlo's image-variation folder: frames turning --init-image (described by DESCRIPTION) "
                        "towards TARGET (DALL-E 2's text diffs), up to --max-theta")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="--interpolate-to / --text-diff: the frames, both ends counted (default 5)")
    p.add_argument("--max-theta", type=_finite, default=None, metavar="T",
                   help="--text-diff: how far to turn, a fraction of the angle to the text diff (default 0.5)")
    p.add_argument("--noise-level", type=int, default=None, metavar="N",
                   help="with --init-image, for SD's x4 upscaler: how much noise its low-resolution picture gets, 0 to "
                        "its max_noise_level (default 20; more invents more detail); for an unCLIP decoder (SD 2.1 "
                        "unCLIP): how much noise the picture's CLIP embedding gets (default 0; more keeps less of it); "
                        "for an unCLIP model with a diffusion prior: how much noise the prior's embedding gets")
    p.add_argument("--stage-2", default=None, metavar="FOLDER",
                   help="a pixel cascade's super-resolution stage (DeepFloyd IF: --model IF-I-... --stage-2 IF-II-...): "
                        "the first stage's 64 px pictures made 256 px, with its noise conditioning augmentation "
                        "(--noise-level, default 250)")
    p.add_argument("--stage-2-steps", type=int, default=None, metavar="N",
                   help="the super-resolution stage's steps (default 50, diffusers' IF; for a Karlo UnCLIPPipeline "
                        "folder 7, its super-resolution stage needing no --stage-2)")
    p.add_argument("--stage-2-guidance-scale", type=_finite, default=None, metavar="S",
                   help="the super-resolution stage's classifier-free guidance (default 4, diffusers' IF)")
    p.add_argument("--stage-2-sampler", default=None, metavar="NAME",
                   help="the super-resolution stage's sampler (a pixel cascade's names, as --sampler; default: "
                        "--sampler's, as diffusers' two pipelines each with its own scheduler)")
    p.add_argument("--stage-3", default=None, metavar="FOLDER",
                   help="after --stage-2, a super-resolution model of SD's x4 upscaler's kind (DeepFloyd IF's stage III: "
                        "stable-diffusion-x4-upscaler): the 256 px pictures made 1024 px; its noise level "
                        "--stage-3-noise-level (default 100, IF's), its own steps and guidance by default")
    p.add_argument("--stage-3-noise-level", type=int, default=None, metavar="N",
                   help="the stage III picture's noise level (default 100, as DeepFloyd IF's documentation runs it)")
    p.add_argument("--image-guidance-scale", type=_finite, default=None, metavar="S",
                   help="an instruct-pix2pix model's guidance on the picture to edit (--init-image), beside "
                        "--guidance-scale on the instruction (default 1.5; A1111's 'Image CFG scale')")
    p.add_argument("--variation-seed", "--subseed", type=int, default=None, metavar="N",
                   help="AUTOMATIC1111's variation seed: the start noise moves towards this seed's (image i: N + i; "
                        "-1: random) by --variation-strength, which it needs")
    p.add_argument("--variation-strength", "--subseed-strength", type=_finite, default=0.0, metavar="S",
                   help="how far towards the variation seed's noise, 0 (the seed's image) to 1")
    p.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="AUTOMATIC1111's 'resize seed from': the noise the seed gives at WxH pixels goes in the "
                        "middle of this size's, so an image found at WxH keeps its composition")
    p.add_argument("--infotext", default=None, metavar="PNG|TXT",
                   help="run what an AUTOMATIC1111 infotext describes (A1111's PNG Info / 'Send to txt2img'): a PNG "
                        "(or JPEG/WebP) with its parameters, or the text in a file; the prompt, negative prompt, "
                        "steps, sampler and schedule type, CFG scale, seed, size, hires. fix, variation seed, seed "
                        "resize, RNG, ENSD, eta, churn options, noise schedule and clip skip become the flags' "
                        "defaults (flags given win), run as A1111 runs them (--a1111-sampling, A1111's prompt "
                        "syntax); a PNG imagine made runs again from its own record; what is not applied (the model, "
                        "LoRAs...) is said")
    p.add_argument("--rng", choices=("cpu", "nv"), default="cpu",
                   help="where a seed's noise comes from: cpu (torch's CPU generator; A1111's 'CPU', and its default on "
                        "a machine without a GPU) or nv (the noise torch gives on an NVIDIA GPU: A1111's 'NV', which "
                        "A1111 gives so that any machine makes the pictures its default makes on an NVIDIA card)")
    p.add_argument("--noise-seed-delta", "--ensd", type=int, default=0, metavar="N",
                   help="A1111's eta noise seed delta (ENSD, e.g. 31337): each image's noise after its start noise "
                        "(ancestral samplers, eta) comes from its seed + N")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=False,
                   help="sample over A1111's 'Zero Terminal SNR' noise schedule: the model's rescaled so that the last "
                        "level is pure noise (Lin et al. 2023), for models trained so (v-prediction fine-tunes)")
    p.add_argument("--downcast-alphas-cumprod", action=argparse.BooleanOptionalAction, default=False,
                   help="A1111's 'Downcast alphas_cumprod', for pictures made before its 1.7.0-225 (an infotext from "
                        "then turns it on): the noise levels from the model's alphas_cumprod rounded to float16, as a "
                        "float16 model held them; for the samplers that step in noise levels (not DDIM, PLMS, UniPC, "
                        "LCM)")
    p.add_argument("--pad-conds", choices=("empty", "v0"), default=None,
                   help="A1111's 'Pad prompt/negative prompt' options, for a prompt and negative prompt of different "
                        "lengths (long prompts): 'empty' fills the shorter up with the empty prompt's chunks ('Pad "
                        "conds'), 'v0' repeats the negative's last state up to the prompt's length or cuts it ('Pad "
                        "conds v0', its DDIM and PLMS before 1.6.0, which an infotext from then turns on); both then "
                        "share one U-Net batch. Default: off (two U-Net calls, A1111's default)")
    p.add_argument("--strength", "--denoising-strength", type=_finite, default=None,
                   help="with --init-image: how far from the picture, 0 < s <= 1; the last int(steps * s) steps run "
                        "(default 0.75, A1111's; 1 with --mask, diffusers' inpainting default: the masked part "
                        "starts from pure noise)")
    p.add_argument("--hires-scale", "--hr-scale", type=_finite, default=None, metavar="S",
                   help="AUTOMATIC1111's hires. fix: generate at the base size, upscale by S (1 <= S <= 4; see "
                        "--hires-upscaler) and run image to image there")
    p.add_argument("--hires-resize", default=None, metavar="WxH",
                   help="hires. fix to this size instead of a scale (A1111's 'Resize width to' / 'height to'; 0 for "
                        "a side: from the other and the first pass's aspect; both: upscaled to cover them, then cut "
                        "to them, centred)")
    p.add_argument("--hires-strength", type=_finite, default=None, metavar="S",
                   help="the hires pass's denoising strength, 0 < S <= 1 (default 0.7)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="the hires pass's steps (default, or 0 as in A1111: --steps)")
    p.add_argument("--hires-prompt", default=None, metavar="TEXT",
                   help="the hires pass's prompt (A1111's 'Hires prompt'; default: the prompt)")
    p.add_argument("--hires-negative-prompt", default=None, metavar="TEXT",
                   help="the hires pass's negative prompt (default: the negative prompt)")
    p.add_argument("--hires-upscaler", default=None, metavar="NAME",
                   help="latent: the latents resized bilinearly (A1111's 'Latent', the default), or its other latent "
                        "modes (latent_antialiased, latent_bicubic, latent_bicubic_antialiased, latent_nearest, "
                        "latent_nearest_exact); lanczos, nearest, none: the pictures resized (A1111's labels too); "
                        "or an upscaler model (ESRGAN, SwinIR, HAT, DAT, ...: .pth or .safetensors): its path, or its "
                        "name in "
                        "--upscaler-dir (the file's stem, or A1111's name such as 'R-ESRGAN 4x+')")
    p.add_argument("--sd-upscale", type=_finite, default=None, metavar="S",
                   help="A1111's 'SD upscale' script: --init-image enlarged S times (0 < S <= 8) by "
                        "--sd-upscale-upscaler, cut into --width x --height tiles overlapping by --sd-upscale-overlap, "
                        "each tile through image to image at --strength (tiles in batches of --batch-size, default 1, "
                        "each batch's seeds from the one before plus 1, as A1111's), put back together")
    p.add_argument("--sd-upscale-upscaler", default=None, metavar="NAME",
                   help="what enlarges the picture first: lanczos (default here), nearest, none (A1111's UI default: "
                        "the picture as it is, only its tiles redrawn), or an upscaler model (a path, or a name in "
                        "--upscaler-dir as for --hires-upscaler)")
    p.add_argument("--sd-upscale-overlap", type=int, default=None, metavar="PIXELS",
                   help="the tiles' overlap (default 64, A1111's, or an eighth of a tile's side if that is less)")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="a folder of upscaler models (A1111's models/ESRGAN, RealESRGAN, SwinIR, DAT, or its whole "
                        "models/ folder; ComfyUI's models/upscale_models) that --hires-upscaler, --sd-upscale-upscaler "
                        "and an infotext's 'Hires upscaler' name")
    p.add_argument("--hires-sampler", default=None, metavar="NAME",
                   help="the hires pass's sampler (A1111's 'Hires sampler'; default: --sampler)")
    p.add_argument("--hires-schedule-type", default=None, metavar="NAME",
                   help="the hires pass's schedule type (A1111's 'Hires schedule type'; default: --schedule-type)")
    p.add_argument("--negative-prompt", "-n", default=None, action=_NegativePrompt, metavar="TEXT",
                   help="what to steer away from (A1111's negative prompt; -n is this, not a number of images: "
                        "--num-images)")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="an AUTOMATIC1111 prompt style from --styles-file, merged into the prompt and the negative "
                        "prompt (its {prompt} marks where the prompt goes; else appended after a comma); repeatable, "
                        "applied in order")
    p.add_argument("--styles-file", default=None, metavar="CSV",
                   help="AUTOMATIC1111's styles.csv (columns name, prompt, negative_prompt)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="sampling steps (default: the model's, 20 for the embedded model; a Karlo UnCLIPPipeline "
                        "folder: its decoder's, 25; an Imagen cascade: every stage's, default the folder's, else "
                        "each stage's trained timesteps (an ElucidatedImagen's: its num_sample_steps))")
    p.add_argument("--sampler", default=None,
                   help="ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_sde, dpmpp_3m, dpmpp_3m_sde, "
                        "unipc, euler, euler_a, heun, lms, dpm2, dpm2_a, dpmpp_2s_a, plms, lcm, restart, dpm_fast, "
                        "dpm_adaptive, ddim_cfgpp, euler_cfgpp, euler_a_cfgpp (A1111 names work too); a pixel cascade "
                        "(DeepFloyd IF, Imagen) runs ddpm (its default), ddim, dpmpp_2m, unipc, euler, euler_a, in "
                        "every stage; an ElucidatedImagen heun (its default, with its churn), euler, euler_a, dpm2, "
                        "dpmpp_2m, dpmpp_2s_a")
    p.add_argument("--schedule-type", "--sigma-schedule", dest="sigma_schedule", default=None, type=_schedule_name,
                   metavar="NAME",
                   help=f"noise levels' spacing: {', '.join(SCHEDULE_NAMES)}, or A1111's labels ('Karras', 'SGM "
                        "Uniform', 'Automatic'...) (A1111's schedule type; align_your_steps: SDXL's list for an SDXL "
                        "model; uniform/normal, sgm_uniform, simple, ddim_uniform: read off the model's own levels "
                        "as A1111 and ComfyUI do; time_uniform, time_quadratic, logsnr: the DPM-Solver and UniPC "
                        "code's steps in continuous time, ending at abar_0); default: the model's; an Imagen "
                        "cascade: uniform (its even grid in t, the default) or karras (Karras-spaced, for few steps)")
    p.add_argument("--sigma-range", choices=["spaced", "model"], default="spaced",
                   help="what --schedule-type (or a '... Karras' sampler) spans: the spaced timesteps' levels "
                        "(diffusers', the default) or the model's whole trained range (AUTOMATIC1111's)")
    p.add_argument("--rho", type=_finite, default=None,
                   help="the schedule type's exponent (karras: 7, polyexponential: 1 = exponential)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a further option of the sampler, repeatable: e.g. s_tmin=1.5 (SDE samplers' noise band), "
                        "order=3 or variant=bh1 (unipc)")
    p.add_argument("--final-step", choices=["euler", "heun"], default=None,
                   help="the step to sigma = 0: euler (x0 = D(x), as diffusers) or heun (trapezoidal, same cost)")
    p.add_argument("--start", choices=["noise", "matched", "sigma_max"], default=None,
                   help="the start sample: noise (as diffusers), matched (moved to the mean of q(x_T) by the model's "
                        "own x0 estimate, no extra model call: for schedules whose terminal SNR is not zero) or "
                        "sigma_max (x_T = z sigma_max for every sampler, as k-diffusion and AUTOMATIC1111)")
    p.add_argument("--discard-penultimate-sigma", action="store_true",
                   help="lay out steps + 1 noise levels and leave out the one before the end (AUTOMATIC1111's way "
                        "for DPM2, DPM2 a and DPM++ 3M SDE)")
    p.add_argument("--strength-rule", choices=["diffusers", "a1111", "a1111_fixed_steps"], default="diffusers",
                   help="which steps --init-image runs: diffusers' int(steps x strength), A1111's img2img "
                        "int(min(strength, 0.999) x steps) + 1, or A1111's fixed steps (all --steps, the last of "
                        "int(steps / strength); its hires. fix pass); with --hires-scale, a1111 runs the second pass "
                        "with the fixed rule, as A1111 does")
    p.add_argument("--a1111-sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="run the sampler as AUTOMATIC1111 does (imagine.samplers.a1111_settings): the schedule type "
                        "its 'Automatic' picks unless --schedule-type names one, over the model's whole range, "
                        "x_T = z sigma_max, its discarded level for DPM2 / DPM2 a / DPM++ 3M SDE, k-diffusion's "
                        "3M warm-up and A1111's image-to-image step count (what the server's A1111 API does)")
    p.add_argument("--guidance-scale", "--cfg-scale", type=_finite, default=None, metavar="S",
                   help="classifier-free guidance scale (A1111's CFG scale; default: the model's, 7.5 for SD, 3 for "
                        "the embedded model; a CFG++ sampler's lambda, 0..1; a Karlo UnCLIPPipeline folder: its "
                        "decoder's, 8; an Imagen cascade: every stage's cond_scale, default the folder's, else 1 as "
                        "imagen-pytorch's Imagen.sample)")
    p.add_argument("--guidance-rescale", type=_finite, default=0.0, metavar="PHI",
                   help="Lin et al. 2023 guidance rescale phi, 0..1 (default 0: off)")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None, help="Karras sigma spacing")
    p.add_argument("--eta", type=_finite, default=None,
                   help="DDIM's eta (ddim, ddim_cfgpp; default 0: deterministic), or the noise scale of the ancestral "
                        "and SDE samplers (euler_a, euler_a_cfgpp, dpm2_a, dpmpp_2s_a, dpmpp_sde, dpmpp_2m_sde, "
                        "dpmpp_3m_sde; default 1), or of dpm_fast and dpm_adaptive (default 0; 1 under "
                        "--a1111-sampling, as A1111)")
    p.add_argument("--thresholding", choices=["static", "dynamic"], default=None,
                   help="clip x0 predictions (Imagen's dynamic thresholding, or static [-R, R])")
    p.add_argument("--threshold-range", type=_finite, default=None,
                   help="R, the data's range that thresholding holds x0 to (default: the model's, else 1 = pixels)")
    p.add_argument("--seed", type=int, default=-1, metavar="N",
                   help="seed, 0..4294967295 (-1, the default: random); the run's image i uses seed + i, counting on "
                        "over the prompts of --from-file (with --variation-strength every image keeps the seed and "
                        "the variation seeds count up instead, as in A1111)")
    p.add_argument("--height", type=int, default=None, metavar="PIXELS",
                   help="pixels, a multiple of the model's factor (8 for SD; default: the model's own size, or the "
                        "--init-image's)")
    p.add_argument("--width", type=int, default=None, metavar="PIXELS", help="pixels, as --height")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help="images per prompt (default 1; A1111's batch count x batch size); several go to a folder: "
                        "see --output")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per forward pass (default 4; 1 for DPM adaptive, whose steps follow its whole "
                        "batch); prompts asking for other LoRAs run in batches of their own")
    p.add_argument("--output", "-o", default=None, metavar="PATH",
                   help="one image: a .png path in an existing folder (a file there is replaced), or a folder (one "
                        "that exists, or a path ending in '/', created) for imagine-<seed>.png; default "
                        "imagine-<seed>.png here. A default name never replaces a file: imagine-<seed>-1.png... "
                        "Several images or --from-file: a folder (default outputs/, created) of NNNNN-<seed>.png "
                        "numbered on from the highest there, as A1111 numbers, with images.jsonl (a line per image). "
                        "Each PNG is written whole or not at all (a temporary file renamed)")
    p.add_argument("--from-file", default=None, metavar="FILE",
                   help="a UTF-8 text file with one prompt a line (every non-blank line is a prompt); the images go "
                        "to --output, a folder (default outputs/), as NNNNN-SEED.png with images.jsonl")
    p.add_argument("--precision", choices=["exact", "fast"], default="exact", help=PRECISION_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the weights as loaded: bfloat16 halves the model's memory, for --precision fast only, whose "
                        "copies compute in bf16 anyway")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    single = p.add_argument_group("single-file checkpoints (.safetensors / .ckpt)")
    single.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="what the U-Net predicts: epsilon (SD 1.x, SD 2.x base) or v_prediction (SD 2.x 768-v); "
                             "default: from <name>.yaml beside the file, else for SD 2.x a .ckpt's global step, "
                             "else AUTOMATIC1111's probe of the U-Net (docs/stable-diffusion.md)")
    single.add_argument("--tokenizer", default=None,
                        help="a CLIP tokenizer folder (vocab.json + merges.txt), if none sits beside the file")
    single.add_argument("--tokenizer-2", default=None,
                        help="SDXL's second (OpenCLIP ViT-bigG) tokenizer folder, if no tokenizer_2/ sits beside the "
                             "file")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="a CLIP text encoder's states N layers before the last, diffusers' clip_skip (1 = the "
                        "penultimate layer; any model with CLIP, folder or file); AUTOMATIC1111's 'Clip skip' is N + 1")


def defaults_from(args) -> dict:
    """The flags' defaults an --infotext gives (imagine.cli parses the flags again over them, so flags given win): a
    PNG imagine made is run again from its own record (the "imagine" chunk: the whole run, which the infotext is not);
    any other infotext as A1111 runs it."""
    if not args.infotext:
        return {}
    from imagine.images import parse_a1111_parameters, read_imagine_parameters, read_infotext

    _check_infotext_file(args.infotext)
    from imagine.models.text_encoders import text_encoder_family  # (read from configs or names: no weights)

    own = read_imagine_parameters(args.infotext)
    if own is not None:
        own, refiner = _refiner_again(own, args.refiner, ("refiner", "refiner_switch_at", "refiner_switch_by_steps"))
        out = {**record_defaults(_loaded_again(own, args, "model", "lora", "embeddings",
                                               ("model_hash", "lora_hashes", "ti_hashes")),
                                 init_image=bool(args.init_image), mask=bool(args.mask)), **refiner}
    else:
        fields = parse_a1111_parameters(read_infotext(args.infotext))
        out = infotext_defaults(_loaded_again(fields, args, "Model", None, None,
                                              ("Model hash", "Lora hashes", "TI hashes")),
                                init_image=bool(args.init_image), refiner=args.refiner,
                                text_encoder=text_encoder_family(args.model), upscaler_dir=args.upscaler_dir,
                                sd_upscale=args.sd_upscale is not None)
    if args.from_file:  # (its prompts, not the picture's)
        out.pop("prompt", None)
    if args.hires_scale is not None:  # (hires. fix's two forms: the one given wins over the picture's other)
        out.pop("hires_resize", None)
    if args.hires_resize:
        out.pop("hires_scale", None)
    if "seed" in out:  # (so that a seed out of range is said to be the infotext's)
        out["_infotext_seed"] = out["seed"]
    if out.get("dtype") == "bfloat16":  # (a record's bf16 weights go with its fast mode: not with --precision exact)
        out["_record_dtype"] = out["dtype"]
    return out


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff")


def _check_infotext_file(path: str) -> None:
    """--infotext's file: a picture, or a text file; a folder, or a file named as a picture that is not one (read as
    text it would run its bytes as a prompt), is refused."""
    from PIL import Image, UnidentifiedImageError

    given = Path(path)
    if given.is_dir():
        raise ValueError(f"--infotext: {path} is a folder; give a PNG with A1111's parameters, or a text file")
    if given.is_file() and given.suffix.lower() in _PICTURE_SUFFIXES:
        try:
            with Image.open(given):
                pass
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"--infotext: {path} is named as a picture but is not one Pillow can read ({e}); give "
                             "the picture, or its parameters in a text file") from None
        except Image.DecompressionBombError:  # (a picture: its reader says what is wrong with it)
            pass


# imagine's record of a run (TextToImagePipeline.generate's parameters, with the CLI's) -> this command's flags
_RECORD_FLAGS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler",
                 "guidance_scale": "guidance_scale", "seed": "seed", "height": "height", "width": "width",
                 "schedule_type": "sigma_schedule", "schedule_rho": "rho", "sigma_range": "sigma_range",
                 "start": "start", "final_step": "final_step", "strength_rule": "strength_rule",
                 "discard_penultimate_sigma": "discard_penultimate_sigma", "guidance_rescale": "guidance_rescale",
                 "thresholding": "thresholding", "threshold_range": "threshold_range", "eta": "eta", "rng": "rng",
                 "noise_seed_delta": "noise_seed_delta", "clip_skip": "clip_skip", "subseed": "variation_seed",
                 "subseed_strength": "variation_strength", "seed_resize_from": "seed_resize_from",
                 "hires_scale": "hires_scale", "hires_resize": "hires_resize", "hires_steps": "hires_steps",
                 "hires_prompt": "hires_prompt",
                 "hires_negative_prompt": "hires_negative_prompt", "composable": "composable",
                 "prompt_editing": "prompt_editing", "long_prompts": "long_prompts", "resize_mode": "resize_mode",
                 "masked_content": "masked_content", "zero_terminal_snr": "zero_terminal_snr",
                 "downcast_alphas_cumprod": "downcast_alphas_cumprod", "old_prompt_editing": "old_prompt_editing",
                 "pad_conds": "pad_conds", "precision": "precision", "dtype": "dtype",
                 "mask_invert": "invert_mask", "a1111_schedule": "_a1111_schedule",
                 "hires_sampling": "_hires_sampling", "a1111_hires_schedule": "_a1111_hires_schedule"}


def _refiner_again(record: dict, refiner: str | None, keys: tuple[str, str, str]) -> tuple[dict, dict]:
    """A picture's refiner settings (its refiner's name, switch at, switch by sampling steps: `keys` in `record`) as
    flags where --refiner runs a refiner again (`refiner`, its path): (the record without them, the flags); a name
    that is not the refiner's given (A1111 writes "name [hash]") stays for the notes. Without --refiner all stay for
    the notes (and A1111's "switch by sampling steps", which it writes into every picture while the option is on, goes
    where no refiner ran)."""
    name_key, switch_key, by_steps_key = keys
    record, out = dict(record), {}
    if not record.get(name_key):
        record.pop(by_steps_key, None)
        return record, out
    if not refiner:
        return record, out
    given = Path(refiner)
    if re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(record[name_key])) in (given.name, given.stem):
        record.pop(name_key)
    if switch_key in record:
        switch = record.pop(switch_key)
        try:
            out["refiner_switch"] = float(switch)
        except (TypeError, ValueError):
            raise ValueError(f"--infotext: the refiner's switch at {switch!r} is not a number") from None
    if record.pop(by_steps_key, False) in (True, "True"):
        out["refiner_switch_by_steps"] = True
    return record, out


def _loaded_again(record: dict, args, model_key: str, lora_key: str | None, embeddings_key: str | None,
                  hash_keys: tuple[str, str, str]) -> dict:
    """`record` without what this run loads again, so that the notes name only what is not applied: the model where
    it is the one loaded now (by folder or file name, or its stem as A1111 names a checkpoint, or by its A1111
    "Model hash"; the hash stays in the notes where the file loaded has another), the LoRAs that come back, by the
    prompt's own tags or a --lora given again, and the embedding words an --embedding gives again, with their
    hashes (`hash_keys`: the record's keys of the model's, the LoRAs' and the embeddings')."""
    from imagine.loading.hashes import model_hash
    from imagine.pipelines.text_to_image import LORA_TAG

    record = dict(record)
    model_hash_key, lora_hashes_key, ti_hashes_key = hash_keys
    model = Path(args.model) if args.model else None
    held = model_hash(model) if model is not None and record.get(model_hash_key) else None
    if held is not None and record[model_hash_key] == held:
        record.pop(model_hash_key)
        record.pop(model_key, None)  # (the same file under another name)
    elif record.get(model_key) in ((model.name, model.stem) if model else ("default",)):
        record.pop(model_key)
        if held is None:  # (a folder, or imagine's own model: no file hash to hold the record's against)
            record.pop(model_hash_key, None)
    again = {m.group(1) for text in (record.get("prompt"), record.get("negative_prompt"), record.get("Prompt"),
                                     record.get("Negative prompt")) for m in LORA_TAG.finditer(text or "")}
    again |= {Path(spec.split(":")[0] if not Path(spec).exists() else spec).stem for spec in args.lora}
    # (a word the file itself names is known only once loaded: the file's name stands for it here)
    given = {word or Path(path).stem for path, word in parse_embeddings(args.embedding)}
    for key, back in ((lora_key, again), (lora_hashes_key, again), (embeddings_key, given), (ti_hashes_key, given)):
        if key and record.get(key):
            left = [item for item in str(record[key]).split(", ") if item.split(": ")[0] not in back]
            if left:
                record[key] = ", ".join(left)
            else:
                record.pop(key)
    return record


def record_defaults(record: dict, init_image: bool = False, mask: bool = False) -> dict:
    """imagine's own record of a run (a PNG's "imagine" chunk) as this command's flags, for the same run again: its
    sampling as run (a run under --a1111-sampling too: its levels, start and steps spelled out, its infotext's
    schedule naming kept); "_infotext_notes" says what is not applied (the model and what was loaded with it)."""
    from imagine.pipelines.text_to_image import hires_upscaler_key

    record, out = dict(record), {}
    # (the picture's settings only where the picture and its mask are given again: said otherwise)
    given = {"resize_mode": init_image, "masked_content": mask, "mask_invert": mask}
    for key, dest in _RECORD_FLAGS.items():
        if not given.get(key, True):
            continue
        if key in record and (record[key] is not None or key.startswith("a1111_")):
            out[dest] = record.pop(key)
    emphasis = {"a1111": True, "no_norm": "No norm", "ignore": "Ignore"}.get(record.pop("emphasis", None))
    if emphasis is not None:  # (A1111's "Original", or its other modes by name: imagine.emphasis.emphasis_record)
        out["emphasis"] = emphasis
    if record.get("sampler_options"):
        out["sampler_option"] = [f"{k}={v}" for k, v in record.pop("sampler_options").items()]
    if "hires_upscaler" in record:
        name = record.pop("hires_upscaler")
        try:
            out["hires_upscaler"] = hires_upscaler_key(name)
        except ValueError:  # (an upscaler model's name: --upscaler-dir must have it, as it had to for the run)
            out["hires_upscaler"] = name
    if "strength" in record:
        if "hires_scale" in out or "hires_resize" in out:
            out["hires_strength"] = record.pop("strength")
        elif init_image:
            out["strength"] = record.pop("strength")
    record.pop("version", None)
    record.pop("padded_conds", None)  # (whether the run padded: it follows from pad_conds and the prompts)
    notes = [f"not applied: {', '.join(f'{k}: {v}' for k, v in record.items())}"] if record else []
    return {**out, "_infotext_notes": notes}


# A1111's text encoders that read no "Clip skip", which it writes into every infotext while its option is above 1,
# whatever the model: why, by the model's text encoder (imagine.models.text_encoders.text_encoder_family)
_A1111_CLIP_SKIP_IGNORED = {
    "openclip": "SD 2.x's OpenCLIP text encoder always takes the penultimate layer (its sd_hijack_open_clip)",
    "sdxl": "SDXL's text encoders read it only under its sdxl_clip_l_skip option, off by default, and then in the "
            "ViT-L one alone"}


def infotext_defaults(fields: dict, init_image: bool = False, refiner: str | None = None,
                      text_encoder: str | None = None, upscaler_dir: str | None = None,
                      sd_upscale: bool = False) -> dict:
    """An AUTOMATIC1111 infotext's fields (imagine.images.parse_a1111_parameters) as this command's flags, for a run
    as A1111 made it: its sampling and prompt reading, and "_infotext_notes" for what is not applied or assumed.
    refiner: the --refiner given (the picture's refiner settings then apply); text_encoder: the model's text encoder family
    ("clip", "openclip", "sdxl", imagine.models.text_encoders.text_encoder_family; None: not known): A1111 ignores
    its "Clip skip" on SD 2.x and SDXL, so there it is a note. upscaler_dir: --upscaler-dir, where a "Hires upscaler"
    model (R-ESRGAN 4x+, ...) is looked for (not there: Lanczos, and a note). sd_upscale: --sd-upscale is given (A1111's
    SD upscale script: its infotext's overlap and upscaler then apply; its scale is not in the infotext)."""
    from imagine.images import A1111_SIGMA_LABELS
    from imagine.pipelines.text_to_image import hires_upscaler_key
    from imagine.samplers import COMPVIS_SAMPLERS, TIMESTEP_RULE, a1111_settings, resolve_sampler
    from imagine.schedules import SCHEDULE_LABELS, check_downcast

    from imagine.images import a1111_backcompat

    fields, notes = dict(fields), []
    notes += a1111_backcompat(fields)
    fields, out_refiner = _refiner_again(fields, refiner, ("Refiner", "Refiner switch at",
                                                          "Refiner switch by sampling steps"))

    def number(label: str, cast=float):
        value = fields.pop(label)
        try:
            return cast(float(value)) if cast is int and float(value).is_integer() else cast(value)
        except (TypeError, ValueError):
            raise ValueError(f"--infotext: {label} {value!r} is not a{' whole' if cast is int else ''} "
                             "number") from None

    from imagine.emphasis import EMPHASIS_MODES

    emphasis = fields.pop("Emphasis", "Original")
    if emphasis not in EMPHASIS_MODES:
        notes.append(f"Emphasis: {emphasis} (read as Original, A1111's default)")
        emphasis = "Original"
    out: dict = {"a1111_sampling": True, "long_prompts": True, "prompt_editing": True, "composable": True,
                 "emphasis": {"Original": True, "None": False}.get(emphasis, emphasis), **out_refiner}
    if fields.get("Start") == "sigma_max":  # (imagine's record of an A1111 run's start: the one these flags run)
        fields.pop("Start")
    prompt, negative = fields.pop("Prompt", ""), fields.pop("Negative prompt", "")
    if prompt:
        out["prompt"] = prompt
    if negative:
        out["negative_prompt"] = negative
    for label, dest, cast in (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
                              ("Size-1", "width", int), ("Size-2", "height", int), ("ENSD", "noise_seed_delta", int),
                              ("Eta", "eta", float)):
        if label in fields:
            out[dest] = number(label, cast)
    if "Sampler" in fields:
        sampler, schedule = fields.pop("Sampler"), fields.pop("Schedule type", None)
        for label in sorted(set(SCHEDULE_LABELS.values()), key=len, reverse=True):
            # (A1111 1.6-1.8 wrote some schedules in the sampler's name: "DPM++ 2M SDE Exponential")
            if schedule is None and sampler.endswith(" " + label) and sampler != label:
                try:
                    resolve_sampler(sampler)
                except ValueError:
                    sampler, schedule = sampler[: -len(label) - 1], label
                break
        if schedule == "Automatic":
            schedule = None
        # (A1111's reader, get_sampler_and_scheduler's convert_automatic: the schedule type its "Automatic" picks for
        # the sampler is read as Automatic, so that a hires pass on "Use same scheduler" takes its own sampler's)
        if schedule and _is_named_pick(sampler, schedule):
            schedule = None
        if schedule and resolve_sampler(sampler)[0] in COMPVIS_SAMPLERS:
            notes.append(f"Schedule type: {schedule} (A1111 runs {sampler} on its own timesteps)")
            schedule = None
        out["sampler"] = sampler
        out["sigma_schedule"] = a1111_settings(sampler, schedule)["sigma_schedule"] if schedule else None
        if "Eta DDIM" in fields and resolve_sampler(sampler)[0] in ("ddim", "ddim_cfgpp"):
            out["eta"] = number("Eta DDIM")
    if "Schedule rho" in fields and float(fields["Schedule rho"] or 0) != 0:
        out["rho"] = number("Schedule rho")
    options = [f"{key}={number(label)}" for key, label in A1111_SIGMA_LABELS.items() if label in fields]
    options += [f"{key}={number(key)}" for key in A1111_SIGMA_LABELS if key in fields]  # (imagine's before session 23)
    if options:
        out["sampler_option"] = options
    if "Clip skip" in fields:  # (A1111's 1 is the last layer; diffusers' clip_skip counts the layers skipped)
        skip = number("Clip skip", int)
        if skip > 1 and text_encoder in _A1111_CLIP_SKIP_IGNORED:
            notes.append(f"Clip skip: {skip} (not applied: A1111 ignores it here, "
                         f"{_A1111_CLIP_SKIP_IGNORED[text_encoder]})")
        elif skip > 1:
            out["clip_skip"] = skip - 1
    schedule = fields.pop("Noise Schedule", "Default")
    if schedule not in ("Default", "Zero Terminal SNR"):
        raise ValueError(f"--infotext: Noise Schedule {schedule!r} is not one of A1111's, Default and Zero Terminal SNR")
    if schedule == "Zero Terminal SNR":
        out["zero_terminal_snr"] = True
    if fields.get("Downcast alphas_cumprod") in ("True", True):
        fields.pop("Downcast alphas_cumprod")
        sampler = out.get("sampler", "Euler")  # (A1111's default)
        run = a1111_settings(sampler)  # (the levels A1111 runs it on: the refusal's own rule, check_downcast)
        try:
            check_downcast(TIMESTEP_RULE[run["sampler"]], out.get("sigma_schedule") or run["sigma_schedule"], sampler)
            out["downcast_alphas_cumprod"] = True
        except ValueError:
            notes.append(f"Downcast alphas_cumprod: True (not reproduced for {sampler}: A1111 then takes more than the "
                         "noise levels in float16)")
    elif fields.get("Downcast alphas_cumprod") == "False":
        fields.pop("Downcast alphas_cumprod")
    if fields.get("Old prompt editing timelines") in ("True", True, "False"):
        out["old_prompt_editing"] = fields.pop("Old prompt editing timelines") in ("True", True)
    if fields.get("Precision") in ("fast", "exact"):  # (imagine's own field: fast mode's pictures differ)
        out["precision"] = fields.pop("Precision")
    # (A1111's padding options; "v0" first, as its denoiser tries it first)
    pads = {label: fields.pop(label) in ("True", True) for label in ("Pad conds v0", "Pad conds")
            if fields.get(label) in ("True", True, "False", False)}
    if pads.get("Pad conds v0") or pads.get("Pad conds"):
        out["pad_conds"] = "v0" if pads.get("Pad conds v0") else "empty"
    source = fields.pop("RNG", "GPU")
    if source not in ("GPU", "CPU", "NV"):
        raise ValueError(f"--infotext: RNG {source!r} is not one of A1111's sources GPU, CPU, NV")
    out["rng"] = "cpu" if source == "CPU" else "nv"
    if source == "GPU":  # (A1111's default writes no RNG; most such pictures were made on an NVIDIA card)
        notes.append("RNG: GPU (A1111's default) read as --rng nv, an NVIDIA card's draws; give --rng cpu for a "
                     "picture made without one")
    if "Variation seed strength" in fields and float(fields["Variation seed strength"]) > 0:
        out["variation_strength"] = number("Variation seed strength")
        if "Variation seed" in fields:
            out["variation_seed"] = number("Variation seed", int)
    if "Seed resize from-1" in fields and "Seed resize from-2" in fields:
        out["seed_resize_from"] = f"{fields.pop('Seed resize from-1')}x{fields.pop('Seed resize from-2')}"
    resize = (float(fields.get("Hires resize-1", 0) or 0), float(fields.get("Hires resize-2", 0) or 0))
    hires = "Hires upscale" in fields or max(resize) > 0
    if hires:
        if "Hires upscale" in fields:
            out["hires_scale"] = number("Hires upscale")
        else:  # A1111's "resize to WxH" form (0 for a side: from the other and the first pass's aspect)
            out["hires_resize"] = f"{int(resize[0])}x{int(resize[1])}"
            fields.pop("Hires resize-1", None), fields.pop("Hires resize-2", None)
        if "Hires steps" in fields:
            out["hires_steps"] = number("Hires steps", int)
        if "Hires upscaler" in fields:
            upscaler = fields.pop("Hires upscaler")
            try:
                out["hires_upscaler"] = hires_upscaler_key(upscaler)
            except ValueError:  # (an upscaler model's, e.g. R-ESRGAN 4x+: run where upscaler_dir has it)
                from imagine.upscalers import upscaler_named

                if upscaler_named(upscaler, upscaler_dir) is not None:
                    out["hires_upscaler"] = upscaler
                else:
                    out["hires_upscaler"] = "latent" if upscaler.startswith("Latent") else "lanczos"
                    notes.append(f"Hires upscaler: {upscaler} (upscaled with "
                                 f"{'bilinear Latent' if upscaler.startswith('Latent') else 'Lanczos'} here: no such "
                                 f"model{' in ' + str(upscaler_dir) if upscaler_dir else ''}; see --upscaler-dir)")
        for label, dest in (("Hires prompt", "hires_prompt"), ("Hires negative prompt", "hires_negative_prompt")):
            if fields.get(label):
                out[dest] = fields.pop(label)
        # (A1111's hires sampler and schedule type: written where they differ from the first pass's)
        for label, dest, same in (("Hires sampler", "hires_sampler", "Use same sampler"),
                                  ("Hires schedule type", "hires_schedule_type", "Use same scheduler")):
            value = fields.pop(label, None)
            if value and value != same:
                out[dest] = value
        if "Denoising strength" in fields:
            out["hires_strength"] = number("Denoising strength")
    elif "Denoising strength" in fields and init_image:
        out["strength"] = number("Denoising strength")
    script = {k: fields.pop(k) for k in ("SD upscale overlap", "SD upscale upscaler") if k in fields}
    if script and sd_upscale and init_image:  # (A1111's SD upscale script: its "Size" is the tiles')
        if "SD upscale overlap" in script:
            out["sd_upscale_overlap"] = int(float(script["SD upscale overlap"]))
        upscaler = script.get("SD upscale upscaler")
        if upscaler:
            from imagine.upscalers import upscaler_named

            if upscaler.lower() in ("none", "lanczos", "nearest") or upscaler_named(upscaler, upscaler_dir):
                out["sd_upscale_upscaler"] = upscaler
            else:
                notes.append(f"SD upscale upscaler: {upscaler} (enlarged with Lanczos here: no such model"
                             f"{' in ' + str(upscaler_dir) if upscaler_dir else ''}; see --upscaler-dir)")
    elif script:
        notes.append(", ".join(f"{k}: {v}" for k, v in script.items()) + " (A1111's SD upscale script: give "
                     "--init-image and --sd-upscale S, the scale its infotext does not record)")
    # (A1111's hires. fix before 1.0: its reader has made it today's "Size" and "Hires resize", read above)
    fields.pop("First pass size-1", None), fields.pop("First pass size-2", None)
    not_applied = [f"{k}: {v}" for k, v in fields.items()
                   if not (k in ("Version", "Hires resize-1", "Hires resize-2") or (k.startswith("Hires ") and not v))]
    if not_applied:
        notes.append("not applied: " + ", ".join(not_applied))
    out["_infotext_notes"] = notes
    return out


def _a1111_sampling(name: str, schedule: str | None, sampler_options: dict | None, eta: float | None):
    """Sampler `name` with schedule type `schedule` as AUTOMATIC1111 runs it (samplers.a1111_settings): (the sampler,
    generate's other sampling keywords, the eta (A1111's eta_ancestral, 1, for DPM fast and DPM adaptive where none is
    given), the schedule type its infotext names: the one asked, else the one its "Automatic" picked unless that is
    k-diffusion's own levels; the CompVis samplers' own timesteps are never named, images.a1111_parameters)."""
    from imagine.samplers import a1111_named_pick, a1111_settings

    a1111 = a1111_settings(name, schedule)
    shown = schedule or a1111_named_pick(name)
    sampling = {"sigma_schedule": a1111["sigma_schedule"],
                "sampler_options": {**a1111.get("sampler_options", {}), **(sampler_options or {})} or None,
                "start": a1111.get("start"),
                **{k: a1111[k] for k in ("sigma_range", "discard_penultimate_sigma", "strength_rule")
                   if a1111.get(k) not in (None, False, "spaced", "diffusers")}}
    return a1111["sampler"], sampling, a1111.get("eta") if eta is None else eta, shown


def _is_named_pick(sampler: str, schedule: str) -> bool:
    """Whether schedule type `schedule` (a name or A1111's label) is the one A1111's "Automatic" picks for `sampler`
    (samplers.a1111_named_pick)."""
    from imagine.samplers import a1111_named_pick, a1111_schedule

    try:
        pick = a1111_named_pick(sampler)
        return pick is not None and a1111_schedule(schedule) == pick
    except ValueError:
        return False


def _pass_settings(sampler: str, eta: float | None, options: dict | None, other: str | None):
    """The eta and sampler options of a pass run by `sampler` where the run's other pass (hires. fix's) samples with
    `other` (None: there is none): each one given that `sampler` takes, or that neither takes (the pass's own refusal
    then names it); (eta, options or None)."""
    from imagine.samplers import option_names, resolve_sampler, takes_eta

    if other is None:
        return eta, options
    this, that = resolve_sampler(sampler)[0], resolve_sampler(other)[0]
    if eta is not None and not takes_eta(this) and takes_eta(that):
        eta = None
    mine, theirs = option_names(this), option_names(that)
    return eta, {k: v for k, v in (options or {}).items() if k in mine or k not in theirs} or None


def _batches(pipe, jobs: list, args) -> list[tuple[int, int]]:
    """(start, end) of each batch of `jobs` ((prompt, k) pairs): --batch-size at most (default 4; 1 for a sampler whose
    images depend on their batch, DPM adaptive, as the server runs it), and a new batch wherever the LoRAs the prompts
    ask for change (one batch merges one set), so that every image is the one its prompt and seed give alone."""
    from imagine.samplers import couples_batch

    hires = (getattr(args, "_hires_sampling", None) or {}).get("sampler") or args.hires_sampler
    couples = couples_batch(args.sampler) or couples_batch(hires)
    if couples and args.batch_size and args.batch_size > 1 and len(jobs) > 1:
        print(f"imagine: warning: --batch-size {args.batch_size} with DPM adaptive: its step sizes follow the whole "
              "batch, so each image depends on the others beside it (not the one its seed gives alone, nor made again "
              "from its PNG); leave --batch-size out to run one image a batch", file=sys.stderr)
    size = args.batch_size or (1 if couples else 4)
    asks = getattr(pipe, "loras_asked", None)
    loras = [tuple(asks([p, args.negative_prompt or ""])) if asks else () for p, _ in jobs]
    out, start = [], 0
    for i in range(1, len(jobs) + 1):
        if i == len(jobs) or i - start == size or loras[i] != loras[start]:
            out.append((start, i))
            start = i
    return out


def _prompts(args) -> list[str]:
    if args.from_file:
        path = Path(args.from_file)
        if path.is_dir():
            raise ValueError(f"--from-file: {path} is a folder; give a text file with one prompt a line")
        if not path.is_file():
            raise FileNotFoundError(f"--from-file: {path} not found")
        if args.prompt is not None:
            # one or the other: a prompt given with a file would otherwise be silently dropped
            raise ValueError(f"give a prompt or --from-file, not both (got the prompt {args.prompt!r} and "
                             f"--from-file {path})")
        try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"--from-file: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}); save it as UTF-8") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        options = [n for n, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith("--")]
        if options:  # (A1111's "Prompts from file" script reads such lines as its options: here they would be prompts)
            raise ValueError(f"--from-file: {path} line {options[0]} starts with '--', an option line of A1111's "
                             "'Prompts from file' script (--prompt ... --steps ...), which is not read here: give one "
                             "prompt a line (every non-blank line is a prompt) and the options as flags")
        if not prompts:
            raise ValueError(f"--from-file: {path} holds no prompt")
        return prompts
    if args.prompt is None:
        raise ValueError("give a prompt, e.g. imagine generate \"a red circle to the left of a blue square\", "
                         "or --from-file FILE")
    return [args.prompt]


def _output_target(output: str | None, many: bool) -> tuple[Path | None, Path | None]:
    """Where the images go, as (folder, None) or (None, file); (None, None) is imagine-<seed>.png here. Checked
    before the model loads, so a bad -o costs no generation: several images need a folder; for one image a
    folder (an existing one, or a path ending in a separator) gets imagine-<seed>.png inside it."""
    if many:
        folder = Path(output or "outputs")
        if folder.suffix.lower() == ".png":
            raise ValueError(f"--output {folder}: several images need a folder, not a .png path")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output {folder}: several images need a folder, and {folder} is an existing file; "
                             "give a folder (new or existing)")
        _check_folder_path(folder, output)
        return folder, None
    if output is None:
        return None, None
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if output.endswith(seps) or Path(output).is_dir():
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output {output}: a path ending in a separator is a folder, and {folder} is an "
                             "existing file")
        _check_folder_path(folder, output)
        return folder, None
    file = Path(output)
    if file.suffix.lower() != ".png":  # (the picture is written as PNG, its parameters in PNG text chunks)
        raise ValueError(f"--output {output}: imagine writes PNG files (with the parameters in their text chunks); "
                         "give a path ending in .png, or a folder")
    _check_folder_path(file.parent, output)
    if not file.parent.is_dir():  # (a mistyped folder is said, not made: a folder given as a folder is made)
        raise ValueError(f"--output {output}: the folder {file.parent} does not exist; create it first, or give "
                         f"-o {file.parent}{os.sep} to have it made (the image is then imagine-<seed>.png in it)")
    return None, file


def _check_folder_path(folder: Path, output: str | None) -> None:
    """The nearest existing one of `folder` and its parents must be a folder (it is created below that)."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--output {output}: {p} is a file, not a folder")
            return


def _free_name(path: Path) -> Path:
    """`path` if no file is there, else the first free `<stem>-1.png`, `<stem>-2.png`, ...: a name imagine picks
    (imagine-<seed>.png) never replaces an earlier picture (one the user names, -o x.png, is replaced)."""
    n, free = 0, path
    while free.exists() or free.is_symlink():
        n += 1
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return free


def _save_numbered(img, folder: Path, number: int, seed: int, params: dict) -> tuple[Path, int]:
    """Save as `<number>-<seed>.png`, or, where another run into the folder took that name since the count, under
    the next free number then: (the path, the number for the next image)."""
    while True:
        try:
            return save_png(img, folder / f"{number:05d}-{seed}.png", params, exclusive=True), number + 1
        except FileExistsError:
            number = max(number + 1, _next_number(folder))


def _save_image(img, params: dict, seed: int, many: bool, out_dir: Path | None, out_file: Path | None,
                number: int) -> tuple[Path, int]:
    """One image where `_output_target` sends the run's: several (`many`) numbered into the folder, each with its line
    in images.jsonl; one at -o FILE, or as imagine-<seed>.png. (The path, the next image's number.)"""
    if not many:
        if out_file is not None:
            return save_png(img, out_file, params), number
        return _save_free(img, (out_dir or Path()) / f"imagine-{seed}.png", params), number
    path, number = _save_numbered(img, out_dir, number, seed, params)
    # one line per image, written as soon as its PNG is: a run stopped part-way keeps the records of the images it
    # wrote (one write of a whole line to a file opened for appending)
    with open(out_dir / "images.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file": path.name, **params}, ensure_ascii=False) + "\n")
    return path, number


def _save_free(img, path: Path, params: dict) -> Path:
    """Save under `_free_name(path)`, choosing again where another process took that name meanwhile."""
    while True:
        try:
            return save_png(img, _free_name(path), params, exclusive=True)
        except FileExistsError:
            continue


def _next_number(folder: Path) -> int:
    """The first free NNNNN- number in `folder`: one more than the highest there, as AUTOMATIC1111 numbers
    its outputs, so a second run into the same folder adds to the first instead of overwriting it."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for e in folder.iterdir() if (m := re.match(r"(\d+)-", e.name))]
    return max(numbers, default=-1) + 1


def _read_image(path: str, option: str = "--init-image", mode: str | None = "RGB"):
    """--init-image (or --mask): a picture PIL can open, read now (before the model loads), or one clear error; in
    `mode` (None: its own, a palette expanded)."""
    from PIL import Image, UnidentifiedImageError

    if Path(path).is_dir():
        raise ValueError(f"{option}: {path} is a folder; give a picture file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}: {path} not found")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{option}: {path} is not an image Pillow can read ({e})") from None


def _read_mask(args):
    """--mask (with --init-image; --invert-mask swaps black and white): a grey picture, or None."""
    from PIL import ImageOps

    if args.mask is None:
        if args.invert_mask:
            raise ValueError("--invert-mask needs --mask")
        return None
    if not args.init_image:
        raise ValueError("--mask needs --init-image: the picture whose black part is kept (inpainting)")
    mask = _read_image(args.mask, "--mask", "L")
    return ImageOps.invert(mask) if args.invert_mask else mask


def _number_suffix(item: str) -> tuple[str, float | None]:
    """"path:0.7" -> ("path", 0.7); without a number after the last colon -> (item, None)."""
    path, sep, tail = item.rpartition(":")
    try:
        return (path, float(tail)) if sep and path else (item, None)
    except ValueError:
        return item, None


def _picture_model_run(pipe, args, picture: dict):
    """For a model that is not plain text-to-image, the call that takes generate's keywords; None for other models:
    a super-resolution model (SD's x4 upscaler) makes --init-image larger (`TextToImagePipeline.upscale`), an unCLIP
    decoder (SD 2.1 unCLIP) makes variations of it (`variations`), an unCLIP model with a diffusion prior makes
    images from text through it (`imagine.pipelines.unclip.text_to_image`). Options they have no use for are
    errors."""
    from imagine.pipelines.upscale import NOISE_LEVEL

    what = pipe.picture_model
    prior = getattr(pipe.c, "prior", None) is not None
    if not prior and (args.prior_steps is not None or args.prior_guidance_scale is not None):
        raise ValueError("--prior-steps / --prior-guidance-scale are for unCLIP models with a diffusion prior "
                         "(diffusers' StableUnCLIPPipeline folders); this model has none")
    if what is None and not prior:
        if args.noise_level is not None:
            raise ValueError("--noise-level is for super-resolution models (SD's x4 upscaler) and unCLIP models; "
                             "this model is neither")
        return None
    kind = "prior" if prior else "upscaler" if pipe.c.low_res_schedule is not None else "unCLIP"
    what = what or "an unCLIP text-to-image model (a diffusion prior and SD 2.1 unCLIP's decoder)"
    if kind != "prior" and "init_image" not in picture:
        raise ValueError(f"{args.model} is {what}: give the picture with --init-image")
    unused = [flag for flag, given in (("--init-image", kind == "prior" and "init_image" in picture),
                                       ("--mask", "mask_image" in picture), ("--strength", args.strength is not None),
                                       ("--controlnet", "control_image" in picture),
                                       ("--hires-scale", args.hires_scale is not None or bool(args.hires_resize)),
                                       ("--resize-mode", bool(args.resize_mode)),
                                       ("--height/--width", kind == "upscaler" and (args.height is not None
                                                                                    or args.width is not None)),
                                       ("--variation-strength", bool(args.variation_strength)),
                                       ("--refiner", bool(args.refiner))) if given]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not for {what}")
    if kind == "prior":  # generate() runs the prior and refuses what it cannot honour (A1111 syntax only where used)
        return functools.partial(pipe.generate, noise_level=args.noise_level, prior_steps=args.prior_steps,
                                 prior_guidance_scale=args.prior_guidance_scale)
    image = picture.pop("init_image", None)
    picture.pop("strength", None)

    def run(prompts, negative, *, steps, guidance_scale, sampler, seeds, height, width, eta, karras, sigma_schedule,
            rho, final_step, sampler_options, emphasis, long_prompts, progress, **rest):
        other = sorted(k for k, v in rest.items() if v not in (None, False, 0, 0.0, {}))
        if other:
            raise ValueError(f"{', '.join(other)}: not for {what}")
        common = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler, seeds=seeds, eta=eta, karras=karras,
                      sigma_schedule=sigma_schedule, rho=rho, final_step=final_step, sampler_options=sampler_options,
                      emphasis=emphasis, long_prompts=long_prompts, progress=progress)
        if kind == "upscaler":
            return pipe.upscale(prompts, image, negative, **common,
                                noise_level=NOISE_LEVEL if args.noise_level is None else args.noise_level)
        return pipe.variations(image, prompts, negative, height=height, width=width, **common,
                               noise_level=args.noise_level or 0)
    return run


# the flags a pixel cascade's run reads (imagine.pipelines.cascade); any other, given, is refused by name
CASCADE_FLAGS = {"prompt", "model", "negative_prompt", "steps", "guidance_scale", "seed", "num_images", "output",
                 "from_file", "quiet", "stage_2", "stage_2_steps", "stage_2_guidance_scale", "noise_level", "command",
                 "func", "verbose", "dtype", "stage_3", "stage_3_noise_level", "sampler", "stage_2_sampler"}
IF_STAGE_3_NOISE_LEVEL = 100  # (DeepFloyd IF's documentation runs SD's x4 upscaler as stage III at this level)


def _cascade_model(model: str | None) -> str | None:
    """The pipeline class of a pixel cascade's folder (diffusers' IFPipeline, IFSuperResolutionPipeline;
    UnCLIPPipeline, Karlo's; imagine's ImagenPipeline), else None."""
    index = Path(model) / "model_index.json" if model else None
    if index is None or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (ValueError, OSError):
        return None
    return name if name in ("IFPipeline", "IFSuperResolutionPipeline", "UnCLIPPipeline", "UnCLIPImageVariationPipeline",
                            "ImagenPipeline") else None


def _cascade_run(args, prompts: list[str], max_seed: int) -> int:
    """A pixel cascade (DeepFloyd IF: stage I --model, stage II --stage-2): its pictures, as numbered or named PNGs
    with their parameters, each image from its own seed (base + k) whatever the batch."""
    import torch

    from imagine.pipelines import cascade

    if _cascade_model(args.model) != "IFPipeline":
        raise ValueError(f"--stage-2 follows a pixel cascade's first stage: --model must be a DeepFloyd IF stage I "
                         f"folder (model_index.json: IFPipeline); got {args.model!r}")
    if args.stage_2 is not None and _cascade_model(args.stage_2) != "IFSuperResolutionPipeline":
        raise ValueError(f"--stage-2 {args.stage_2}: not a DeepFloyd IF super-resolution folder (model_index.json: "
                         "IFSuperResolutionPipeline)")
    if args.infotext:  # (its values, set as flags' defaults, would be refused below as flags never given)
        raise ValueError(f"--infotext {args.infotext}: a pixel cascade (DeepFloyd IF) is not run again from a "
                         "picture's parameters; give them as flags: the prompt, --negative-prompt, --seed, --steps, "
                         "--guidance-scale, --sampler, --stage-2-steps, --stage-2-guidance-scale, --noise-level")
    _refuse_idle_flags(args, CASCADE_FLAGS, "a pixel cascade (DeepFloyd IF), which takes the prompt, "
                       "--negative-prompt, --steps, --guidance-scale, --sampler, --seed, --num-images, --dtype, "
                       "--stage-2 (--stage-2-steps, --stage-2-guidance-scale, --stage-2-sampler, --noise-level), -o")
    # (the samplers, said before the models load, with the names a cascade runs: cascade.SAMPLERS; stage II's
    # --sampler's unless --stage-2-sampler names its own)
    sampler = "ddpm" if args.sampler is None else cascade.check_sampler(args.sampler)[0]
    sampler_2 = sampler if args.stage_2_sampler is None else cascade.check_sampler(args.stage_2_sampler)[0]
    _check_values(args, max_seed)  # (the numbers' ranges, --seed, --steps, --num-images, --noise-level)
    for flag, value in (("--num-images", args.num_images), ("--stage-2-steps", args.stage_2_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1; got {value}")
    if args.stage_2 is None and (args.stage_2_steps is not None or args.stage_2_guidance_scale is not None
                                 or args.noise_level is not None or args.stage_3 is not None
                                 or args.stage_2_sampler is not None):
        raise ValueError("--stage-2-steps, --stage-2-guidance-scale, --stage-2-sampler, --noise-level and --stage-3 "
                         "are for the super-resolution stages: give --stage-2 FOLDER too")
    if args.stage_3 is None and args.stage_3_noise_level is not None:
        raise ValueError("--stage-3-noise-level is for stage III: give --stage-3 FOLDER too")
    # (--dtype bfloat16: the weights in bf16, half the memory: IF-I-XL and T5-XXL take about 36 GB in float32; the
    # sampler's state stays float32)
    dtype = getattr(torch, args.dtype)
    first = cascade.IFStage.from_pretrained(args.model, dtype)
    second = cascade.IFStage.from_pretrained(args.stage_2, dtype, encoder=first.encoder) if args.stage_2 else None
    steps = (args.steps or cascade.STAGE_1_STEPS, args.stage_2_steps or cascade.STAGE_2_STEPS)
    scales = (cascade.STAGE_1_GUIDANCE if args.guidance_scale is None else args.guidance_scale,
              cascade.STAGE_2_GUIDANCE if args.stage_2_guidance_scale is None else args.stage_2_guidance_scale)
    level = cascade.NOISE_LEVEL if args.noise_level is None else args.noise_level
    if second is not None:  # (said before stage I runs; stage II would say it after)
        cascade._check_noise_level(second, level)
    third = None
    if args.stage_3 is not None:  # (SD's x4 upscaler, as IF's documentation chains it)
        from imagine.pipelines.text_to_image import TextToImagePipeline

        third = TextToImagePipeline.from_pretrained(args.stage_3, dtype=dtype)
        if third.c.low_res_schedule is None:
            raise ValueError(f"--stage-3 {args.stage_3}: not a super-resolution model of SD's x4 upscaler's kind "
                             "(no low_res_scheduler)")
        level_3 = IF_STAGE_3_NOISE_LEVEL if args.stage_3_noise_level is None else args.stage_3_noise_level
    states = {}

    def picture(prompt: str, seed: int):
        nonlocal states
        if prompt not in states:  # (T5 once per prompt: XXL takes seconds a text)
            states = {prompt: first.encode(prompt, args.negative_prompt)}
        generator = [torch.Generator().manual_seed(seed)]  # (both stages draw from it, stage I first, as diffusers)
        low = cascade.text_to_image(first, states[prompt], steps=steps[0], guidance_scale=scales[0],
                                    generator=generator, output_type="pt", progress=not args.quiet, sampler=sampler)
        img = (cascade.super_resolution(second, states[prompt], low, steps=steps[1], guidance_scale=scales[1],
                                        noise_level=level, generator=generator, progress=not args.quiet,
                                        sampler=sampler_2)[0]
               if second is not None else cascade.pictures(low)[0])
        if third is not None:  # (its draws from the image's seed, as the x4 upscaler draws them alone)
            img = third.upscale(prompt, img, args.negative_prompt, noise_level=level_3, seed=seed,
                                progress=not args.quiet).images[0]
        params = {"prompt": prompt, "negative_prompt": args.negative_prompt or "", "seed": seed, "steps": steps[0],
                  "guidance_scale": scales[0], "sampler": sampler, "width": img.width, "height": img.height,
                  "model": Path(args.model).name, **({"dtype": args.dtype} if args.dtype != "float32" else {})}
        if second is not None:
            params.update(stage_2=Path(args.stage_2).name, stage_2_steps=steps[1], stage_2_guidance_scale=scales[1],
                          noise_level=level, **({"stage_2_sampler": sampler_2} if sampler_2 != sampler else {}))
        if third is not None:
            params.update(stage_3=Path(args.stage_3).name, stage_3_noise_level=level_3)
        return img, params

    return _save_pictures(args, prompts, max_seed, picture)


def _refuse_idle_flags(args, allowed: set[str], what: str) -> None:
    """A pixel cascade's run reads `allowed` flags alone: any other given (away from its default) is refused by name."""
    import argparse

    blank = argparse.ArgumentParser()
    add_arguments(blank)
    defaults = vars(blank.parse_args([]))
    idle = sorted(k for k, v in vars(args).items() if not k.startswith("_") and k not in allowed
                  and k in defaults and v != defaults[k])
    if idle:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in idle)}: not for {what}")


def _save_pictures(args, prompts: list[str], max_seed: int, picture) -> int:
    """A pixel cascade's pictures (`picture(prompt, seed) -> (PIL image, parameters)`), --num-images per prompt, each
    from its own seed (base + k, whatever the batch), as numbered PNGs with images.jsonl or named PNGs, with their
    parameters (`_save_image`)."""
    import random

    jobs = [(p, k) for p in prompts for k in range(args.num_images)]
    many = len(jobs) > 1 or bool(args.from_file)
    out_dir, out_file = _output_target(args.output, many)
    base = random.randint(0, max_seed) if args.seed < 0 else args.seed
    number = _next_number(out_dir) if many else 0
    for i, (prompt, _) in enumerate(jobs):
        seed = (base + i) % (max_seed + 1)
        img, params = picture(prompt, seed)
        path, number = _save_image(img, params, seed, many, out_dir, out_file, number)
        print(path, flush=True)
    return 0


# the flags Karlo's unCLIP cascade reads (imagine.pipelines.karlo); any other, given, is refused by name
KARLO_FLAGS = {"prompt", "model", "steps", "guidance_scale", "prior_steps", "prior_guidance_scale", "stage_2_steps",
               "seed", "num_images", "output", "from_file", "quiet", "command", "func", "verbose", "dtype"}


def _karlo_run(args, prompts: list[str], max_seed: int) -> int:
    """Karlo / DALL-E 2's unCLIP cascade (a diffusers UnCLIPPipeline folder): prior (--prior-steps,
    --prior-guidance-scale), 64 px decoder (--steps, --guidance-scale), super-resolution to 256 px
    (--stage-2-steps), diffusers' defaults; each image from its own seed."""
    import torch

    from imagine.pipelines import karlo

    if args.infotext:
        raise ValueError(f"--infotext {args.infotext}: Karlo's unCLIP cascade is not run again from a picture's "
                         "parameters; give them as flags")
    _refuse_idle_flags(args, KARLO_FLAGS, "Karlo's unCLIP cascade (a UnCLIPPipeline folder), which takes the prompt, "
                       "--steps and --guidance-scale (the decoder's), --prior-steps, --prior-guidance-scale, "
                       "--stage-2-steps (the super-resolution stage's), --seed, --num-images, --dtype, -o")
    _check_values(args, max_seed)
    # (UnCLIPScheduler spaces n steps round(i (T - 1) / (n - 1)): each stage runs 2 or more)
    for flag, value in (("--steps", args.steps), ("--prior-steps", args.prior_steps),
                        ("--stage-2-steps", args.stage_2_steps), ("--num-images", args.num_images)):
        if value is not None and value < (1 if flag == "--num-images" else 2):
            raise ValueError(f"{flag} must be at least {1 if flag == '--num-images' else 2} for Karlo's unCLIP "
                             f"cascade; got {value}")
    pipe = karlo.KarloPipeline.from_pretrained(args.model, getattr(torch, args.dtype))
    settings = dict(prior_steps=args.prior_steps or karlo.PRIOR_STEPS, decoder_steps=args.steps or karlo.DECODER_STEPS,
                    super_res_steps=args.stage_2_steps or karlo.SUPER_RES_STEPS,
                    prior_guidance_scale=karlo.PRIOR_GUIDANCE if args.prior_guidance_scale is None
                    else args.prior_guidance_scale,
                    decoder_guidance_scale=karlo.DECODER_GUIDANCE if args.guidance_scale is None
                    else args.guidance_scale)

    def picture(prompt: str, seed: int):
        img = pipe(prompt, generator=[torch.Generator().manual_seed(seed)], progress=not args.quiet, **settings)[0]
        params = {"prompt": prompt, "seed": seed, "steps": settings["decoder_steps"],
                  "guidance_scale": settings["decoder_guidance_scale"], "sampler": "ddpm",
                  "prior_steps": settings["prior_steps"], "prior_guidance_scale": settings["prior_guidance_scale"],
                  "stage_2_steps": settings["super_res_steps"], "width": img.width, "height": img.height,
                  "model": Path(args.model).name, **({"dtype": args.dtype} if args.dtype != "float32" else {})}
        return img, params

    return _save_pictures(args, prompts, max_seed, picture)


# the flags Karlo's image-variation cascade reads; any other, given, is refused by name
KARLO_VARIATION_FLAGS = {"model", "init_image", "steps", "guidance_scale", "stage_2_steps", "seed", "num_images",
                         "output", "quiet", "command", "func", "verbose", "dtype", "interpolate_to", "text_diff",
                         "frames", "max_theta"}


def _karlo_variations_run(args, max_seed: int) -> int:
    """DALL-E 2's variations of --init-image with Karlo's image-variation cascade (a diffusers
    UnCLIPImageVariationPipeline folder): the picture's CLIP image embedding through the 64 px decoder (--steps,
    --guidance-scale) and the super-resolution stage (--stage-2-steps), diffusers' defaults; --num-images variations,
    each from its own seed. With --interpolate-to or --text-diff, --frames frames from --seed's noise instead."""
    import torch

    from imagine.pipelines import karlo

    what = "Karlo's image-variation cascade (an UnCLIPImageVariationPipeline folder)"
    if args.prompt is not None or args.from_file:
        raise ValueError(f"{what} takes no prompt: a variation reads the picture's CLIP embedding alone (the caption "
                         "is empty); give --init-image")
    if args.infotext:
        raise ValueError(f"--infotext {args.infotext}: {what} is not run again from a picture's parameters; give "
                         "them as flags")
    _refuse_idle_flags(args, KARLO_VARIATION_FLAGS, f"{what}, which takes --init-image, --steps and --guidance-scale "
                       "(the decoder's), --stage-2-steps (the super-resolution stage's), --seed, --num-images, "
                       "--interpolate-to or --text-diff with --frames (and --max-theta), --dtype, -o")
    if not args.init_image:
        raise ValueError(f"{args.model} is {what}: give the picture to vary with --init-image")
    path = args.interpolate_to is not None or args.text_diff is not None
    if args.interpolate_to is not None and args.text_diff is not None:
        raise ValueError("give --interpolate-to or --text-diff, not both")
    if args.frames is not None and not path:
        raise ValueError("--frames is for --interpolate-to or --text-diff")
    if args.max_theta is not None and args.text_diff is None:
        raise ValueError("--max-theta is for --text-diff")
    if path and args.num_images != 1:
        raise ValueError("--num-images: the frames of --interpolate-to / --text-diff share --seed's noise; give "
                         "--frames for more")
    frames = 5 if args.frames is None else args.frames
    if frames < 2:
        raise ValueError(f"--frames must be at least 2 (both ends); got {frames}")
    max_theta = 0.5 if args.max_theta is None else args.max_theta
    if not 0 < max_theta <= 1:
        raise ValueError(f"--max-theta must be in (0, 1]; got {max_theta}")
    _check_values(args, max_seed)
    for flag, value in (("--steps", args.steps), ("--stage-2-steps", args.stage_2_steps)):
        if value is not None and value < 2:
            raise ValueError(f"{flag} must be at least 2 for {what}; got {value}")
    picture = _read_image(args.init_image, mode=None)
    end = _read_image(args.interpolate_to, "--interpolate-to", mode=None) if args.interpolate_to else None
    out_dir = _output_target(args.output or "frames", True)[0] if path else None  # (before the model loads)
    pipe = karlo.KarloPipeline.from_pretrained(args.model, getattr(torch, args.dtype))
    settings = dict(decoder_steps=args.steps or karlo.DECODER_STEPS,
                    super_res_steps=args.stage_2_steps or karlo.SUPER_RES_STEPS,
                    decoder_guidance_scale=karlo.DECODER_GUIDANCE if args.guidance_scale is None
                    else args.guidance_scale)
    if path:
        return _karlo_frames(args, pipe, picture, end, frames, max_theta, settings, max_seed, out_dir)
    z = pipe.image_embedder.embed([picture])  # (once: each variation differs by its seed alone)

    def variation(_, seed: int):
        img = pipe.variations(None, image_embeddings=z, generator=[torch.Generator().manual_seed(seed)],
                              progress=not args.quiet, **settings)[0]
        return img, _variation_parameters(args, settings, img, seed)

    return _save_pictures(args, [""], max_seed, variation)


def _variation_parameters(args, settings: dict, img, seed: int, **more) -> dict:
    """A Karlo variation's (or frame's) parameters, for its PNG."""
    return {"prompt": "", "seed": seed, "steps": settings["decoder_steps"],
            "guidance_scale": settings["decoder_guidance_scale"], "sampler": "ddpm",
            "stage_2_steps": settings["super_res_steps"], "width": img.width, "height": img.height,
            "init_image": Path(args.init_image).name, **more, "model": Path(args.model).name,
            **({"dtype": args.dtype} if args.dtype != "float32" else {})}


def _karlo_frames(args, pipe, picture, end, frames: int, max_theta: float, settings: dict, max_seed: int,
                  out_dir: Path) -> int:
    """--interpolate-to / --text-diff: the frames as numbered PNGs in `out_dir` (-o's folder, default frames/), each
    with its theta in its parameters."""
    import random

    seed = random.randint(0, max_seed) if args.seed < 0 else args.seed
    if end is not None:
        images = pipe.interpolations(picture, end, frames=frames, seed=seed, progress=not args.quiet, **settings)
        thetas = [k / (frames - 1) for k in range(frames)]
        what = {"interpolate_to": Path(args.interpolate_to).name}
    else:
        description, target = args.text_diff
        images = pipe.text_diff(picture, description, target, frames=frames, max_theta=max_theta, seed=seed,
                                progress=not args.quiet, **settings)
        thetas = [max_theta * k / (frames - 1) for k in range(frames)]
        what = {"text_diff": [description, target]}
    number = _next_number(out_dir)
    for img, theta in zip(images, thetas):
        params = _variation_parameters(args, settings, img, seed, **what, theta=round(theta, 6))
        path, number = _save_image(img, params, seed, True, out_dir, None, number)
        print(path, flush=True)
    return 0


# the flags an Imagen cascade's run reads (imagine.pipelines.imagen); any other, given, is refused by name
IMAGEN_FLAGS = {"prompt", "model", "steps", "guidance_scale", "seed", "num_images", "output", "from_file", "quiet",
                "command", "func", "verbose", "dtype", "precision", "sampler", "text_encoder", "ema_weights",
                "start_image", "start_at_stage", "sigma_schedule", "init_image", "strength", "mask", "invert_mask",
                "inpaint_resample_times"}
IMAGEN_GUIDANCE = 1.0  # imagen-pytorch's Imagen.sample cond_scale (its `imagen` command samples at 5)
IMAGEN_T5 = "google/t5-v1_1-base"  # imagen-pytorch's DEFAULT_T5_NAME, a checkpoint's text_encoder_name if none saved


def _imagen_checkpoint(model: str | None) -> dict | None:
    """--model as an imagen-pytorch trainer checkpoint: a file that torch.load(weights_only=True) reads as a dict with
    'model' (the Imagen's weights) and 'imagen_params' (its ImagenConfig), whatever its name; else None (a folder, a
    .safetensors file, an SD checkpoint, anything else: left to the other loaders and their errors). Read memory-mapped,
    so an SD checkpoint's tensors are not read here."""
    path = Path(model) if model else None
    if path is None or not path.is_file() or path.suffix.lower() == ".safetensors":
        return None
    import torch

    try:  # (a pickle needing code, a legacy or foreign file: not imagen-pytorch's, said by the other loaders)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    ok = isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict) and "imagen_params" in checkpoint
    return checkpoint if ok else None


def load_imagen(args, checkpoint: dict | None):
    """The Imagen cascade `args.model` names (`imagine generate` and `imagine serve`): imagine's cascade folder, or an
    imagen-pytorch trainer checkpoint (`checkpoint`, the file's dict) with --text-encoder (its T5, a local folder) and
    --ema-weights; --dtype and --precision as given. The flags' combinations are checked first."""
    import torch

    from imagine.pipelines.imagen import ImagenPipeline

    dtype = getattr(torch, args.dtype)
    if checkpoint is None:
        for flag, given in (("--text-encoder", args.text_encoder is not None), ("--ema-weights", args.ema_weights)):
            if given:
                raise ValueError(f"{flag} is for an imagen-pytorch checkpoint (--model FILE); {args.model} is an "
                                 "Imagen cascade folder, which holds one set of weights and names its text encoder in "
                                 "model_index.json")
        pipe = ImagenPipeline.from_pretrained(args.model, dtype=dtype, precision=args.precision)
    else:
        params = checkpoint["imagen_params"]
        on_text = not isinstance(params, dict) or params.get("condition_on_text", True)
        if args.text_encoder is None and on_text:
            name = params.get("text_encoder_name") if isinstance(params, dict) else None
            raise ValueError(f"--model {args.model} is an imagen-pytorch checkpoint, whose prompts are read by the T5 "
                             f"it was trained with ({name or IMAGEN_T5}), which imagen-pytorch downloads and imagine "
                             "does not: give --text-encoder FOLDER, a local copy of that T5 encoder with its tokenizer")
        if args.text_encoder is not None and not Path(args.text_encoder).is_dir():
            raise FileNotFoundError(f"--text-encoder: {args.text_encoder} is not a folder; give a local T5 encoder "
                                    "folder with its tokenizer")
        if args.ema_weights and not isinstance(checkpoint.get("ema"), dict):
            raise ValueError(f"--ema-weights: {args.model} holds no EMA unets ('ema': its trainer ran without EMA); "
                             "leave the flag out to sample with its 'model' weights")
        pipe = ImagenPipeline.from_imagen_pytorch(checkpoint, ema=args.ema_weights, t5_folder=args.text_encoder,
                                                  dtype=dtype, precision=args.precision)
    return pipe


def _imagen_run(args, prompts: list[str], max_seed: int, checkpoint: dict | None) -> int:
    """An Imagen cascade (imagine.pipelines.imagen): imagine's cascade folder (model_index.json: ImagenPipeline), or an
    imagen-pytorch trainer checkpoint (`checkpoint`, the file's dict), its prompts read by --text-encoder's T5. Every
    stage samples --steps steps at --guidance-scale (cond_scale); each image from its own seed, the picture
    imagen-pytorch samples at batch 1 after torch.manual_seed(seed)."""
    from imagine.pipelines.imagen import INPAINT_RESAMPLE_TIMES

    if args.infotext:
        raise ValueError(f"--infotext {args.infotext}: an Imagen cascade is not run again from a picture's parameters; "
                         "give them as flags: the prompt, --seed, --steps, --guidance-scale")
    _refuse_idle_flags(args, IMAGEN_FLAGS, "an Imagen cascade, which takes the prompt, --steps and --guidance-scale "
                       "(every stage's), --sampler, --schedule-type, --seed, --num-images, --precision, --dtype, -o, "
                       "--start-image with "
                       "--start-at-stage, --init-image with --strength and --mask (--invert-mask, "
                       "--inpaint-resample-times), and for an imagen-pytorch checkpoint --text-encoder and "
                       "--ema-weights")
    _check_values(args, max_seed)
    start = _read_image(args.start_image, "--start-image") if args.start_image else None
    init = _read_image(args.init_image) if args.init_image else None
    mask = _read_mask(args)  # (white: painted anew)
    if args.strength is not None and init is None:
        raise ValueError("--strength is how far from --init-image: give the picture")
    if args.inpaint_resample_times is not None and (mask is None or args.inpaint_resample_times < 1):
        raise ValueError("--inpaint-resample-times is RePaint's passes a step (1 or more) for inpainting: give it "
                         f"with --init-image and --mask; got {args.inpaint_resample_times}")
    if init is not None and start is not None:
        raise ValueError("--init-image (image to image at stage 1) and --start-image (the super-resolution stages "
                         "enlarge it): give one")
    first = args.start_at_stage if args.start_at_stage is not None else 2 if start is not None else 1
    if first < 1 or (first > 1) != (start is not None):
        raise ValueError(f"--start-at-stage {first}: a stage after the first enlarges the --start-image picture, and "
                         "stage 1 makes its own: give --start-image with a stage from 2 on, or neither")
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1; got {value}")
    pipe = load_imagen(args, checkpoint)
    sampler = pipe.check_sampler(args.sampler)  # (None: the cascade's own, ddpm or an ElucidatedImagen's heun)
    steps = args.steps or pipe.defaults.get("steps")  # (None: each stage's own, its trained timesteps or num_sample_steps)
    scale = pipe.defaults.get("guidance_scale", IMAGEN_GUIDANCE) if args.guidance_scale is None \
        else args.guidance_scale
    if first > len(pipe.unets):
        raise ValueError(f"--start-at-stage {first}: {args.model} has stages 1 to {len(pipe.unets)}")
    # (A1111's default denoising strength; inpainting's, diffusers': 1, the painted part from noise)
    strength = (1.0 if mask is not None else 0.75) if args.strength is None else float(args.strength)
    keep, passes = None, args.inpaint_resample_times or INPAINT_RESAMPLE_TIMES
    if mask is not None:  # imagen-pytorch's inpaint_masks: True where the picture is kept (black in --mask)
        from imagine.inpainting import prepare_masks

        keep = prepare_masks([mask], *init.size)[:, 0] == 0
    if args.sigma_schedule not in (None, *pipe.schedule_types):
        raise ValueError(f"--schedule-type {args.sigma_schedule}: this cascade's stages run on "
                         f"{' or '.join(pipe.schedule_types)} levels")
    stage_steps = [pipe.default_steps(k) for k in range(first - 1, len(pipe.unets))] if steps is None \
        else (int(steps),) * (len(pipe.unets) - first + 1)
    recorded = {"steps": stage_steps[0] if len(set(stage_steps)) == 1 else list(stage_steps),
                "guidance_scale": float(scale), "sampler": sampler, "model": Path(args.model).name,
                "stages": len(pipe.unets),
                **({"start_image": Path(args.start_image).name, "start_at_stage": first} if start else {}),
                **({"schedule_type": args.sigma_schedule} if args.sigma_schedule else {}),
                **({"init_image": Path(args.init_image).name, "strength": strength} if init else {}),
                **({"mask": Path(args.mask).name, "inpaint_resample_times": passes,
                    **({"invert_mask": True} if args.invert_mask else {})} if mask is not None else {}),
                **({"text_encoder": Path(args.text_encoder).name} if args.text_encoder else {}),
                **({"ema_weights": True} if args.ema_weights else {}),
                **({"dtype": args.dtype} if args.dtype != "float32" else {}),
                **({"precision": args.precision} if args.precision != "exact" else {})}

    def picture(prompt: str, seed: int):
        img = pipe.sample([prompt], cond_scale=scale, seeds=[seed], steps=steps, output_type="pil",
                          progress=not args.quiet, sampler=sampler, start_at_unet_number=first, start_image=start,
                          schedule_type=args.sigma_schedule, init_image=init if mask is None or strength < 1 else None,
                          strength=strength, inpaint_images=None if mask is None else init, inpaint_masks=keep,
                          inpaint_resample_times=passes)[0]
        return img, {"prompt": prompt, "seed": seed, **recorded, "width": img.width, "height": img.height}

    return _save_pictures(args, prompts, max_seed, picture)


def _hires_resize(text: str | None) -> tuple[int, int] | None:
    """--hires-resize WxH -> (width, height) in pixels (0 for a side: from the other), or None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(text))
    if not m or not (int(m[1]) or int(m[2])):
        raise ValueError(f"--hires-resize must be WIDTHxHEIGHT in pixels, e.g. 1024x768 (0 for one side: from the "
                         f"other and the first pass's aspect); got {text!r}")
    return int(m[1]), int(m[2])


def parse_loras(items: list[str]) -> list[tuple[str, float | tuple[float, float]]]:
    """["style.safetensors:0.7", "other.safetensors", "x.safetensors:1:0.5"] -> [(path, 0.7), (path, 1.0), (path,
    (1.0, 0.5))]: numbers after the last colons are the strength, or the text encoders' and the U-Net's, as
    AUTOMATIC1111's <lora:name:te:unet> (a path with colons still works)."""
    out = []
    for item in items or []:
        path, unet = _number_suffix(item)
        if unet is None:
            head, _, tail = item.rpartition(":")
            if head and not Path(item).exists() and Path(head).exists():  # (a file, then a strength mistyped)
                raise ValueError(f"--lora {item}: the strength after the last colon, {tail!r}, is not a number "
                                 f"(e.g. {head}:0.8, or {head}:1:0.5 for the text encoders' and the U-Net's)")
            out.append((item, 1.0))
            continue
        head, te = _number_suffix(path)
        out.append((head, (te, unet)) if te is not None else (path, unet))
    return out


def parse_controlnets(items: list[str]) -> list[tuple[str, float]]:
    """["canny.pth:0.8", "depth"] -> [(path, 0.8), (path, 1.0)]: a number after the last colon is the scale (so a
    path with colons still works)."""
    out = []
    for item in items or []:
        path, scale = _number_suffix(item)
        out.append((path, scale) if scale is not None else (item, 1.0))
    return out


def _read_controls(args) -> tuple[list[tuple[str, float]], list]:
    """--controlnet and --control-image, checked before the model loads: each ControlNet exists and has its
    picture (one each, in order), and each picture reads. -> ([(path, scale)], [PIL image])."""
    nets = parse_controlnets(args.controlnet)
    if not nets and not args.control_image:
        return [], []
    if len(args.control_image) != len(nets):
        if not nets:
            raise ValueError("--control-image needs a --controlnet to read it")
        raise ValueError(f"{len(nets)} --controlnet and {len(args.control_image)} --control-image given: give one "
                         "control picture per ControlNet, in the same order")
    for path, scale in nets:
        if not Path(path).exists():
            raise FileNotFoundError(f"--controlnet: {path} not found")
        if not math.isfinite(scale):
            raise ValueError(f"--controlnet {path}: the scale must be a finite number; got {scale}")
    return nets, [_read_image(p, "--control-image") for p in args.control_image]


def parse_preprocessors(items: list[str], n: int) -> list[tuple[str, float, float]]:
    """--control-preprocessor NAME[:A[:B]] (none given: 'none'; one: for every ControlNet; else one each) ->
    [(name, threshold a, threshold b)] (-1: the preprocessor's default)."""
    from imagine.preprocessors import find_preprocessor

    if len(items) > 1 and len(items) != n:
        raise ValueError(f"{len(items)} --control-preprocessor for {n} --controlnet: give one for all, or one each")
    out = []
    for item in items or ["none"]:
        name, *numbers = item.split(":")
        if len(numbers) > 2:
            raise ValueError(f"--control-preprocessor {item!r}: NAME[:A[:B]], e.g. canny:100:200")
        try:
            values = [float(v) for v in numbers] + [-1.0] * (2 - len(numbers))
        except ValueError:
            raise ValueError(f"--control-preprocessor {item!r}: its thresholds must be numbers, e.g. canny:100:200") \
                from None
        out.append((find_preprocessor(name), *values))
    return out * n if len(out) == 1 else out


def prepare_control_maps(pictures: list, preps: list[tuple[str, float, float]], width: int, height: int, mode: str,
                         resolution: int | None) -> tuple[list, list[tuple]]:
    """Each control picture through its preprocessor (at `resolution`, default pixel perfect) and fitted to width x
    height by `mode` -> (the maps, per map (module, mode, resolution, threshold a, threshold b, pixel perfect) for the
    infotext)."""
    from imagine import preprocessors as pp

    maps, used = [], []
    for picture, (name, a, b) in zip(pictures, preps):
        res = resolution if resolution is not None else max(1, pp.pixel_perfect_resolution(picture, width, height,
                                                                                            mode))
        kw = pp.settings(name, res, a, b, free_resolution=True)  # (checked: --control-resolution, or pixel perfect)
        maps.append(pp.fit(pp.preprocess(name, picture, res, a, b, free_resolution=True), width, height, mode))
        used.append((name, mode, kw.get("resolution"), kw.get("low"), kw.get("high"),
                     resolution is None and "resolution" in kw))  # (pixel perfect: for a preprocessor that scales)
    return maps, used


def parse_embeddings(items: list[str]) -> list[tuple[str, str | None]]:
    """["EasyNegative.safetensors", "cat.bin:<cat-toy>"] -> [(path, None), (path, "<cat-toy>")]: text after the last
    colon is the word when what is before it is an existing file."""
    from pathlib import Path as _Path

    out = []
    for item in items or []:
        path, sep, word = item.rpartition(":")
        out.append((path, word) if sep and word and _Path(path).is_file() else (item, None))
    return out


def parse_sampler_options(items: list[str]) -> dict:
    """["s_tmin=1.5", "variant=bh1", "last_step=False"] -> {"s_tmin": 1.5, "variant": "bh1", "last_step": False}
    (numbers and True / False parsed; the sampler checks the names)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--sampler-option {item!r}: expected KEY=VALUE, e.g. s_tmin=1.5")
        value = value.strip()
        if value in ("True", "False"):
            out[key.strip()] = value == "True"
            continue
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def _karras_name(name: str) -> bool:
    from imagine.samplers import resolve_sampler

    return resolve_sampler(name)[2]


def _hires_upscaler(args):
    """--hires-upscaler's upscaler model (imagine.upscalers.UpscaleModel) where it names one (a file, or a model in
    --upscaler-dir), else None (a built-in upscaler's name)."""
    from imagine.upscalers import upscaler_named

    if args.hires_upscaler is None:
        return None
    model = upscaler_named(args.hires_upscaler, getattr(args, "upscaler_dir", None))
    return None if model is None else model.with_precision(getattr(args, "precision", None) or "exact")


def _check_values(args, max_seed: int) -> None:
    """What can be said of the flags before the model loads (which takes minutes for SDXL): the names of samplers and
    upscalers (with their near misses), the numbers' ranges, and flags that would do nothing, each by its flag."""
    from imagine.pipelines.text_to_image import HIRES_UPSCALERS, hires_upscaler_key

    _check_sampler("--sampler", args.sampler)
    _check_sampler("--hires-sampler", args.hires_sampler)
    if args.hires_upscaler is not None:
        try:
            hires_upscaler_key(args.hires_upscaler)
        except ValueError:
            if _hires_upscaler(args) is None:
                from imagine.cli import did_you_mean

                models, where = _upscaler_models(args)
                hint = did_you_mean(args.hires_upscaler, [*HIRES_UPSCALERS, *HIRES_UPSCALERS.values(), *models],
                                    _name_key)
                raise ValueError(f"--hires-upscaler: unknown upscaler {args.hires_upscaler!r}{hint}; valid: "
                                 f"{', '.join(HIRES_UPSCALERS)} (or A1111's labels: "
                                 f"{', '.join(dict.fromkeys(HIRES_UPSCALERS.values()))}){where}") from None
    _hires_resize(args.hires_resize)  # (its form)
    for flag, value, ok, valid in (
            ("--strength", args.strength, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("--hires-scale", args.hires_scale, lambda v: 1 <= v <= 4, "in [1, 4] (A1111's slider)"),
            ("--guidance-rescale", args.guidance_rescale, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("--variation-strength", args.variation_strength, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("--threshold-range", args.threshold_range, lambda v: v > 0, "above 0"),
            ("--rho", args.rho, lambda v: v > 0, "above 0"),
            ("--eta", args.eta, lambda v: v >= 0, "0 or more"),
            ("--prior-steps", args.prior_steps, lambda v: v >= 1, "at least 1"),
            ("--noise-level", args.noise_level, lambda v: v >= 0, "0 or more"),
            ("--clip-skip", args.clip_skip, lambda v: v >= 0, "0 (the last layer) or more"),
            ("--image-guidance-scale", args.image_guidance_scale, lambda v: v >= 0, "0 or more")):
        if value is not None and not ok(value):
            raise ValueError(f"{flag} must be {valid}; got {value:g}")
    if args.variation_seed is not None and args.variation_seed != -1 and not 0 <= args.variation_seed <= max_seed:
        raise ValueError(f"--variation-seed must be -1 (random) or 0..{max_seed}; got {args.variation_seed}")
    if args.hires_scale is not None and args.hires_resize:
        raise ValueError("--hires-scale and --hires-resize are two ways to size hires. fix's second pass: give one "
                         "(A1111's 'Upscale by' or its 'Resize width/height to')")
    if args.emphasis_mode and args.emphasis is False:
        raise ValueError(f"--no-emphasis and --emphasis-mode {args.emphasis_mode!r}: give one (--emphasis-mode None "
                         "reads brackets as text)")
    if args.a1111_prompts:
        off = [f"--no-{f.replace('_', '-')}" for f in ("emphasis", "long_prompts", "prompt_editing", "composable")
               if getattr(args, f) is False]
        if off:
            raise ValueError(f"--a1111-prompts turns on --emphasis, --long-prompts, --prompt-editing and --composable "
                             f"together; with {', '.join(off)} give the ones wanted instead")
    karras_name = bool(args.sampler) and _karras_name(args.sampler)  # (--a1111-sampling: a1111_settings says it)
    if (args.karras or karras_name) and args.sigma_schedule not in (None, "karras") and not args.a1111_sampling:
        asks = "--karras" if args.karras else f"--sampler {args.sampler!r}"
        raise ValueError(f"{asks} asks for Karras levels and --schedule-type {args.sigma_schedule} for others: give "
                         "one (a '... Karras' name is the sampler with --schedule-type karras)")
    if (args.hires_scale is not None or args.hires_resize) and args.init_image:
        raise ValueError("--hires-scale / --hires-resize start from text (A1111's txt2img hires. fix); with "
                         "--init-image leave them out")
    _check_sd_upscale(args)
    if args.infotext:  # (an infotext's or a record's values are the run's as it was: not said to do nothing)
        return
    for flag, given, needs in (
            ("--variation-seed", args.variation_seed is not None and not args.variation_strength,
             "--variation-strength above 0 (how far towards its noise)"),
            ("--threshold-range", args.threshold_range is not None and not args.thresholding, "--thresholding"),
            ("--control-resolution", args.control_resolution is not None and not args.controlnet, "a --controlnet"),
            ("--control-resize", args.control_resize is not None and not args.controlnet, "a --controlnet"),
            ("--old-prompt-editing", args.old_prompt_editing and not (args.prompt_editing or args.a1111_prompts),
             "--prompt-editing (or --a1111-prompts): it changes how [from:to:when] is read")):
        if given:
            raise ValueError(f"{flag} does nothing without {needs}")


def _upscaler_models(args) -> tuple[list[str], str]:
    """The upscaler models --upscaler-dir holds (by A1111's names), and the words an unknown upscaler's error ends
    with: that list, or how to name a model."""
    from imagine.upscalers import A1111_NAMES, find_upscalers

    if not args.upscaler_dir:
        return [], "; or an upscaler model's file (or its name with --upscaler-dir)"
    models = [A1111_NAMES.get(stem, stem) for stem in find_upscalers(args.upscaler_dir)]
    return models, f"; models in {args.upscaler_dir}: {', '.join(models) or 'none'}"


def _sd_upscale_upscaler(args):
    """--sd-upscale-upscaler as imagine.upscalers.a1111_upscale takes it: "Lanczos" / "Nearest", None for none (the
    picture as it is), or an upscaler model."""
    from imagine.upscalers import upscaler_named

    name = args.sd_upscale_upscaler or "lanczos"
    built_in = {"lanczos": "Lanczos", "nearest": "Nearest", "none": None}
    if name.lower() in built_in:
        return built_in[name.lower()]
    model = upscaler_named(name, getattr(args, "upscaler_dir", None))
    if model is None:
        _, where = _upscaler_models(args)
        raise ValueError(f"--sd-upscale-upscaler: unknown upscaler {name!r}; valid: lanczos, nearest, none{where}")
    return model.with_precision(getattr(args, "precision", None) or "exact")


def _check_sd_upscale(args) -> None:
    """--sd-upscale's flags, before the model loads: the scale, the overlap, the upscaler's name, and the flags it
    cannot run with."""
    given = [f for f in ("sd_upscale_upscaler", "sd_upscale_overlap") if getattr(args, f) is not None]
    if args.sd_upscale is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is for --sd-upscale (A1111's SD upscale script)")
        return
    if not 0 < args.sd_upscale <= 8:
        raise ValueError(f"--sd-upscale must be in (0, 8] (A1111's scale factor); got {args.sd_upscale:g}")
    if not args.init_image:
        raise ValueError("--sd-upscale enlarges a picture: give it with --init-image")
    for flag, on in (("--mask", args.mask), ("--controlnet", args.controlnet), ("--resize-mode", args.resize_mode),
                     ("--variation-strength", args.variation_strength), ("--refiner", args.refiner),
                     ("--seed-resize-from", getattr(args, "seed_resize_from", None))):
        if on:
            raise ValueError(f"{flag} and --sd-upscale: A1111's SD upscale script redraws the whole picture tile by "
                             "tile with plain image to image; leave one out")
    overlap = args.sd_upscale_overlap
    side = min(v for v in (args.width, args.height) if v is not None) if (args.width or args.height) else None
    if overlap is not None and (overlap < 0 or (side is not None and overlap >= side)):
        raise ValueError(f"--sd-upscale-overlap must be 0 or more and less than a tile's side (--width x --height"
                         f"{f': {side}' if side else ''}); got {overlap}")
    _sd_upscale_upscaler(args)


def _sd_upscale(args, pipe, jobs, seeds, init_image, call, save) -> None:
    """A1111's SD upscale script (scripts/sd_upscale.py) for each job (prompt, seed): `init_image` enlarged by
    Upscaler.upscale (a1111_upscale; "none": as it is), cut by split_grid into tiles of the run's size overlapping
    by --sd-upscale-overlap, the tiles through `call` (image to image) in batches of --batch-size (default 1), batch
    j's seeds s_j + i with s_0 the job's seed and s_(j+1) = s_j + 1 (A1111: p.seed = processed.seed + 1), put back
    by combine_grid; `save(picture, params, seed)` with the first batch's parameters, the two the script adds."""
    from imagine.upscalers import a1111_upscale, combine_grid, split_grid

    upscaler = _sd_upscale_upscaler(args)
    label = "None" if upscaler is None else upscaler if isinstance(upscaler, str) else upscaler.a1111_name
    big = init_image.convert("RGB") if upscaler is None else a1111_upscale(init_image.convert("RGB"), args.sd_upscale,
                                                                          upscaler)
    height, width = pipe.output_size(args.height, args.width)  # (the tiles: the run's size, else the model's own)
    # (A1111's 64 on its 512-px tiles: an eighth of a smaller tile's side, where 64 would not fit)
    overlap = min(64, min(width, height) // 8) if args.sd_upscale_overlap is None else args.sd_upscale_overlap
    if overlap >= min(width, height):
        raise ValueError(f"--sd-upscale-overlap {overlap} must be less than a tile's side ({width}x{height})")
    grid = split_grid(big, width, height, overlap)
    tiles = [tile for _, row in grid.rows for _, tile in row]
    batch = args.batch_size or 1
    for (prompt, _), seed in zip(jobs, seeds):
        done, first, s = [], None, seed
        for j in range(0, len(tiles), batch):
            part = tiles[j:j + batch]
            res = call([prompt] * len(part), [s + i for i in range(len(part))], part, height, width)
            first = first or res
            done += list(res.images)
            s += 1
        it = iter(done)
        picture = combine_grid(dataclasses.replace(grid, rows=[(y, [(x, next(it)) for x, _ in row])
                                                               for y, row in grid.rows]))
        params = {**{k: v for k, v in first.parameters.items() if k not in ("prompt", "negative_prompt")},
                  "prompt": prompt, "negative_prompt": args.negative_prompt or "", "seed": seed,
                  "sd_upscale_overlap": overlap, "sd_upscale_upscaler": label}
        save(picture, params, seed)


def _check_memory(args) -> None:
    """A size no machine here could hold refused before it is drawn (the system would kill the run part-way, with no
    word): the final picture's float32 pixels alone, a bound far below what the model takes, against the memory."""
    if args.height is None or args.width is None or min(args.height, args.width) <= 0:  # (said later)
        return
    scale = 1.0
    if args.hires_resize:
        w, h = _hires_resize(args.hires_resize)
        scale = max(w / args.width, h / args.height)
    elif args.hires_scale is not None:
        scale = args.hires_scale
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (no sysconf: not said)
        return
    need = 12 * args.height * args.width * scale * scale  # (RGB float32)
    if need > memory:
        raise ValueError(f"--height {args.height} --width {args.width}"
                         f"{' with hires. fix' if scale != 1 else ''}: the picture's pixels alone take "
                         f"{need / 2**30:.0f} GiB as float32, more than this machine's {memory / 2**30:.0f} GiB of "
                         "memory; give a smaller size")


def run(args) -> int:
    from imagine.pipelines.text_to_image import MAX_SEED, TextToImagePipeline

    for note in getattr(args, "_infotext_notes", None) or []:  # (what an --infotext left out or assumed: said
        print(f"imagine: --infotext: {note}", file=sys.stderr)  # with -q too, which only stops the progress bar)
    if _cascade_model(args.model) == "UnCLIPImageVariationPipeline":
        return _karlo_variations_run(args, MAX_SEED)
    for flag in ("interpolate_to", "text_diff", "frames", "max_theta"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for Karlo's image-variation folder (an "
                             f"UnCLIPImageVariationPipeline), and {args.model or 'the embedded model'} is not one")
    prompts = _prompts(args)
    checkpoint = _imagen_checkpoint(args.model)
    if checkpoint is not None or _cascade_model(args.model) == "ImagenPipeline":
        return _imagen_run(args, prompts, MAX_SEED, checkpoint)
    for flag, given in (("--text-encoder", args.text_encoder is not None), ("--ema-weights", args.ema_weights)):
        if given:
            raise ValueError(f"{flag} is for an imagen-pytorch checkpoint (--model FILE: a dict with 'model' and "
                             f"'imagen_params'), and {args.model or 'the embedded model'} is not one")
    for flag, given in (("--start-image", args.start_image), ("--start-at-stage", args.start_at_stage)):
        if given is not None and not _cascade_model(args.model) and args.stage_2 is None:
            raise ValueError(f"{flag} is for an Imagen cascade (its super-resolution stages enlarge a picture), and "
                             f"{args.model or 'the embedded model'} is not one; for image to image give --init-image")
    if args.inpaint_resample_times is not None:
        raise ValueError(f"--inpaint-resample-times is RePaint's passes for an Imagen cascade's inpainting, and "
                         f"{args.model or 'the embedded model'} is not one (its --mask inpainting is diffusers')")
    if _cascade_model(args.model) == "UnCLIPPipeline" and args.stage_2 is None:
        return _karlo_run(args, prompts, MAX_SEED)
    if _cascade_model(args.model) or args.stage_2 is not None:
        return _cascade_run(args, prompts, MAX_SEED)
    stages = [f"--{f.replace('_', '-')}" for f in ("stage_2_steps", "stage_2_guidance_scale", "stage_2_sampler",
                                                    "stage_3", "stage_3_noise_level") if getattr(args, f) is not None]
    if stages:  # (a latent model has no later stages: the flags would do nothing)
        raise ValueError(f"{', '.join(stages)}: for a pixel cascade's later stages (DeepFloyd IF with --stage-2, a "
                         f"Karlo folder); {args.model or 'the embedded model'} is a latent model")
    for flag in ("hires_sampler", "hires_schedule_type"):
        if getattr(args, flag) in ("Use same sampler", "Use same scheduler"):  # (A1111's labels for "as the first")
            setattr(args, flag, None)
    if args.hires_steps == 0:  # (A1111's "Hires steps: 0": the first pass's steps)
        args.hires_steps = None
    _check_values(args, MAX_SEED)  # (names, ranges, flags that would do nothing: before the model loads)
    _check_memory(args)
    seed_resize = {}  # (read before the model loads: a bad value fails fast)
    if args.seed_resize_from:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", args.seed_resize_from)
        if not m or 0 in (int(m[1]), int(m[2])):
            raise ValueError(f"--seed-resize-from must be WIDTHxHEIGHT in pixels, e.g. 512x512; got "
                             f"{args.seed_resize_from!r}")
        seed_resize = {"seed_resize_from_w": int(m[1]), "seed_resize_from_h": int(m[2])}
    if args.style or args.styles_file:  # A1111's prompt styles, merged into every prompt and the negative prompt
        from imagine.styles import apply_styles, pick_styles, read_styles

        if not (args.style and args.styles_file):
            raise ValueError("--style NAME takes its text from --styles-file CSV (A1111's styles.csv): give both")
        chosen = pick_styles(read_styles(args.styles_file), args.style)
        prompts = [apply_styles(p, "", chosen)[0] for p in prompts]
        args.negative_prompt = apply_styles("", args.negative_prompt or "", chosen)[1] or None
        if args.hires_prompt:  # (the hires pass's own texts are styled when given, as A1111's)
            args.hires_prompt = apply_styles(args.hires_prompt, "", chosen)[0]
        if args.hires_negative_prompt:
            args.hires_negative_prompt = apply_styles("", args.hires_negative_prompt, chosen)[1]
    sampler_options = parse_sampler_options(args.sampler_option) or None
    sampling = {"sigma_schedule": args.sigma_schedule, "sampler_options": sampler_options, "start": args.start,
                **({"sigma_range": args.sigma_range} if args.sigma_range != "spaced" else {}),
                **({"strength_rule": args.strength_rule} if args.strength_rule != "diffusers" else {}),
                **({"discard_penultimate_sigma": True} if args.discard_penultimate_sigma else {})}
    if args.a1111_sampling:
        from imagine.samplers import a1111_settings

        if args.karras is not None or args.sigma_range != "spaced" or args.start or args.discard_penultimate_sigma \
                or args.strength_rule != "diffusers":
            raise ValueError("--a1111-sampling sets the noise levels' range, the start, the discarded level and the "
                             "image-to-image steps as AUTOMATIC1111 does (an --infotext from A1111 runs so too); leave "
                             "out --karras, --sigma-range, --start, --discard-penultimate-sigma and --strength-rule "
                             "(name a schedule type with --schedule-type), or give --no-a1111-sampling")
        a1111_settings(args.sampler or "euler", args.sigma_schedule)  # (a bad name fails before the model loads)
    if args.hires_steps is not None and args.hires_steps < 0:
        raise ValueError(f"--hires-steps must be at least 1 (0: the first pass's, as A1111); got {args.hires_steps}")
    if args.hires_strength is not None and not 0 < args.hires_strength <= 1:
        raise ValueError(f"--hires-strength must be in (0, 1] (A1111's hires denoising strength); got "
                         f"{args.hires_strength}")
    for flag in ("hires_sampler", "hires_schedule_type", "hires_strength", "hires_steps", "hires_prompt",
                 "hires_negative_prompt", "hires_upscaler"):
        if getattr(args, flag) is not None and args.hires_scale is None and not args.hires_resize \
                and not args.infotext:
            raise ValueError(f"--{flag.replace('_', '-')} is for hires. fix's second pass: give --hires-scale (or "
                             "--hires-resize) too")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength is how far from --init-image an image-to-image run goes: give --init-image (a "
                         "hires. fix pass's strength is --hires-strength)")
    if args.karras is False and args.sampler:
        from imagine.samplers import resolve_sampler

        if resolve_sampler(args.sampler)[2]:  # (a name that holds Karras levels: "DPM++ 2M Karras", k_dpmpp_2m_ka)
            raise ValueError(f"--no-karras with --sampler {args.sampler!r}, a name that asks for Karras levels: give "
                             "the sampler's name without 'Karras', or leave out --no-karras")
    if args.hires_sampler or args.hires_schedule_type:
        from imagine.samplers import a1111_settings

        a1111_settings(args.hires_sampler or args.sampler or "euler", args.hires_schedule_type)  # (names checked)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1; got {args.steps}")
    if args.noise_seed_delta < 0:
        raise ValueError(f"--noise-seed-delta (--ensd) must be 0 or more; got {args.noise_seed_delta}")
    if args.num_images < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--num-images and --batch-size must be at least 1")
    if args.seed != -1 and not 0 <= args.seed <= MAX_SEED:  # not wrapped: the PNG would name another seed
        if getattr(args, "_infotext_seed", None) == args.seed:
            raise ValueError(f"--infotext {args.infotext}: its Seed {args.seed} is outside imagine's seeds, "
                             f"0..{MAX_SEED}; give --seed")
        raise ValueError(f"--seed must be -1 (random) or 0..{MAX_SEED}; got {args.seed}")
    for side in ("height", "width"):
        if getattr(args, side) is not None and getattr(args, side) <= 0:
            raise ValueError(f"--{side} must be a positive number of pixels; got {getattr(args, side)}")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise FileNotFoundError(f"--lora-dir: {args.lora_dir} is not a folder")
    # (in its own mode: the pipelines take it as diffusers' do, image to image as RGB, unCLIP's variations with
    # any transparency on white as CLIP's image processor)
    init_image = _read_image(args.init_image, mode=None) if args.init_image else None
    mask_image = _read_mask(args)
    controlnets, control_images = _read_controls(args)
    picture = {}  # image to image (A1111's default strength 0.75), inpainting (the pipeline's, 1, unless given)
    if init_image is not None:
        inpainting = mask_image is not None
        picture = {"init_image": init_image,
                   "strength": args.strength if args.strength is not None or inpainting else 0.75}
        if inpainting:
            picture["mask_image"] = mask_image
            if args.masked_content:
                picture["masked_content"] = args.masked_content
        if args.resize_mode:
            picture["resize_mode"] = args.resize_mode
    if args.resize_mode and init_image is None:
        raise ValueError("--resize-mode needs --init-image (the picture to bring to --height x --width)")
    if args.masked_content and mask_image is None:
        raise ValueError("--masked-content needs --mask (and --init-image)")
    if args.control_mode and not controlnets:
        raise ValueError("--control-mode needs a --controlnet")
    if (args.control_start is not None or args.control_end is not None) and not controlnets:
        raise ValueError("--control-start / --control-end need a --controlnet")
    preps = parse_preprocessors(args.control_preprocessor, len(controlnets))
    if args.control_preprocessor and not controlnets:
        raise ValueError("--control-preprocessor needs a --controlnet (and its --control-image)")
    if args.control_resolution is not None and not 64 <= args.control_resolution <= 4096:
        raise ValueError(f"--control-resolution must be 64..4096 pixels; got {args.control_resolution}")
    if controlnets:  # one picture (for every prompt) per ControlNet, each at its scale
        scales = [scale for _, scale in controlnets]
        picture["control_image"] = control_images[0] if len(controlnets) == 1 else control_images
        picture["controlnet_scale"] = scales[0] if len(scales) == 1 else scales
        for flag, key in (("control_start", "control_guidance_start"), ("control_end", "control_guidance_end")):
            value = getattr(args, flag)
            if value is not None:
                if not 0 <= value <= 1:
                    raise ValueError(f"--{flag.replace('_', '-')} must be a fraction of the steps, from 0 to 1; got "
                                     f"{value}")
                picture[key] = value
    for flag, given in (("--refiner-switch", args.refiner_switch is not None),
                        ("--refiner-switch-by-steps", args.refiner_switch_by_steps)):
        if given and not args.refiner:
            raise ValueError(f"{flag} needs --refiner")
    if args.refiner:
        if not Path(args.refiner).exists():
            raise FileNotFoundError(f"--refiner: {args.refiner} not found")
        from imagine.refiner import SWITCH, check_switch

        picture["refiner_switch"] = check_switch(SWITCH if args.refiner_switch is None else args.refiner_switch)
        if args.refiner_switch_by_steps:
            picture["refiner_switch_by_steps"] = True
    jobs = [(p, i) for p in prompts for i in range(args.num_images)]
    many = len(jobs) > 1 or bool(args.from_file)
    out_dir, out_file = _output_target(args.output, many)
    if args.dtype == "bfloat16" and args.precision != "fast":
        if getattr(args, "_record_dtype", None) == "bfloat16":  # (the picture's, not asked: exact mode's weights)
            args.dtype = "float32"
        else:
            raise ValueError("--dtype bfloat16 is for --precision fast (exact mode computes in float32 on float32 "
                             "weights)")
    if args.lora_dir is None:  # (a tag no --lora merges and no --lora-dir holds: said before the model loads)
        from imagine.pipelines.text_to_image import LORA_TAG

        merged = {Path(path).stem for path, *_ in parse_loras(args.lora)}
        for text in [*prompts, args.negative_prompt or "", args.hires_prompt or "", args.hires_negative_prompt or ""]:
            for m in LORA_TAG.finditer(text):
                if m[1].strip() not in merged:
                    raise ValueError(f"the prompt asks for {m[0]}, which no --lora merges: give the folder of LoRAs "
                                     f"that holds {m[1].strip()} (--lora-dir), or --lora PATH/{m[1].strip()}"
                                     ".safetensors, or take the tag out of the prompt")
    pipe = TextToImagePipeline.from_pretrained(args.model, precision=args.precision, vae=args.vae,
                                               dtype=getattr(__import__("torch"), args.dtype),
                                               loras=parse_loras(args.lora),
                                               embeddings=parse_embeddings(args.embedding),
                                               controlnets=[path for path, _ in controlnets], refiner=args.refiner,
                                               prediction_type=args.prediction_type, tokenizer=args.tokenizer,
                                               tokenizer_2=args.tokenizer_2, clip_skip=args.clip_skip)
    pipe.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    asked_sampler = args.sampler or pipe.defaults["sampler"]
    hires_sampling = getattr(args, "_hires_sampling", None)  # (a run again from its record: as it ran)
    a1111_hires_schedule = getattr(args, "_a1111_hires_schedule", None)
    hires_named = bool(args.hires_sampler or args.hires_schedule_type)  # (A1111's hires sampler: the second pass's)
    hires_sampler = args.hires_sampler or asked_sampler
    # --eta and --sampler-option go to each pass whose sampler takes them, as A1111 hands p.eta and its sigma
    # settings to whichever sampler it makes (where neither pass's takes one, the first's refusal names it)
    first_eta, first_options = _pass_settings(asked_sampler, args.eta, sampler_options,
                                              hires_sampler if hires_named else None)
    hires_eta, hires_options = _pass_settings(hires_sampler, args.eta, sampler_options, asked_sampler)
    args.eta, sampling["sampler_options"] = first_eta, first_options
    if hires_named:
        hires_sampling = {"sampler": hires_sampler, "karras": args.karras, "rho": args.rho,
                          "final_step": args.final_step, **sampling, "sampler_options": hires_options,
                          "eta": hires_eta}
        if args.hires_schedule_type:  # (a schedule type named, "Automatic" the model's own: no Karras flag over it)
            from imagine.samplers import a1111_schedule

            hires_sampling.update(sigma_schedule=a1111_schedule(args.hires_schedule_type), karras=None)
    if args.a1111_sampling:
        from imagine.samplers import a1111_guidance_scale

        # (A1111's run of each pass's sampler, and the schedule type its infotext names: _a1111_sampling)
        args.sampler, sampling, args.eta, a1111_schedule = _a1111_sampling(asked_sampler, args.sigma_schedule,
                                                                           first_options, first_eta)
        if hires_named:
            name, hires, eta, a1111_hires_schedule = _a1111_sampling(
                hires_sampler, args.hires_schedule_type or args.sigma_schedule, hires_options, hires_eta)
            hires_sampling = {"sampler": name, "eta": eta, **hires}
        # (DDIM CFG++: A1111's CFG scale / 12.5 is CFG++'s lambda)
        args.guidance_scale = a1111_guidance_scale(args.sampler, pipe.defaults["guidance_scale"]
                                                   if args.guidance_scale is None else args.guidance_scale)
    conditioned = _picture_model_run(pipe, args, picture)
    if args.a1111_sampling and conditioned is not None:
        raise ValueError(f"--a1111-sampling: not for {args.model}, whose pipeline (an upscaler, unCLIP variations or "
                         "a prior) runs its samplers diffusers' way; leave it out")
    if pipe.edits:  # instruct-pix2pix: the picture conditions every step; the run starts from noise unless
        if args.strength is None:  # a strength is given (diffusers' pipeline)
            picture.pop("strength", None)
        if args.image_guidance_scale is not None:
            picture["image_guidance_scale"] = args.image_guidance_scale
    elif args.image_guidance_scale is not None:
        raise ValueError("--image-guidance-scale is for instruct-pix2pix models (8-channel U-Nets); this one is not")
    height, width = args.height, args.width  # a side not given is the model's own (the pipeline's rule)
    if height is not None or width is not None:
        pipe.check_size(height or 8 * pipe.scale, width or 8 * pipe.scale)  # before the first image, not after
    control_units = None
    if controlnets:  # the maps made and fitted to the image's size, as the pipeline will choose it
        size_h, size_w = pipe.output_size(height, width, init_image if init_image is not None else control_images[0])
        maps, used = prepare_control_maps(control_images, preps, size_w, size_h, args.control_resize or "just_resize",
                                          args.control_resolution)
        picture["control_image"] = maps[0] if len(maps) == 1 else maps
        control_units = [(name, scale, picture.get("control_guidance_start", 0.0), picture.get("control_guidance_end",
                                                                                                  1.0), *u,
                          args.control_mode or "balanced")
                         for (name, _), (_, scale), u in zip(pipe.controlnets, controlnets, used)]
        if args.control_mode:
            picture["control_mode"] = args.control_mode
    number = 0  # (the next image's NNNNN- number in a --from-file folder)
    if many:
        out_dir.mkdir(parents=True, exist_ok=True)
        number = _next_number(out_dir)
    import random

    base = random.randint(0, MAX_SEED) if args.seed < 0 else args.seed
    variation = (random.randint(0, MAX_SEED) if args.variation_seed is None or args.variation_seed < 0
                 else args.variation_seed)
    def call(run, prompts, seeds, subseeds, picture):
        return run(prompts, args.negative_prompt, steps=args.steps,
                   guidance_scale=args.guidance_scale, sampler=args.sampler, seeds=seeds,
                   height=height, width=width, guidance_rescale=args.guidance_rescale,
                   karras=args.karras, eta=args.eta, thresholding=args.thresholding,
                   threshold_range=args.threshold_range,
                   final_step=args.final_step, rho=args.rho, **sampling,
                   emphasis=args.emphasis_mode or args.emphasis or args.a1111_prompts,
                   long_prompts=args.long_prompts or args.a1111_prompts,
                   prompt_editing=args.prompt_editing or args.a1111_prompts,
                   composable=args.composable or args.a1111_prompts,
                   **({"subseeds": subseeds, "subseed_strength": args.variation_strength} if subseeds else {}),
                   **seed_resize, progress=not args.quiet,
                   **({"rng": args.rng} if args.rng != "cpu" else {}),
                   **({"noise_seed_delta": args.noise_seed_delta} if args.noise_seed_delta else {}),
                   **({"zero_terminal_snr": True} if args.zero_terminal_snr else {}),
                   **({"downcast_alphas_cumprod": True} if args.downcast_alphas_cumprod else {}),
                   **({"old_prompt_editing": True} if args.old_prompt_editing else {}),
                   **({"pad_conds": args.pad_conds} if args.pad_conds else {}),
                   **picture)

    if args.sd_upscale is not None:  # (A1111's SD upscale script: each image is a picture's tiles redrawn)
        if conditioned is not None:
            raise ValueError(f"--sd-upscale redraws tiles with a text-to-image model's image to image; "
                             f"{args.model} runs its own picture pipeline (an upscaler, unCLIP variations or a prior)")

        def tiles_run(prompts, seeds, tiles, tile_h, tile_w):
            nonlocal height, width
            height, width = tile_h, tile_w
            return call(conditioned or pipe.generate, prompts, seeds, None, {**picture, "init_image": tiles})

        def save(img, params, seed):
            nonlocal number
            path, number = _save_image(img, params, seed, many, out_dir, out_file, number)
            print(path, flush=True)

        _sd_upscale(args, pipe, jobs, [(base + k) % (MAX_SEED + 1) for k in range(len(jobs))], init_image, tiles_run,
                    save)
        return 0
    for start, end in _batches(pipe, jobs, args):
        chunk = jobs[start:end]
        # (A1111's rule: with a variation seed at work every image keeps the seed; the variation seeds count up)
        seeds = [(base + (0 if args.variation_strength else start + k)) % (MAX_SEED + 1) for k in range(len(chunk))]
        run = conditioned or pipe.generate
        if args.hires_scale is not None or args.hires_resize:
            run = functools.partial(pipe.generate_hires, hires_scale=2.0 if args.hires_scale is None else args.hires_scale,
                                    hires_resize=_hires_resize(args.hires_resize),
                                    hires_strength=0.7 if args.hires_strength is None else args.hires_strength,
                                    hires_steps=args.hires_steps,
                                    hires_upscaler=_hires_upscaler(args) or args.hires_upscaler or "latent",
                                    hires_prompt=args.hires_prompt,
                                    hires_negative_prompt=args.hires_negative_prompt, hires_sampling=hires_sampling)
        subseeds = [(variation + start + k) % (MAX_SEED + 1) for k in range(len(chunk))] \
            if args.variation_strength else None
        res = call(run, [p for p, _ in chunk], seeds, subseeds, picture)
        for k, (img, s) in enumerate(zip(res.images, res.seeds)):
            params = {**{k2: v for k2, v in res.parameters.items() if k2 not in ("prompt", "negative_prompt")},
                      "prompt": chunk[k][0], "negative_prompt": args.negative_prompt or "", "seed": s}
            if res.subseeds:  # (A1111's "Variation seed" of this image)
                params["subseed"] = res.subseeds[k]
            if isinstance(params.get("padded_conds"), list):  # (whether this image's texts were padded)
                params["padded_conds"] = params["padded_conds"][k]
            if args.a1111_sampling:
                params["a1111_schedule"] = a1111_schedule
                if hires_sampling is not None:
                    params["a1111_hires_schedule"] = a1111_hires_schedule
            else:  # (an A1111-rule run again from its record: its infotext's naming)
                for key in ("a1111_schedule", "a1111_hires_schedule"):
                    if hasattr(args, "_" + key):
                        params[key] = getattr(args, "_" + key)
            if mask_image is not None and args.invert_mask:
                params["mask_invert"] = True  # (A1111's "Mask mode: Inpaint not masked")
            if control_units:  # the preprocessing too (A1111's ControlNet infotext)
                params["controlnet_units"] = control_units
            path, number = _save_image(img, params, s, many, out_dir, out_file, number)
            print(path, flush=True)
    return 0
