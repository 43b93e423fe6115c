"""Text to image: text encoder -> sampler loop with the U-Net and classifier-free guidance ->
latent -> VAE decoder -> image (Rombach et al. 2022, fig. 3; Ho & Salimans 2022 for the guidance).

Works in pixel space too (no VAE: the U-Net samples images directly, as in GLIDE/Imagen's base
stage). The same seed gives the same image at any batch size: sample i draws all its noise from
its own generator seeded `seed + i` (AUTOMATIC1111's convention for batches).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from imagine.guidance import check_threshold_range
from imagine.images import RESIZE_MODES, fit_picture, to_pil
from imagine.loading.folder import Components
from imagine.composable import ComposedConditioning, split_and
from imagine.emphasis import emphasis_record
from imagine.prompt_editing import Timeline, prompt_schedule, text_at
from imagine.refiner import check_switch, with_refiner
from imagine.samplers import default_guidance_scale, is_cfg_pp, resolve_sampler
from imagine.sampling import PerSampleNoise, make_generators, posterior_generators

log = logging.getLogger(__name__)

# the hires. fix's upscalers, ours -> AUTOMATIC1111's label: its latent upscale modes (shared.latent_upscale_modes, the
# latents resized by torch's interpolate: LATENT_UPSCALE_MODES) and the picture upscalers it has without a model
# ("None" resizes with Lanczos, as its images.resize_image does)
HIRES_UPSCALERS = {"latent": "Latent", "latent_antialiased": "Latent (antialiased)", "latent_bicubic": "Latent (bicubic)",
                   "latent_bicubic_antialiased": "Latent (bicubic antialiased)", "latent_nearest": "Latent (nearest)",
                   "latent_nearest_exact": "Latent (nearest-exact)", "none": "None", "lanczos": "Lanczos",
                   "nearest": "Nearest"}
LATENT_UPSCALE_MODES = {"latent": ("bilinear", False), "latent_antialiased": ("bilinear", True),
                        "latent_bicubic": ("bicubic", False), "latent_bicubic_antialiased": ("bicubic", True),
                        "latent_nearest": ("nearest", False), "latent_nearest_exact": ("nearest-exact", False)}
# generate's keywords that say how a pass samples: hires. fix's second pass takes its own set (A1111's "Hires sampler",
# "Hires schedule type"), and the parameters of its result keep the first pass's (the param keys named so)
SAMPLING_KEYWORDS = ("sampler", "sigma_schedule", "karras", "eta", "rho", "final_step", "sampler_options", "start",
                     "sigma_range", "discard_penultimate_sigma", "strength_rule")
_SAMPLING_PARAMS = ("sampler", "schedule_type", "schedule_rho", "eta", "final_step", "start", "sampler_options",
                    "sigma_range", "discard_penultimate_sigma")
MASKED_CONTENTS = ("original", "latent_noise", "latent_nothing")  # inpainting's start where painted anew (A1111's)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # LoRA files in a lora_dir, as AUTOMATIC1111 lists them
# AUTOMATIC1111's <lora:name[:s[:unet s...]]>, and <lyco:...>, its alias of the same tag (LyCORIS files load alike)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?((?::[^:>]*)*)>")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "default"
MAX_SEED = 2**32 - 1
_HASH_LIST_SYMBOLS = str.maketrans("", "", ":,")
MAX_SEED_RESIZE = 8192  # pixels: AUTOMATIC1111's seed_resize_from_h/w (its sliders end at 2048)
# a guidance-distilled LCM's defaults (its U-Net has time_cond_proj_dim): diffusers' LatentConsistencyModelPipeline's
# __call__ (4 steps at guidance 8.5) with LCMScheduler's multistep consistency sampling
LCM_DEFAULTS = {"steps": 4, "guidance_scale": 8.5, "sampler": "lcm"}


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: dict[str, Any]
    seconds: float = 0.0
    latents: torch.Tensor | None = field(default=None, repr=False)
    negatives: list | None = field(default=None, repr=False)  # per image, None where not given (SDXL: zeros)
    subseeds: list[int] | None = None  # A1111's variation seeds, per image (with subseed_strength > 0)


class TextToImagePipeline:
    def __init__(self, components: Components, precision: str = "exact"):
        if precision not in ("exact", "fast"):
            raise ValueError(f"precision must be 'exact' (fp32) or 'fast' (bf16, channels-last where the CPU has "
                             f"native bf16); got {precision!r}")
        self.c = components
        self.precision = precision
        if precision == "fast":
            from imagine.hardware import native_bf16

            if not native_bf16():
                log.warning("precision 'fast': this CPU has no native bfloat16 (AVX512-BF16 or AMX), so the fast "
                            "mode runs in float32 (emulated bf16 would be many times slower), with Winograd "
                            "convolutions where they pay (imagine.models.winograd; $IMAGINE_WINOGRAD_GB caps "
                            "their memory)")
        self.unet = components.unet.eval().requires_grad_(False)
        self.vae = components.vae.eval().requires_grad_(False) if components.vae is not None else None
        u = self.unet.config
        if u.addition_embed_type == "text_time" and not hasattr(components.text_encoder, "towers"):
            raise ValueError(f"{components.source or 'this model'}: its U-Net is SDXL's (text_time conditioning), but "
                             "its text encoder is one CLIP tower; an SDXL folder needs text_encoder_2/ and tokenizer_2/ "
                             "beside text_encoder/ and tokenizer/")
        width = getattr(components.text_encoder, "dim", None)
        if u.has_cross_attention and isinstance(width, int) and width != u.cross_attention_dim:
            raise ValueError(f"{components.source or 'this model'}: the text encoder gives {width}-wide states, the "
                             f"U-Net cross-attends to {u.cross_attention_dim}: they belong to different models")
        inputs, latent = self.unet.config.in_channels, self.latent_channels
        if components.low_res_schedule is not None:  # a super-resolution stage: the picture's RGB beside its latents
            if inputs != latent + 3 or self.vae is None:
                raise ValueError(f"{components.source or 'this model'}: an upscaler (it has a low_res_scheduler) "
                                 f"needs a VAE and a U-Net taking {latent} + 3 input channels; its takes {inputs}")
        elif inputs == latent + 3 and self.vae is not None:  # (an x4 upscaler's U-Net without its low_res_scheduler)
            raise ValueError(f"{components.source or 'this model'}: its U-Net takes {latent} + 3 input channels, an "
                             "upscaler's (the picture's RGB beside the latents), but the folder names no "
                             "low_res_scheduler (model_index.json's low_res_scheduler entry and low_res_scheduler/, as "
                             "diffusers' StableDiffusionUpscalePipeline saves them)")
        elif inputs not in (latent, 2 * latent + 1, 2 * latent) or (inputs != latent and self.vae is None):
            raise ValueError(f"{components.source or 'this model'}: its U-Net takes {inputs} input channels; imagine "
                             f"runs U-Nets that take the {latent} channels of the noisy latents, or "
                             f"{2 * latent + 1} (an inpainting model's: noisy latents, mask, masked-picture latents), or "
                             f"{2 * latent} (instruct-pix2pix's: noisy latents, the picture's latents)")
        self.text_encoder = components.text_encoder
        self.schedule = components.schedule
        self.prediction_type = components.prediction_type
        self.defaults = {"steps": 20, "guidance_scale": 7.5, "sampler": "dpmpp_2m",
                         **(LCM_DEFAULTS if u.time_cond_proj_dim is not None else {}), **components.defaults}
        pooled = getattr(components.text_encoder, "pooled_dim", None)
        if u.addition_embed_type == "text_time" and pooled and "aesthetic_score" not in self.defaults and (
                u.projection_class_embeddings_input_dim - pooled == 5 * u.addition_time_embed_dim):
            from imagine.loading.folder import AESTHETIC_SCORES

            # five size codes: SDXL's refiner (its last is the aesthetic score), whatever its folder's config says
            self.defaults["aesthetic_score"] = AESTHETIC_SCORES
        self.loras: list[tuple[str, float]] = []  # (name, strength) of the LoRAs merged, in order
        # AUTOMATIC1111's LoRAs per prompt (<lora:name:s> of a file in lora_dir): merged for the prompts that ask
        # for them, the weights they change kept to be put back exactly (set_request_loras)
        self.lora_dir: Path | None = None
        self.request_loras: list[tuple[str, float]] = []
        self._lora_saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.embeddings: list[str] = []  # the words of the textual-inversion embeddings loaded
        self.embedding_files: dict[str, str] = {}  # word -> the file name it was loaded from (load_embedding)
        # A1111's hashes of the LoRAs (by name) and embeddings (by word) loaded from files, found as they load (a file
        # moved later changes nothing), for its "Lora hashes" / "TI hashes"
        self.network_hashes: dict[tuple[str, str], str] = {}
        self.controlnets: list[tuple[str, torch.nn.Module]] = []  # (name, ControlNet) loaded, in order
        self.controlnet_files: dict[str, str] = {}  # name -> the file (or folder) name it was loaded from
        self._controlnet_files: dict[Path, torch.nn.Module] = {}  # a file loaded again shares its model
        self.refiner: "TextToImagePipeline | None" = None  # SDXL's refiner (load_refiner), for generate's refiner_switch
        # (the fast mode leaves these modules as they are: it runs bf16 channels-last copies, see fast_copy)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, precision: str = "exact",
                        dtype: torch.dtype = torch.float32, vae: str | Path | None = None,
                        loras: list | None = None, embeddings: list | None = None, controlnets: list | None = None,
                        refiner: str | Path | None = None, **single_file) -> "TextToImagePipeline":
        """`path`: a model folder (ours or diffusers'), an original single-file checkpoint
        (.safetensors / .ckpt), or None for the embedded default model. `vae`: a VAE file or folder
        that replaces the model's own (`imagine.loading.vae`; AUTOMATIC1111's "SD VAE"). `loras`: LoRA files
        to merge, each a path or (path, strength) (`load_lora`). `embeddings`: textual-inversion files, each a
        path or (path, word) (`load_embedding`). `controlnets`: ControlNet files or folders, each a path or (path,
        name) (`load_controlnet`). `refiner`: an SDXL refiner's folder or file (`load_refiner`). `single_file`:
        options of `load_single_file` (tokenizer, prediction_type, scaling_factor, unet_config,
        clip_skip); an error for a folder, which carries all of them in its configs."""
        if path is None:
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                                        "reinstall imagine or pass --model PATH")
            path = DEFAULT_MODEL_DIR
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model not found: {path} (give a model folder with model_index.json, "
                                    "or a .safetensors / .ckpt single-file checkpoint)")
        given = {k: v for k, v in single_file.items() if v is not None}
        clip_skip = given.pop("clip_skip", None) if path.is_dir() else None  # a folder's configs do not carry it
        if path.is_dir():
            from imagine.loading.folder import load_folder

            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only for single-file checkpoints; the model folder "
                                 f"{path} carries these in its own configs")
            comps = load_folder(path, dtype=dtype)
        else:
            from imagine.loading.single_file import load_single_file
            from imagine.loading.vae import load_vae

            vae_model = load_vae(vae, dtype) if vae is not None else None  # (read once; also for a file without one)
            comps = load_single_file(path, dtype=dtype, vae=vae_model, **given)
        if clip_skip is not None:
            if not hasattr(comps.text_encoder, "clip_skip"):
                raise ValueError(f"clip_skip: {path}'s text encoder is not CLIP ({comps.text_encoder.kind})")
            comps.text_encoder.clip_skip = clip_skip
        if vae is not None:
            comps = replace_vae(comps, vae, dtype, vae_model if not path.is_dir() else None)
        pipe = cls(comps, precision=precision)
        # (the embedding files first: a word a LoRA also bundles keeps the file's vectors, as in AUTOMATIC1111)
        for item in embeddings or []:
            emb, word = (item, None) if isinstance(item, (str, Path)) else item
            pipe.load_embedding(emb, word)
        for item in loras or []:
            lora, strength = (item, 1.0) if isinstance(item, (str, Path)) else item
            pipe.load_lora(lora, strength)
        for item in controlnets or []:
            net, name = (item, None) if isinstance(item, (str, Path)) else item
            pipe.load_controlnet(net, name)
        if refiner is not None:
            pipe.load_refiner(refiner, **{k: v for k, v in given.items() if k in ("tokenizer_2",)})
        return pipe

    def load_refiner(self, path, **single_file) -> "TextToImagePipeline":
        """Add SDXL's refiner (Podell et al. 2023, sec. 2.5; `imagine.refiner`): a refiner folder or original
        file, or a pipeline of one, for the last steps of `generate(..., refiner_switch=...)`. It must denoise
        this model's latents on this model's noise schedule. Returns the refiner's pipeline."""
        if not isinstance(path, TextToImagePipeline) and Path(path).is_file() and not single_file.get("tokenizer_2"):
            own = Path(self.c.source) / "tokenizer_2"  # a refiner file reads bigG's tokenizer, which an SDXL
            if own.is_dir():  # folder beside it has
                single_file["tokenizer_2"] = own
        refiner = path if isinstance(path, TextToImagePipeline) else TextToImagePipeline.from_pretrained(
            path, precision=self.precision, dtype=self.unet.dtype, **single_file)
        where = refiner.c.source or "the refiner"
        if refiner.latent_channels != self.latent_channels or refiner.scale != self.scale or \
                refiner.unet.config.in_channels != refiner.latent_channels:
            raise ValueError(f"{where}: it denoises {refiner.unet.config.in_channels}-channel latents at 1/{refiner.scale} "
                             f"of the size; this model's are {self.latent_channels}-channel at 1/{self.scale}")
        spaces = [p.vae.config.latent_space() if p.vae is not None else None for p in (refiner, self)]
        if spaces[0] != spaces[1]:
            raise ValueError(f"{where}: its VAE maps latents by {spaces[0]}, this model's by {spaces[1]}: a refiner "
                             "continues this model's latents, so it must work in the same latent space")
        if refiner.prediction_type != self.prediction_type or not torch.allclose(
                refiner.schedule.alphas_cumprod.double(), self.schedule.alphas_cumprod.double(), rtol=1e-6, atol=0):
            raise ValueError(f"{where}: its noise schedule or prediction ({refiner.prediction_type}) is not this "
                             f"model's ({self.prediction_type}); a refiner continues the base model's run, so they "
                             "must share both")
        # The refiner decodes nothing (this model's VAE does), and SDXL's refiner reads the prompt with the base's own
        # bigG tower: a copy of equal weights is dropped for this model's (2.8 GB at full size in float32)
        refiner.vae = self.vae
        own, theirs = getattr(self.text_encoder, "towers", [None])[-1], refiner.text_encoder
        if own is not None and len(getattr(theirs, "towers", ())) == 1 and _same_weights(own, theirs.towers[0]):
            theirs.towers[0] = own
        self.refiner = refiner
        return refiner

    def load_controlnet(self, path, name: str | None = None) -> str:
        """Add a ControlNet (Zhang et al. 2023; `imagine.models.controlnet`): a diffusers ControlNet folder, an
        original file (`imagine.loading.controlnet`), or a ControlNetModel. It must be made for this U-Net (the
        same widths, levels and text width). Returns its name (default: the file's or folder's name, or the folder
        holding a diffusers-named file; `name#2`, `name#3`... where that is taken), which `generate`'s control
        pictures follow in the order loaded. A file loaded again (one ControlNet with two pictures, as diffusers'
        MultiControlNet and A1111's units allow) shares the model already loaded."""
        from imagine.models.controlnet import ControlNetModel

        if isinstance(path, ControlNetModel):
            net, base = path, f"controlnet{len(self.controlnets)}"
        else:
            source = Path(path).resolve()
            net = self._controlnet_files.get(source)
            if net is None:
                try:
                    from imagine.loading.controlnet import load_controlnet
                except ImportError:  # the folder reader alone
                    load_controlnet = ControlNetModel.from_pretrained
                net = load_controlnet(path, dtype=self.unet.dtype)
            base = Path(path).stem
            if Path(path).is_file() and base in ("diffusion_pytorch_model", "model"):
                base = Path(path).resolve().parent.name
        if name is None:
            taken = dict(self.controlnets)
            name, k = base, 2
            while name in taken:
                name, k = f"{base}#{k}", k + 1
        u, c = self.unet.config, net.config
        for what in ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types",
                     "addition_embed_type"):
            if getattr(u, what) != getattr(c, what):
                raise ValueError(f"ControlNet {name}: its {what} is {getattr(c, what)!r}, this model's U-Net has "
                                 f"{getattr(u, what)!r}; it was made for another kind of model")
        if c.in_channels != self.latent_channels:
            raise ValueError(f"ControlNet {name}: it takes {c.in_channels} latent channels, this model has "
                             f"{self.latent_channels}")
        if c.conditioning_channels != 3:
            raise ValueError(f"ControlNet {name}: it takes {c.conditioning_channels}-channel control pictures; imagine "
                             "gives ControlNets RGB pictures (3 channels)")
        if name in dict(self.controlnets):
            raise ValueError(f"a ControlNet named {name!r} is loaded already; give another name")
        self.controlnets.append((name, net.eval().requires_grad_(False)))
        if not isinstance(path, ControlNetModel):
            self._controlnet_files[Path(path).resolve()] = net
            self.controlnet_files[name] = Path(path).name
        return name

    def _without_lora_tags(self, prompt: str) -> str:
        """The prompt without AUTOMATIC1111's `<lora:name:s>` tags, each of which must name a LoRA merged into this
        model at that strength (`load_lora`): imagine merges LoRAs when the model loads, not per prompt."""
        def check(m: re.Match) -> str:
            name = m[1].strip()
            strength = _tag_strength(m)
            merged = {**dict(self.loras), **dict(self.request_loras)}
            if name not in merged:
                raise ValueError(f"the prompt asks for {m[0]}, which is not merged into this model (merged: "
                                 f"{', '.join(merged) or 'none'}); merge it when the model loads (--lora "
                                 f"PATH/{name}.safetensors:{_strength_text(strength)}), or give a folder of LoRAs "
                                 "(--lora-dir)")
            if not _same_strength(merged[name], strength):
                raise ValueError(f"the prompt asks for {m[0]}, but {name} is merged at strength "
                                 f"{_strength_text(merged[name])}; load it with --lora PATH:{_strength_text(strength)}")
            return ""

        return LORA_TAG.sub(check, prompt) if "<lora:" in prompt or "<lyco:" in prompt else prompt

    def loras_asked(self, texts: list[str]) -> list[tuple[str, Path, float]]:
        """The LoRAs of `lora_dir` that AUTOMATIC1111's `<lora:name:s>` tags in `texts` ask for, (name, file,
        strength) in the order first asked; a tag naming a LoRA merged at load is checked as `_without_lora_tags`
        checks it. A name not found, or asked at two strengths, is a ValueError."""
        asked: dict[str, tuple[Path, float]] = {}
        for text in texts:
            for m in LORA_TAG.finditer(text or ""):
                name = m[1].strip()
                if name in dict(self.loras) or self.lora_dir is None:
                    self._without_lora_tags(m[0])  # checked as a LoRA merged at load (or not found: the error)
                    continue
                path = next((self.lora_dir / f"{name}{ext}" for ext in LORA_SUFFIXES
                             if (self.lora_dir / f"{name}{ext}").is_file()), None)
                if path is None:
                    raise ValueError(f"the prompt asks for {m[0]}, but {self.lora_dir} has no {name}.safetensors (nor "
                                     f".pt, .ckpt, .bin); LoRAs there: {', '.join(self.available_loras()) or 'none'}")
                strength = _tag_strength(m)
                if name in asked and not _same_strength(asked[name][1], strength):
                    raise ValueError(f"<lora:{name}> is asked for at strengths {_strength_text(asked[name][1])} and "
                                     f"{_strength_text(strength)}; one batch merges one")
                asked.setdefault(name, (path, strength))
        return [(name, path, s) for name, (path, s) in asked.items()]

    def available_loras(self) -> list[str]:
        """The names of the LoRA files in lora_dir."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        return sorted({p.stem for p in self.lora_dir.iterdir() if p.suffix.lower() in LORA_SUFFIXES and p.is_file()})

    def set_request_loras(self, wanted: list[tuple[str, Path, float]]) -> None:
        """Make the LoRAs merged for prompts exactly `wanted` ((name, file, strength), as `loras_asked` gives them),
        on top of those merged at load: the weights the previous set changed are first put back as they were, bit
        for bit, so that an image does not depend on the requests before it. Nothing is done when the set is the
        one merged already (a change makes the cached fast and exact copies rebuild)."""
        from imagine.loading.hashes import lora_hash
        from imagine.loading.lora import merge_lora, read_lora_file

        if [(n, s) for n, _, s in wanted] == self.request_loras:
            return
        with torch.no_grad():
            for w, saved in reversed(self._lora_saved):
                w.copy_(saved)
        self._lora_saved, self.request_loras = [], []
        kept: set[int] = set()

        def keep(w: torch.Tensor) -> None:
            if id(w) not in kept:
                kept.add(id(w))
                self._lora_saved.append((w, w.detach().clone()))

        try:
            for name, path, strength in wanted:
                layers, embeddings = read_lora_file(path)
                if set(embeddings) - set(self.embeddings):
                    # (a word added for one request would stay for the next: an image must not depend on those before)
                    log.warning("%s bundles embeddings (%s) that a prompt's tag does not load; merge the LoRA when the "
                                "model loads (--lora, load_lora) to have their words", Path(path).name,
                                ", ".join(sorted(set(embeddings) - set(self.embeddings))))
                with torch.no_grad():
                    merge_lora(self._lora_parts(), layers, strength, Path(path).name, before=keep)
                self.request_loras.append((name, strength))
                self.network_hashes["lora", name] = lora_hash(path)
        except BaseException:
            self.set_request_loras([])  # back to the model as loaded
            raise

    def _lora_parts(self) -> dict:
        towers = getattr(self.text_encoder, "towers", None)
        if towers is not None:  # SDXL: CLIP ViT-L and OpenCLIP bigG, diffusers' text_encoder and text_encoder_2
            # (the refiner's one tower is bigG: its text_encoder_2, as diffusers' refiner pipeline names it)
            names = ("text_encoder", "text_encoder_2")[-len(towers):]
            return {"unet": self.unet, **{name: tower.model for name, tower in zip(names, towers)}}
        te = getattr(self.text_encoder, "model", None)
        return {"unet": self.unet, "text_encoder": te if isinstance(te, torch.nn.Module) else None}

    def load_embedding(self, path: str | Path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding's word to the text encoder (`imagine.loading.textual_inversion`,
        Gal et al. 2022): `token`, else the word the file names (diffusers), else the file's name (AUTOMATIC1111).
        SDXL takes SDXL files (`clip_l` and `clip_g` vectors, one set per text tower). Returns the tokens added; a
        prompt that says the word reads all of them."""
        from imagine.loading.hashes import embedding_hash
        from imagine.loading.textual_inversion import read_embedding_file

        named, vectors = read_embedding_file(path)
        word = token or named or Path(path).stem
        tokens = self._add_word(word, vectors, Path(path).name)
        self.network_hashes["embedding", word] = embedding_hash(path)
        self.embedding_files[word] = Path(path).name
        return tokens

    def _add_word(self, word: str, vectors, source: str, check_only: bool = False) -> list[str]:
        """An embedding's word added to the text encoder(s) (`load_embedding`); check_only: only the checks."""
        from imagine.loading.textual_inversion import add_embedding, add_sdxl_embedding

        towers = getattr(self.text_encoder, "towers", None)
        if towers is not None:
            tokens = add_sdxl_embedding(towers, word, vectors, source, check_only)
        elif not hasattr(getattr(self.text_encoder, "model", None), "get_input_embeddings"):
            raise ValueError(f"{source}: this model's text encoder ({self.text_encoder.kind}) takes no "
                             "textual-inversion embeddings")
        else:
            tokens = add_embedding(self.text_encoder, word, vectors, source, check_only)
        if not check_only:
            self.embeddings.append(word)
        return tokens

    def weights_changed(self) -> None:
        """Tell the pipeline that the U-Net's or VAE's weights were changed in a way their version counters do
        not show (through `.data`, or under `torch.inference_mode`): the cached exact and fast copies are
        rebuilt at the next call. (Changes through the parameters themselves, `load_state_dict` and
        `load_lora` are seen without it.) The copies are new modules: hooks registered on `pipe.unet` or
        `pipe.vae` do not run in them."""
        for m in (self.unet, self.vae):
            if m is not None:
                forget_copies(m)

    def load_lora(self, path: str | Path, strength: float | tuple[float, float] = 1.0) -> dict[str, int]:
        """Merge a LoRA file into the U-Net and text encoder (`imagine.loading.lora`: W += s (alpha / r) B A,
        Hu et al. 2021 eq. 3), `strength` s as AUTOMATIC1111's `<lora:name:s>`, or (the text encoders' s, the
        U-Net's s) as its `<lora:name:te:unet>`. It stays merged; load the model again to drop it. Returns the layers
        merged per part."""
        from imagine.loading.hashes import lora_hash
        from imagine.loading.lora import merge_lora, read_lora_file
        from imagine.loading.textual_inversion import word_tokens

        pair = strength if isinstance(strength, (tuple, list)) else (strength, strength)
        if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
            raise ValueError(f"LoRA strength must be a finite number, or (text encoders', U-Net's); got {strength!r}")
        strength = float(pair[0]) if pair[0] == pair[1] else (float(pair[0]), float(pair[1]))
        name, merged = Path(path).stem, dict(self.loras)
        if name in merged:  # its strength would add up, and the name would stand for two merges
            raise ValueError(f"{Path(path).name}: a LoRA named {name!r} is merged already (at "
                             f"{_strength_text(merged[name])}); merge each once, at the strength wanted")
        if self.request_loras:
            raise ValueError("LoRAs asked for by prompts are merged now; load LoRAs before generating with them")
        layers, embeddings = read_lora_file(path)
        # the embeddings it bundles (AUTOMATIC1111's bundle_emb) become words too, checked before anything changes; a
        # word already loaded keeps its own vectors
        words = {w: v for w, v in embeddings.items() if w not in self.embeddings}
        for word in embeddings.keys() - words.keys():
            log.warning("%s bundles an embedding for %r, a word already loaded; the loaded one is kept",
                        Path(path).name, word)
        tokens: set[str] = set()
        for word, vectors in words.items():
            self._add_word(word, vectors, f"{Path(path).name} (bundled embedding {word!r})", check_only=True)
            n = (vectors["clip_l"] if isinstance(vectors, dict) else vectors).shape[0]
            if clash := tokens & set(word_tokens(word, n)):  # (two bundled words that would share a token)
                raise ValueError(f"{Path(path).name}: its bundled embeddings need the token {sorted(clash)[0]!r} "
                                 f"twice ({word!r} is one of them); nothing was merged")
            tokens |= set(word_tokens(word, n))
        counts = merge_lora(self._lora_parts(), layers, strength, Path(path).name)
        for word, vectors in words.items():
            self._add_word(word, vectors, f"{Path(path).name} (bundled embedding {word!r})")
        self.loras.append((name, strength))
        self.network_hashes["lora", name] = lora_hash(path)
        return counts

    # -- running -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """The sample's channels: the VAE's latent's, or a pixel model's output's (half of them where the U-Net also
        outputs its learned variance, the schedule's "learned_range" or "learned")."""
        from imagine.schedules import LEARNED_VARIANCE_TYPES

        if self.vae is not None:
            return self.vae.config.latent_channels
        out = self.unet.config.out_channels
        return out // 2 if self.c.schedule.variance_type in LEARNED_VARIANCE_TYPES else out

    @property
    def scale(self) -> int:
        return self.vae.config.downsampling_factor if self.vae is not None else 1

    def check_size(self, height: int, width: int) -> None:
        # The VAE's factor only: the U-Net runs any latent size (upsampling to each skip's size, as diffusers),
        # so SD takes multiples of 8, as in diffusers and AUTOMATIC1111.
        f = self.scale
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
            if v % f:
                raise ValueError(f"{name} {v} is not a multiple of {f} (this model needs multiples of {f}, "
                                 f"e.g. {max(f, v // f * f)} or {(v // f + 1) * f})")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], emphasis: bool | str = False,
                       long_prompts: bool = False) -> dict[str, torch.Tensor]:
        return self.text_encoder.encode(prompts, emphasis=emphasis, long_prompts=long_prompts).as_cond()

    @torch.no_grad()
    def conditioning(self, prompts: list[str], negatives: list[str | None], height: int, width: int,
                     guided: bool = True, emphasis: bool | str = False, long_prompts: bool = False,
                     editing_steps=None, zero_empty: bool | None = None, composable: bool = False):
        """(cond, uncond) for the U-Net: the prompts' and negative prompts' encodings (uncond None when not
        `guided`) with SDXL's size codes. A negative prompt None is not given: "" encoded, or zeros where the
        model says so (SDXL's force_zeros_for_empty_prompt). `editing_steps`: read AUTOMATIC1111's prompt editing
        over a run of that many steps, or on an imagine.prompt_editing.Timeline (a hires. fix second pass's); where
        a text changes, that side is a StepConditioning (imagine.guidance). `zero_empty`: whether a negative prompt
        not given is zeros (None: the model's own rule). `composable`: read AUTOMATIC1111's AND (imagine.composable):
        where a prompt has parts (or
        a weight), cond is a ComposedConditioning, and uncond is made even without guidance (the parts pull from
        it)."""
        d = self.defaults
        zero_empty = bool(d.get("zero_empty_negative")) if zero_empty is None else zero_empty
        texts = [self._without_lora_tags(p) for p in prompts]
        split = [split_and(t) for t in texts] if composable else []
        if any(len(parts) > 1 or parts[0][1] != 1.0 for parts in split):
            k = max(len(parts) for parts in split)  # (a row with fewer parts: weight 0 on the rest)
            cond = ComposedConditioning(
                [self._encode_texts([parts[j][0] if j < len(parts) else parts[0][0] for parts in split], emphasis,
                                    long_prompts, editing_steps) for j in range(k)],
                torch.tensor([[parts[j][1] if j < len(parts) else 0.0 for j in range(k)] for parts in split]))
            guided = True
        else:
            cond = self._encode_texts(texts, emphasis, long_prompts, editing_steps)
        uncond = None
        if guided:
            zero = [n is None and zero_empty for n in negatives]
            if all(zero):  # SDXL's force_zeros_for_empty_prompt: no negative prompt is all zeros
                uncond = self.text_encoder.zeros(len(prompts)).as_cond()
            else:
                uncond = self._encode_texts([self._without_lora_tags(n or "") for n in negatives], emphasis,
                                            long_prompts, editing_steps)
                if any(zero):  # rows whose negative was not given, in a batch with some that were
                    rows = torch.tensor(zero)
                    uncond = _each_step(uncond, lambda u: {
                        k: (v.masked_fill(rows.view(-1, *[1] * (v.ndim - 1)), 0) if k in ("context", "text_embeds")
                            else v) for k, v in u.items()})
        sizes = [self.size_conditioning(len(prompts), height, width, negative) for negative in (False, True)]
        cond = _each_step(cond, lambda c: {**c, **sizes[0]})
        uncond = None if uncond is None else _each_step(uncond, lambda c: {**c, **sizes[1]})
        return cond, uncond

    def _encode_texts(self, texts: list[str], emphasis: bool, long_prompts: bool, editing_steps: int | None):
        """The texts' cond dict; with `editing_steps`, a StepConditioning where some text changes during the run:
        every text a schedule reaches is encoded once, and each step's dict takes each row's text of that step."""
        from imagine.guidance import StepConditioning
        if editing_steps is None:
            return self.encode_prompts(texts, emphasis, long_prompts)
        line = editing_steps if isinstance(editing_steps, Timeline) else Timeline(editing_steps)
        schedules = [prompt_schedule(t, line.steps, line.first_pass, line.old) for t in texts]
        if all(len(s) == 1 for s in schedules):
            return self.encode_prompts([s[0][1] for s in schedules], emphasis, long_prompts)
        unique = list(dict.fromkeys(text for s in schedules for _, text in s))
        table = self.encode_prompts(unique, emphasis, long_prompts)
        rows = [[unique.index(text) for _, text in s] for s in schedules]
        made: dict[tuple, dict] = {}

        def at(i: int) -> dict:
            pick = tuple(row[text_at(s, i)] for row, s in zip(rows, schedules))
            if pick not in made:
                index = torch.tensor(pick, device=self.text_encoder.device)
                made[pick] = {k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in table.items()}
            return made[pick]

        return StepConditioning(at)

    def output_size(self, height: int | None = None, width: int | None = None,
                    picture: Image.Image | None = None) -> tuple[int, int]:
        """The image's (height, width) for generate's height / width: with neither given, `picture`'s size (the
        first init or control picture) to the VAE's factor; a side still not given is the model's own."""
        if picture is not None and height is None and width is None:  # the picture's size, to the VAE's factor
            width, height = self.factor_size(picture)
        sample = self.unet.config.sample_size or 64
        sample_h, sample_w = (sample[0], sample[-1]) if isinstance(sample, (tuple, list)) else (sample, sample)
        d = self.defaults
        height = (d.get("height") or self.scale * sample_h) if height is None else height
        width = (d.get("width") or self.scale * sample_w) if width is None else width
        return height, width

    def size_conditioning(self, n: int, height: int, width: int, negative: bool = False) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): the U-Net is told the picture's original
        size, the crop's top-left corner and the target size, here (height, width), (0, 0), (height, width), as
        diffusers' default; the refiner (sec. 2.5) is told an aesthetic score in place of the target size, a high
        one with the prompt and a low one with the negative prompt (`negative`; defaults["aesthetic_score"],
        6 and 2.5 as in diffusers and AUTOMATIC1111). {} for a U-Net without it."""
        if self.unet.config.addition_embed_type != "text_time":
            return {}
        scores = self.defaults.get("aesthetic_score")
        last = [float(scores[1 if negative else 0])] if scores else [height, width]
        return {"time_ids": torch.tensor([[height, width, 0, 0, *last]], dtype=torch.float32).repeat(n, 1)}

    def __call__(self, prompt, negative_prompt=None, **kw) -> list[Image.Image]:
        return self.generate(prompt, negative_prompt, **kw).images

    @torch.no_grad()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                 seed: int | None = None, seeds: list[int] | None = None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, guidance_rescale: float = 0.0,
                 eta: float | None = None, karras: bool | None = None, thresholding: str | None = None,
                 threshold_range: float | None = None, sigma_schedule: str | None = None, final_step: str | None = None,
                 sampler_options: dict | None = None, rho: float | None = None, start: str | None = None,
                 emphasis: bool | str = False, long_prompts: bool = False, prompt_editing: bool = False,
                 composable: bool = False, init_image=None, strength: float | None = None,
                 init_latents: torch.Tensor | None = None, mask_image=None, masked_content: str = "original",
                 latent_noise_seeds: list[int] | None = None, resize_mode: str = "just_resize", control_image=None,
                 controlnet_scale: float | list[float] | None = None,
                 control_guidance_start: float | list[float] | None = None,
                 control_guidance_end: float | list[float] | None = None,
                 control_mode: str | list[str] | None = None, guess_mode: bool = False,
                 refiner_switch: float | None = None, refiner_switch_by_steps: bool = False,
                 image_guidance_scale: float | None = None,
                 subseed: int | None = None, subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                 seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 image_guidance_gate: bool = True, noise_level: int | None = None, prior_steps: int | None = None,
                 prior_guidance_scale: float | None = None, sigma_range: str = "spaced",
                 discard_penultimate_sigma: bool = False, strength_rule: str = "diffusers", rng: str = "cpu",
                 noise_seed_delta: int = 0, zero_terminal_snr: bool = False, downcast_alphas_cumprod: bool = False,
                 old_prompt_editing: bool = False, editing_first_pass: int | None = None,
                 pad_conds: str | None = None, quantize: bool = False, window: tuple | None = None,
                 latent_mask: torch.Tensor | None = None, latent_concat: torch.Tensor | None = None,
                 conditioning: Callable | None = None, noise_indices: list[int] | None = None,
                 levels: list[float] | None = None, add_noise: bool = True, prediction_type: str | None = None,
                 timestep_rule: str | None = None,
                 callback: Callable[[dict], None] | None = None, progress: bool = True,
                 output_type: str = "pil") -> GenerationResult:
        """Text to images. Options left None take the model's defaults (model_index.json "defaults",
        else 20 steps of dpmpp_2m at guidance 7.5). sigma_schedule: "karras", "exponential", "polyexponential",
        "beta", "kl_optimal", "align_your_steps", and those read off the model's own levels, "uniform" / "normal",
        "sgm_uniform", "simple", "ddim_uniform", "compvis" (A1111's schedule types and its DDIM timesteps), rho its
        exponent (Karras 7, polyexponential 1), sigma_range what they span ("spaced", diffusers', or "model", A1111's:
        imagine.schedules.NoiseSchedule.plan);
        discard_penultimate_sigma: steps + 1 levels, the one before the end left out (A1111's way for DPM2, DPM2 a
        and DPM++ 3M SDE; imagine.samplers.a1111_settings gives all of A1111's settings for its samplers);
        strength_rule: which steps an image-to-image run takes, "diffusers" (int(steps * strength)), "a1111" or
        "a1111_fixed_steps" (imagine.sampling.sample; generate_hires runs its second pass with the fixed rule when
        given "a1111", as A1111's hires. fix does); final_step: "euler" or "heun"
        (the trapezoidal last step, imagine.samplers.final_heun_step); sampler_options: e.g. {"order": 3} for unipc; start: "noise"
        (diffusers' start) or "matched" (x_T moved to the mean of q(x_T), imagine.sampling.Denoiser.matched_start);
        emphasis: read AUTOMATIC1111's `(word:1.3)` / `[word]` syntax as weights (imagine.emphasis; off: brackets are
        text, as in diffusers; True is A1111's "Original", or one of its modes by name: "No norm", "Ignore", "None"); long_prompts: a CLIP text encoder reads a prompt past its 77-token window in
        75-token chunks, BREAK starting a new one with emphasis (AUTOMATIC1111's way, imagine.long_prompts; off:
        cut at the window with a warning, as diffusers); prompt_editing: read AUTOMATIC1111's `[from:to:when]` and
        `[a|b]`, a text that changes during the run (imagine.prompt_editing; off: brackets are text or emphasis);
        composable: read AUTOMATIC1111's `a AND b :w`, several prompts guiding one image (imagine.composable);
        thresholding "static"/"dynamic" (Imagen) holds x_0 to [-R, R], R = threshold_range (default: the model's
        "threshold_range", else 1, the pixel range of the paper).

        init_image, strength: image to image (SDEdit, Meng et al. 2022; diffusers' img2img, AUTOMATIC1111's
        denoising strength): a PIL image (or a list, one per prompt) is encoded by the VAE (its posterior sampled
        with each image's own seed, then the noise drawn, as diffusers does; under A1111's strength rules the noise
        is the seed's first draw, as A1111's, and the posterior from a stream of its own,
        imagine.sampling.posterior_generators), taken to the level of the last
        int(steps * strength) steps (strength default 0.8), and denoised from there. The size is the image's unless
        height/width are given; the image (and mask) is then brought to them by AUTOMATIC1111's img2img resize_mode
        (`imagine.images.fit_picture`): "just_resize" (stretched, the default), "crop_and_resize", "resize_and_fill",
        or "latent_upscale" (encoded at its own size, to the VAE's factor below, its latents resized bilinearly; image
        to image only).

        mask_image (with init_image): inpainting, as diffusers' StableDiffusionInpaintPipeline (strength default
        1): a PIL image (or one per prompt), white where the picture is painted anew and black where it is kept
        (grey level 0.5 and up counts as white; `imagine.inpainting.prepare_masks`). An inpainting model (a U-Net
        that takes the mask and the masked picture's latents beside its noisy latents, LDM sec. 4.5) sees them
        at every step; any other model keeps the black part by the replacement method
        (`imagine.sampling.Denoiser.keep_known`). Under AUTOMATIC1111's rules (strength_rule "a1111" or
        "a1111_fixed_steps") both kinds keep it as A1111 does instead: over its latent mask (the mask resized bicubic to
        the latents' size and rounded, `imagine.inpainting.a1111_latent_mask`), by its blend with the picture's clean
        latents (keep_known's "denoised" and "input" rules). An inpainting model given no picture paints a whole new one
        from the text (everything masked), as AUTOMATIC1111 runs it. masked_content (AUTOMATIC1111's "masked
        content" for the part painted anew, which matters below strength 1): "original" (the picture), "latent_noise"
        (the latents there replaced by the run's own start noise, as A1111 draws it from the image's seed) or
        "latent_nothing" (zeros). latent_noise_seeds (one per image): the seeds whose first draw is that noise
        instead (AUTOMATIC1111 fills every n_iter round from the first round's seeds, all_seeds[0:batch_size], as its
        processing fills the picture once for the whole job).

        control_image, controlnet_scale: the loaded ControlNets' pictures (`load_controlnet`), as diffusers'
        ControlNet pipelines take them: with one ControlNet a PIL image (or one per prompt) and a float; with
        several, a list with one entry per ControlNet and a float or one per ControlNet. The pictures are used
        as given (edges, depth, pose: already made), resized to the image's size; with no size given the size
        is the first picture's. control_guidance_start / end (a float, or one per ControlNet): the fraction of the
        steps a ControlNet acts in, as diffusers (A1111's starting and ending control step). control_mode (one, or one
        per ControlNet; imagine.models.controlnet.CONTROL_MODES): "balanced", AUTOMATIC1111's "prompt" ("My prompt is
        more important") and "controlnet" ("ControlNet is more important"), or "guess"; guess_mode: diffusers' guess
        mode for all (the conditional rows only, the residuals scaled up the levels).

        refiner_switch (with a refiner loaded, `load_refiner`): the fraction of the steps after which SDXL's refiner
        takes over from this model (AUTOMATIC1111's "switch at", e.g. 0.8; imagine.refiner); None: no refiner.
        refiner_switch_by_steps: hand over at that fraction of the sampler's model calls instead of the noise
        levels (AUTOMATIC1111's "Refiner switch by sampling steps", its rule before 1.8.0).

        subseed, subseed_strength (AUTOMATIC1111's variation seed): each image's start noise moved towards the noise of
        its variation seed (subseed + i, or `subseeds`; a negative or None: random) by spherical interpolation
        (imagine.sampling.variation_noise); 0 leaves the seed's image, 1 gives the variation seed's start noise.
        Above 0 every image of the call keeps `seed` (A1111's rule: the variation seeds tell them apart).
        seed_resize_from_h, seed_resize_from_w (AUTOMATIC1111's "resize seed from", pixels; 0: off): the noise the
        seeds give at that size is put in the middle of this size's (imagine.sampling.start_noise), so that an image
        found at one size keeps its composition at another.
        rng (AUTOMATIC1111's "random number generator source"): "cpu", each image's noise from torch's CPU generator
        seeded with its seed (A1111's "CPU", and its default on a machine without a GPU), or "nv", the noise
        torch.randn gives on an NVIDIA GPU (imagine.philox; A1111's "NV", which A1111 gives so that any machine makes
        the pictures its default makes on an NVIDIA card). noise_seed_delta (A1111's "Eta noise seed delta", ENSD, e.g. 31337): each
        image's draws after its start noise (an ancestral sampler's, eta's) come from its seed + the delta
        (imagine.sampling.ImageNoiseStream). zero_terminal_snr: sample over AUTOMATIC1111's "Zero Terminal SNR" noise
        schedule, the model's rescaled so that the last level is pure noise (Lin et al. 2023; for models trained so;
        imagine.schedules.NoiseSchedule.a1111_zero_terminal_snr). downcast_alphas_cumprod: AUTOMATIC1111's "Downcast
        alphas_cumprod" (for pictures from before its 1.7.0-225, when a float16 model held them in float16): the noise
        levels of the model's alphas_cumprod rounded to float16, computed in float16 as k-diffusion computes them
        (imagine.schedules.NoiseSchedule.a1111_downcast; for the samplers that step in noise levels).
        old_prompt_editing: AUTOMATIC1111's "Old prompt editing timelines" (before its 1.6: a `when` under 1 a fraction,
        else a step; imagine.prompt_editing). editing_first_pass: set by generate_hires for its second pass, the
        first pass's prompt-editing steps (one timeline over both passes, as A1111). pad_conds: where a prompt and its
        negative prompt differ in length (long prompts), AUTOMATIC1111's "Pad prompt/negative prompt" options
        (imagine.guidance.PaddedConds): "empty" fills the shorter up with the empty prompt's chunks ("Pad conds"),
        "v0" repeats the negative's last state up to the prompt's length or cuts it ("Pad conds v0", its DDIM's
        before 1.6.0); both then share the guidance batch. None (the default, A1111's too): two U-Net calls.
        quantize: the U-Net sees each noise level's nearest training timestep (k-diffusion's quantize, ComfyUI's way;
        imagine.sampling.sample). rng "comfyui" with start "comfyui": ComfyUI's noise (one seed for the batch,
        imagine.sampling.BatchNoiseStream) and start (its max_denoise rule). window (with init_latents, VE latents as
        ComfyUI hands them on, and strength 1): (start_at_step, end_at_step, full_denoise, add_noise), ComfyUI's
        KSamplerAdvanced (imagine.sampling.sample's window; add_noise False: no start noise). latent_mask (with
        init_latents): [B or 1, 1, h, w] at the latents' size, 1 where the run paints, 0 where it keeps init_latents
        (ComfyUI's noise mask; imagine.sampling.sample's mask, its keep rule by the start rule). latent_concat (with
        init_latents, for an inpainting model): [B, 1 + C, h, w], the mask and masked-picture latents its U-Net reads
        beside the sample, made by the caller (ComfyUI's concat_cond); latent_mask may come with it. conditioning:
        (pipe, n, height, width, guided) -> (cond, uncond), made in place of the prompts' encoding, once the LoRAs
        their tags ask for are merged (ComfyUI's conditioning lists, imagine.area_conditioning; uncond None: no
        unconditional pass). noise_indices (rng "comfyui"): a latent's batch_index, each image's start noise the draw
        of that place in a batch (imagine.sampling.BatchNoiseStream). levels (with init_latents, VE as ComfyUI hands
        them on, and strength 1): the run's noise levels themselves (ComfyUI's SamplerCustom; imagine.sampling.sample's
        levels). add_noise False: no start noise (its add_noise off). prediction_type: what the U-Net's output is read
        as in place of the model's own ("epsilon", "v_prediction": ComfyUI's ModelSamplingDiscrete). timestep_rule:
        the plan's timestep rule in place of the sampler's ("lcm": ComfyUI's LCM model sampling, its levels over the
        distillation timesteps; imagine.sampling.sample's rule).

        An instruct-pix2pix model (`edits`: Brooks et al. 2023) edits init_image as the prompt instructs, as diffusers'
        StableDiffusionInstructPix2PixPipeline: its U-Net reads the picture's latents at every step, and guidance
        runs on the picture and the text (image_guidance_scale s_I, default 1.5, beside guidance_scale s_T;
        imagine.guidance.instruct_pix2pix_guidance), when s_T > 1 and s_I >= 1 as diffusers gates it
        (`image_guidance_gate`; False: always, as AUTOMATIC1111). It starts from noise; a strength given starts it from the
        picture as image to image does (AUTOMATIC1111's denoising strength for such models).

        An unCLIP text-to-image model (a diffusion prior and an SD 2.1 unCLIP decoder) runs `imagine.pipelines.unclip.
        text_to_image` (noise_level, prior_steps, prior_guidance_scale: its options, None for the prior's defaults);
        the options that steer a picture, the text or the start noise are not for it.

        A guidance-distilled latent consistency model (its U-Net has time_cond_proj_dim: `guidance_embedded`) runs as
        diffusers' LatentConsistencyModelPipeline: one U-Net call a step, guidance_scale given to the U-Net as the
        code of guidance_scale - 1, no negative prompt; by default the lcm sampler, 4 steps at guidance 8.5."""
        _check_output_type(output_type)
        if self.c.prior is not None:
            from imagine.composable import split_and
            from imagine.pipelines.unclip import text_to_image

            # (A1111's prompt syntax, which its API always reads, counts only where a prompt uses it)
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
            edit_steps = int(self.defaults["steps"] if steps is None else steps)
            edits = prompt_editing and any(len(prompt_schedule(t, edit_steps)) > 1
                                           for t in texts + [n for n in negs if n])
            given = {"guidance_rescale": guidance_rescale, "thresholding": thresholding,
                     "threshold_range": threshold_range, "start": start, "prompt_editing": edits,
                     "composable": composable and any(len(parts) > 1 or parts[0][1] != 1.0
                                                      for parts in map(split_and, texts)),
                     "init_image": init_image, "strength": strength,
                     "init_latents": init_latents, "mask_image": mask_image, "control_image": control_image,
                     "refiner_switch": refiner_switch, "refiner_switch_by_steps": refiner_switch_by_steps,
                     "image_guidance_scale": image_guidance_scale,
                     "subseed_strength": subseed_strength,  # (a variation seed does nothing at strength 0)
                     "seed_resize_from_h": seed_resize_from_h, "seed_resize_from_w": seed_resize_from_w,
                     "masked_content": masked_content != "original", "resize_mode": resize_mode != "just_resize",
                     "controlnet_scale": controlnet_scale, "control_mode": control_mode, "guess_mode": guess_mode,
                     "control_guidance_start": control_guidance_start, "control_guidance_end": control_guidance_end,
                     "image_guidance_gate": image_guidance_gate is not True,
                     "sigma_range": sigma_range != "spaced" and bool(sigma_schedule or karras),
                     "discard_penultimate_sigma": discard_penultimate_sigma,
                     "strength_rule": strength_rule != "diffusers", "rng": rng != "cpu",
                     "noise_seed_delta": noise_seed_delta, "zero_terminal_snr": zero_terminal_snr,
                     "downcast_alphas_cumprod": downcast_alphas_cumprod,
                     "old_prompt_editing": old_prompt_editing and edits, "pad_conds": pad_conds,
                     "quantize": quantize, "window": window, "latent_mask": latent_mask,
                     "latent_concat": latent_concat, "conditioning": conditioning, "noise_indices": noise_indices,
                     "levels": levels, "add_noise": add_noise is not True, "prediction_type": prediction_type,
                     "timestep_rule": timestep_rule}
            unused = sorted(k for k, v in given.items() if v is not None and v is not False
                            and not (isinstance(v, (int, float, str)) and v in (0, 0.0, "noise")))
            if unused:
                said = {"composable": "composable (AND / :weight prompts)",
                        "prompt_editing": "prompt_editing ([from:to:when] / [a|b] prompts)",
                        "subseed_strength": "subseed_strength (a variation seed)"}
                raise ValueError(f"{', '.join(said.get(k, k) for k in unused)}: not for "
                                 f"{self.c.source or 'this model'}, an unCLIP text-to-image model (prior and decoder)")
            return text_to_image(self, prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale,
                                 sampler=sampler, seed=seed, seeds=seeds, num_images_per_prompt=num_images_per_prompt,
                                 height=height, width=width, eta=eta, karras=karras, sigma_schedule=sigma_schedule,
                                 rho=rho, final_step=final_step, sampler_options=sampler_options, emphasis=emphasis,
                                 long_prompts=long_prompts, callback=callback, progress=progress,
                                 output_type=output_type, noise_level=noise_level or 0, prior_steps=prior_steps,
                                 prior_guidance_scale=prior_guidance_scale)
        for name, value in (("noise_level", noise_level), ("prior_steps", prior_steps),
                            ("prior_guidance_scale", prior_guidance_scale)):
            if value is not None:
                raise ValueError(f"{name} is for unCLIP text-to-image models (a diffusion prior and decoder); "
                                 f"{self.c.source or 'this model'} has no prior (an upscaler or unCLIP decoder takes "
                                 "its noise_level in upscale() / variations())")
        t0 = time.time()
        prompts = _prompt_list(prompt, num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is None:
            negatives = [None] * len(prompts)  # not given: "" (encoded), or zeros for SDXL (zero_empty_negative)
        else:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) == 1:
                negs = negs * (len(prompts) // num_images_per_prompt)
            if len(negs) * num_images_per_prompt != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts) // num_images_per_prompt} prompts; "
                                 "give one, or one per prompt")
            negatives = [n for n in negs for _ in range(num_images_per_prompt)]
        if not all(n is None or isinstance(n, str) for n in negatives):
            raise TypeError("negative prompts must be strings (or None: not given)")
        if self.guidance_embedded and any(negatives):
            raise ValueError(f"negative_prompt: {self.c.source or 'this model'} is a guidance-distilled latent "
                             "consistency model (its U-Net takes the guidance scale, time_cond_proj_dim): it learned "
                             "classifier-free guidance against the empty prompt and runs no unconditional pass, so a "
                             "negative prompt cannot act (diffusers' LatentConsistencyModelPipeline takes none); "
                             "leave it out or empty")
        if self.picture_model and conditioning is None:  # (ComfyUI's lists carry an unCLIP model's class input)
            call = "upscale(prompt, image)" if self.c.low_res_schedule is not None else "variations(image, prompt)"
            raise ValueError(f"{self.c.source or 'this model'} is {self.picture_model}, which a picture conditions "
                             f"throughout; use {call} (the CLI: --init-image PICTURE)")
        d = self.defaults
        steps = _steps(steps, d["steps"])
        guidance_scale = _default_guidance(d, guidance_scale, sampler or d["sampler"])
        sampler = sampler or d["sampler"]
        from imagine.samplers import same_sampler

        if same_sampler(sampler, d["sampler"]):  # the model's default sampler (by any of its names) comes with
            # its default schedule and last step
            if karras is None and sigma_schedule is None:
                sigma_schedule = d.get("sigma_schedule")
            if final_step is None:
                final_step = d.get("final_step")
        final_step = final_step or "euler"
        schedule = self.a1111_schedule(downcast_alphas_cumprod, zero_terminal_snr)  # (its errors before any work)
        if pad_conds is not None:
            from imagine.guidance import check_pad_conds

            check_pad_conds(pad_conds)
        if downcast_alphas_cumprod:
            from imagine.samplers import TIMESTEP_RULE
            from imagine.schedules import check_downcast

            check_downcast(TIMESTEP_RULE[resolve_sampler(sampler)[0]], sigma_schedule, sampler)
        # a model's default start (matched) moves pure noise; an image-to-image run starts from its picture
        start = start or (None if init_image is not None or init_latents is not None else d.get("start")) or "noise"
        # (A scheduler config's clip_sample is not applied: diffusers' SD text-to-image and img2img pipelines set it
        # False for SD, calling a True a bug in the config; only its inpainting pipeline keeps it.)
        threshold_range = check_threshold_range(d.get("threshold_range", 1.0) if threshold_range is None
                                                else threshold_range)
        if karras is None and sigma_schedule is None:  # a diffusers scheduler config may name its noise levels
            sc = self.c.scheduler_config
            sigma_schedule = ("karras" if sc.get("use_karras_sigmas") else
                              "exponential" if sc.get("use_exponential_sigmas") else
                              "beta" if sc.get("use_beta_sigmas") else None)
        # A side not given is the model's own (as diffusers and AUTOMATIC1111: not the other side, a square)
        inits = self._init_images(init_image, len(prompts) // num_images_per_prompt, num_images_per_prompt)
        masks = self._init_images(mask_image, len(prompts) // num_images_per_prompt, num_images_per_prompt,
                                  "mask_image", mode=None)
        if masks is not None and inits is None:
            raise ValueError("mask_image needs init_image: the picture whose black part is kept (inpainting)")
        if masked_content not in MASKED_CONTENTS:
            raise ValueError(f"masked_content must be one of {', '.join(MASKED_CONTENTS)}; got {masked_content!r}")
        if masked_content != "original" and masks is None:
            raise ValueError(f"masked_content={masked_content!r} is for inpainting: give mask_image (and init_image)")
        if latent_noise_seeds is not None and masked_content != "latent_noise":
            raise ValueError("latent_noise_seeds are for masked_content 'latent_noise' (the seeds of its fill); got "
                             f"masked_content={masked_content!r}")
        if strength is not None and inits is None and init_latents is None:
            raise ValueError("strength is image to image's (denoising strength); give init_image (or init_latents) "
                             "with it, or leave it out for text to image")
        edit_from_noise = self.edits and strength is None  # (instruct-pix2pix: the picture conditions, noise starts)
        if self.edits:
            if inits is None:
                raise ValueError("this is an instruct-pix2pix model: it edits a picture as the prompt instructs; give "
                                 "init_image (the picture to edit)")
            if masks is not None:
                raise ValueError("an instruct-pix2pix model edits the whole picture; mask_image is for inpainting")
            image_guidance_scale = float(d.get("image_guidance_scale", 1.5) if image_guidance_scale is None
                                         else image_guidance_scale)
            if not math.isfinite(image_guidance_scale) or image_guidance_scale < 0:
                raise ValueError(f"image_guidance_scale must be a finite number >= 0; got {image_guidance_scale}")
        elif image_guidance_scale is not None:
            raise ValueError("image_guidance_scale is for instruct-pix2pix models (8-channel U-Nets, which read the "
                             "picture to edit); this model's U-Net does not")
        if strength is None:  # diffusers' pipelines' defaults: inpainting 1.0 (SDXL's 0.9999: 19 of 20 steps, from
            # the noised picture), image to image 0.8 (SDXL's 0.3; 0.8 with ControlNets)
            sdxl = self.unet.config.addition_embed_type == "text_time"
            strength = (0.9999 if sdxl else 1.0) if masks is not None else \
                0.3 if sdxl and control_image is None else 0.8
        if control_image is None and (guess_mode or not all(v is None for v in (
                controlnet_scale, control_guidance_start, control_guidance_end, control_mode))):
            raise ValueError("controlnet_scale / control_guidance_start / control_guidance_end / control_mode / guess_mode "
                             "need control_image (the ControlNets' pictures)")
        n_prompts = len(prompts) // num_images_per_prompt
        controls = self._control_pictures(control_image, 1.0 if controlnet_scale is None else controlnet_scale,
                                          n_prompts, num_images_per_prompt,
                                          0.0 if control_guidance_start is None else control_guidance_start,
                                          1.0 if control_guidance_end is None else control_guidance_end,
                                          "guess" if guess_mode else (control_mode or "balanced"),
                                          a1111=strength_rule != "diffusers")
        if init_latents is not None:  # image to image from latents (hires. fix's latent upscale)
            if inits is not None:
                raise ValueError("give init_image or init_latents, not both")
            expected = (len(prompts), self.latent_channels)
            if not isinstance(init_latents, torch.Tensor) or init_latents.ndim != 4 or \
                    tuple(init_latents.shape[:2]) != expected:
                raise ValueError(f"init_latents must be [{expected[0]}, {expected[1]}, h, w] (one per image); got "
                                 f"{tuple(init_latents.shape) if isinstance(init_latents, torch.Tensor) else init_latents!r}")
            size = (init_latents.shape[-2] * self.scale, init_latents.shape[-1] * self.scale)
            if (height or size[0], width or size[1]) != size:
                raise ValueError(f"init_latents are for {size[1]}x{size[0]} pixels; got height {height}, width {width}")
            height, width = size
        first = inits[0] if inits is not None else (controls[0][1][0] if controls else None)
        height, width = self.output_size(height, width, first)
        self.check_size(height, width)
        height, width = int(height), int(width)
        latent_upscale = self.check_resize_mode(resize_mode, inits, masks)
        first_size = self._seed_resize(seed_resize_from_h, seed_resize_from_w, (height // self.scale,
                                                                                width // self.scale))
        if inits is not None and not latent_upscale:  # (A1111 brings the mask to the size as it does the picture)
            inits = [fit_picture(im, width, height, resize_mode) for im in inits]
            masks = None if masks is None else [fit_picture(m, width, height, resize_mode) for m in masks]
        if isinstance(subseed_strength, bool) or not isinstance(subseed_strength, (int, float)) or \
                not 0 <= subseed_strength <= 1:
            raise ValueError(f"subseed_strength must be a number in [0, 1]; got {subseed_strength!r}")
        # (AUTOMATIC1111's rule: with a variation seed at work every image keeps the seed; the variation seeds count up)
        seeds = seed_list(seed, seeds, len(prompts), same=subseed_strength > 0)

        refine = refiner_switch is not None
        if refiner_switch_by_steps is not False and (not refine or not isinstance(refiner_switch_by_steps, bool)):
            raise ValueError("refiner_switch_by_steps (True or False) sets how refiner_switch hands over: give it with "
                             f"refiner_switch; got {refiner_switch_by_steps!r}"
                             f"{'' if refine else ' and no refiner_switch'}")
        if refine:
            refiner_switch = check_switch(refiner_switch)
            if self.refiner is None:
                raise ValueError("refiner_switch needs a refiner: load one first (load_refiner, --refiner)")
            if self.image_conditioned:
                raise ValueError("an inpainting model's U-Net takes the mask at every step; the refiner would not: "
                                 "use the refiner with a 4-channel model")
        self.set_request_loras(self.loras_asked([*prompts, *(n for n in negatives if n)]))
        # (A1111 schedules a second-order sampler's edits over 2N model calls; the denoiser counts its calls then)
        editing = Timeline(2 * steps if _two_call(sampler) else steps, editing_first_pass, old_prompt_editing) \
            if prompt_editing else None
        # (diffusers' pipelines guide only above scale 1: at 0, SD-Turbo's setting there, the prompt's prediction
        # alone; A1111's rules apply the formula at any scale but 1. A1111's edit guidance: always; CFG++'s samplers
        # renoise with the unconditional prediction at scale 1 too)
        above = guidance_scale > 1.0 if strength_rule == "diffusers" and not self.edits else guidance_scale != 1.0
        guided = above or (self.edits and not image_guidance_gate) or is_cfg_pp(sampler)
        if self.guidance_embedded:  # (the scale goes in as the U-Net's guidance code, one pass a step)
            self._check_guidance_embedded(sampler, guidance_rescale)
            guided = False
        if conditioning is not None:  # (the caller's own, ComfyUI's lists)
            cond, uncond = conditioning(self, len(prompts), height, width, guided)
        else:
            cond, uncond = self.conditioning(prompts, negatives, height, width, guided, emphasis, long_prompts,
                                             editing, composable=composable)
        if self.guidance_embedded:
            cond = self._with_guidance_code(cond, guidance_scale, len(prompts))
        padding = None
        if pad_conds is not None:  # (A1111's empty prompt: its cond_stage_model_empty_prompt, "" encoded)
            from imagine.guidance import PaddedConds

            padding = PaddedConds(pad_conds, self.encode_prompts([""], False, False) if pad_conds == "empty" else None)
        if self.edits and controls and any(c[4] in ("guess", "controlnet") or c[0].config.global_pool_conditions
                                           for c in controls):
            raise ValueError("a ControlNet acting on the conditional half only (guess mode, 'ControlNet is more "
                             "important', a shuffle ControlNet) is not combined with instruct-pix2pix's three passes; "
                             "use control_mode 'balanced' or 'prompt'")
        if self.edits and isinstance(cond, ComposedConditioning) and image_guidance_scale != 1:
            raise ValueError("AND (composed prompts) combines with instruct-pix2pix only at image_guidance_scale 1 "
                             "(as AUTOMATIC1111); give the instruction as one prompt, or image guidance 1")
        if refine:  # the refiner reads the prompts with its own text encoder and size codes; the LoRA tags (this
            # model's) are taken out first, and a negative prompt not given is zeros where this model zeros it (A1111
            # zeros an empty negative prompt for every SDXL model, the refiner too)
            refined = self.refiner.conditioning(
                [self._without_lora_tags(p) for p in prompts],
                [None if n is None else self._without_lora_tags(n) for n in negatives], height, width,
                guided, emphasis, long_prompts, editing, zero_empty=bool(d.get("zero_empty_negative")),
                composable=composable)
            cond, uncond = (with_refiner(c, r) for c, r in zip((cond, uncond), refined))
        shape = (len(prompts), self.latent_channels, height // self.scale, width // self.scale)
        generators = make_generators(len(prompts), seeds, rng=rng, seed_delta=noise_seed_delta)
        if noise_indices is not None:
            if rng != "comfyui":
                raise ValueError("noise_indices (ComfyUI's batch_index) go with rng 'comfyui'")
            generators.indices = [int(i) for i in noise_indices]
        # the VAE's posterior draws: from the images' streams first, as diffusers; under A1111's rules from streams of
        # their own, each image's stream giving its start noise first as A1111's does
        encoders = generators if strength_rule == "diffusers" else posterior_generators(seeds)
        inpaint = {}
        if latent_concat is not None:  # (an inpainting model's channels as the caller made them: ComfyUI's)
            want = (len(prompts), self.unet.config.in_channels - self.latent_channels, *shape[2:])
            if not self.image_conditioned or masks is not None or init_latents is None:
                raise ValueError("latent_concat is an inpainting model's mask and masked-picture latents, with "
                                 "init_latents and no mask_image")
            if tuple(latent_concat.shape) != want:
                raise ValueError(f"latent_concat must be {list(want)} (the mask, then the masked picture's latents); "
                                 f"got {list(latent_concat.shape)}")
            init, inpaint = init_latents.float(), {"concat": latent_concat.float()}
            if latent_mask is not None:
                inpaint["mask"] = latent_mask.float()
        elif latent_mask is not None and (masks is not None or self.image_conditioned):
            raise ValueError("latent_mask (ComfyUI's noise mask) is for a 4-channel U-Net without mask_image; an "
                             "inpainting model reads the mask and the masked picture: give mask_image (or "
                             "latent_concat)")
        elif masks is not None or self.image_conditioned:
            fill = None if latent_noise_seeds is None else \
                PerSampleNoise(make_generators(len(prompts), latent_noise_seeds, rng=rng)).draw(shape)
            init, inpaint = self._inpainting(inits, masks, shape, width, height, generators, encoders, strength,
                                             init_latents, masked_content, strength_rule, fill)
        else:
            if inits is None or edit_from_noise:
                init = None
            elif latent_upscale:  # A1111's "Just resize (latent upscale)": the picture encoded at its own size (sides
                # not multiples of the VAE's factor: stretched to the multiple below, which the VAE takes), its latents
                # resized bilinearly
                init = torch.nn.functional.interpolate(self.encode_images(inits, *self.factor_size(inits[0]),
                                                                          encoders),
                                                       size=shape[2:], mode="bilinear", align_corners=False)
            else:
                init = self.encode_images(inits, width, height, encoders)
            if init_latents is not None:
                init = init_latents.float()
            if latent_mask is not None:
                if init_latents is None:
                    raise ValueError("latent_mask keeps part of init_latents: give them")
                inpaint["mask"] = latent_mask.float()
        if self.edits:  # the picture's latents: the mode of q(z | x), unscaled, as diffusers gives them
            picture = self._edit_latents(inits, width, height)
            cond = _each_step(cond, lambda c: {**c, "concat": picture})
            uncond = None if uncond is None else _each_step(uncond, lambda c: {**c, "concat": picture})
            inpaint["image_guidance_scale"] = image_guidance_scale
            inpaint["image_guidance_gate"] = image_guidance_gate
        if controls:
            inpaint["controls"] = [(net, self._pixels(pictures, width, height, normalize=False), scale, window, mode)
                                   for net, pictures, scale, window, mode in controls]
        if subseed_strength > 0:  # A1111's variation seed: the start noise moved towards another seed's
            subseeds = seed_list(subseed, subseeds, len(prompts), what="subseeds")
        else:
            subseeds = None
        if subseeds is not None or first_size is not None:  # A1111's seed options (imagine.sampling.start_noise)
            from imagine.sampling import start_noise

            # (its own part drawn from the images' own generators, as the sampler would draw it, so the steps' noise
            # follows on)
            inpaint["noise"] = start_noise(shape, generators, seeds, subseeds, float(subseed_strength), first_size,
                                           inpaint.get("noise"), rng)
        if window is not None or levels is not None:
            if init_latents is None or strength != 1:
                raise ValueError("window (ComfyUI's KSamplerAdvanced) and levels (its SamplerCustom) run from "
                                 "init_latents at strength 1")
            if not add_noise or (window is not None and not window[3]):  # (its add_noise off: the latent as it is)
                inpaint["noise"] = torch.zeros(shape)
        report: dict = {}
        latents = self._sample(shape, cond, uncond, steps=steps, guidance_scale=guidance_scale if guided else 1.0,
                               sampler=sampler,
                               generators=generators, seeds=seeds, init=init, strength=strength, **inpaint,
                               guidance_rescale=guidance_rescale, eta=eta, karras=karras,
                               thresholding=thresholding, threshold_range=threshold_range, callback=callback,
                               progress=progress,
                               sigma_schedule=sigma_schedule, final_step=final_step,
                               sampler_options=sampler_options, rho=rho, start=start, sigma_range=sigma_range,
                               discard_penultimate_sigma=discard_penultimate_sigma, strength_rule=strength_rule,
                               refiner_switch=refiner_switch if refine else None,
                               refiner_switch_by_steps=refiner_switch_by_steps, report=report,
                               schedule=schedule, padding=padding, quantize=quantize,
                               window=None if window is None else tuple(window[:3]), levels=levels,
                               prediction_type=prediction_type, rule=timestep_rule)
        params = {"steps": steps, "sampler": sampler, "guidance_scale": guidance_scale, "height": height,
                  "width": width, "model": Path(self.c.source).name or "default",
                  "version": __import__("imagine").__version__, **self.run_record()}
        if self.c.vae_source:
            params["vae"] = Path(self.c.vae_source).name
        if init is not None or masks is not None:
            params["strength"] = float(strength)
            if resize_mode != "just_resize":
                params["resize_mode"] = resize_mode
        if masks is not None:
            params["inpainting"] = True
            if masked_content != "original":
                params["masked_content"] = masked_content
        if controls:
            params["controlnet"] = ", ".join(
                f"{name}: {scale:g}" + ("" if window == (0.0, 1.0) else f" ({window[0]:g}-{window[1]:g})")
                for (name, _), (_, _, scale, window, _) in zip(self.controlnets, controls))
            if any(c[4] != "balanced" for c in controls):
                params["control_mode"] = [c[4] for c in controls]
        # ((word:1.3) read as weights, "a1111"; or brackets read as text, or another of A1111's modes, which its
        # infotext names: "Emphasis: None" / "No norm" / "Ignore")
        if (record := emphasis_record(emphasis, [*prompts, *(n for n in negatives if n)])) is not None:
            params["emphasis"] = record
        if self.edits and (image_guidance_gate or image_guidance_scale != 1):
            params["image_guidance_scale"] = image_guidance_scale  # (A1111's "Image CFG scale"; its default 1: none)
        if subseeds is not None:
            params["subseed_strength"] = float(subseed_strength)  # (each image's variation seed: result.subseeds)
        if eta is not None:
            params["eta"] = float(eta)  # (A1111's "Eta", "Eta DDIM")
        if rng != "cpu":
            params["rng"] = rng  # (A1111's "RNG: NV")
        if noise_seed_delta:
            params["noise_seed_delta"] = noise_seed_delta  # (A1111's "ENSD")
        if zero_terminal_snr:
            params["zero_terminal_snr"] = True  # (A1111's "Noise Schedule: Zero Terminal SNR")
        if downcast_alphas_cumprod:
            params["downcast_alphas_cumprod"] = True  # (A1111's "Downcast alphas_cumprod: True")
        if old_prompt_editing and prompt_editing:
            params["old_prompt_editing"] = True  # (A1111's "Old prompt editing timelines: True")
        if padding is not None:
            params["pad_conds"] = pad_conds  # (A1111's "Pad conds: True" / "Pad conds v0: True" where it padded)
            # (per image of a batch: each row is padded by its own texts' lengths)
            rows = [r in padding.padded_rows for r in range(len(seeds))]
            params["padded_conds"] = rows if len(rows) > 1 else rows[0]
        if seed_resize_from_h > 0 and seed_resize_from_w > 0:  # (A1111's W x H; written, as A1111, whenever set)
            params["seed_resize_from"] = f"{seed_resize_from_w}x{seed_resize_from_h}"
        if refine and report.get("refined"):  # AUTOMATIC1111's infotext: "Refiner: name, Refiner switch at: 0.8"
            params["refiner"] = Path(self.refiner.c.source).name
            params["refiner_switch_at"] = refiner_switch
            if refiner_switch_by_steps:
                params["refiner_switch_by_steps"] = True  # (A1111's "Refiner switch by sampling steps: True")
        if composable:
            params["composable"] = True  # a AND b read (imagine.composable)
        if prompt_editing:
            params["prompt_editing"] = True  # [from:to:when], [a|b] read (imagine.prompt_editing)
        if long_prompts and not getattr(self.text_encoder, "uses_mask", True):
            params["long_prompts"] = True  # read in 75-token chunks (imagine.long_prompts)
        if getattr(self.text_encoder, "clip_skip", 0):
            params["clip_skip"] = self.text_encoder.clip_skip  # layers skipped (diffusers' numbering)
        used = [w for w in self.embeddings if any(w in t for t in [*prompts, *(n for n in negatives if n)])]
        if used:  # (the textual-inversion words the texts use: a run again needs them loaded, as A1111's "TI hashes")
            params["embeddings"] = ", ".join(used)
        if self.loras or self.request_loras:
            params["lora"] = ", ".join(f"{name}: {_strength_text(strength)}"
                                       for name, strength in [*self.loras, *self.request_loras])
        params.update(self.file_hashes(used, [name for name, _ in [*self.loras, *self.request_loras]]))
        if guidance_rescale and guidance_scale != 1.0:  # (at scale 1 there is no guidance to rescale)
            params["guidance_rescale"] = guidance_rescale
        if sigma_schedule or karras:
            params["schedule_type"] = sigma_schedule or "karras"
        # (rho where the levels take it: Karras's, the polyexponential's; a rho no schedule type reads is not recorded)
        if rho is not None and (karras or sigma_schedule in ("karras", "polyexponential", "exponential")
                                or resolve_sampler(sampler)[2]):
            params["schedule_rho"] = float(rho)
        if thresholding:
            params["thresholding"] = thresholding
            params["threshold_range"] = threshold_range
        if final_step != "euler":
            params["final_step"] = final_step
        if start != "noise":
            params["start"] = start
        if sampler_options:
            params["sampler_options"] = dict(sampler_options)
        if sigma_range != "spaced" and (sigma_schedule or karras):
            params["sigma_range"] = sigma_range
        if discard_penultimate_sigma:
            params["discard_penultimate_sigma"] = True
        if strength_rule != "diffusers":  # (image to image's steps, and the picture's 8-bit rounding below)
            params["strength_rule"] = strength_rule
        # (latents asked for: no VAE decode; hires. fix's latent upscale and the parity tests decode themselves;
        # under A1111's rules its 8-bit pictures, truncated)
        images = [to_pil(t, truncate=strength_rule != "diffusers") for t in self.decode(latents)] \
            if output_type == "pil" else []
        return GenerationResult(images=images, seeds=seeds, seconds=time.time() - t0, latents=latents, negatives=negatives,
                                subseeds=list(subseeds) if subseeds is not None else None,
                                parameters={**params, "prompt": prompts,
                                            "negative_prompt": [n or "" for n in negatives]})

    def a1111_schedule(self, downcast_alphas_cumprod: bool = False, zero_terminal_snr: bool = False):
        """The model's noise schedule under AUTOMATIC1111's overrides, in its order (apply_alpha_schedule_override):
        "Downcast alphas_cumprod", then the "Zero Terminal SNR" rescale; None where neither is asked (the model's own)."""
        for name, value in (("downcast_alphas_cumprod", downcast_alphas_cumprod),
                            ("zero_terminal_snr", zero_terminal_snr)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False; got {value!r}")
        if not (downcast_alphas_cumprod or zero_terminal_snr):
            return None
        schedule = self.schedule.a1111_downcast() if downcast_alphas_cumprod else self.schedule
        return schedule.a1111_zero_terminal_snr() if zero_terminal_snr else schedule

    def generate_hires(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                       hires_scale: float = 2.0, hires_strength: float = 0.7, hires_steps: int | None = None,
                       hires_upscaler: Any = "latent", hires_resize: tuple[int, int] | None = None,
                       hires_prompt: str | None = None,
                       hires_negative_prompt: str | None = None, hires_sampling: dict | None = None,
                       hires_control_image=None, hires_control_mode: str | list[str] | None = None,
                       callback: Callable[[dict], None] | None = None, progress: bool = True,
                       output_type: str = "pil", **kw) -> GenerationResult:
        """AUTOMATIC1111's "hires. fix": text to image at the base size, upscaled by `hires_scale` (to the VAE's
        factor), then image to image at that size with `hires_strength` (A1111's hires denoising strength, default
        0.7) over `hires_steps` (default: the first pass's), each image with its own seed again: the large picture
        keeps the small one's composition, which the model could not hold at a size it was not trained on.
        `hires_upscaler` (HIRES_UPSCALERS, or A1111's labels): "latent" (A1111's default "Latent": the latents
        resized bilinearly, no VAE round trip; it wants a strength of 0.5 or more to clean up) and A1111's other
        latent modes (antialiased, bicubic, nearest), or "lanczos" / "nearest" / "none" (the decoded pictures
        resized, then encoded), or an upscaler model (imagine.upscalers.UpscaleModel, e.g. R-ESRGAN 4x+: the
        decoded pictures enlarged by it over A1111's tiles, then Lanczos to the size, as A1111 runs it).
        `hires_resize`: A1111's (hr_resize_x, hr_resize_y), a size in pixels in place of the scale (`hires_target`;
        where both are given the upscaled picture is cut to them, centred: its latents for a latent upscaler, as
        A1111 cuts them, the pictures before encoding for the others).
        `hires_prompt` / `hires_negative_prompt`: the second pass's texts (A1111's "Hires prompt"; None or "": the
        first pass's). `hires_sampling`: how the second pass samples (A1111's "Hires sampler" and "Hires schedule
        type"), all of it: generate's SAMPLING_KEYWORDS, "sampler" among them, in place of the first pass's (a key left
        out takes generate's default; None: the first pass's). `hires_control_image`, `hires_control_mode`: the second
        pass's ControlNet pictures and modes, as control_image / control_mode take them (None: the first pass's,
        the pictures resized by generate; A1111's ControlNet extension fits its map to the hires size apart, and
        runs canny and mlsd units with the soft weights there). `kw`: `generate`'s options, for both passes. The
        parameters give the first pass's size and sampling, as A1111's infotext does, with the scale and
        "hires_sampling"."""
        _check_output_type(output_type)  # (before the first pass runs)
        if isinstance(hires_scale, bool) or not isinstance(hires_scale, (int, float)) or not 1 <= hires_scale <= 4:
            raise ValueError(f"hires_scale must be a number in [1, 4] (A1111's slider; 1: a second pass at the first "
                             f"size); got {hires_scale!r}")
        if hires_resize is not None and (len(hires_resize) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in hires_resize) or not any(hires_resize)):
            raise ValueError(f"hires_resize must be (width, height) in pixels, whole numbers >= 0, not both 0 (0: from "
                             f"the other side and the first pass's aspect); got {hires_resize!r}")
        if hires_steps is not None and (not isinstance(hires_steps, int) or hires_steps < 1):
            raise ValueError(f"hires_steps must be a positive integer or None (the first pass's); got {hires_steps!r}")
        if kw.get("init_image") is not None or kw.get("init_latents") is not None or kw.get("mask_image") is not None:
            raise ValueError("hires. fix starts from text; for a picture of your own (or inpainting) use init_image "
                             "(and mask_image) without hires")
        if self.c.prior is not None:  # (its second pass would start from the first's latents, a picture)
            raise ValueError(f"hires. fix is not for {self.c.source or 'this model'}, an unCLIP text-to-image model "
                             "(prior and decoder): generate at the size wanted")
        if hires_sampling is not None:
            from imagine.samplers import is_cfg_pp

            if not isinstance(hires_sampling, dict) or "sampler" not in hires_sampling:
                raise ValueError("hires_sampling must be a dict of generate's sampling keywords with a 'sampler'; got "
                                 f"{hires_sampling!r}")
            unknown = sorted(set(hires_sampling) - set(SAMPLING_KEYWORDS))
            if unknown:
                raise ValueError(f"hires_sampling: {', '.join(map(repr, unknown))} not among generate's sampling "
                                 f"keywords {', '.join(SAMPLING_KEYWORDS)}")
            # (a CFG++ sampler reads the guidance scale as its lambda, the others as CFG's scale: one scale, two
            # meanings)
            if is_cfg_pp(hires_sampling["sampler"]) != is_cfg_pp(kw.get("sampler") or self.defaults["sampler"]):
                raise ValueError(f"hires sampler {hires_sampling['sampler']!r}: a CFG++ sampler reads the guidance "
                                 "scale as its lambda, the first pass's sampler as CFG's scale (or the other way "
                                 "round); take CFG++ samplers for both passes or for neither")
            # (the second pass's plan laid out now, the part its image to image runs, so that a sampler and schedule
            # type that cannot run it are refused before the first pass runs, not after)
            from imagine.sampling import run_plan

            h = hires_sampling
            rule = h.get("strength_rule", "diffusers")  # (the second pass's: its sampling is hires_sampling's alone)
            try:
                run_plan(self.a1111_schedule(kw.get("downcast_alphas_cumprod", False),
                                             kw.get("zero_terminal_snr", False)) or self.schedule,
                         h["sampler"], hires_steps or kw.get("steps") or self.defaults["steps"], img2img=True,
                         strength=hires_strength, start=h.get("start") or "noise",
                         strength_rule="a1111_fixed_steps" if rule == "a1111" else rule,
                         lcm_strength=self.guidance_embedded, **self._plan_options(h["sampler"], h.get("sigma_schedule")),
                         **{k: h[k] for k in ("karras", "rho", "sigma_range", "discard_penultimate_sigma") if k in h})
            except ValueError as e:
                raise ValueError(f"hires sampler {h['sampler']!r}: {e}") from None
        if (hires_control_image is not None or hires_control_mode is not None) and kw.get("control_image") is None:
            raise ValueError("hires_control_image / hires_control_mode are the second pass's ControlNet pictures and "
                             "modes: give control_image (the first pass's) too")
        if hires_control_mode is not None:
            from imagine.models.controlnet import CONTROL_MODES

            modes = [hires_control_mode] if isinstance(hires_control_mode, str) else list(hires_control_mode)
            if any(m not in CONTROL_MODES for m in modes):
                raise ValueError(f"hires_control_mode must be one of {', '.join(CONTROL_MODES)}, or one per "
                                 f"ControlNet; got {hires_control_mode!r}")
        from imagine.upscalers import UpscaleModel

        model = hires_upscaler if isinstance(hires_upscaler, UpscaleModel) else None
        upscaler = "model" if model is not None else hires_upscaler_key(hires_upscaler)
        latent = LATENT_UPSCALE_MODES.get(upscaler)
        # (a refiner runs in the second pass only: AUTOMATIC1111's default "hires_fix_refiner_pass")
        first = self.generate(prompt, negative_prompt, callback=callback, progress=progress,
                              output_type="latent" if latent else "pil",
                              **{k: v for k, v in kw.items() if k not in ("refiner_switch", "refiner_switch_by_steps")})
        p = first.parameters
        f = self.scale
        (up_h, up_w), (cut_h, cut_w) = hires_target(p["height"], p["width"], hires_scale, hires_resize, f)
        height, width = up_h - cut_h * f, up_w - cut_w * f
        later = {k: v for k, v in kw.items()
                 if k not in ("seed", "seeds", "num_images_per_prompt", "height", "width", "steps", "strength")}
        if hires_sampling is not None:  # (the second pass's sampling, all of it: A1111's hires sampler)
            later = {**{k: v for k, v in later.items() if k not in SAMPLING_KEYWORDS}, **hires_sampling}
        if later.get("strength_rule") == "a1111":  # (A1111's second pass runs its steps in full, the last of more)
            later["strength_rule"] = "a1111_fixed_steps"
        later.update({k: v for k, v in (("control_image", hires_control_image), ("control_mode", hires_control_mode))
                      if v is not None})
        steps = hires_steps or p["steps"]
        if latent:  # A1111's latent modes: torch's interpolate, its latents cut after (truncate_y / truncate_x)
            mode, antialias = latent
            x = torch.nn.functional.interpolate(first.latents.float(), size=(up_h // f, up_w // f), mode=mode,
                                                antialias=antialias,
                                                **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))
            start = {"init_latents": x[:, :, cut_h // 2:x.shape[2] - (cut_h + 1) // 2,
                                       cut_w // 2:x.shape[3] - (cut_w + 1) // 2]}
        else:  # the pictures resized (Lanczos; nearest), cut before encoding where A1111 cuts the encoded latents
            box = (cut_w // 2 * f, cut_h // 2 * f, up_w - (cut_w + 1) // 2 * f, up_h - (cut_h + 1) // 2 * f)
            if model is not None:  # (an upscaler model as A1111's images.resize_image runs it: imagine.upscalers)
                from imagine.upscalers import a1111_resize

                start = {"init_image": [a1111_resize(im, up_w, up_h, model).crop(box) for im in first.images]}
            else:
                kind = Image.NEAREST if upscaler == "nearest" else Image.LANCZOS
                start = {"init_image": [im.resize((up_w, up_h), kind).crop(box) for im in first.images]}
        prompts = [hires_prompt] * len(first.seeds) if hires_prompt else p["prompt"]
        negatives = [hires_negative_prompt] * len(first.seeds) if hires_negative_prompt else first.negatives
        if first.subseeds is not None:  # (the same variation seeds in both passes, as A1111)
            later = {**{k: v for k, v in later.items() if k != "subseed"}, "subseeds": first.subseeds}
        # (prompt editing on one timeline over both passes, A1111's: the first pass's steps as it counts them)
        first_editing = 2 * p["steps"] if _two_call(p["sampler"]) else p["steps"]
        # (the second pass's reports say so: a progress display counts the two passes, as A1111's does)
        second_callback = None if callback is None else (lambda d: callback({**d, "hires_pass": True}))
        second = self.generate(prompts, negatives, seeds=first.seeds, height=height, width=width,
                               steps=steps, strength=hires_strength, callback=second_callback, progress=progress,
                               output_type=output_type, editing_first_pass=first_editing, **start, **later)
        params = second.parameters
        if hires_sampling is not None:  # (the parameters name the first pass's sampling, and the second's apart)
            params = {**{k: v for k, v in params.items() if k not in _SAMPLING_PARAMS},
                      **{k: p[k] for k in _SAMPLING_PARAMS if k in p}, "hires_sampling": dict(hires_sampling)}
        params = {**params, "height": p["height"], "width": p["width"], "steps": p["steps"],
                  # (a size asked stands for the scale, as A1111's infotext says it)
                  **({"hires_resize": f"{hires_resize[0]}x{hires_resize[1]}"} if hires_resize
                     else {"hires_scale": float(hires_scale)}), "hires_steps": steps,
                  "hires_upscaler": model.a1111_name if model is not None else HIRES_UPSCALERS[upscaler],
                  "prompt": p["prompt"],
                  "negative_prompt": p["negative_prompt"],
                  **({"hires_prompt": hires_prompt} if hires_prompt else {}),
                  **({"hires_negative_prompt": hires_negative_prompt} if hires_negative_prompt else {})}
        return GenerationResult(images=second.images, seeds=second.seeds, parameters=params, negatives=second.negatives,
                                subseeds=second.subseeds,
                                seconds=first.seconds + second.seconds, latents=second.latents)

    @functools.cached_property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's "Model hash" of this model's checkpoint file (None for a folder), found once: a
        checkpoint's sha256 takes seconds (imagine.loading.hashes keeps it on disk too)."""
        from imagine.loading.hashes import model_hash

        try:
            return model_hash(self.c.source)
        except OSError:  # (the file moved or gone since it loaded: no hash rather than a failed run)
            return None

    def file_hashes(self, words: list[str] = (), loras: list[str] = ()) -> dict:
        """AUTOMATIC1111's hashes of the files a run used (imagine.loading.hashes), as a run's record keeps them:
        "model_hash" (a single-file checkpoint's; a folder has none), "lora_hashes" and "ti_hashes" ("name: hash"
        for the LoRAs and embedding words given, those loaded from files)."""
        out = {"model_hash": self.model_hash} if self.model_hash else {}
        for key, kind, names in (("lora_hashes", "lora", loras), ("ti_hashes", "embedding", words)):
            held = [(name, self.network_hashes[kind, name]) for name in names if (kind, name) in self.network_hashes]
            if held:  # (A1111 takes ":" and "," out of the names, which its list separates by)
                out[key] = ", ".join(f"{name.translate(_HASH_LIST_SYMBOLS)}: {digest}" for name, digest in held)
        return out

    def run_record(self) -> dict:
        """How this pipeline computes, for a run's record where it is not exact float32 (the images differ): precision
        "fast" (bf16 and our kernels: the same picture again on a CPU of the same kind), the weights' dtype where not
        float32."""
        out = {"precision": "fast"} if self.precision == "fast" else {}
        dtype = next(self.unet.parameters()).dtype
        if dtype != torch.float32:
            out["dtype"] = str(dtype).replace("torch.", "")
        return out

    def _seed_resize(self, from_h, from_w, size: tuple) -> tuple[int, int] | None:
        """AUTOMATIC1111's seed_resize_from_h / _w (pixels; either <= 0: off) -> the latent size the seeds' noise is
        drawn at, or None when off, equal to this run's latent `size`, or under one latent cell (A1111 then pastes
        nothing)."""
        for name, v in (("seed_resize_from_h", from_h), ("seed_resize_from_w", from_w)):
            if isinstance(v, bool) or not isinstance(v, int) or v > MAX_SEED_RESIZE:
                raise ValueError(f"{name} must be a whole number of pixels up to {MAX_SEED_RESIZE} (0 or less: "
                                 f"off); got {v!r}")
        if from_h <= 0 or from_w <= 0:
            return None
        first = (from_h // self.scale, from_w // self.scale)
        return None if first == tuple(size) or 0 in first else first

    def _picture_batch(self, prompt, negative_prompt, image, per_prompt: int, seed, seeds, picture: bool = True):
        """The batch of a run conditioned on pictures (`upscale`, `variations`) or on an embedding (unCLIP's prior,
        picture=False: no picture): (prompts, negative prompts, pictures, seeds), each per image: one prompt or a
        list, a negative prompt or one per prompt, one picture or one per prompt, `per_prompt` images of each;
        seeds: `seeds`, else seed, seed + 1, ... (random where None or < 0)."""
        prompts = _prompt_list(prompt, per_prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        pictures = self._init_images(image, len(prompts), per_prompt, "image") if picture else None
        if pictures is None and picture:
            raise ValueError("give the picture (image=)")
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        return prompts, negatives, pictures, seed_list(seed, seeds, len(prompts))

    def _picture_run(self, prompts, negatives, seeds, height: int, width: int, condition, *, steps, guidance_scale,
                     sampler, eta, karras, sigma_schedule, rho, final_step, sampler_options, emphasis, long_prompts,
                     callback, progress, output_type, **params) -> GenerationResult:
        """The run `upscale` and `variations` share: the model's defaults where steps, guidance or sampler are not
        given; the prompts' LoRAs and encodings; `condition(generators)` -> (the U-Net's class labels for the prompts,
        for the negatives, channels to concatenate or None), its noise drawn from each image's generator before the
        start noise (as diffusers' pipelines draw them); the sampling; the decoded images (none for output_type
        "latent") and the parameters (`params` with what generate records)."""
        _check_output_type(output_type)
        d = self.defaults
        steps = _steps(steps, d["steps"])
        guidance_scale = _default_guidance(d, guidance_scale, sampler or d["sampler"])
        sampler = sampler or d["sampler"]
        t0 = time.perf_counter()
        generators = make_generators(len(prompts), seeds)
        self.set_request_loras(self.loras_asked([*prompts, *(n for n in negatives if n)]))
        # (diffusers' gate for these models' pipelines, upscaler and unCLIP: a scale at or below 1 runs the prompt's
        # side alone; generate's text to image guides at any scale other than 1, as AUTOMATIC1111)
        guided = guidance_scale > 1.0 or is_cfg_pp(sampler)
        cond, uncond = self.conditioning(prompts, negatives, height, width, guided, emphasis, long_prompts)
        label, negative_label, concat = condition(generators)
        cond = {**cond, "class_labels": label}
        uncond = None if uncond is None else {**uncond, "class_labels": negative_label}
        latents = self._sample((len(prompts), self.latent_channels, height // self.scale, width // self.scale), cond,
                               uncond, steps=steps, guidance_scale=guidance_scale if guided else 1.0, sampler=sampler,
                               generators=generators, seeds=seeds, guidance_rescale=0.0, eta=eta, karras=bool(karras),
                               sigma_schedule=sigma_schedule, rho=rho, final_step=final_step or "euler",
                               sampler_options=sampler_options, thresholding=None, callback=callback,
                               progress=progress, concat=concat)
        params = {"steps": steps, "sampler": sampler, "guidance_scale": guidance_scale, "height": height,
                  "width": width, **params, "model": Path(self.c.source).name if self.c.source else "default",
                  "version": __import__("imagine").__version__, **self.run_record(), "prompt": prompts[0],
                  "negative_prompt": negatives[0] or ""}
        if (record := emphasis_record(emphasis, [*prompts, *(n for n in negatives if n)])) is not None:
            params["emphasis"] = record
        if sigma_schedule or karras:
            params["schedule_type"] = sigma_schedule or "karras"
        images = [] if output_type == "latent" else [to_pil(im) for im in self.decode(latents)]
        return GenerationResult(images=images, seeds=seeds, parameters=params, latents=latents, negatives=negatives,
                                seconds=time.perf_counter() - t0)

    def check_resize_mode(self, mode: str, inits: list | None, masks: list | None) -> bool:
        """resize_mode must be one of RESIZE_MODES, and other than "just_resize" only with init pictures;
        "latent_upscale" (True) is image to image's only: not for a mask, an inpainting or instruct-pix2pix model
        (A1111 runs it only where the picture is encoded alone), and its pictures must share one size (they are
        encoded together, at `factor_size`)."""
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
        if mode != "just_resize" and inits is None:
            raise ValueError(f"resize_mode {mode!r} brings an init_image to the size; give init_image")
        if mode != "latent_upscale":
            return False
        if masks is not None or self.image_conditioned or self.edits:
            raise ValueError("resize_mode 'latent_upscale' is for image to image; inpainting and instruct-pix2pix "
                             "take the picture at the output size: use 'just_resize', 'crop_and_resize' or "
                             "'resize_and_fill'")
        if len({im.size for im in inits}) > 1:
            raise ValueError(f"resize_mode 'latent_upscale' encodes the pictures together: give pictures of one size "
                             f"(got {sorted({im.size for im in inits})})")
        return True

    def factor_size(self, picture: Image.Image) -> tuple[int, int]:
        """A picture's (width, height), each side down to the VAE's factor (at least one factor): the size it is
        encoded at where its own is kept (generate's default size, "latent_upscale", the x4 upscaler's input)."""
        return tuple(max(self.scale, side // self.scale * self.scale) for side in picture.size)

    def _init_images(self, init_image, n_prompts: int, per_prompt: int, name: str = "init_image",
                     mode: str | None = "RGB") -> list[Image.Image] | None:
        """init_image (one PIL image, or one per prompt) -> one per image of the batch, in `mode` (None: as given)."""
        if init_image is None:
            return None
        images = [init_image] if isinstance(init_image, Image.Image) else list(init_image)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise TypeError(f"{name} must be a PIL image or a list of them (one per prompt)")
        if len(images) == 1:
            images = images * n_prompts
        if len(images) != n_prompts:
            what = {"init_image": "init images", "mask_image": "masks", "image": "pictures"}.get(name, "control pictures")
            raise ValueError(f"{len(images)} {what} for {n_prompts} prompts; give one, or one per prompt")
        return [(im.convert(mode) if mode else im) for im in images for _ in range(per_prompt)]

    def _control_pictures(self, control_image, scales, n_prompts: int, per_prompt: int, starts=0.0,
                          ends=1.0, modes="balanced", a1111: bool = False) -> list[tuple]:
        """(ControlNet, one RGB picture per image of the batch, scale, (start, end), control mode) per loaded
        ControlNet; [] with no picture."""
        if control_image is None:
            if self.controlnets:
                log.debug("ControlNets loaded but no control_image given: they are not used")
            return []
        if not self.controlnets:
            raise ValueError("control_image given, but no ControlNet is loaded (load_controlnet, or --controlnet)")
        n = len(self.controlnets)
        if n == 1:
            per_net = [control_image]
        elif not isinstance(control_image, (list, tuple)) or len(control_image) != n:
            raise ValueError(f"{n} ControlNets are loaded ({', '.join(k for k, _ in self.controlnets)}): give "
                             f"control_image as a list of {n}, one picture (or one per prompt) for each")
        else:
            per_net = list(control_image)
        def per_controlnet(values, what: str, low: float = -math.inf, high: float = math.inf) -> list[float]:
            if isinstance(values, (int, float)) and not isinstance(values, bool):
                values = [values] * n
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                           math.isfinite(v) and low <= v <= high for v in values):
                bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) else ""
                raise ValueError(f"{what} must be a finite number{bounds} or one per ControlNet ({n}); got {values!r}")
            return [float(v) for v in values]

        scales = per_controlnet(scales, "controlnet_scale")
        starts = per_controlnet(starts, "control_guidance_start", 0.0, 1.0)
        ends = per_controlnet(ends, "control_guidance_end", 0.0, 1.0)
        for s, e in zip(starts, ends):  # (A1111's ControlNet extension runs start == end: one step)
            if s > e or (s == e and not a1111):
                raise ValueError(f"control_guidance_start ({s:g}) must be below control_guidance_end ({e:g})"
                                 + ("" if a1111 else " (equal: under A1111's rules)"))
        from imagine.models.controlnet import CONTROL_MODES

        modes = [modes] * n if isinstance(modes, str) else list(modes)
        if len(modes) != n or any(m not in CONTROL_MODES for m in modes):
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}, or one per ControlNet ({n}); "
                             f"got {modes!r}")
        return [(net, self._init_images(pictures, n_prompts, per_prompt, "control_image"), scale, (s, e), mode)
                for (_, net), pictures, scale, s, e, mode in zip(self.controlnets, per_net, scales, starts, ends,
                                                                 modes)]

    @property
    def edits(self) -> bool:
        """Whether the model is InstructPix2Pix's (Brooks et al. 2023): its U-Net reads the picture to edit, as
        latents beside the noisy latents (4 + 4 = 8 input channels in SD's), and follows an instruction."""
        return self.unet.config.in_channels == 2 * self.latent_channels

    @property
    def guidance_embedded(self) -> bool:
        """Whether the U-Net takes the guidance scale as an input (a guidance-distilled latent consistency model, Luo
        et al. 2023, LCM sec. 4.2; diffusers' time_cond_proj_dim, e.g. SimianLuo/LCM_Dreamshaper_v7). generate then
        runs as diffusers' pipelines run such a U-Net (LatentConsistencyModelPipeline; StableDiffusion(XL)Pipeline
        likewise): one U-Net call a step on the prompt alone, no classifier-free guidance pass, the scale s given as
        the code of w = s - 1 (`imagine.models.embeddings.guidance_scale_embedding`; diffusers' CFG scale is LCM's
        w + 1), a non-empty negative prompt refused. The defaults are LCM_DEFAULTS (the lcm sampler, 4 steps,
        8.5). Any other sampler runs too, the same way (diffusers lets any scheduler step such a U-Net with the
        code), but the model was distilled for the lcm sampler's few steps at its distillation timesteps; CFG++
        samplers, which need the unconditional pass, are refused."""
        return self.unet.config.time_cond_proj_dim is not None

    def _check_guidance_embedded(self, sampler: str, guidance_rescale: float) -> None:
        """The options a guidance-distilled LCM's run cannot honour, refused by name."""
        if is_cfg_pp(sampler):
            raise ValueError(f"sampler {sampler!r}: a CFG++ sampler renoises with the unconditional prediction, which "
                             "a guidance-distilled LCM (time_cond_proj_dim) does not make; take e.g. 'lcm'")
        if guidance_rescale:
            raise ValueError("guidance_rescale rescales classifier-free guidance, which a guidance-distilled LCM "
                             "(time_cond_proj_dim) does not run (its scale is an input of the U-Net); leave it 0")
        sc = self.c.scheduler_config
        if resolve_sampler(sampler)[0] == "lcm" and int(sc.get("original_inference_steps") or 50) != 50:
            from imagine.schedules import LCM_ORIGINAL_STEPS

            raise ValueError(f"the lcm sampler runs over LCM's {LCM_ORIGINAL_STEPS} distillation timesteps; this "
                             f"model's scheduler config says original_inference_steps="
                             f"{sc['original_inference_steps']}, which imagine does not lay out")

    def _with_guidance_code(self, cond, guidance_scale: float, batch: int):
        """cond with a guidance-distilled LCM's `timestep_cond`: the code of w = guidance_scale - 1 for each of the
        batch's rows, as diffusers' LatentConsistencyModelPipeline makes it (float32 w)."""
        from imagine.models.embeddings import guidance_scale_embedding

        if isinstance(cond, ComposedConditioning):
            raise ValueError("AND (composed prompts) combines predictions against the unconditional one, which a "
                             "guidance-distilled LCM (time_cond_proj_dim) does not make; give one prompt")
        w = torch.tensor(guidance_scale - 1, dtype=torch.float32).repeat(batch)
        code = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim).to(self.unet.device)
        return _each_step(cond, lambda c: {**c, "timestep_cond": code})

    @property
    def picture_model(self) -> str | None:
        """What the model is where a picture conditions it throughout ("a super-resolution model (SD's x4
        upscaler)", "an unCLIP decoder (SD 2.1 unCLIP)"): it runs `upscale` or `variations`, not `generate`; else
        None."""
        if self.c.low_res_schedule is not None:
            return "a super-resolution model (SD's x4 upscaler)"
        if self.c.image_embedder is not None and self.c.prior is None:
            return "an unCLIP decoder (SD 2.1 unCLIP)"
        return None

    def upscale(self, prompt, image, negative_prompt=None, **kw) -> GenerationResult:
        """A super-resolution model's (SD's x4 upscaler) picture made larger as the prompt describes it:
        `imagine.pipelines.upscale.upscale`."""
        from imagine.pipelines.upscale import upscale

        return upscale(self, prompt, image, negative_prompt, **kw)

    def variations(self, image, prompt=None, negative_prompt=None, **kw) -> GenerationResult:
        """An unCLIP decoder's (SD 2.1 unCLIP) variations of a picture, from its CLIP image embedding:
        `imagine.pipelines.unclip.variations`."""
        from imagine.pipelines.unclip import variations

        return variations(self, image, prompt, negative_prompt, **kw)

    @property
    def image_conditioned(self) -> bool:
        """Whether the U-Net is an inpainting model's: it takes the mask and the masked picture's latents
        beside the noisy latents (4 + 1 + 4 = 9 input channels in SD's)."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    def _inpainting(self, inits, masks, shape, width: int, height: int, generators, encoders, strength: float,
                    init_latents: torch.Tensor | None = None, masked_content: str = "original",
                    strength_rule: str = "diffusers", fill: torch.Tensor | None = None):
        """The start and the model's inputs of an inpainting run, with diffusers' draws in diffusers' order (each
        image's generator: the picture's posterior, then the start noise, then the masked picture's posterior); the
        posteriors' draws come from `encoders` (the images' generators, or under A1111's rules streams of their own).
        Each image encodes its picture with its own generator, so a seed gives the same image in any batch (with
        num_images_per_prompt > 1 diffusers encodes a shared picture once, with the first image's generator: its
        later images differ from the same seeds run alone).
        An inpainting model given no mask paints everything anew: its mask is all ones, its masked picture all
        zeros (AUTOMATIC1111's conditioning for such a model in text to image and image to image). `fill`: the
        noise of masked_content "latent_noise" (default: the start noise)."""
        from imagine.inpainting import a1111_latent_mask, latent_mask, masked_pixels, prepare_masks

        if self.vae is None:
            raise ValueError("inpainting needs a latent model (with a VAE); this model works on pixels")
        if inits is None:  # an inpainting model from text or latents: everything masked, nothing known
            pixels = torch.zeros(shape[0], 3, height, width)
            mask = torch.ones(shape[0], 1, height, width)
        else:
            pixels = self._pixels(inits, width, height)
            mask = prepare_masks(masks, width, height) if masks is not None else torch.ones(shape[0], 1, height, width)
        image_cond = self.image_conditioned
        # the picture's latents: the start below strength 1, and what a plain model keeps (diffusers' order)
        if init_latents is not None:
            init = init_latents.float()
        else:
            # (at strength 1 an inpainting model starts from noise, as diffusers; A1111's rules from q(x_t | x_0))
            init = self._encode_pixels(pixels, encoders) \
                if inits is not None and (not image_cond or strength < 1 or strength_rule != "diffusers") else None
        noise = PerSampleNoise(generators).draw_start(shape)
        # the mask the samplers keep the known part by: diffusers' (nearest of the binarized pixel mask) or A1111's
        a1111 = strength_rule != "diffusers" and masks is not None
        keep = a1111_latent_mask(masks, width, height, shape[-2:]) if a1111 else latent_mask(mask, shape[-2:])
        if init is not None and masked_content != "original":  # A1111's masked content, in the part painted anew
            if masked_content == "latent_nothing":
                fill = torch.zeros_like(init)
            elif fill is None:
                fill = noise
            init = torch.lerp(init, fill.to(init.dtype), keep.to(init.dtype))
        if image_cond:
            masked = self._encode_pixels(masked_pixels(pixels, mask), encoders)
            concat = torch.cat([latent_mask(mask, shape[-2:]), masked], dim=1)
            # (A1111 keeps the known part for an inpainting model too)
            return init, {"noise": noise, "concat": concat, **({"mask": keep} if a1111 else {})}
        PerSampleNoise(encoders).draw(shape)  # diffusers encodes the masked picture here too, unused: same draws
        return init, {"noise": noise, "mask": keep}

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], width: int, height: int, generators) -> torch.Tensor:
        """Images -> scaled latents z ~ q(z | x) drawn with each image's generator (diffusers' img2img samples the
        posterior, then draws the noise); resized to width x height (Lanczos, as diffusers) where they differ.
        A model without a VAE starts from the pixels."""
        x = self._pixels(images, width, height)
        if self.vae is None:
            return x
        return self._encode_pixels(x, generators)

    @staticmethod
    def _pixels(images: list[Image.Image], width: int, height: int, normalize: bool = True) -> torch.Tensor:
        """RGB pictures -> [B, 3, height, width] in [-1, 1] ([0, 1] without `normalize`), resized (Lanczos, as
        diffusers) where they differ."""
        from imagine.images import from_pil

        x = torch.stack([from_pil(im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS))
                         for im in images])
        return x if normalize else (x + 1) / 2

    def _edit_latents(self, images: list[Image.Image], width: int, height: int) -> torch.Tensor:
        """instruct-pix2pix's picture condition: the mode of q(z | x) of each picture, not scaled (the model was
        trained on them so, and diffusers' pipeline gives them so)."""
        return self.vae_mode(self._pixels(images, width, height))

    @torch.no_grad()
    def vae_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> the mode of q(z | x), not scaled (float32)."""
        m = fast_copy(self.vae) if self.precision == "fast" else exact_copy(self.vae)
        x = x.to(_weights_dtype(m))
        if m is not self.vae:
            x = x.contiguous(memory_format=torch.channels_last)
        return m.encode(x).mode().float()

    @torch.no_grad()
    def _encode_pixels(self, x: torch.Tensor, generators) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents z ~ q(z | x), drawn with each image's generator."""
        m = fast_copy(self.vae) if self.precision == "fast" else exact_copy(self.vae)
        xm = x.to(_weights_dtype(m))
        if m is not self.vae:  # the copies run channels-last maps
            xm = xm.contiguous(memory_format=torch.channels_last)
        posterior = m.encode(xm)
        z = posterior.sample(noise=PerSampleNoise(generators).draw(tuple(posterior.mean.shape)))
        return self.vae.to_latent(z.float())

    def _sample(self, shape, cond, uncond, *, steps, guidance_scale, sampler, generators, seeds, guidance_rescale, eta,
                karras, thresholding, callback, progress, sigma_schedule=None, final_step="euler", sampler_options=None,
                rho=None, start="noise", threshold_range=1.0, init=None, strength=1.0, noise=None, mask=None,
                concat=None, controls=None, refiner_switch=None, refiner_switch_by_steps=False,
                image_guidance_scale=None, image_guidance_gate=True,
                report=None, sigma_range="spaced", discard_penultimate_sigma=False, strength_rule="diffusers",
                schedule=None, padding=None, quantize=False, window=None, levels=None, prediction_type=None,
                rule=None):
        """The sampler's run over the U-Net (and what wraps it); `schedule`: the run's noise schedule (None: the
        model's); `padding`: an imagine.guidance.PaddedConds to run the guidance through."""
        from imagine.sampling import ConcatChannels, ConcatFromCond, sample

        kwargs = self._plan_options(sampler, sigma_schedule)
        model = _Autocast(self.unet) if self.precision == "fast" else exact_copy(self.unet)
        if concat is not None:  # an inpainting model's mask and masked-picture latents
            model = ConcatChannels(model, concat)
        guidance = None
        if image_guidance_scale is not None:  # instruct-pix2pix: the picture's latents come with each pass's cond
            from imagine.guidance import instruct_pix2pix_guidance

            model = ConcatFromCond(model)
            guidance = functools.partial(instruct_pix2pix_guidance, image_scale=image_guidance_scale,
                                         gate=image_guidance_gate)
        if padding is not None:  # (the prompt and negative brought to one length before the guidance rule runs)
            padding.inner = guidance or padding.inner
            guidance = padding
        if controls:  # ControlNets (they see the noisy latents alone), each run as the U-Net is: its fast or exact copy
            from imagine.models.controlnet import Controlled

            copy = fast_copy if self.precision == "fast" else exact_copy
            # (the guidance windows by ComfyUI's rule under its start, by A1111's ControlNet extension's under A1111's
            # rules, else diffusers')
            windows = "comfyui" if start == "comfyui" else "diffusers" if strength_rule == "diffusers" else "a1111"
            model = Controlled(model, [(copy(net), *rest) for net, *rest in controls], window_rule=windows,
                               schedule=schedule or self.schedule)
        if refiner_switch is not None:  # SDXL's refiner for the last steps (imagine.refiner)
            from imagine.refiner import Handoff

            r = self.refiner.unet
            model = handoff = Handoff(model, _Autocast(r) if self.precision == "fast" else exact_copy(r), refiner_switch,
                                      by_steps=refiner_switch_by_steps)
        latents = sample(model, shape if noise is None else noise, schedule=schedule or self.schedule,
                         prediction_type=prediction_type or self.prediction_type, sampler=sampler,
                      steps=steps, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, thresholding=thresholding, threshold_range=threshold_range,
                      karras=bool(karras), eta=eta,
                      generator=generators, noise_seeds=seeds, callback=callback, progress=progress,
                      sigma_range=sigma_range,
                      discard_penultimate_sigma=discard_penultimate_sigma, strength_rule=strength_rule,
                      final_step=final_step, sampler_options=sampler_options, rho=rho, start=start,
                      init=init, strength=strength, mask=mask, guidance=guidance,
                      lcm_strength=self.guidance_embedded, quantize=quantize, window=window, levels=levels, rule=rule,
                      **kwargs)  # (an LCM pipeline's image to image)
        if report is not None and refiner_switch is not None:
            report["refined"] = handoff.used  # (whether some step was the refiner's)
        return latents

    def _plan_options(self, sampler: str, sigma_schedule) -> dict:
        """The plan's layout as the model's scheduler config gives it (timestep spacing, steps offset) for `sampler`,
        with the schedule type `sigma_schedule`: the keywords of sampling.sample and sampling.run_plan. A diffusers
        config without a timestep_spacing (SD 1.5's and 2.1's, written before diffusers had the key) gives each
        sampler the spacing of the diffusers scheduler that runs it, as diffusers' from_config does (the key is
        among its `_use_default_values`): "linspace" for Euler, DPM++ and the like, "leading" for DDIM and DDPM
        (samplers.diffusers_plan_layout, the rule the pixel cascade shares)."""
        from imagine.samplers import diffusers_plan_layout

        if sigma_schedule == "align_your_steps" and self.unet.config.addition_embed_type == "text_time":
            sigma_schedule = "align_your_steps_sdxl"  # (SDXL's levels for an SDXL model, as A1111 picks them)
        return {"sigma_schedule": sigma_schedule, **diffusers_plan_layout(self.c.scheduler_config, sampler)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return decode_latents(self.vae, latents, self.precision)


# ---------------------------------------------------------------------------------------------
# The fast mode: bfloat16 weights, channels-last feature maps (float32 with Winograd
# convolutions on a CPU without native bf16: see fast_copy)
# ---------------------------------------------------------------------------------------------
# Measured on a 2-core Sapphire Rapids (AMX) with the SD 1.5 U-Net (docs/stable-diffusion.md):
# bf16 *weights* beat bf16 autocast, which re-casts every fp32 weight on every call (3.4 GB
# read per U-Net step); channels-last lets oneDNN run the convolutions without reordering.
# bfloat16 keeps float32's exponent range, so the attention logits that overflow float16 in
# SD 2.1 (diffusers' `upcast_attention`) cannot overflow here: the fast copy attends in bf16
# (SDPA's CPU flash kernel accumulates in fp32 anyway).
_FAST_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _weights_stamp(module: torch.nn.Module, pin: bool = False) -> tuple:
    """Changes when a weight of `module` is replaced or modified in place. `pin`: the stamp a cached copy
    keeps holds the tensors' storages, so that a replaced weight cannot be given a freed one's address
    (`imagine.models.prepacked.WeightStamp`)."""
    from imagine.models.prepacked import weight_stamp

    return tuple(weight_stamp(p, pin) for p in module.state_dict(keep_vars=True).values())


_EXACT_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors, name for name, value for value."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _each_step(cond, f):
    """f applied to a cond dict, or to each step's dict of a StepConditioning (each part of a ComposedConditioning)."""
    from imagine.guidance import StepConditioning

    return cond.map(f) if isinstance(cond, (StepConditioning, ComposedConditioning)) else f(cond)


def _tag_strength(m: re.Match) -> float | tuple[float, float]:
    """The strength of AUTOMATIC1111's `<lora:name:te[:unet]>` tag: its fields after the name are positional (the
    text encoders' strength, default 1; the U-Net's, default the text encoders') or named (`te=`, `unet=`). One
    number where both are the same, else (text encoders', U-Net's). A1111's `dyn` (a rank to cut the LoRA to) is
    refused: imagine merges the whole LoRA."""
    fields = [f.strip() for f in ([m[2]] if m[2] is not None else []) + (m[3] or "").split(":")[1:]]
    positional, named = [], {}
    for f in fields:  # (as A1111's ExtraNetworkParams: a named field's key is read as written)
        key, eq, value = f.partition("=")
        if eq:
            named[key] = value
        else:
            positional.append(f)

    def number(text: str, what: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"{m[0]}: the {what} strength {text!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{m[0]}: the {what} strength must be a finite number")
        return v

    if len(positional) > 2 or "dyn" in named or set(named) - {"te", "unet", "dyn"}:
        raise ValueError(f"the prompt asks for {m[0]}: imagine reads a LoRA tag's strengths, <lora:name:te:unet> or "
                         "te= / unet=; not a third field (A1111's dyn, a rank to cut the LoRA to) nor other settings")
    te = number(positional[0], "text encoder") if positional else 1.0
    te = number(named["te"], "text encoder") if "te" in named else te
    unet = number(positional[1], "U-Net") if len(positional) > 1 else te
    unet = number(named["unet"], "U-Net") if "unet" in named else unet
    return te if te == unet else (te, unet)


def _strength_text(strength: float | tuple[float, float]) -> str:
    """A strength as its tag writes it: 0.7, or 0.7:0.2 (text encoders', U-Net's)."""
    return f"{strength:g}" if isinstance(strength, (int, float)) else f"{strength[0]:g}:{strength[1]:g}"


def _same_strength(a, b) -> bool:
    ta, tb = ((s, s) if isinstance(s, (int, float)) else tuple(s) for s in (a, b))
    return all(abs(x - y) <= 1e-6 for x, y in zip(ta, tb))


def hires_upscaler_key(name: str) -> str:
    """A hires. fix upscaler: one of HIRES_UPSCALERS' keys, or AUTOMATIC1111's label for it (case aside)."""
    wanted = str(name).strip().lower()
    for key, label in HIRES_UPSCALERS.items():
        if wanted in (key, label.lower()):
            return key
    raise ValueError(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)} (or A1111's labels: "
                     f"{', '.join(HIRES_UPSCALERS.values())}); got {name!r}")


def hires_target(height: int, width: int, scale: float, resize: tuple[int, int] | None = None,
                 factor: int = 8) -> tuple[tuple[int, int], tuple[int, int]]:
    """AUTOMATIC1111's hires. fix size (StableDiffusionProcessingTxt2Img.calculate_target_resolution) -> ((height,
    width) upscaled to, down to the VAE's `factor`; (rows, columns) of latent cells then cut, centred). The size is
    int(side x scale); or `resize`, A1111's (hr_resize_x, hr_resize_y) in pixels, in place of the scale: one of them
    0, the other side from the first pass's aspect (floor division); both, upscaled to cover them at the first pass's
    aspect and its latents cut by (upscaled - asked) // factor cells (its truncate_y / truncate_x)."""
    rx, ry = resize or (0, 0)
    if not rx and not ry:
        up_x, up_y = int(width * scale), int(height * scale)
    elif not ry or (rx and width / height < rx / ry):  # (as wide as asked; as tall as the aspect makes it)
        up_x, up_y = rx, rx * height // width
    else:
        up_x, up_y = ry * width // height, ry
    crop = ((up_y - ry) // factor, (up_x - rx) // factor) if rx and ry else (0, 0)
    return (max(factor, up_y // factor * factor), max(factor, up_x // factor * factor)), crop


def seed_list(seed: int | None, seeds, n: int, same: bool = False, what: str = "seeds") -> list[int]:
    """The n images' seeds: `seeds` as given (n of them), else `seed` counting up, wrapping past MAX_SEED (a negative
    or None: a random one); `same`: all `seed` (A1111's rule where a variation seed tells the images apart)."""
    if seeds is not None:
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} {what} for {n} images")
        return list(seeds)
    base = random.randint(0, MAX_SEED) if seed is None or seed < 0 else int(seed)
    return [(base + (0 if same else i)) % (MAX_SEED + 1) for i in range(n)]


def _prompt_list(prompt, per_prompt) -> list[str]:
    """One prompt or a list of them -> the list, checked, with the number of images for each."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer; got {per_prompt!r}")
    return prompts


OUTPUT_TYPES = ("pil", "latent")  # generate's results: PIL images, or the latents alone (result.latents, no decode)


def _check_output_type(output_type) -> None:
    """output_type must be one of OUTPUT_TYPES (diffusers' "np" and "pt" would otherwise run the whole batch and
    give no image)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil' (PIL images) or 'latent' (the latents alone, in result.latents, "
                         f"not decoded); got {output_type!r} (for diffusers' 'np' or 'pt', decode result.latents with "
                         "pipe.decode: images in [-1, 1])")


def _steps(steps, default) -> int:
    """The sampler's steps asked, a whole number (not a bool: 2.5 must not run 2 steps), or None: the model's
    `default`."""
    if steps is None:
        return int(default)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"steps must be a whole number of sampling steps (1 up to the model's training timesteps); "
                         f"got {steps!r}")
    return int(steps)


def _two_call(sampler: str) -> bool:
    """Whether a sampler evaluates the model twice a step (imagine.samplers.TWO_CALL_SAMPLERS)."""
    from imagine.samplers import TWO_CALL_SAMPLERS, sampler_in

    return sampler_in(sampler, TWO_CALL_SAMPLERS)


def _default_guidance(defaults: dict, guidance_scale: float | None, sampler: str) -> float:
    """The guidance scale asked, else the model's default; for a CFG++ sampler, whose scale is lambda in about [0, 1],
    the default CFG scale / 12.5 (A1111's mapping: 7.5 -> 0.6). A lambda above 2 is far outside CFG++'s range: a
    warning says so (a CFG scale given to a CFG++ sampler)."""
    if guidance_scale is None:
        return default_guidance_scale(defaults["guidance_scale"], sampler)
    guidance_scale = float(guidance_scale)
    if not math.isfinite(guidance_scale):  # (NaN would read as "not above 1": no guidance, without a word)
        raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale}")
    if is_cfg_pp(sampler) and guidance_scale > 2:
        import warnings

        warnings.warn(f"{sampler}: guidance_scale {guidance_scale} is CFG++'s lambda, whose range is about 0 to 1 "
                      "(A1111's CFG scale / 12.5: 7.5 -> 0.6)", stacklevel=3)
    return guidance_scale


def replace_vae(components: Components, vae: str | Path, dtype: torch.dtype = torch.float32,
                loaded: torch.nn.Module | None = None) -> Components:
    """`components` with the VAE at `vae` (a file or folder, `imagine.loading.vae.load_vae`; `loaded`: it, already
    read) in place of its own. A file's VAE takes the model's latent space (scaling factor, shift, per-channel
    statistics: VAEConfig.latent_space), as AUTOMATIC1111 takes its scaling (the file has no config; a fine-tuned
    decoder keeps its model's latent space); a folder's config carries its own."""
    from dataclasses import replace

    own = components.vae
    if own is None:
        raise ValueError(f"--vae {vae}: the model {components.source or 'default'} works on pixels and has no VAE "
                         "to replace")
    if own is loaded:  # (a checkpoint without a VAE of its own took it in its latent space)
        return replace(components, vae_source=str(vae))
    return replace(components, vae=fitted_vae(own, vae, dtype, loaded), vae_source=str(vae))


def fitted_vae(own: torch.nn.Module, vae: str | Path, dtype: torch.dtype = torch.float32,
               loaded: torch.nn.Module | None = None, what: str = "--vae") -> torch.nn.Module:
    """The VAE at `vae` (`loaded`: it, already read) for a model whose VAE is `own`: a file's takes `own`'s latent
    space (replace_vae); one of another kind of model (channels, factor) is a ValueError naming `what`."""
    from imagine.loading.vae import load_vae

    new = loaded if loaded is not None else load_vae(vae, dtype)
    if not Path(vae).is_dir():
        for key, value in own.config.latent_space().items():
            setattr(new.config, key, value)
    for attr in ("latent_channels", "in_channels", "out_channels"):
        if getattr(new.config, attr) != getattr(own.config, attr):
            raise ValueError(f"{what} {vae}: its {attr} is {getattr(new.config, attr)}, the model's VAE has "
                             f"{getattr(own.config, attr)}; it belongs to another kind of model")
    if new.config.downsampling_factor != own.config.downsampling_factor:
        raise ValueError(f"{what} {vae}: it scales images down {new.config.downsampling_factor}x, the model's VAE "
                         f"{own.config.downsampling_factor}x; it belongs to another kind of model")
    return new


def _cached_copy(cache, module: torch.nn.Module, build) -> torch.nn.Module:
    """`build()`'s copy of `module`, made once and kept in `cache` while `module`'s weights do not change
    (replaced, or modified in place through the parameters: a change through `.data` or under
    inference mode moves no version counter and is not seen; `forget_copies` drops the copies then).
    One thread builds while the others wait: the server's worker and a preview decode must not build
    an SD-sized copy twice. A stale copy is dropped before its replacement is built (two copies would be
    alive at once, and the stale one's Winograd filters and budget would count against the new one's).
    The copy is built outside inference mode (its tensors must serve autograd later too). `build` may
    return None (nothing cached, None returned)."""
    with _COPY_LOCK:
        stamp = _weights_stamp(module)
        hit = cache.get(module)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        if hit is not None:
            stale = weakref.ref(hit[1])
            del cache[module], hit
            if stale() is not None:  # (a reference cycle, such as a compiled copy's, keeps it)
                import gc

                gc.collect()
        with torch.inference_mode(False), torch.no_grad():
            copy = build()
        if copy is None:
            return None
        copy = copy.eval()  # (not requires_grad_(False): a copy may share the original's parameters)
        cache[module] = (_weights_stamp(module, pin=True), copy)
        return copy


def forget_copies(module: torch.nn.Module) -> None:
    """Drop the cached exact and fast copies of `module` (and their packs), so that the next call builds
    them from its weights as they are now: for weights changed in a way no version counter shows."""
    with _COPY_LOCK:
        _EXACT_COPIES.pop(module, None)
        _FAST_COPIES.pop(module, None)


_COPY_LOCK = threading.RLock()


def _sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """New modules holding the very same weight tensors as `module` (no weight memory of its own)."""
    import copy as _copy

    return _copy.deepcopy(module, memo={id(t): t for t in [*module.parameters(), *module.buffers()]})


def _packable_bytes(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules()
               if type(m) in (torch.nn.Linear, torch.nn.Conv2d))


def exact_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The exact mode's U-Net or VAE: float32, sharing the original's weight tensors, with its linear layers
    and convolutions multiplying by weights packed once into oneDNN's layout (`imagine.models.prepacked`)
    instead of having oneDNN reorder them at every call, as diffusers' fp32 does. Same kernels, same
    float32 arithmetic: the SD 1.5 U-Net step moves by 2.2e-6 relative (its maps become channels-last).
    Measured on a Zen 4 at one thread, SD 1.5 U-Net at batch 2: 15.2 against 17.4 s a step.

    The packs are a second copy of those weights (3.4 GB for SD 1.5), built at the first call, so the
    module itself is returned where they would take more than a quarter of the memory available now, or
    where packing is off (`IMAGINE_PREPACK=0`, or a torch without oneDNN). The original is not changed
    (training, and the fast copy's float32 Winograd weights, use it)."""
    from imagine.models.prepacked import available, use_prepacked
    from imagine.models.winograd import _available_bytes

    if not available() or _weights_dtype(module) != torch.float32:
        return module
    hit = _EXACT_COPIES.get(module)
    if hit is None:  # the memory check once per module: a copy already made keeps its packs
        free = _available_bytes()
        if free is not None and _packable_bytes(module) > free // 4:
            return module

    def build():
        copy = _sharing_copy(module)
        use_prepacked(copy)
        return copy

    return _cached_copy(_EXACT_COPIES, module, build)


def fast_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The fast mode's copy of a U-Net or VAE, made once and reused as long as the original's
    weights do not change. The original stays as it is (the exact mode and training use it).

    - On a CPU with native bfloat16 (`imagine.hardware.native_bf16`): bfloat16 weights in
      channels-last memory, but the 3x3 convolutions on maps of 16x16 and more (256 or more input
      channels) by Winograd in float32 from the original's float32 weights: on a Zen 4 that beat
      oneDNN's direct bf16 convolution on SD's layers (320 channels on 64x64 at batch 1: 27.4 ms
      against 34.1; 2560 -> 1280 on 16x16 at batch 2: 120 against 164; the VAE's 512 on 256x256:
      1017 against 1397), at float32's accuracy; on 8x8 the direct bf16 one is faster (1280
      channels at batch 2: 20.4 ms against 27.5). With the transform kernel also 128-255 channels
      on maps of 128x128 and more (the VAE's top levels; `winograd.NARROW_CHANNELS`). Not on CPUs
      with AMX, whose bf16 convolutions are several times faster than AVX-512's (unmeasured
      against Winograd there).
    - Without it (emulated bf16 is many times slower than float32 there): float32, sharing the
      original's weights, with its 3x3 convolutions on large maps computed by Winograd's F(4x4, 3x3)
      or, on maps of 24x24 and more where memory allows, F(6x6, 3x3) (`imagine.models.winograd`: a
      quarter or a fifth of the multiplications, within 2-4e-6 of float64 like direct float32;
      not used in bf16, where it loses 9x the accuracy). A module with no such convolution (the
      embedded default's channels are all under 256) gets the exact mode's copy (`exact_copy`).
    - In both copies the linear layers and the direct convolutions use weights packed once into
      oneDNN's layout (`imagine.models.prepacked`: bit-identical outputs in bf16, the same to rounding
      in float32, no reorder per call), and
      the GEGLUs run as two packed products with oneDNN post-ops (each output rounded once)."""
    from imagine.hardware import amx, fast_dtype
    from imagine.models.prepacked import use_prepacked
    from imagine.models.winograd import default_budget_bytes, transform_kernel, use_winograd, winograd_candidates

    if fast_dtype() == torch.float32 and not winograd_candidates(module):
        return exact_copy(module)  # nothing for Winograd to do: the float32 exact copy is the fast one

    def build_float32():
        # The budget is looked at when a copy is made, not at each call: a copy made keeps being returned when
        # the memory available drops later (its own promise counts against it), not the exact copy in turns.
        if default_budget_bytes() == 0:
            return None  # no memory for Winograd (or IMAGINE_WINOGRAD_GB=0): the exact copy serves, uncached
        copy = _sharing_copy(module)
        packs = _pack_bytes_if_they_fit(module, 4)
        if _weights_dtype(module) == torch.float32:  # (a module loaded in bf16 stays direct: Winograd loses 9x
            use_winograd(copy)                         # the accuracy in bf16, see above)
        _channels_last_direct_filters(copy)
        if packs is not None:
            use_prepacked(copy)
        return copy

    def build_bf16():
        state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach())
                 for k, v in module.state_dict().items()}
        state = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v.contiguous()
                 for k, v in state.items()}
        try:
            from imagine.models.io import without_random_init

            with torch.device("meta"), without_random_init():
                copy = type(module)(module.config)  # no init work: the weights are assigned below
            copy.load_state_dict(state, strict=True, assign=True)
        except (TypeError, AttributeError, RuntimeError):
            import copy as _copy

            copy = _copy.deepcopy(module).to(torch.bfloat16).to(memory_format=torch.channels_last)
        for m in copy.modules():
            if hasattr(m, "upcast"):
                m.upcast = False  # see the note above
        packs = _pack_bytes_if_they_fit(module, 2)
        if not amx() and default_budget_bytes() > 0:  # with AMX, oneDNN's bf16 convolutions are the faster
            use_winograd(copy, float32_from=module, min_pixels=BF16_WINOGRAD_MIN_PIXELS, narrow=transform_kernel())
        if packs is not None:
            use_prepacked(copy)  # after use_winograd, which converts only plain nn.Conv2d
        return copy.requires_grad_(False)  # its own bf16 weights

    copy = _cached_copy(_FAST_COPIES, module, build_float32 if fast_dtype() == torch.float32 else build_bf16)
    return exact_copy(module) if copy is None else copy


BF16_WINOGRAD_MIN_PIXELS = 16 * 16  # smallest map for float32 Winograd in a bf16 copy (see fast_copy)


def _pack_bytes_if_they_fit(module: torch.nn.Module, element_size: int) -> int | None:
    """The bytes the packed weights of `module`'s copy will take (its linear and convolution weights at
    `element_size` bytes each: they are a second copy, made at the first call), or None where they would take
    more than a quarter of the memory available now (exact_copy's rule): the copy then runs unpacked (SDXL's
    2.6 B-parameter U-Net on a 24 GB machine, say)."""
    from imagine.models.winograd import _available_bytes

    need = sum(m.weight.numel() for m in module.modules()
               if type(m) in (torch.nn.Linear, torch.nn.Conv2d)) * element_size
    free = _available_bytes()
    return need if free is None or need <= free // 4 else None



def _channels_last_direct_filters(module: torch.nn.Module) -> None:
    """Give the 3x3 convolutions that stay direct in a float32 fast copy (the stride-2 downsamplers,
    those outside Winograd's budget) channels-last copies of their weights when they have
    `winograd.MIN_CHANNELS` or more input channels: with channels-last inputs oneDNN otherwise
    reorders an NCHW weight at every call (measured on an AVX2 EPYC: SD 1.5's 1280-channel
    downsampler 116 ms against 190, no change on 640 or 320 channels or on 1x1 filters). The
    original module keeps its weights."""
    from imagine.models.winograd import MIN_CHANNELS

    for m in module.modules():
        if (type(m) is torch.nn.Conv2d and tuple(m.kernel_size) != (1, 1) and m.in_channels >= MIN_CHANNELS
                and not m.weight.is_contiguous(memory_format=torch.channels_last)):
            m.weight = torch.nn.Parameter(m.weight.detach().contiguous(memory_format=torch.channels_last),
                                          requires_grad=False)


def _weights_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, precision: str = "exact") -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32. "fast" decodes with the VAE's `fast_copy` (bf16
    channels-last where bf16 is native, else float32 with Winograd convolutions), "exact" with its
    `exact_copy` (float32, packed weights); the latent scaling stays in float32.

    Each image is decoded whole, as diffusers and AUTOMATIC1111 decode it (a tile has its own GroupNorm statistics
    and mid-block attention, so tiles change the picture), and alone: its pixels then do not depend on the batch it
    came in (float32 convolutions round by batch shape: 25 pixels of a 3-image batch moved by one level), and a
    batch's peak memory is one image's. Only an image whose decode would not fit in half the memory available now
    (`decode_bytes`) is decoded in 64-latent tiles (`AutoencoderKL.tiled_decode`). Measured on SD's VAE at 1024 x
    1024 (session 25, exact, 2 threads): whole 3.1 GB and 129 s, in tiles 0.8 GB and 196 s."""
    from imagine.models.winograd import _available_bytes

    m = fast_copy(vae) if precision == "fast" else exact_copy(vae)  # the module itself where neither applies
    z = m.from_latent(latents.float()).to(_weights_dtype(m))
    if m is not vae:  # the copies run channels-last maps (their packed and Winograd convolutions' layout)
        z = z.contiguous(memory_format=torch.channels_last)
    free = _available_bytes()
    budget = free // 2 if free is not None else None
    tile = 64 if budget is not None and decode_bytes(m, z[:1]) > budget and max(z.shape[-2:]) > 64 else None
    x = torch.cat([m.tiled_decode(z[i:i + 1], tile) if tile else m.decode(z[i:i + 1]) for i in range(len(z))])
    return x.float().clamp(-1, 1)


def decode_bytes(vae, z: torch.Tensor) -> int:
    """The memory a VAE decode of latents `z` takes at its peak, estimated: about six float32 maps of the decoder's
    widest full-resolution level (measured on SD's VAE, 128 channels there: 0.85, 1.8 and 3.1 GB at 512, 768 and
    1024 pixels, where this gives 0.81, 1.8 and 3.2)."""
    f = vae.config.downsampling_factor
    return 6 * 4 * vae.config.block_out_channels[0] * z.shape[0] * z.shape[-2] * f * z.shape[-1] * f


COMPILE_ENV = "IMAGINE_COMPILE"


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor, with weight freezing) of a fast copy, made once per copy.

    Opt-in ($IMAGINE_COMPILE=1): on the 2-core test machine it cut the SD 1.5 U-Net step by about
    1.2x but took about 45 CPU-seconds to compile (more than 2 minutes of wall time on a busy
    machine), and again for every new batch shape, so it pays only for long runs in one process
    (a server, or --from-file with many prompts), not for one image."""
    hit = getattr(module, "_imagine_compiled", None)
    if hit is None:
        hit = torch.compile(module)
        # kept on the copy (not registered as a submodule), so that it goes with the copy: a cache keyed by the
        # copy would keep it alive through the compiled module's own reference to it
        object.__setattr__(module, "_imagine_compiled", hit)
    return hit


class _Autocast(torch.nn.Module):
    """The fast mode's U-Net: the bf16 channels-last copy of the U-Net (see `fast_copy`), called
    with bf16 channels-last inputs, compiled when $IMAGINE_COMPILE=1 (see `_compiled`); it hands
    back float32, so the sampler's arithmetic stays in float32. (The name is historical: bf16
    weights measured faster than autocast.)"""

    def __init__(self, unet, compile: bool | None = None):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.shares_guidance_batch = bool(getattr(unet, "shares_guidance_batch", False))
        self.fast = fast_copy(unet)
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "").strip() not in ("", "0")
        self.compile = bool(compile)
        self._filters_built = False  # see _needs_eager_call

    def _needs_eager_call(self) -> bool:
        """True while the fast copy has Winograd layers none of which has built its U: the first call
        runs eagerly to build them under the memory budget, and the compiled graph then reads them."""
        from imagine.models.winograd import WinogradConv2d

        if self._filters_built:  # once built, they stay: no scan on every step
            return False
        convs = [m for m in self.fast.modules() if isinstance(m, WinogradConv2d)]
        self._filters_built = not convs or any(m._u for m in convs)
        return not self._filters_built

    def forward(self, x, t, **cond):
        if self.fast is not self.unet:  # the bf16 copy, or the float32 one with Winograd convolutions
            dtype = _weights_dtype(self.fast)
            cond = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "time_ids" else v)
                    for k, v in cond.items()}  # (SDXL's sizes stay float32: their sinusoidal codes are)
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        if self.compile and not self._needs_eager_call():
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):  # weights become constants: oneDNN prepacks them
                out = _compiled(self.fast)(x, t, **cond)
        else:
            out = self.fast(x, t, **cond)
        return out.float()
