"""Loading an original SDXL base single-file checkpoint (the `sd_xl_base_1.0.safetensors` layout), offline.

Stability's generative-models code (`sgm`, `DiffusionEngine`; Podell et al. 2023) saves four networks:

    model.diffusion_model.*      the U-Net, in the LDM layout of SD 1.x/2.x (`keymap.unet_module_table`):
                                 three levels (320, 640, 1280) of two residual blocks, no transformer at
                                 the first level, 2 and 10 transformer blocks per spatial transformer at the
                                 others (and 10 in the middle), linear projections, 64-wide heads, a
                                 2048-wide context; plus `label_emb.0.0` / `label_emb.0.2`, the MLP over
                                 [pooled text, sinusoidal codes of the six size numbers] that diffusers
                                 calls `add_embedding.linear_1` / `linear_2` (1280 + 6 x 256 = 2816 inputs)
    first_stage_model.*          the KL autoencoder: SD's architecture and names; latent scale 0.13025
    conditioner.embedders.0.transformer.text_model.*
                                 CLIP ViT-L/14, a transformers CLIPTextModel (SD 1.x's text encoder)
    conditioner.embedders.1.model.*
                                 the OpenCLIP ViT-bigG/14 text tower (1280 wide, 32 blocks), in the
                                 OpenCLIP names SD 2.x's tower has (`keymap.openclip_to_transformers`);
                                 here every block is kept, since the pooled vector comes from the last
                                 layer and the states from the penultimate, and its `text_projection`
                                 [width, proj] (applied as x @ P) becomes CLIPTextModelWithProjection's
                                 `text_projection.weight` = P^T (diffusers' single-file conversion does
                                 the same transpose)

(embedders 2-4, the size and crop codes, have no weights). Shapes are read off the weights as for SD
1.x/2.x (`single_file.infer_unet_config` already reads per-level transformer depth and levels without
attention), and what the weights do not say follows the released SDXL base configs: 64-wide heads
(`attention_head_dim` = channels // 64, diffusers' "number of heads" meaning), no attention upcast, the
size code width = (label_emb inputs - pooled width) / 6 (256 in SDXL), Euler with SD's betas and
"leading" spacing, 1024 px, and a zero encoding for an empty negative prompt (diffusers'
`force_zeros_for_empty_prompt`).

The two tokenizers are in neither the file nor transformers: `tokenizer` / `tokenizer_2` (folders, or an
SDXL model folder holding both), else `tokenizer/` and `tokenizer_2/` beside the checkpoint (or under
`<name>/`), else $IMAGINE_CLIP_TOKENIZER / $IMAGINE_CLIP_TOKENIZER_2, else a copy already in the local
Hugging Face cache; never downloaded. The first pads with the end token, the second with id 0 ("!",
`open_clip.tokenize`), as SDXL was trained.

Also read, as ComfyUI reads them: a `v_pred` marker tensor (v-prediction) and `ztsnr` (zero terminal SNR,
diffusers' `rescale_betas_zero_snr`). Refused with a clear error: EDM models (Playground v2.5's `edm_mean`).

The refiner (`sd_xl_refiner_1.0.safetensors`, sec. 2.5 of the paper) has the bigG tower alone, as
`conditioner.embedders.0.model.*`, and a U-Net whose added embedding takes five numbers (original size, crop
corner, aesthetic score: 1280 + 5 x 256 = 2560 inputs) and cross-attends to bigG's 1280-wide states; it needs
`tokenizer_2` only, and encodes an empty negative prompt (diffusers' refiner config).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagine.loading import keymap
from imagine.loading import single_file as sf
from imagine.loading.folder import Components

log = logging.getLogger(__name__)

SDXL_MARK = "conditioner.embedders."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner has the bigG tower alone, as embedders.0
TOKENIZER_2_ENV = "IMAGINE_CLIP_TOKENIZER_2"

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
}
SDXL_SCALING_FACTOR = 0.13025  # stabilityai/sdxl-vae, vae/config.json
SDXL_SAMPLE_SIZE = 128  # latents of 1024 px
SIZE_NUMBERS = 6  # original (h, w), crop corner (top, left), target (h, w)
REFINER_NUMBERS = 5  # original (h, w), crop corner (top, left), aesthetic score
MARKERS = ("v_pred", "ztsnr")  # empty tensors some fine-tunes carry (ComfyUI's convention)
# Keys besides the four networks: LDM/sgm buffers and training bookkeeping (as for SD; `denoiser.sigmas` is
# checked against the schedule below), the contrastive logit scale, CLIP's position_ids buffer.
IGNORED_PREFIXES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_alphas_cumprod",
                    "posterior_", "logvar", "model_ema.", "lvlb_weights", "denoiser.", BIGG_PREFIX + "logit_scale",
                    BIGG_PREFIX + "attn_mask", REFINER_BIGG_PREFIX + "logit_scale", REFINER_BIGG_PREFIX + "attn_mask")
SDXL_LAYOUT = (f"an original SDXL checkpoint (model.diffusion_model.* U-Net, first_stage_model.* VAE, {CLIP_L_PREFIX}* "
               f"CLIP ViT-L and {BIGG_PREFIX}* OpenCLIP ViT-bigG; the refiner: {REFINER_BIGG_PREFIX}*)")  # (for errors)
OTHER_SDXL_LIKE = {
    "edm_mean": "a Playground v2.5 checkpoint (an EDM model: edm_mean / edm_std); imagine loads SDXL base models "
                "(DDPM-trained, epsilon or v)",
    "edm_vpred.sigma_max": "an EDM v-prediction SDXL checkpoint (edm_vpred.*); imagine loads SDXL base models "
                           "(DDPM-trained, epsilon or v)",
}


def is_sdxl(state: dict[str, torch.Tensor]) -> bool:
    """Whether an original checkpoint is SDXL's (its text encoders sit under conditioner.embedders.*)."""
    return any(k.startswith(SDXL_MARK) for k in state)


# ---------------------------------------------------------------------------------------------
# The file's parts
# ---------------------------------------------------------------------------------------------
def is_refiner(state: dict[str, torch.Tensor]) -> bool:
    """Whether an original SDXL checkpoint is the refiner's: the bigG tower as embedders.0, no CLIP ViT-L."""
    keys = list(state)
    return any(k.startswith(REFINER_BIGG_PREFIX) for k in keys) and not any(k.startswith(CLIP_L_PREFIX) for k in keys)


def split_sdxl(state: dict[str, torch.Tensor], source: str = "checkpoint", vae_given: bool = False) -> dict[str, Any]:
    """An original SDXL base or refiner state dict -> {"unet", "vae", "clip" (empty for the refiner), "openclip":
    {...} (prefixes removed), "refiner": bool, "markers": set of MARKERS present, "betas", "sigmas": tensor | None}.
    ValueError, naming what was found, for EDM models, a missing network or weights of no known place."""
    keys = list(state)
    for key, what in OTHER_SDXL_LIKE.items():
        if key in state:
            raise ValueError(f"{source} looks like {what}")
    refiner = is_refiner(state)
    prefixes = {keymap.UNET_PREFIX: "unet", keymap.VAE_PREFIX: "vae"}
    prefixes.update({REFINER_BIGG_PREFIX: "openclip"} if refiner else {CLIP_L_PREFIX: "clip", BIGG_PREFIX: "openclip"})
    split, rest = sf.split_by_prefix(state, prefixes, IGNORED_PREFIXES)
    parts: dict[str, Any] = {"clip": {}, **split, "refiner": refiner, "markers": {k for k in rest if k in MARKERS},
                             "betas": state.get("betas"), "sigmas": state.get("denoiser.sigmas")}
    other = [k for k in rest if k not in MARKERS]
    expected = ("expected an original SDXL checkpoint with model.diffusion_model.* (U-Net), first_stage_model.* "
                f"(VAE), {CLIP_L_PREFIX}* (CLIP ViT-L) and {BIGG_PREFIX}* (OpenCLIP ViT-bigG), or the refiner's "
                f"{REFINER_BIGG_PREFIX}* (ViT-bigG alone)")
    needed = [("U-Net", "unet"), ("VAE", "vae"), ("OpenCLIP ViT-bigG text encoder", "openclip")]
    if not refiner:
        needed.insert(2, ("CLIP ViT-L text encoder", "clip"))
    missing = [name for name, part in needed if not parts[part] and not (part == "vae" and vae_given)]
    if missing:
        tops = sorted({".".join(k.split(".")[:3]) for k in keys})
        shown = ", ".join(tops[:10]) + (f" ... ({len(tops)} groups)" if len(tops) > 10 else "")
        raise ValueError(f"{source}: no {' and no '.join(missing)} weights found; {expected}; found {shown}"
                         + (sf.NO_VAE_HINT if missing == ["VAE"] else ""))
    if other:
        raise ValueError(f"{source}: unexpected weights {', '.join(other[:6])}"
                         + (f" ... ({len(other)} in all)" if len(other) > 6 else "") + f"; {expected}")
    return parts


# ---------------------------------------------------------------------------------------------
# Shapes and names
# ---------------------------------------------------------------------------------------------
ADD_EMBEDDING = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def infer_unet_config(unet: dict[str, torch.Tensor], pooled_dim: int, encoder_only: bool = False,
                      what: str = "SDXL U-Net (model.diffusion_model.*)",
                      numbers: int = SIZE_NUMBERS) -> tuple[dict[str, Any], list[int], list[bool]]:
    """The diffusers-style config of an SDXL U-Net (prefix removed), with the residual blocks and attention
    flag per level: SD's inference (`single_file.infer_unet_config`) on everything but `label_emb.*`, plus
    the text_time embedding, whose input is the pooled text vector (`pooled_dim` wide) and `numbers` size codes
    (six; the refiner's five). `encoder_only`, `what`: as there (an SDXL ControlNet's copy of the contracting
    path)."""
    label = {k: v for k, v in unet.items() if k.startswith("label_emb.")}
    rest = {k: v for k, v in unet.items() if not k.startswith("label_emb.")}
    unknown = sorted(k for k in label if k.rpartition(".")[0] not in ADD_EMBEDDING)
    if unknown or not label:
        raise ValueError(f"{what}: expected label_emb.0.0 / label_emb.0.2 (SDXL's pooled-text and size embedding); "
                         f"found {unknown[:6] or 'none'}")
    cfg, layers, attention = sf.infer_unet_config(rest, encoder_only, what)
    adm_in = sf._need(label, "label_emb.0.0.weight", what).shape[1]
    time_dim, remainder = divmod(adm_in - pooled_dim, numbers)
    if time_dim < 1 or remainder:
        raise ValueError(f"{what}: label_emb.0.0 takes {adm_in} inputs, which is not the {pooled_dim}-wide pooled text "
                         f"vector plus {numbers} equal size codes (SDXL base: 1280 + 6 x 256 = 2816; the refiner: "
                         "1280 + 5 x 256 = 2560)")
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
               projection_class_embeddings_input_dim=adm_in,
               upcast_attention=False)  # SDXL's config (null): its attention runs in the weights' dtype
    return cfg, layers, attention


def unet_to_diffusers(unet: dict[str, torch.Tensor], layers: list[int], attention: list[bool],
                      has_mid_block: bool = True) -> dict[str, torch.Tensor]:
    """SDXL U-Net weights (prefix removed) -> our/diffusers names: SD's table plus label_emb -> add_embedding."""
    out = keymap.unet_to_diffusers({k: v for k, v in unet.items() if not k.startswith("label_emb.")}, layers,
                                   attention, has_mid_block)
    for k, v in unet.items():
        if k.startswith("label_emb."):
            module, _, leaf = k.rpartition(".")
            out[f"{ADD_EMBEDDING[module]}.{leaf}"] = v
    return out


def infer_bigg_config(text: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A CLIPTextConfig dict for the OpenCLIP ViT-bigG tower (prefix removed), every block kept: width, depth,
    heads (64 wide), MLP width, vocabulary and positions from the weights; the projection from
    text_projection [width, proj]."""
    what = f"SDXL text encoder 2 ({BIGG_PREFIX}*)"
    cfg, _ = sf.infer_text_config(text, "openclip")  # gelu, 64-wide heads; it keeps all but the last block (SD 2)
    proj = keymap.openclip_projection(text, what)
    if proj is None:
        raise ValueError(f"{what}: no text_projection; SDXL's pooled vector is the bigG tower's projected end-of-text "
                         "state, so the checkpoint must carry it")
    if proj.ndim != 2 or proj.shape[0] != cfg["hidden_size"]:
        raise ValueError(f"{what}: text_projection (as OpenCLIP's [width, proj]) has shape {tuple(proj.shape)}; "
                         f"expected [{cfg['hidden_size']}, projection width]")
    cfg.update(num_hidden_layers=keymap.openclip_layers(text), projection_dim=proj.shape[1])
    return cfg


def bigg_to_transformers(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bigG tower (prefix removed) -> CLIPTextModelWithProjection's names without the `text_model.` prefix
    (see `build_projected_text_model`): SD 2's OpenCLIP map with all blocks, and text_projection.weight = P^T
    (OpenCLIP applies x @ P; a Linear applies x @ W^T; `keymap.openclip_projection` reads either name)."""
    out = keymap.openclip_to_transformers(text, keymap.openclip_layers(text))
    out["text_projection.weight"] = keymap.openclip_projection(text).t()
    return out


@dataclass
class SDXLParts:
    """An SDXL checkpoint in our names, with the configs read off it: what `components_from_state` builds,
    and what a test needs to load the same weights into diffusers / transformers."""

    unet_config: dict[str, Any]
    unet: dict[str, torch.Tensor]
    vae_config: dict[str, Any] | None  # (None: the checkpoint has no VAE)
    vae: dict[str, torch.Tensor]
    text_config: dict[str, Any] | None  # CLIP ViT-L (CLIPTextConfig keys); None for the refiner
    text: dict[str, torch.Tensor]  # CLIPTextModel names without `text_model.`
    text_config_2: dict[str, Any]  # OpenCLIP ViT-bigG, with projection_dim
    text_2: dict[str, torch.Tensor]  # CLIPTextModelWithProjection names without `text_model.`
    markers: set
    betas: torch.Tensor | None
    sigmas: torch.Tensor | None
    refiner: bool = False


def convert(state: dict[str, torch.Tensor], source: str = "checkpoint", *, scaling_factor: float | None = None,
            unet_config: dict[str, Any] | None = None, vae_given: bool = False) -> SDXLParts:
    """An original SDXL base state dict -> SDXLParts (no tensor copied: renamed, split or transposed views; with
    `vae_given`, a state without VAE weights gives vae_config None)."""
    parts = split_sdxl(state, source, vae_given)
    name = Path(source).name
    refiner = parts["refiner"]
    # CLIP ViT-L: quick_gelu, all layers
    tcfg = None if refiner else sf._inferred(name, SDXL_LAYOUT, sf.infer_text_config, parts["clip"], "clip")[0]
    tcfg2 = sf._inferred(name, SDXL_LAYOUT, infer_bigg_config, parts["openclip"])
    numbers = REFINER_NUMBERS if refiner else SIZE_NUMBERS
    ucfg, layers, attention = sf._inferred(name, SDXL_LAYOUT, infer_unet_config, parts["unet"],
                                           tcfg2["projection_dim"], numbers=numbers)
    widths = [c["hidden_size"] for c in (tcfg, tcfg2) if c is not None]
    if ucfg["cross_attention_dim"] != sum(widths):
        raise ValueError(f"{name}: the U-Net cross-attends to {ucfg['cross_attention_dim']}-wide states but the text "
                         f"tower{'s give' if len(widths) > 1 else ' gives'} {' + '.join(map(str, widths))}")
    ucfg["sample_size"] = SDXL_SAMPLE_SIZE
    if unet_config:
        ucfg.update(unet_config)
    vcfg, vae = None, {}
    if parts["vae"]:
        vcfg, vlevels, vlayers = sf._inferred(name, SDXL_LAYOUT, sf.infer_vae_config, parts["vae"])
        vcfg["scaling_factor"] = SDXL_SCALING_FACTOR if scaling_factor is None else float(scaling_factor)
        vcfg["sample_size"] = 8 * SDXL_SAMPLE_SIZE
        vae = keymap.vae_to_diffusers(parts["vae"], vlevels, vlayers, vcfg["mid_block_add_attention"])
    return SDXLParts(
        unet_config=ucfg, unet=unet_to_diffusers(parts["unet"], layers, attention, ucfg["mid_block_type"] is not None),
        vae_config=vcfg, vae=vae,
        text_config=tcfg, text=keymap.clip_to_transformers(parts["clip"]) if not refiner else {},
        text_config_2=tcfg2, text_2=bigg_to_transformers(parts["openclip"]),
        markers=parts["markers"], betas=parts["betas"], sigmas=parts["sigmas"], refiner=refiner)


# ---------------------------------------------------------------------------------------------
# The tokenizers
# ---------------------------------------------------------------------------------------------
def _hf_cache_repos(which: str) -> list[tuple[str, str]]:
    if which == "tokenizer":
        return [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"), ("openai/clip-vit-large-patch14", "")]
    return [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
            ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "")]


def find_tokenizer(checkpoint: Path, which: str, given: str | os.PathLike | None = None,
                   first: str | os.PathLike | None = None) -> Path:
    """The folder of SDXL's tokenizer `which` ("tokenizer": CLIP ViT-L's, "tokenizer_2": bigG's): `given`
    (a tokenizer folder, or an SDXL model folder holding `which/`), else `which/` beside the checkpoint or
    in `<name>/`, else the environment ($IMAGINE_CLIP_TOKENIZER, $IMAGINE_CLIP_TOKENIZER_2: a tokenizer or
    model folder), else the local Hugging Face cache. For "tokenizer_2", `first` (the tokenizer argument) is
    also looked beside and into, so one SDXL model folder, or its tokenizer/, serves for both."""
    if given is not None:
        p = Path(given)
        if sf._is_tokenizer_folder(p):
            return p
        if sf._is_tokenizer_folder(p / which):
            return p / which
        raise FileNotFoundError(f"{which}={p}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, or "
                                f"tokenizer.json) nor a model folder with {which}/; found {sf._listing(p)}")
    candidates: list[tuple[str, Path]] = [("next to the checkpoint", checkpoint.parent / which),
                                          ("next to the checkpoint", checkpoint.parent / checkpoint.stem / which)]
    env1 = os.environ.get(sf.TOKENIZER_ENV)
    if which == "tokenizer":
        if env1:
            candidates += [(f"${sf.TOKENIZER_ENV}", Path(env1)), (f"${sf.TOKENIZER_ENV}", Path(env1) / which)]
    else:
        if first is not None:  # tokenizer= an SDXL model folder, or its tokenizer/ (tokenizer_2/ beside it)
            candidates += [("in tokenizer=", Path(first) / which), ("beside tokenizer=", Path(first).parent / which)]
        env2 = os.environ.get(TOKENIZER_2_ENV)
        if env2:
            candidates += [(f"${TOKENIZER_2_ENV}", Path(env2)), (f"${TOKENIZER_2_ENV}", Path(env2) / which)]
        if env1:
            candidates += [(f"${sf.TOKENIZER_ENV}", Path(env1) / which),
                           (f"${sf.TOKENIZER_ENV}", Path(env1).parent / which)]
    for repo, sub in _hf_cache_repos(which):
        candidates.extend(("the Hugging Face cache", snap / sub) for snap in sf._hf_snapshots(repo))
    tried = []
    for where, p in candidates:
        if str(p) in tried:
            continue
        tried.append(str(p))
        if sf._is_tokenizer_folder(p):
            log.info("SDXL single file: using the %s in %s (%s)", which, p, where)
            return p
    tower = "CLIP ViT-L/14, text encoder 1" if which == "tokenizer" else "OpenCLIP ViT-bigG/14, text encoder 2"
    env = sf.TOKENIZER_ENV if which == "tokenizer" else TOKENIZER_2_ENV
    raise FileNotFoundError(
        f"no {which} found for {checkpoint.name} (SDXL's {tower}): a single-file checkpoint does not contain the "
        f"tokenizers' vocab.json and merges.txt. Pass {which}=FOLDER (load_single_file), or put a '{which}' folder "
        f"next to the checkpoint, or set {env}=FOLDER; e.g. the {which}/ folder of an SDXL diffusers model "
        f"(stabilityai/stable-diffusion-xl-base-1.0). Looked in: " + ", ".join(tried))


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def build_projected_text_model(config: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                               dtype: torch.dtype = torch.float32, token_ids: dict[str, int] | None = None):
    """A transformers CLIPTextModelWithProjection with these weights (CLIPTextModel names plus
    text_projection.weight), built on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config, **(token_ids or {})))
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {k if k == "text_projection.weight" else prefix + k: v for k, v in state.items()}
    state = sf._cast(state, dtype)
    sf._assign(model, state, source)
    return sf.finish_clip_text_model(model, state)


def marked_prediction_type(markers: set, name: str) -> str | None:
    """The prediction type a file's MARKERS say: ComfyUI's `v_pred` (its CheckpointSave writes it into every
    v-prediction model it saves, SDXL or SD 1.x/2.x) is v-prediction; else None (not said)."""
    if "v_pred" not in markers:
        return None
    log.info("%s: v_pred marker: v-prediction", name)
    return "v_prediction"


def marked_schedule(cfg: dict[str, Any], markers: set, name: str) -> dict[str, Any]:
    """A scheduler config with what a file's MARKERS say of it: ComfyUI's `ztsnr`, zero terminal SNR (diffusers'
    rescale_betas_zero_snr, Lin et al. 2024)."""
    if "ztsnr" not in markers:
        return cfg
    log.info("%s: ztsnr marker: zero terminal SNR (rescale_betas_zero_snr)", name)
    return dict(cfg, rescale_betas_zero_snr=True)


def _schedule(parts: SDXLParts, prediction_type: str, name: str) -> dict[str, Any]:
    """SDXL base's scheduler config, with what the file says: `ztsnr`, and stored betas or sgm's
    `denoiser.sigmas` when they differ from SD's betas beyond their dtype's rounding."""
    cfg = marked_schedule(dict(SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type), parts.markers, name)
    betas = parts.betas
    if betas is None and parts.sigmas is not None and parts.sigmas.device.type != "meta":
        betas = _betas_from_sigmas(parts.sigmas, name)
    if betas is not None and betas.device.type != "meta" and not sf._is_sd_schedule(betas):
        log.warning("%s: its stored schedule differs from SDXL's scaled_linear betas; using the stored one", name)
        cfg.update(trained_betas=betas.double().tolist(), num_train_timesteps=len(betas))
    return cfg


def _betas_from_sigmas(sigmas: torch.Tensor, name: str) -> torch.Tensor | None:
    """sgm's DiscreteDenoiser keeps sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..999 (in either order);
    None (SD's schedule) when they are SD's to their dtype's rounding. Else the betas they imply."""
    s = sigmas.double().flatten().sort().values
    s = s[s > 0]
    if s.numel() < 2:
        log.warning("%s: denoiser.sigmas holds %d levels; ignored (SDXL's schedule used)", name, s.numel())
        return None
    c = SDXL_SCHEDULER_CONFIG
    sd_betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"],
                              dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - sd_betas, 0)
    sd = ((1 - abar) / abar).sqrt()
    eps = torch.finfo(sigmas.dtype).eps if sigmas.is_floating_point() else 0.0
    if s.numel() == sd.numel() and torch.allclose(s, sd, rtol=max(1e-4, 4 * eps), atol=0):
        return None
    abar = 1 / (1 + s ** 2)
    return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])


def components_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint",
                          dtype: torch.dtype = torch.float32, *, tokenizer: str | os.PathLike | None = None,
                          tokenizer_2: str | os.PathLike | None = None, prediction_type: str | None = None,
                          scaling_factor: float | None = None, unet_config: dict[str, Any] | None = None,
                          clip_skip: int = 0, checkpoint_path: Path | None = None,
                          global_step: int | None = None, vae=None) -> Components:
    """An original SDXL base state dict -> Components (imagine's U-Net and VAE, an SDXLTextEncoder of
    transformers' CLIPTextModel + CLIPTextModelWithProjection), built on the meta device and given the
    checkpoint's tensors (no copy when already in `dtype`; meta tensors give meta modules).

    tokenizer, tokenizer_2: see `find_tokenizer`. prediction_type: default "v_prediction" when the file
    carries a `v_pred` marker, else epsilon (SDXL base). scaling_factor: the VAE's latent scale (default
    SDXL's 0.13025). unet_config: entries overriding the inferred U-Net config. clip_skip: layers skipped
    beyond SDXL's penultimate one, in both towers. global_step: unused (SDXL's prediction type is not
    told apart by it)."""
    from imagine.models.text_encoders import SDXLCLIPTower, SDXLTextEncoder
    from imagine.models.unet import UNet2DConditionModel, UNetConfig
    from imagine.models.vae import AutoencoderKL, VAEConfig
    from imagine.schedules import NoiseSchedule

    sf._check_options(prediction_type, dtype)
    name = Path(source).name
    parts = convert(state, source, scaling_factor=scaling_factor, unet_config=unet_config, vae_given=vae is not None)
    if prediction_type is None:
        prediction_type = marked_prediction_type(parts.markers, name) or "epsilon"

    try:
        unet_cfg = UNetConfig.from_dict(parts.unet_config)
    except ValueError as e:
        raise ValueError(f"{name}: the SDXL U-Net read off the weights is not buildable: {e}") from None
    unet = sf._build(UNet2DConditionModel, unet_cfg, parts.unet, f"{name} (U-Net)", dtype)
    vae = (sf._build(AutoencoderKL, VAEConfig.from_dict(parts.vae_config), parts.vae, f"{name} (VAE)", dtype)
           if parts.vae_config is not None else  # (pruned of its VAE: the one given)
           sf.given_vae(vae, SDXL_SCALING_FACTOR if scaling_factor is None else scaling_factor))

    checkpoint = checkpoint_path or Path(source)
    tok_dirs = (None if parts.refiner else find_tokenizer(checkpoint, "tokenizer", tokenizer),
                find_tokenizer(checkpoint, "tokenizer_2", tokenizer_2, first=tokenizer))
    towers = []
    for i, (tok_dir, kind, cfg, tstate) in enumerate(((tok_dirs[0], "clip", parts.text_config, parts.text),
                                                       (tok_dirs[1], "openclip", parts.text_config_2, parts.text_2))):
        if cfg is None:  # the refiner: no CLIP ViT-L
            continue
        tok, max_len = sf.load_tokenizer(tok_dir, kind, cfg["vocab_size"], cfg["max_position_embeddings"])
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        what = f"{name} (text encoder {i + 1})"
        model = (sf.build_clip_text_model(cfg, tstate, what, dtype, ids) if i == 0
                 else build_projected_text_model(cfg, tstate, what, dtype, ids))
        towers.append(SDXLCLIPTower(model, tok, max_len, f"{source} (text encoder {i + 1})"))
    text_encoder = SDXLTextEncoder(*towers)
    text_encoder.clip_skip = clip_skip

    sched_cfg = _schedule(parts, prediction_type, name)
    sample = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else SDXL_SAMPLE_SIZE
    size = 8 * sample
    defaults = {"height": size, "width": size, "sampler": "euler", "zero_empty_negative": True}
    if parts.refiner:  # diffusers' refiner config: an empty negative prompt encoded, the aesthetic scores
        from imagine.loading.folder import AESTHETIC_SCORES

        defaults.update(zero_empty_negative=False, aesthetic_score=AESTHETIC_SCORES)
    return Components(unet=unet, text_encoder=text_encoder, schedule=NoiseSchedule.from_diffusers_config(sched_cfg),
                      prediction_type=prediction_type, vae=vae, scheduler_config=sched_cfg, defaults=defaults,
                      source=str(source))
