"""Loading a model folder: ours or diffusers', offline.

Both are a `model_index.json` plus one sub-folder per component (diffusers' layout). In a
diffusers folder `model_index.json` names each component's library and class
(`"unet": ["diffusers", "UNet2DConditionModel"]`); ours names the text encoder by type
(`"text_encoder": {"type": "minilm"}`) since the default's encoder comes from its own package.
Nothing here calls the hub: transformers is always given `local_files_only=True`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagine.models.io import read_json
from imagine.models.text_encoders import TextEncoder, load_text_encoder

# diffusers scheduler class -> the model's default sampler: the one of ours that follows the same algorithm, but for
# PNDM and LMS (SD 1.x's folders name them), where it is AUTOMATIC1111's default, DPM++ 2M, as the 20 default steps are
# A1111's (diffusers' default call runs PNDM over 50; `--sampler plms` is its PNDMScheduler, skip_prk_steps).
# LCMScheduler: a model saved with an LCM-LoRA fused in, whose U-Net (no guidance code) gets no LCM defaults from it
SCHEDULER_TO_SAMPLER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun", "PNDMScheduler": "dpmpp_2m", "LMSDiscreteScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}

# the defaults of diffusers' own pipelines for these models (StableDiffusionUpscalePipeline's __call__: 75 steps at
# guidance 9; StableUnCLIPPipeline's and StableUnCLIPImg2ImgPipeline's: 20 at 10), where model_index.json names none
X4_DEFAULTS = {"steps": 75, "guidance_scale": 9.0}
UNCLIP_DEFAULTS = {"steps": 20, "guidance_scale": 10.0}


@dataclass
class Components:
    unet: torch.nn.Module
    text_encoder: TextEncoder
    schedule: Any
    prediction_type: str
    vae: torch.nn.Module | None = None
    scheduler_config: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    source: str = ""
    vae_source: str = ""  # a VAE loaded in place of the model's own (imagine.loading.vae), else ""
    # a super-resolution stage's (SD's x4 upscaler): the schedule that noises its low-resolution picture (CDM's
    # conditioning augmentation), else None
    low_res_schedule: Any = None
    # an unCLIP decoder's (SD 2.1 unCLIP): the CLIP image embedder (imagine.models.image_encoder) and the schedule
    # that noises its embedding, else None
    image_embedder: Any = None
    image_noise_schedule: Any = None
    # unCLIP's text-to-image (SD 2.1 unCLIP with Karlo): the diffusion prior that makes the image embedding from the
    # prompt (imagine.models.prior.DiffusionPrior), else None
    prior: Any = None


def load_folder(root: str | Path, dtype: torch.dtype = torch.float32) -> Components:
    from imagine.models.unet import UNet2DConditionModel
    from imagine.models.vae import AutoencoderKL
    from imagine.schedules import NoiseSchedule

    root = Path(root)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(_not_a_model_folder(root))
    index = read_json(root / "model_index.json")
    if index.get("prior") and not index.get("image_normalizer"):  # DALL-E 2's own cascade (UnCLIPPipeline), Kandinsky
        karlo = index.get("_class_name") == "UnCLIPPipeline" or all(
            index.get(k) for k in ("decoder", "text_proj", "super_res_first", "super_res_last"))
        raise ValueError(f"{root} has a diffusion prior but no image_normalizer/ ({index.get('_class_name', '?')}): "
                         "the latent pipeline runs unCLIP's prior with an SD 2.1 unCLIP decoder (diffusers' "
                         "StableUnCLIPPipeline folders), not this pipeline" + (
                             "; it is Karlo's pixel cascade (diffusers' UnCLIPPipeline: prior, 64 px decoder, "
                             "super-resolution to 256 px): run it with `imagine generate --model FOLDER` or "
                             "imagine.pipelines.karlo (KarloPipeline.from_pretrained(folder)(prompt))" if karlo else ""))
    # (a half-built StableUnCLIPImg2Img folder, or DALL-E 2's variation pipeline; an SD folder's image_encoder is an
    # IP-Adapter's, [null, null] or named, and loads as SD)
    if index.get("_class_name") in ("StableUnCLIPImg2ImgPipeline", "UnCLIPImageVariationPipeline") and \
            not _named(index.get("image_normalizer")):
        raise ValueError(f"{root} has an image_encoder but no image_normalizer/ entry in model_index.json "
                         f"({index.get('_class_name', '?')}): imagine runs an image embedding through SD 2.1 unCLIP's "
                         "decoder (diffusers' StableUnCLIPImg2ImgPipeline folders: image_encoder/, feature_extractor/, "
                         "image_normalizer/ and image_noising_scheduler/), not DALL-E 2's own (UnCLIPImageVariation)")
    if index.get("_class_name") in ("IFPipeline", "IFSuperResolutionPipeline"):  # (pixels: no VAE, two stages)
        raise ValueError(f"{root} is a DeepFloyd IF stage ({index['_class_name']}), a pixel cascade: run it with "
                         "`imagine generate --model IF-I-FOLDER --stage-2 IF-II-FOLDER` or imagine.pipelines.cascade "
                         "(IFCascade, IFStage); the latent pipeline and the server do not take it")
    if index.get("_class_name") == "ImagenPipeline":  # (imagine's Imagen cascade: pixels, Efficient U-Nets)
        raise ValueError(f"{root} is an Imagen cascade (ImagenPipeline: {', '.join(map(str, index.get('unets', [])))}),"
                         " a pixel cascade: run it with `imagine generate --model FOLDER`, `imagine eval shapes "
                         "--model FOLDER` or imagine.pipelines.imagen.ImagenPipeline.from_pretrained; the latent "
                         "pipeline and the server do not take it")
    if _named(index.get("depth_estimator")):  # its U-Net takes the estimated depth map as a 5th channel
        raise ValueError(f"{root} is SD 2 depth ({index.get('_class_name', '?')}: a depth_estimator/ beside a U-Net "
                         "that takes the depth map as a 5th channel, diffusers' StableDiffusionDepth2ImgPipeline); "
                         "imagine runs SD 1.x/2.x/SDXL text-to-image, inpainting and instruct-pix2pix models, not "
                         "depth-to-image")
    for needed in ("unet", "scheduler", "text_encoder"):
        if needed not in index:
            raise ValueError(f"{root / 'model_index.json'} has no {needed!r} entry; a text-to-image folder needs "
                             f"unet, scheduler, text_encoder (and vae for latent diffusion); found "
                             f"{sorted(k for k in index if not k.startswith('_'))}")
    unet = UNet2DConditionModel.from_pretrained(root / _sub(index["unet"], "unet")).to(dtype).eval()
    vae = None
    if index.get("vae"):
        vae = AutoencoderKL.from_pretrained(root / _sub(index["vae"], "vae")).to(dtype).eval()
    te_entry = index["text_encoder"]
    defaults = dict(index.get("defaults", {}))
    if isinstance(te_entry, dict):  # ours
        text_encoder = load_text_encoder(te_entry, root=root, dtype=dtype)
    elif index.get("text_encoder_2"):  # SDXL: CLIP ViT-L and OpenCLIP ViT-bigG (with its projection)
        from imagine.models.text_encoders import SDXLTextEncoder

        classes = [e[1] if isinstance(e, list) and len(e) == 2 else None
                   for e in (te_entry, index["text_encoder_2"])]
        if classes not in (["CLIPTextModel", "CLIPTextModelWithProjection"], [None, "CLIPTextModelWithProjection"]):
            raise ValueError(f"{root}: text encoders {classes} are not SDXL's (CLIPTextModel, "
                             "CLIPTextModelWithProjection; the refiner's: none, CLIPTextModelWithProjection); imagine "
                             "loads SD 1.x, 2.x and SDXL base and refiner folders")
        first = classes[0] is not None  # the refiner has the bigG tower alone
        text_encoder = SDXLTextEncoder.from_folders(root / "text_encoder" if first else None, root / "tokenizer",
                                                    root / "text_encoder_2", root / "tokenizer_2", dtype=dtype)
        if index.get("force_zeros_for_empty_prompt", True):  # diffusers' default for SDXL
            defaults.setdefault("zero_empty_negative", True)
        if index.get("requires_aesthetics_score"):  # the refiner's size codes end with an aesthetic score
            defaults.setdefault("aesthetic_score", AESTHETIC_SCORES)
    else:  # diffusers: ["transformers", "CLIPTextModel"]
        cls = te_entry[1] if isinstance(te_entry, list) and len(te_entry) == 2 else None
        kinds = {"CLIPTextModel": "clip", "T5EncoderModel": "t5"}
        if cls not in kinds:
            raise ValueError(f"{root}: text encoder class {cls!r} is not supported; valid: {sorted(kinds)}")
        text_encoder = load_text_encoder({"type": kinds[cls], "path": "text_encoder", "tokenizer": "tokenizer"},
                                         root=root, dtype=dtype)
    sched_dir = root / _sub(index["scheduler"], "scheduler")
    sched_cfg = read_json(sched_dir / "scheduler_config.json")
    schedule = NoiseSchedule.from_diffusers_config(sched_cfg)
    sampler = SCHEDULER_TO_SAMPLER.get(sched_cfg.get("_class_name", ""))
    if sampler and "sampler" not in defaults:
        defaults["sampler"] = sampler
    low_res = None
    if index.get("low_res_scheduler"):  # diffusers' StableDiffusionUpscalePipeline (SD's x4 upscaler)
        low_res = NoiseSchedule.from_diffusers_config(read_json(
            root / _sub(index["low_res_scheduler"], "low_res_scheduler") / "scheduler_config.json"))
        defaults.setdefault("max_noise_level", int(index.get("max_noise_level", 350)))
        for k, v in X4_DEFAULTS.items():
            defaults.setdefault(k, v)
    embedder = image_noise = prior = None
    if index.get("image_normalizer") and (index.get("image_encoder") or index.get("prior")):
        # diffusers' StableUnCLIPImg2ImgPipeline (a picture's CLIP embedding) or StableUnCLIPPipeline (a prior's)
        from imagine.models.image_encoder import ImageEmbedder

        embedder = ImageEmbedder.from_folder(root, dtype, encoder=bool(index.get("image_encoder")))
        for k, v in UNCLIP_DEFAULTS.items():
            defaults.setdefault(k, v)
        image_noise = NoiseSchedule.from_diffusers_config(read_json(
            root / _sub(index.get("image_noising_scheduler", []), "image_noising_scheduler") / "scheduler_config.json"))
        if index.get("prior"):
            from imagine.models.prior import DiffusionPrior

            prior = DiffusionPrior.from_folder(root, index, dtype)
            width = prior.model.config["clip_embed_dim"] or prior.model.embedding_dim
            if width != embedder.dim:
                raise ValueError(f"{root}: the prior makes {width}-wide image embeddings, the decoder's normalizer "
                                 f"has {embedder.dim}")
    return Components(unet=unet, text_encoder=text_encoder, schedule=schedule, vae=vae,
                      prediction_type=sched_cfg.get("prediction_type", "epsilon"), scheduler_config=sched_cfg,
                      defaults=defaults, source=str(root), low_res_schedule=low_res, image_embedder=embedder,
                      image_noise_schedule=image_noise, prior=prior)


# The SDXL refiner's aesthetic-score conditioning (Podell et al. 2023, sec. 2.5): the score given with the prompt and
# with the negative prompt, diffusers' aesthetic_score / negative_aesthetic_score defaults and AUTOMATIC1111's
# "SDXL high / low aesthetic score" options
AESTHETIC_SCORES = (6.0, 2.5)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _not_a_model_folder(root: Path) -> str:
    """The error for a folder without model_index.json: what a model folder needs, and what to
    pass instead when the folder is one component of a model or holds a single-file checkpoint."""
    if not root.exists():
        return (f"model folder not found: {root} (give a model folder with model_index.json, or a .safetensors / "
                ".ckpt single-file checkpoint)")
    if not root.is_dir():
        return f"{root} is a file, not a model folder; load it as a single-file checkpoint"
    needs = (f"{root} has no model_index.json, so it is not a model folder: a model folder (diffusers' "
             "save_pretrained layout, or ours) has model_index.json and one sub-folder per component (unet/, vae/, "
             "text_encoder/, tokenizer/, scheduler/)")
    config = root / "config.json"
    if config.is_file() or (root / "scheduler_config.json").is_file():
        cls = ""
        try:
            cls = json.loads(config.read_text()).get("_class_name", "") if config.is_file() else "a scheduler"
        except (OSError, ValueError, AttributeError):
            pass
        what = f" ({cls})" if cls else ""
        parent = root.parent
        if (parent / "model_index.json").is_file():
            hint = f"pass its parent folder {parent}, which has model_index.json"
        else:
            hint = f"pass the model folder it belongs to (its parent {parent} has no model_index.json either)"
        return (f"{needs}. It looks like one component of a diffusers model{what}, the {root.name}/ sub-folder: "
                f"{hint}")
    checkpoints = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if checkpoints:
        shown = ", ".join(checkpoints[:5]) + (f" ... ({len(checkpoints)} files)" if len(checkpoints) > 5 else "")
        return (f"{needs}. It holds {shown}: to load a single-file checkpoint, pass the file itself, e.g. "
                f"{root / checkpoints[0]}")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    listing = ", ".join(found[:10]) + (f" ... ({len(found)} entries)" if len(found) > 10 else "")
    return f"{needs}; found {listing or 'nothing'}"


def _named(entry) -> bool:
    # a model_index.json entry that names a component (["library", "Class"]), not diffusers' [null, null] for an
    # optional one left out
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _sub(entry, default: str) -> str:
    # ours: "unet" (a folder name); diffusers: ["diffusers", "UNet2DConditionModel"] (folder = key)
    return entry if isinstance(entry, str) else default
