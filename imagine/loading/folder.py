"""Loading a model folder: ours or diffusers', offline.

Both are a `model_index.json` plus one sub-folder per component (diffusers' layout). In a
diffusers folder `model_index.json` names each component's library and class
(`"unet": ["diffusers", "UNet2DConditionModel"]`); ours names the text encoder by type
(`"text_encoder": {"type": "minilm"}`) since the default's encoder comes from its own package.
Nothing here calls the hub: transformers is always given `local_files_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagine.models.io import read_json
from imagine.models.text_encoders import TextEncoder, load_text_encoder

# diffusers scheduler class -> the sampler of ours that follows the same algorithm
SCHEDULER_TO_SAMPLER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun", "PNDMScheduler": "dpmpp_2m", "LMSDiscreteScheduler": "dpmpp_2m",
}


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


def load_folder(root: str | Path, dtype: torch.dtype = torch.float32) -> Components:
    from imagine.models.unet import UNet2DConditionModel
    from imagine.models.vae import AutoencoderKL
    from imagine.schedules import NoiseSchedule

    root = Path(root)
    index = read_json(root / "model_index.json")
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
    if isinstance(te_entry, dict):  # ours
        text_encoder = load_text_encoder(te_entry, root=root, dtype=dtype)
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
    defaults = dict(index.get("defaults", {}))
    sampler = SCHEDULER_TO_SAMPLER.get(sched_cfg.get("_class_name", ""))
    if sampler and "sampler" not in defaults:
        defaults["sampler"] = sampler
    return Components(unet=unet, text_encoder=text_encoder, schedule=schedule, vae=vae,
                      prediction_type=sched_cfg.get("prediction_type", "epsilon"), scheduler_config=sched_cfg,
                      defaults=defaults, source=str(root))


def _sub(entry, default: str) -> str:
    # ours: "unet" (a folder name); diffusers: ["diffusers", "UNet2DConditionModel"] (folder = key)
    return entry if isinstance(entry, str) else default
