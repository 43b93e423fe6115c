"""Imagen (Saharia et al. 2022) as lucidrains' imagen-pytorch (2.1.0) trains and samples it: a cascade of U-Nets in
pixels, text -> a small picture -> larger ones, each stage a continuous-time diffusion (Kingma et al. 2021, VDM).

- Noise: each stage's schedule is a log-SNR lambda(t) of the time t in [0, 1] ("cosine" for the first two stages,
  "linear" after, by default; imagine.schedules.log_snr), alpha_t^2 = sigmoid(lambda); the U-Net is conditioned on
  lambda(t) itself. A stage samples over the grid t = 1, 1 - 1/T, ..., 0 (T its training `timesteps`) by the
  ancestral step of VDM eq. 33, which is DDPM's step on that grid's abar (imagine.samplers.sample_ddpm over
  imagine.schedules.continuous_plan, no noise on the step to t = 0, whose SNR is finite). `steps` other than T runs the
  same sampler on a coarser grid (ours: imagen-pytorch samples at its T only).
- x_0: from the prediction (`pred_objectives`: "noise", "v" or "x_start"), then dynamic thresholding (Imagen sec. 2.3,
  percentile 0.95 by default; imagine.guidance.dynamic_threshold) or, per stage where it is off, clipping to [-1, 1].
- Guidance: imagen-pytorch 2.1.0's (Unet.forward_with_cond_scale): cond + (s - 1) (cond - uncond) with, by default,
  the update's part along cond removed (imagine.guidance.projected_guidance, Sadat et al. 2024's projection), the
  unconditional rows the U-Net's learned null text (`text_dropped`); one forward over the 2B rows.
- Super-resolution (Imagen sec. 2.5, noise conditioning augmentation): the previous stage's picture, in [0, 1],
  resized to the stage's size (F.interpolate, `resize_mode` "nearest" by default), taken to [-1, 1], noised to time
  `lowres_sample_noise_level` (0.2) of the `lowres_noise_schedule` ("linear"), and given to the U-Net with that
  level's log-SNR.
- Draws, per stage in imagen-pytorch's order: the low-resolution picture's noise (super-resolution stages), the start
  noise, then a draw at every step, the last step's too, which imagen-pytorch makes and masks (t_next = 0) and which is
  made and dropped here so that the stream stays its. With `seeds` (or generators), one generator per image
  (imagine.sampling.make_generators): the same seed gives the same picture whatever the batch, and it is the picture
  imagen-pytorch samples at batch 1 after torch.manual_seed(seed). With neither, torch's global generator at batch
  shape, as imagen-pytorch draws: after the same torch.manual_seed, the pictures of Imagen.sample.
- Text: T5 states with their padding zeroed and the mask of real tokens (imagen-pytorch's t5_encode_text: padding to
  the longest prompt, at most 256 tokens), given as `text_embeds` / `text_masks`, or encoded here from prompts by
  imagine's T5TextEncoder (read 256 tokens at most, cut to the longest and the padding zeroed: the same states, the
  attention mask hiding the padding either way).

Checkpoints: an ImagenTrainer's torch.save dict ('model': the Imagen state dict, unets under "unets.{i}.";
'imagen_params': its ImagenConfig dict; 'ema': the EMA unets) loads offline with `from_imagen_pytorch`, the U-Nets as
imagine.models.efficient_unet.EfficientUNet.
"""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from imagine.sampling import Denoiser

MAX_TEXT_LENGTH = 256  # imagen-pytorch's t5 MAX_LENGTH: prompts are cut to 256 tokens
OUTPUT_TYPES = ("pt", "pil")
PRECISIONS = ("exact", "fast")
INPAINT_RESAMPLE_TIMES = 5  # RePaint's passes a step by default (imagen-pytorch's inpaint_resample_times)
# the samplers a stage runs on its log-SNR grid: imagen-pytorch's DDPM (the default), and ODE / multistep solvers that
# need no more than the grid's levels (few steps); the others (SDE forms, CompVis loops, LCM) are refused by name
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "unipc", "euler", "euler_a")
# imagen-pytorch's pred_objectives -> imagine's prediction types
PREDICTION_TYPES = {"noise": "epsilon", "v": "v_prediction", "x_start": "sample"}
# Imagen keywords that only training reads (accepted from a checkpoint's config and not used to sample)
TRAINING_ONLY = ("text_encoder_name", "loss_type", "random_crop_sizes", "per_sample_random_aug_noise_level",
                 "only_train_unet_number", "temporal_downsample_factor", "resize_cond_video_frames",
                 "min_snr_loss_weight", "min_snr_gamma", "video")
RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
# the Imagen keywords sampling reads (ImagenPipeline's, besides unets, image_sizes and text_embed_dim)
IMAGEN_SETTINGS = ("timesteps", "noise_schedules", "pred_objectives", "lowres_noise_schedule",
                   "lowres_sample_noise_level", "dynamic_thresholding", "dynamic_thresholding_percentile",
                   "resize_mode", "auto_normalize_img", "channels", "condition_on_text", "cond_drop_prob")


def per_stage(value, stages: int, name: str) -> tuple:
    """One value per stage: a list or tuple as it is (of `stages` values), else the value repeated (imagen-pytorch's
    cast_tuple)."""
    out = tuple(value) if isinstance(value, (list, tuple)) else (value,) * stages
    if len(out) != stages:
        raise ValueError(f"{name}: {len(out)} values for {stages} unets; give one value, or one per unet")
    return out


def stage_noise_schedules(noise_schedules, stages: int) -> tuple[str, ...]:
    """imagen-pytorch's per-stage schedules: the values given, filled up to two with "cosine", then with "linear",
    one per stage (its zip with the unets drops the rest)."""
    given = tuple(noise_schedules) if isinstance(noise_schedules, (list, tuple)) else (noise_schedules,)
    given = given + ("cosine",) * max(2 - len(given), 0)
    return (given + ("linear",) * max(stages - len(given), 0))[:stages]


class StageModel:
    """One stage's U-Net as imagine's Denoiser calls a model, model(x_t, t, **cond): t the plan's timestep, given to the
    U-Net as `condition(t)` (Imagen's: the log-SNR of the continuous time t, imagen-pytorch's get_condition, in
    float32; ElucidatedImagen's: c_noise, made by imagine.edm.preconditioned_output, as it is); a self-conditioned
    U-Net (its config's self_cond) gets the previous evaluation's x_0 estimate, `previous_x0` (None: zeros), which
    `StageDenoiser` keeps."""

    def __init__(self, unet: Callable[..., torch.Tensor], condition: Callable[[torch.Tensor], torch.Tensor]):
        self.unet, self.condition = unet, condition
        config = getattr(unet, "config", None)
        self.self_cond = bool(getattr(config, "self_cond", getattr(unet, "self_cond", False)))
        self.previous_x0: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        previous = None
        if self.self_cond and self.previous_x0 is not None:  # (a guidance batch: the rows of every part)
            previous = self.previous_x0.repeat(x.shape[0] // self.previous_x0.shape[0], 1, 1, 1).to(x.dtype)
        return self.unet(x, self.condition(t), self_cond=previous, **cond)


def log_snr_condition(noise_schedule: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Imagen's noise condition: t -> lambda(t) of the stage's continuous schedule, in float32 (the name checked)."""
    from imagine.schedules import log_snr

    log_snr(noise_schedule, torch.zeros(1))  # (checks the name)
    return lambda t: log_snr(noise_schedule, t.float())


class StageSampling(NamedTuple):
    """How a stage runs (ImagenPipeline.stage_sampling): the sampler's plan; `condition`, the plan's timestep -> the
    U-Net's noise condition; the prediction type its output is read as; the Denoiser's guidance rule; keywords for the
    sampler; the start noise's scale; the draws made after the run to keep the peer's random stream."""

    plan: Any
    condition: Callable[[torch.Tensor], torch.Tensor]
    prediction_type: str
    guidance: Callable[..., torch.Tensor]
    options: dict
    trailing_draws: int = 0
    start_scale: float = 1.0
    schedule: Any = None  # (Denoiser.at_sigma's timestep map, for samplers that evaluate between the levels)


class StageDenoiser(Denoiser):
    """imagine.sampling.Denoiser for a stage: every evaluation's x_0 (guided and thresholded) becomes the stage
    model's `previous_x0`, the next evaluation's self-conditioning input, as imagen-pytorch hands its x_start on
    (Heun's second evaluation of a step included)."""

    def _denoise(self, *args, **kwargs) -> torch.Tensor:
        x0 = super()._denoise(*args, **kwargs)
        self.model.previous_x0 = x0
        return x0


def _pil_pictures(value) -> bool:
    """A PIL picture, or a non-empty list of them."""
    from PIL import Image

    return isinstance(value, Image.Image) or (isinstance(value, (list, tuple)) and bool(value)
                                              and all(isinstance(i, Image.Image) for i in value))


def _pictures_tensor(pictures, mode: str | None, name: str) -> torch.Tensor:
    """PIL pictures (one, or a list of one size) as a float tensor [B, C, H, W] in [0, 1], in `mode` (None: their
    own); `name` in the error of pictures that differ in size or mode."""
    import numpy as np
    from PIL import Image

    rows = [pictures] if isinstance(pictures, Image.Image) else list(pictures)
    arrays = [np.asarray(r if mode is None else r.convert(mode), dtype=np.float32) / 255.0 for r in rows]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"{name}: the pictures differ in size or mode ({sorted({a.shape for a in arrays})})")
    return torch.stack([torch.from_numpy(a if a.ndim == 3 else a[..., None]) for a in arrays]).permute(0, 3, 1, 2)


class ImagenPipeline:
    """An imagen-pytorch Imagen's cascade (module doc). unets: one model per stage, each called as EfficientUNet is,
    unet(x, noise_cond, *, text_embeds, text_mask, lowres_cond_img, lowres_noise_cond, self_cond, text_dropped); the
    other keywords are imagen-pytorch Imagen's, with its defaults, per stage where it takes them per unet (timesteps,
    noise_schedules, pred_objectives, dynamic_thresholding). cond_drop_prob only says whether the unets learned the
    null text (guidance needs it > 0). text_encoder: for prompts, an imagine text encoder of the unets' width (an
    imagen-pytorch checkpoint's: T5 reading 256 tokens, from_imagen_pytorch(t5_folder=); a cascade trained here: the
    run's encoder, which from_pretrained builds from the folder)."""

    def __init__(self, unets: Sequence[Callable[..., torch.Tensor]], *, image_sizes: Sequence[int],
                 timesteps: int | Sequence[int] = 1000, noise_schedules: str | Sequence[str] = "cosine",
                 pred_objectives: str | Sequence[str] = "noise", lowres_noise_schedule: str = "linear",
                 lowres_sample_noise_level: float = 0.2, dynamic_thresholding: bool | Sequence[bool] = True,
                 dynamic_thresholding_percentile: float = 0.95, resize_mode: str = "nearest",
                 auto_normalize_img: bool = True, channels: int = 3, condition_on_text: bool = True,
                 text_embed_dim: int | None = None, cond_drop_prob: float = 0.1, text_encoder=None,
                 precision: str = "exact"):
        from imagine.schedules import CONTINUOUS_SCHEDULES

        self.unets = list(unets) if isinstance(unets, (list, tuple)) else [unets]
        n = len(self.unets)
        if not n or not all(callable(u) for u in self.unets):
            raise TypeError("unets must be one or more callable models (imagine.models.efficient_unet.EfficientUNet)")
        self.image_sizes = per_stage(image_sizes, 1, "image_sizes") if isinstance(image_sizes, int) \
            else tuple(image_sizes)
        if len(self.image_sizes) != n:
            raise ValueError(f"{n} unets for {len(self.image_sizes)} image sizes {self.image_sizes}: give one size "
                             "per unet")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.image_sizes):
            raise ValueError(f"image_sizes must be positive ints; got {self.image_sizes}")
        self.timesteps = per_stage(timesteps, n, "timesteps")
        for T in self.timesteps:
            if isinstance(T, bool) or not isinstance(T, int) or T < 1:
                raise ValueError(f"timesteps must be ints >= 1 (one, or one per unet); got {self.timesteps}")
        self.noise_schedules = stage_noise_schedules(noise_schedules, n)
        for kind in (*self.noise_schedules, lowres_noise_schedule):
            if kind not in CONTINUOUS_SCHEDULES:
                raise ValueError(f"noise schedule {kind!r} is not one of {CONTINUOUS_SCHEDULES}")
        self.pred_objectives = per_stage(pred_objectives, n, "pred_objectives")
        for objective in self.pred_objectives:
            if objective not in PREDICTION_TYPES:
                raise ValueError(f"pred_objectives must be among {tuple(PREDICTION_TYPES)}; got {objective!r}")
        self.dynamic_thresholding = tuple(bool(d) for d in per_stage(dynamic_thresholding, n, "dynamic_thresholding"))
        if not 0 < dynamic_thresholding_percentile <= 1:
            raise ValueError(f"dynamic_thresholding_percentile must be in (0, 1]; got "
                             f"{dynamic_thresholding_percentile}")
        self.dynamic_thresholding_percentile = float(dynamic_thresholding_percentile)
        self.lowres_noise_schedule = lowres_noise_schedule
        self.lowres_sample_noise_level = _check_level(lowres_sample_noise_level)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}; got {resize_mode!r}")
        self.resize_mode, self.auto_normalize_img = resize_mode, bool(auto_normalize_img)
        self.channels, self.condition_on_text = int(channels), bool(condition_on_text)
        self.cond_drop_prob = float(cond_drop_prob)
        self.text_encoder = text_encoder
        self.defaults: dict[str, Any] = {}  # a folder's generation defaults (from_pretrained)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        self.precision = precision
        self._runs: dict[int, Callable[..., torch.Tensor]] = {}  # each stage's U-Net as it runs (`stage_unet`)
        if text_embed_dim is None and self.condition_on_text:
            text_embed_dim = getattr(text_encoder, "dim", None) or getattr(
                getattr(self.unets[0], "config", None), "text_embed_dim", None)
            if text_embed_dim is None:
                raise ValueError("text_embed_dim: give the text encoder's width (T5's d_model; 768 for t5-v1_1-base)")
        self.text_embed_dim = int(text_embed_dim) if self.condition_on_text else None
        if text_encoder is not None:
            if getattr(text_encoder, "dim", self.text_embed_dim) != self.text_embed_dim:
                raise ValueError(f"the text encoder's states are {text_encoder.dim} wide; the unets read "
                                 f"{self.text_embed_dim} (text_embed_dim)")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_imagen_pytorch(cls, path_or_state, *, config: dict | None = None, ema: bool = False,
                            t5_folder=None, dtype: torch.dtype = torch.float32,
                            precision: str = "exact") -> "ImagenPipeline":
        """An imagen-pytorch checkpoint: a file ImagenTrainer.save wrote (read with torch.load(weights_only=True)), or
        that dict. Its 'imagen_params' (the ImagenConfig dict) give the cascade, else `config` (the same dict: unets
        as lists of Unet keywords, image_sizes, ...). ema: the trainer's EMA unets ('ema'; imagen-pytorch's trainer
        samples with them) instead of 'model''s. t5_folder: a local T5 encoder folder (with its tokenizer) for
        prompts; without it, sample with text_embeds."""
        from imagine.models.efficient_unet import EfficientUNet

        checkpoint = read_checkpoint(path_or_state)
        klass = pipeline_class(checkpoint.get("imagen_type", "original"), cls)
        params = config if config is not None else checkpoint.get("imagen_params")
        if params is None:
            raise ValueError("this checkpoint holds no 'imagen_params' (its Imagen was not built from an ImagenConfig):"
                             " give config=, the ImagenConfig dict (unets as lists of Unet keywords, image_sizes, ...)")
        if not isinstance(params, dict) or not isinstance(params.get("unets"), (list, tuple)):
            raise ValueError("the Imagen config must be a dict with 'unets' (a list of Unet keyword dicts) and "
                             "'image_sizes'")
        if params.get("video"):
            raise ValueError("a video Imagen (Unet3D) is not built here; only image checkpoints load")
        sizes = params.get("image_sizes")
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        if len(sizes) != len(params["unets"]):
            raise ValueError(f"the config lists {len(params['unets'])} unets for {len(sizes)} image sizes {sizes}: "
                             "give one size per unet")
        if ema and not isinstance(checkpoint.get("ema"), dict):
            raise ValueError("ema=True: this checkpoint holds no EMA unets ('ema')")
        checkpoint = {**checkpoint, "imagen_params": params}  # (the config given, where the checkpoint has none)
        unets = [EfficientUNet.from_imagen_checkpoint(checkpoint, i, ema=ema).to(dtype)
                 for i in range(len(params["unets"]))]
        encoder = None
        if t5_folder is not None:
            from imagine.models.text_encoders import T5TextEncoder

            encoder = T5TextEncoder.from_folder(t5_folder, max_length=MAX_TEXT_LENGTH, dtype=dtype)
        settings = {k: v for k, v in params.items() if k not in ("unets", "image_sizes", "text_embed_dim",
                                                                 *TRAINING_ONLY)}
        unknown = sorted(set(settings) - set(klass.settings_keys))
        if unknown:
            raise ValueError(f"the {klass.__name__[:-8]} config has keys imagine does not know: {unknown}; known: "
                             f"{sorted({'unets', 'image_sizes', 'text_embed_dim', *klass.settings_keys, *TRAINING_ONLY})}")
        return klass(unets, image_sizes=sizes, text_embed_dim=unets[0].config.text_embed_dim, text_encoder=encoder,
                   precision=precision, **settings)

    # -- imagine's own folder ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The keywords that rebuild this cascade around its unets (what model_index.json stores)."""
        return {**self.common_settings(), "timesteps": list(self.timesteps),
                "noise_schedules": list(self.noise_schedules), "pred_objectives": list(self.pred_objectives)}

    def common_settings(self) -> dict[str, Any]:
        """settings() shared by Imagen and ElucidatedImagen: the cascade's sizes, low-resolution noise, thresholding,
        pictures and text."""
        return {"image_sizes": list(self.image_sizes), "lowres_noise_schedule": self.lowres_noise_schedule,
                "lowres_sample_noise_level": self.lowres_sample_noise_level,
                "dynamic_thresholding": list(self.dynamic_thresholding),
                "dynamic_thresholding_percentile": self.dynamic_thresholding_percentile,
                "resize_mode": self.resize_mode, "auto_normalize_img": self.auto_normalize_img,
                "channels": self.channels, "condition_on_text": self.condition_on_text,
                "text_embed_dim": self.text_embed_dim, "cond_drop_prob": self.cond_drop_prob}

    def save_pretrained(self, folder, *, text_encoder: dict | None = None, defaults: dict | None = None,
                        training_config: dict | None = None) -> None:
        """A cascade folder: model_index.json (class ImagenPipeline, the library version, `settings()`, the text
        encoder's description for imagine.models.text_encoders.load_text_encoder, the generation `defaults`, the
        training config) and one EfficientUNet folder per stage, unet_1, unet_2, ... (config.json + safetensors).
        Written beside the target and renamed into place, so a failure leaves the previous folder whole."""
        import shutil
        import tempfile

        from imagine import __version__
        from imagine.models.io import atomic_write_json

        folder = Path(folder)
        if not all(hasattr(u, "save_pretrained") for u in self.unets):
            raise TypeError("only a cascade of EfficientUNets saves as a folder")
        if text_encoder is not None and not (isinstance(text_encoder, dict) and "type" in text_encoder):
            raise ValueError(f"text_encoder must describe the encoder ({{'type': 'minilm' | 'clip' | 't5', ...}}); got "
                             f"{text_encoder!r}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            names = [f"unet_{k + 1}" for k in range(len(self.unets))]
            for unet, name in zip(self.unets, names):
                unet.save_pretrained(tmp / name)
            atomic_write_json(tmp / "model_index.json", {
                "_class_name": "ImagenPipeline", "_imagine_version": __version__, "imagen_type": self.imagen_type,
                "unets": names, **self.settings(),
                **({"text_encoder": text_encoder} if text_encoder is not None else {}),
                **({"defaults": defaults} if defaults else {}),
                **({"training_config": training_config} if training_config is not None else {})})
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old)
            else:
                tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32, text_encoder=None,
                        precision: str = "exact") -> "ImagenPipeline":
        """A cascade folder save_pretrained wrote; its text encoder built from the folder's description unless one is
        given (`text_encoder`). `defaults` (the steps and guidance the run sampled with) in `.defaults`."""
        from imagine.models.efficient_unet import EfficientUNet
        from imagine.models.io import read_json

        folder = Path(folder)
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{folder} is not an Imagen cascade folder: no model_index.json")
        spec = read_json(index)
        if spec.get("_class_name") != "ImagenPipeline" or not isinstance(spec.get("unets"), list):
            raise ValueError(f"{index} describes a {spec.get('_class_name')!r}, not an Imagen cascade "
                             "(_class_name ImagenPipeline with a list of unets)")
        unets = [EfficientUNet.from_pretrained(folder / name, dtype=dtype).eval() for name in spec["unets"]]
        if text_encoder is None and spec.get("text_encoder") is not None:
            from imagine.models.text_encoders import load_text_encoder

            text_encoder = load_text_encoder(spec["text_encoder"], root=folder, dtype=dtype)
        klass = pipeline_class(spec.get("imagen_type", "original"), cls)
        settings = {k: v for k, v in spec.items()
                    if k not in ("unets", "text_encoder", "defaults", "training_config", "imagen_type")
                    and not k.startswith("_")}
        pipe = klass(unets, text_encoder=text_encoder, precision=precision, **settings)
        pipe.defaults = dict(spec.get("defaults") or {})
        return pipe

    # -- text --------------------------------------------------------------------------------------
    def encode_text(self, texts: str | Sequence[str], emphasis: bool | str = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, D], mask [B, L]) of the prompts as imagen-pytorch's t5_encode_text gives them: L the longest
        prompt's tokens (at most 256), the padding's states zeroed. `emphasis`: AUTOMATIC1111's `(word:1.3)` read as
        weights on the states (TextEncoder.encode; not imagen-pytorch's)."""
        if self.text_encoder is None:
            raise ValueError("no text encoder: give text_embeds (and text_masks), imagen-pytorch's t5_encode_text "
                             "output, or load with t5_folder= (a local T5 encoder folder)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts must be one or more non-empty strings")
        encoded = self.text_encoder.encode(texts, emphasis=emphasis)
        mask = encoded.mask.bool()
        length = int(mask.sum(1).max())
        mask = mask[:, :length]
        return encoded.states[:, :length].masked_fill(~mask[..., None], 0.0), mask

    def _text(self, texts, text_embeds, text_masks, batch_size, emphasis: bool | str = False
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        if not self.condition_on_text:
            if texts is not None or text_embeds is not None:
                raise ValueError("this Imagen was trained without text (condition_on_text False): give no text")
            return None, None, _check_count(batch_size)
        if text_embeds is None:
            if texts is None:
                raise ValueError("give texts (prompts, with a T5 text encoder) or text_embeds (T5 states [B, L, D])")
            text_embeds, text_masks = self.encode_text(texts, emphasis)
        elif texts is not None:
            raise ValueError("give texts or text_embeds, not both")
        if not torch.is_tensor(text_embeds) or text_embeds.ndim != 3:
            got = tuple(text_embeds.shape) if torch.is_tensor(text_embeds) else type(text_embeds).__name__
            raise ValueError(f"text_embeds must be T5 states [B, L, D]; got {got}")
        if text_embeds.shape[-1] != self.text_embed_dim:
            raise ValueError(f"text_embeds are {text_embeds.shape[-1]} wide; this Imagen's unets read "
                             f"{self.text_embed_dim} (its text encoder's width)")
        if text_masks is None:  # (imagen-pytorch's default: the tokens whose states are not all zero)
            text_masks = (text_embeds != 0).any(dim=-1)
        if not torch.is_tensor(text_masks) or tuple(text_masks.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(f"text_masks must be [B, L] = {tuple(text_embeds.shape[:2])} (True: a token); got "
                             f"{tuple(text_masks.shape) if torch.is_tensor(text_masks) else type(text_masks).__name__}")
        return text_embeds.float(), text_masks.bool(), text_embeds.shape[0]

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, texts: str | Sequence[str] | None = None, *, text_embeds: torch.Tensor | None = None,
               text_masks: torch.Tensor | None = None, cond_scale: float | Sequence[float] = 1.0,
               seeds: int | Sequence[int] | None = None, generator=None, stop_at_unet_number: int | None = None,
               steps: int | Sequence[int | None] | None = None, batch_size: int = 1,
               lowres_sample_noise_level: float | None = None, cfg_remove_parallel_component: bool = True,
               cfg_keep_parallel_frac: float = 0.0, output_type: str = "pt", progress: bool = True,
               callback: Callable[[dict], None] | None = None, sampler: str | Sequence[str] | None = None,
               start_at_unet_number: int = 1, start_image=None, schedule_type: str | None = None,
               init_image=None, strength: float = 0.75, emphasis: bool | str = False, inpaint_images=None,
               inpaint_masks=None, inpaint_resample_times: int = INPAINT_RESAMPLE_TIMES, cond_images=None):
        """The cascade's pictures: [B, C, H, W] in [0, 1] (in [-1, 1] where auto_normalize_img is off), or PIL
        pictures (output_type "pil"), of the last stage run (`stop_at_unet_number`: stop after that stage, from 1).
        cond_scale: guidance scale, one or one per stage (1: the conditional pass alone). seeds / generator: per-image
        noise (module doc); neither: torch's global generator, as imagen-pytorch. steps: None (each stage's trained
        T), or an int or one per stage: the same sampler on a grid of that many steps (not imagen-pytorch's).
        cfg_remove_parallel_component, cfg_keep_parallel_frac: imagen-pytorch's guidance settings (the update's part
        along the conditional output kept by that fraction when removed). batch_size: for an Imagen without text.
        callback(info): after each step, with info["stage"] (from 1) besides the sampler's keys. sampler: one name or
        one per stage (`SAMPLERS`): "ddpm", imagen-pytorch's (VDM's ancestral step), or an ODE / multistep solver on
        the same log-SNR levels (ours, for few steps: DDIM, DPM-Solver++ 2M, UniPC, Euler; Euler a), each run
        ending at the grid's t = 0 as DDPM's does. start_at_unet_number (> 1) with start_image: the super-resolution
        stages from that one on, given a picture in the previous stage's place (imagen-pytorch's
        start_image_or_video: a square picture in [0, 1] as that stage would hand it on, resized to its size by
        resize_mode; a tensor [B or 1, C, H, W] or PIL pictures), e.g. to make a picture larger. schedule_type: the
        stages' grid, "uniform" in t (imagen-pytorch's, the default) or "karras" (ours, for few steps:
        imagine.schedules.continuous_times_karras); an ElucidatedImagen's levels are Karras' own. init_image with
        strength: image to image (SDEdit, Meng et al. 2022) at the first stage: the picture (square, in [0, 1], a
        tensor or PIL pictures; resized to stage 1's size by resize_mode) noised to the level int(steps * strength)
        steps before the end of stage 1's grid, x = sqrt(abar) x_0 + sqrt(1 - abar) eps with eps the stage's start
        noise, and those last steps run (diffusers' img2img rule); later stages as usual. (Not imagen-pytorch's
        init_images, which adds the picture to unit noise.) emphasis: AUTOMATIC1111's `(word:1.3)` in the texts read
        as weights (encode_text). inpaint_images with inpaint_masks (imagen-pytorch's): inpainting at every stage by
        RePaint (imagine.samplers.sample_repaint; DDPM's steps, an ElucidatedImagen's Heun steps with its churn, each
        redone inpaint_resample_times times): the pictures (as start_image) kept where the masks ([B or 1, H, W]
        tensors, True / 1: keep, imagen-pytorch's convention) say, resized to each stage as imagen-pytorch resizes
        them; the rest painted anew. (imagen-pytorch sends x back a level with less noise than the forward process
        adds, and repeats its last step on its own output; imagine follows the paper: with inpaint_resample_times 1
        the pictures are imagen-pytorch's Imagen's.) With
        init_image and strength too, stage 1's RePaint runs the last int(steps * strength) steps from init_image
        noised there (AUTOMATIC1111's inpainting at a denoising strength below 1; init_image is usually the
        inpainted picture itself). cond_images (imagen-pytorch's): the conditioning pictures of the stages whose U-Nets
        read one (cond_images_channels > 0; e.g. a segmentation map or a sketch): a tensor [B or 1, C, H, W] (uint8
        taken to [0, 1], floats as given) or PIL pictures (in [0, 1]), each such U-Net resizing them to its size,
        the unconditional rows of guidance reading them too."""
        from imagine.guidance import guided_model_output, projected_guidance
        from imagine.samplers import resolve_sampler, sample_repaint
        from imagine.sampling import PerSampleNoise, make_generators
        from imagine.schedules import alpha_sigma, log_snr

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        n = len(self.unets)
        last = n if stop_at_unet_number is None else stop_at_unet_number
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= n:
            raise ValueError(f"stop_at_unet_number must be a unet number from 1 to {n}; got {stop_at_unet_number!r}")
        first = start_at_unet_number
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= last:
            raise ValueError(f"start_at_unet_number must be a unet number from 1 to {last} (the last stage run); got "
                             f"{start_at_unet_number!r}")
        scales = per_stage(cond_scale, n, "cond_scale")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scales):
            raise ValueError(f"cond_scale must be finite numbers; got {scales}")
        if any(s != 1 for s in scales[:last]) and self.condition_on_text and self.cond_drop_prob <= 0:
            raise ValueError("this Imagen was trained without dropping the text (cond_drop_prob 0): its unets have no "
                             "learned null text, so classifier-free guidance cannot run; use cond_scale 1")
        stage_steps = [self.default_steps(k) if s is None else s for k, s in enumerate(per_stage(steps, n, "steps"))]
        samplers = [self.check_sampler(name) for name in per_stage(sampler, n, "sampler")]
        spacing = self.schedule_types[0] if schedule_type is None else schedule_type
        if spacing not in self.schedule_types:
            raise ValueError(f"schedule_type {schedule_type!r}: this cascade's stages run on "
                             f"{' or '.join(map(repr, self.schedule_types))} levels")
        level = self.lowres_sample_noise_level if lowres_sample_noise_level is None \
            else _check_level(lowres_sample_noise_level)
        fraction = 1.0 if not cfg_remove_parallel_component else float(cfg_keep_parallel_frac)
        guidance = functools.partial(guided_model_output,
                                     combine=functools.partial(projected_guidance, parallel_fraction=fraction))
        text_embeds, text_masks, batch = self._text(texts, text_embeds, text_masks, batch_size, emphasis)
        device = _device(self.unets[0])
        noise = PerSampleNoise(make_generators(batch, seeds, generator))
        # picture: the last stage's output, in [0, 1] (auto_normalize_img) as imagen-pytorch hands it on
        picture, init = self._given_pictures(first, start_image, init_image, strength, batch, device)
        inpaint = self._inpainting(inpaint_images, inpaint_masks, inpaint_resample_times, samplers, first, batch)
        conditioning = self._cond_images(cond_images, batch, first, last, device)
        for k in range(first - 1, last):
            size = self.image_sizes[k]
            shape = (batch, self.channels, size, size)
            extra: dict[str, Any] = {}
            if k > 0:  # noise conditioning augmentation of the previous stage's picture
                low = picture if picture.shape[-1] == size else F.interpolate(picture, size, mode=self.resize_mode)
                low = self._normalize(low)
                t_low = torch.full((batch,), level, dtype=torch.float32)
                lam = log_snr(self.lowres_noise_schedule, t_low)
                a, s = (v.view(-1, 1, 1, 1).to(device) for v in alpha_sigma(lam))
                extra = {"lowres_cond_img": a * low + s * noise.draw(tuple(low.shape)).to(device),
                         "lowres_noise_cond": self.lowres_condition(t_low, lam).to(device)}
            if conditioning[k] is not None:
                extra["cond_images"] = conditioning[k]
            stage = self.stage_sampling(k, int(stage_steps[k]), samplers[k], guidance, spacing)
            eps = noise.draw(shape).to(device)
            x, plan = eps * stage.start_scale, stage.plan
            if init is not None and k == 0:  # SDEdit: the picture noised to the level the last steps start from
                run = int(len(plan) * strength)
                if run < 1:
                    raise ValueError(f"strength {strength} of {len(plan)} steps runs none: raise the strength or the "
                                     "steps")
                plan = plan.tail(len(plan) - run)
                abar = float(plan.alphas_cumprod[0])
                x = math.sqrt(abar) * init + math.sqrt(1.0 - abar) * eps
            model = StageModel(self.stage_unet(k), stage.condition)
            cond, uncond = extra, None
            if self.condition_on_text:
                text = {"text_embeds": text_embeds.to(device), "text_mask": text_masks.to(device)}
                cond = {**text, **extra, "text_dropped": torch.zeros(batch, dtype=torch.bool, device=device)}
                if scales[k] != 1:
                    uncond = {**cond, "text_dropped": torch.ones(batch, dtype=torch.bool, device=device)}
            denoise = StageDenoiser(model, plan, stage.prediction_type, cond, uncond,
                                    float(scales[k]) if uncond is not None else 1.0,
                                    thresholding="dynamic" if self.dynamic_thresholding[k] else "static",
                                    threshold_percentile=self.dynamic_thresholding_percentile,
                                    guidance=stage.guidance, schedule=stage.schedule)

            def step_done(info, stage_number=k + 1):
                if callback is not None:
                    callback({**info, "stage": stage_number})

            run, options = resolve_sampler(samplers[k])[1], dict(stage.options)
            if inpaint is not None:  # RePaint over the stage's DDPM steps, the pictures at the stage's size
                images, masks = inpaint
                known = self._normalize(self._picture(images, batch, size, device, "inpaint_images"))
                keep = F.interpolate(masks.to(device), size, mode=self.resize_mode) != 0
                run = sample_repaint
                options.update(known=known, keep=keep, resample_times=inpaint_resample_times, step=samplers[k])
            with torch.no_grad():
                x = run(denoise, x, plan, noise=noise, callback=step_done, progress=progress, **options)
            for _ in range(stage.trailing_draws):  # (draws imagen-pytorch makes and leaves unused: the stream stays its)
                noise.draw(shape)
            picture = self._unnormalize(x.clamp(-1.0, 1.0))
        return picture if output_type == "pt" else pictures(picture, self.auto_normalize_img)

    __call__ = sample

    # -- what a stage samples with (ElucidatedImagenPipeline has its own) -----------------------------------------
    imagen_type = "original"  # imagen-pytorch's name for a continuous-time DDPM Imagen (its trainer's imagen_type)
    default_sampler = "ddpm"  # imagen-pytorch's
    samplers = SAMPLERS
    sampler_levels = "an Imagen stage's log-SNR grid"  # (what the samplers step over, for check_sampler's error)
    schedule_types = ("uniform", "karras")  # its grids (imagine.schedules.CONTINUOUS_SPACINGS), the default first
    settings_keys = IMAGEN_SETTINGS  # the config keys sampling reads (an imagen-pytorch config's others refused)

    def default_steps(self, k: int) -> int:
        """Stage k's steps when none are asked: its trained T (imagen-pytorch samples at it)."""
        return self.timesteps[k]

    def check_sampler(self, name: str | None) -> str:
        """The canonical name of a sampler this cascade's stages run (`samplers`; None: the default; imagine's aliases
        taken), else a ValueError naming them."""
        from imagine.samplers import resolve_sampler

        canonical, _, karras = resolve_sampler(self.default_sampler if name is None else name)
        if canonical not in self.samplers or karras:
            raise ValueError(f"sampler {name!r} does not run on {self.sampler_levels} here; valid: "
                             f"{', '.join(self.samplers)}")
        return canonical

    def lowres_condition(self, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The noise level a super-resolution U-Net is told for its augmented input at time t (log-SNR lam): lam,
        imagen-pytorch's get_condition, what the U-Net was trained on."""
        return lam

    def stage_sampling(self, k: int, steps: int, sampler: str, guidance: Callable[..., torch.Tensor],
                       spacing: str = "uniform") -> StageSampling:
        """Stage k's run: the continuous-time grid of `steps` steps of its schedule (imagine.schedules.continuous_plan,
        even in t or Karras-spaced),
        the U-Net told lambda(t), its pred_objective read as imagine's prediction type; DDPM's last step adds no noise
        and its draw, made and masked by imagen-pytorch, is made here after the run."""
        from imagine.schedules import continuous_plan

        return StageSampling(plan=continuous_plan(self.noise_schedules[k], steps, spacing),
                             condition=log_snr_condition(self.noise_schedules[k]),
                             prediction_type=PREDICTION_TYPES[self.pred_objectives[k]], guidance=guidance,
                             options={"final_noise": False} if sampler == "ddpm" else {}, trailing_draws=1)

    def stage_unet(self, k: int) -> Callable[..., torch.Tensor]:
        """Stage k's U-Net as `precision` runs it, made once: "exact", float32 on weights packed once for oneDNN
        (imagine.pipelines.text_to_image.exact_copy: the same kernels and arithmetic, about 1e-6 relative); "fast",
        its fast copy (`_Autocast`: bf16 where the CPU multiplies it natively, else float32 with Winograd 3x3
        convolutions on the large maps). A model that is not a torch module runs as it is. Both copies share the
        U-Net's weights, so they see no later change to them: a pipeline made for a moment's sampling (a training
        run's grid) is made anew each time."""
        if k not in self._runs:
            from imagine.pipelines.text_to_image import _Autocast, exact_copy

            unet = self.unets[k]
            if isinstance(unet, torch.nn.Module):
                unet = exact_copy(unet) if self.precision == "exact" else _Autocast(unet)
            self._runs[k] = unet
        return self._runs[k]

    def _given_pictures(self, first: int, start_image, init_image, strength, batch: int, device):
        """(start_image as stage first - 1 hands it on, or None; init_image at stage 1's size in [-1, 1], or None),
        the combinations checked."""
        n = len(self.unets)
        if first > 1 and start_image is None:
            raise ValueError(f"start_at_unet_number {first}: give start_image, the picture stage {first} enlarges")
        if first == 1 and start_image is not None:
            raise ValueError(f"start_image: give start_at_unet_number (2 to {n}), the stage that enlarges it; stage 1 "
                             "makes its picture from noise" if n > 1 else "start_image: this cascade has one stage, "
                             "which makes its picture from noise")
        if init_image is not None and first > 1:
            raise ValueError("init_image is image to image at stage 1; with start_at_unet_number > 1 the stages "
                             "enlarge start_image: give one of them")
        if init_image is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                       or not 0 < strength <= 1):
            raise ValueError(f"strength must be in (0, 1] (how far from init_image); got {strength!r}")
        start = None if first == 1 else self._picture(start_image, batch, self.image_sizes[first - 2], device,
                                                        "start_image")
        init = None if init_image is None else \
            self._normalize(self._picture(init_image, batch, self.image_sizes[0], device, "init_image"))
        return start, init

    def _inpainting(self, images, masks, resample_times, samplers, first: int, batch: int):
        """(inpaint_images, their masks as float [B, 1, H, W]), or None; the combinations checked."""
        if images is None and masks is None:
            return None
        if images is None or masks is None:
            raise ValueError("inpainting needs inpaint_images and inpaint_masks (True: keep the picture there), both")
        if first > 1:
            raise ValueError("inpaint_images: inpainting runs from stage 1; give no start_image / start_at_unet_number "
                             "with it")
        steps = [name for name in ("ddpm", "heun") if name in self.samplers]  # (RePaint redoes one step at a time)
        if any(name not in steps for name in samplers):
            raise ValueError(f"inpainting (RePaint) redoes single steps: sampler {samplers} asked; use "
                             f"{' or '.join(map(repr, steps))}")
        if isinstance(resample_times, bool) or not isinstance(resample_times, int) or resample_times < 1:
            raise ValueError(f"inpaint_resample_times must be an integer >= 1; got {resample_times!r}")
        if not torch.is_tensor(masks) or masks.ndim not in (3, 4) or (masks.ndim == 4 and masks.shape[1] != 1) \
                or masks.shape[0] not in (1, batch):
            got = tuple(masks.shape) if torch.is_tensor(masks) else type(masks).__name__
            raise ValueError(f"inpaint_masks must be a tensor [B, H, W] (True or 1: keep) with B = {batch} or 1; got "
                             f"{got}")
        masks = (masks if masks.ndim == 4 else masks[:, None]).float().expand(batch, -1, -1, -1)
        return images, masks

    def _cond_images(self, cond_images, batch: int, first: int, last: int, device) -> list:
        """Per stage, the conditioning pictures its U-Net reads ([batch, C, H, W], as given: each U-Net resizes them),
        or None for a U-Net that reads none; an error where they are missing, not read by any stage run, or of the
        wrong kind."""
        def channels(unet) -> int:
            return int(getattr(getattr(unet, "config", None), "cond_images_channels",
                               getattr(unet, "cond_images_channels", 0)) or 0)
        wanted = [channels(self.unets[k]) if first - 1 <= k < last else 0 for k in range(len(self.unets))]
        if cond_images is None:
            if any(wanted):
                raise ValueError(f"stage {[bool(w) for w in wanted].index(True) + 1}'s U-Net reads a conditioning "
                                 "picture (cond_images_channels > 0): give cond_images")
            return [None] * len(self.unets)
        if not any(wanted):
            raise ValueError("cond_images: no stage run here reads a conditioning picture (their U-Nets have "
                             "cond_images_channels 0)")
        if _pil_pictures(cond_images):  # (in their own mode: a conditioning picture has the channels it has)
            cond_images = _pictures_tensor(cond_images, None, "cond_images")
        if torch.is_tensor(cond_images) and cond_images.dtype == torch.uint8:  # (imagen-pytorch's cast)
            cond_images = cond_images.float() / 255.0
        need = {w for w in wanted if w}
        if not torch.is_tensor(cond_images) or cond_images.ndim != 4 or not cond_images.is_floating_point() \
                or cond_images.shape[0] not in (1, batch) or {cond_images.shape[1]} != need:
            got = f"{cond_images.dtype} {tuple(cond_images.shape)}" if torch.is_tensor(cond_images) else \
                type(cond_images).__name__
            raise ValueError(f"cond_images must be PIL pictures or a tensor [B, C, H, W] with B = {batch} or 1 and C "
                             f"= {' and '.join(map(str, sorted(need)))} (the U-Nets' cond_images_channels); got {got}")
        if cond_images.shape[-1] != cond_images.shape[-2]:
            raise ValueError(f"cond_images are {cond_images.shape[-1]}x{cond_images.shape[-2]}: the cascade's stages "
                             "are square; give square pictures")
        cond_images = cond_images.expand(batch, -1, -1, -1).to(device)
        return [cond_images if w else None for w in wanted]

    def _picture(self, image, batch: int, size: int, device, name: str) -> torch.Tensor:
        """A picture given to the cascade (start_image, init_image) as a stage hands one on: a float tensor [batch, C,
        size, size] (resized by resize_mode, as imagen-pytorch's resize_image_to), from a tensor [B or 1, C, H, W] or
        PIL pictures (taken to [0, 1], or [-1, 1] where auto_normalize_img is off)."""
        if _pil_pictures(image):
            mode = {1: "L", 3: "RGB"}.get(self.channels)
            if mode is None:
                raise ValueError(f"{name}: PIL pictures are for 1- or 3-channel cascades; this one has "
                                 f"{self.channels} channels: give a tensor")
            image = _pictures_tensor(image, mode, name)
            image = image if self.auto_normalize_img else image * 2 - 1
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != self.channels \
                or image.shape[0] not in (1, batch) or not image.is_floating_point():
            got = f"{image.dtype} {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"{name} must be PIL pictures or a float tensor [B, {self.channels}, H, W] with B = "
                             f"{batch} or 1; got {got}")
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"{name} is {image.shape[-1]}x{image.shape[-2]}: the cascade's stages are square; "
                             "crop or pad it square first")
        image = image.float().to(device).expand(batch, -1, -1, -1)
        return image if image.shape[-1] == size else F.interpolate(image, size, mode=self.resize_mode)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 - 1 if self.auto_normalize_img else x

    def _unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) * 0.5 if self.auto_normalize_img else x


def pipeline_class(imagen_type, asked: type) -> type:
    """The pipeline class of an imagen-pytorch imagen_type ("original": ImagenPipeline, "elucidated":
    imagine.pipelines.elucidated_imagen.ElucidatedImagenPipeline); `asked`, the class a loader was called on, must be
    it or its base."""
    from imagine.pipelines.elucidated_imagen import ElucidatedImagenPipeline

    classes = {"original": ImagenPipeline, "elucidated": ElucidatedImagenPipeline}
    if imagen_type not in classes:
        raise ValueError(f"imagen_type {imagen_type!r} is not one imagine samples; known: {sorted(classes)}")
    klass = classes[imagen_type]
    if not issubclass(klass, asked):
        raise ValueError(f"this is an imagen_type {imagen_type!r} cascade; load it with {klass.__name__} (or "
                         "ImagenPipeline, which picks the class)")
    return klass


def read_checkpoint(path_or_state) -> dict:
    """An imagen-pytorch trainer checkpoint as a dict with 'model': from a file by torch.load(weights_only=True)
    (tensors and plain values only: no code runs), or the dict itself."""
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"no imagen-pytorch checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} needs more than tensors and plain values to unpickle (it stores objects whose "
                             f"code would run on loading), so imagine does not load it (torch.load weights_only=True):"
                             f" re-save it as a dict of tensors, numbers, strings, lists and dicts ({e})") from None
    else:
        checkpoint = path_or_state
    if not isinstance(checkpoint, dict):
        raise ValueError(f"an imagen-pytorch checkpoint is a dict (ImagenTrainer.save); got "
                         f"{type(checkpoint).__name__}")
    if not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"this checkpoint has no 'model' (the Imagen state dict ImagenTrainer.save stores); its keys: "
                         f"{sorted(map(str, checkpoint))}")
    return checkpoint


def pictures(x: torch.Tensor, unit_range: bool = True) -> list:
    """Samples as 8-bit pictures: from [0, 1] as imagen-pytorch's return_pil_images (torchvision's ToPILImage:
    255 x, truncated), or from [-1, 1] (auto_normalize_img off) as imagine.images.to_pil."""
    from PIL import Image

    from imagine.images import to_pil

    if not unit_range:
        return [to_pil(row) for row in x.float().cpu()]
    rows = (x.float().cpu().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(r if r.shape[2] != 1 else r[:, :, 0]) for r in rows]


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= 1:
        raise ValueError(f"lowres_sample_noise_level must be a time in [0, 1] of the lowres noise schedule; got "
                         f"{level!r}")
    return float(level)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {n!r}")
    return n


def _device(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")
