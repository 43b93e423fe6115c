"""Training one stage of an Imagen cascade: an Efficient U-Net in pixels at continuous noise levels.

Imagen (Saharia et al. 2022) trains each stage of its cascade on its own: the base model (text -> a small picture)
and then each super-resolution model (a picture -> a larger one, conditioned on the text too), as cascaded diffusion
(Ho et al. 2022, CDM) does. Here a run trains one stage; a super-resolution run names the cascade below it
(`imagen.previous`, the `model/` folder of the run before), samples its grids through the whole cascade and exports
the cascade with its stage on top.

- Noise (Kingma et al. 2021, VDM): t ~ U[0, 1], the stage's log-SNR lambda(t) (`imagen.noise_schedule`, "cosine" or
  "linear", imagine.schedules.log_snr), x_t = alpha x_0 + sigma eps; the U-Net sees lambda
  (imagine.diffusion.continuous_training_loss), its target eps, v or x_0 (`prediction_type`), min-SNR-gamma weights
  (Hang et al. 2023; `min_snr_gamma`, 5 by default as imagen-pytorch's).
- Text: a frozen encoder's states (`text_encoder`, cached), the padding's states zeroed as imagen-pytorch's
  t5_encode_text gives them; with probability `caption_dropout` a caption is replaced by the U-Net's learned null
  text (`text_dropped`), so the same network learns the unconditional model classifier-free guidance needs (Ho &
  Salimans 2022; Imagen sec. 2.2).
- Pictures: the data's images at this stage's `imagen.image_size` (area-averaged down where the data is larger). A
  super-resolution stage's input (CDM sec. 4.1; Imagen sec. 2.5, noise conditioning augmentation): the same picture
  averaged down to the stage below's size, then resized up by `imagen.resize_mode` (the sampler's resize), noised by
  the `imagen.lowres_noise_schedule` to a time drawn from U[0, 1] for the batch (imagen-pytorch's default), that level's
  log-SNR the U-Net's second condition. (imagen-pytorch takes the stage's picture and the small one by
  F.interpolate's nearest mode; averaging keeps the small picture what a stage below, trained on averaged pictures,
  makes.)

- Self-conditioning (Chen et al. 2022, sec. 3.3; `model.self_cond`): half the batches (one draw each) first estimate
  x_0 without gradient and give it to the U-Net as `self_cond`, as its sampler gives the previous step's estimate.

- ElucidatedImagen (`imagen.type: elucidated`; Karras et al. 2022, EDM, as imagen-pytorch's ElucidatedImagen):
  ln(sigma) ~ N(P_mean, P_std^2), x = x_0 + sigma eps, the U-Net preconditioned (eq. 7: it sees c_in x and ln(sigma)
  / 4) and the loss lambda(sigma) |D(x; sigma) - x_0|^2 (imagine.edm.training_loss); prediction_type, min_snr_gamma
  and noise_schedule do not apply. The stage's sampling settings (sigma_min, sigma_max, rho, S_churn, S_tmin, S_tmax,
  S_noise; imagine.pipelines.elucidated_imagen) go into the exported cascade, which samples with Heun and churn.
  Every stage of a cascade is of one type.

Every random draw is made for the global batch from the task's generators and indexed by slot, as DiffusionTask's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from imagine.train.config import check_keys
from imagine.train.diffusion_task import TEXT_ENCODER_KEYS, CaptionStates
from imagine.train.loop import Task, global_slots

IMAGEN_STAGE_DEFAULTS = {
    "type": "original",            # imagen-pytorch's imagen_type: "original" (continuous-time DDPM) or "elucidated" (EDM)
    "image_size": None,            # this stage's picture size (None: data.resolution)
    "previous": None,              # a super-resolution stage: the cascade folder below it (an earlier run's model/)
    "noise_schedule": None,        # None: imagen-pytorch's, "cosine" for the first two stages, "linear" after
    "lowres_noise_schedule": "linear",
    "lowres_sample_noise_level": 0.2,
    "resize_mode": "nearest",
    "dynamic_thresholding": True,
    "dynamic_thresholding_percentile": 0.95,
}
IMAGEN_DEFAULTS = {
    "prediction_type": "epsilon", "caption_dropout": 0.1, "min_snr_gamma": 5.0,
    "text_encoder": {"type": "minilm", "max_length": 32}, "cache_text": True,
    "imagen": IMAGEN_STAGE_DEFAULTS,
    "sample": {"prompts": [], "steps": 50, "guidance_scale": 5.0, "seed": 0},
}
IMAGEN_TYPES = ("original", "elucidated")
# an ElucidatedImagen stage's EDM settings in its config (imagen.*; num_sample_steps is sample.steps)
EDM_TRAINING = ("sigma_data", "P_mean", "P_std", "sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax",
                "S_noise")
# imagine's prediction types -> imagen-pytorch's pred_objectives (the cascade folder keeps the latter, as its pipeline)
OBJECTIVES = {"epsilon": "noise", "v_prediction": "v", "sample": "x_start"}


def check_imagen_config(cfg: dict) -> dict:
    """Every section of an Imagen stage's config but `train` and `data`, checked before anything is built. Returns
    the task's settings with their defaults filled in."""
    from imagine.models.efficient_unet import EfficientUNetConfig
    from imagine.pipelines.imagen import RESIZE_MODES
    from imagine.schedules import CONTINUOUS_SCHEDULES
    from imagine.train.config import as_bool, as_choice, as_int, as_mapping, as_number, check_fields

    check_keys(cfg, {"seed", "output", "data", "model", "train", *IMAGEN_DEFAULTS}, "the imagen config")
    from imagine.pipelines.elucidated_imagen import check_edm_settings

    check_keys(as_mapping(cfg.get("imagen") or {}, "imagen"), {*IMAGEN_STAGE_DEFAULTS, *EDM_TRAINING}, "imagen")
    check_keys(as_mapping(cfg.get("sample") or {}, "sample"), set(IMAGEN_DEFAULTS["sample"]), "sample")
    d = {**IMAGEN_DEFAULTS, **{k: v for k, v in cfg.items() if k in IMAGEN_DEFAULTS}}
    d["imagen"] = s = {**IMAGEN_STAGE_DEFAULTS, **(cfg.get("imagen") or {})}
    d["sample"] = {**IMAGEN_DEFAULTS["sample"], **(cfg.get("sample") or {})}
    as_choice(s["type"], "imagen.type", IMAGEN_TYPES)
    edm_given = sorted(k for k in EDM_TRAINING if k in s)
    if s["type"] == "elucidated":
        given = [k for k in ("prediction_type", "min_snr_gamma") if k in cfg] + \
            (["imagen.noise_schedule"] if s["noise_schedule"] is not None else [])
        if given:
            raise ValueError(f"{', '.join(given)}: not for an ElucidatedImagen stage (imagen.type elucidated), which "
                             f"learns EDM's preconditioned denoiser; its settings are imagen.{', imagen.'.join(EDM_TRAINING)}")
        edm = check_edm_settings(1, **{k: s[k] for k in edm_given})
        s.update({k: edm[k][0] for k in EDM_TRAINING})
    elif edm_given:
        raise ValueError(f"imagen.{', imagen.'.join(edm_given)}: ElucidatedImagen settings; this stage is imagen.type "
                         "original (continuous-time DDPM): set imagen.type elucidated, or leave them out")
    as_choice(d["prediction_type"], "prediction_type", tuple(OBJECTIVES))
    d["caption_dropout"] = as_number(d["caption_dropout"], "caption_dropout", 0.0, below=1.0)
    d["min_snr_gamma"] = as_number(d["min_snr_gamma"], "min_snr_gamma", 0.0, inclusive=False, none=True)
    as_bool(d["cache_text"], "cache_text")
    te = as_mapping(d["text_encoder"], "text_encoder")
    check_keys(te, TEXT_ENCODER_KEYS[as_choice(te.get("type"), "text_encoder.type", tuple(TEXT_ENCODER_KEYS))],
               f"text_encoder (type {te.get('type')})")
    resolution = as_int((cfg.get("data") or {}).get("resolution", 64), "data.resolution", 1)
    s["image_size"] = as_int(resolution if s["image_size"] is None else s["image_size"], "imagen.image_size", 1)
    if s["image_size"] > resolution:
        raise ValueError(f"imagen.image_size {s['image_size']} is larger than the data's pictures (data.resolution "
                         f"{resolution}): a stage learns from pictures at least its size")
    if s["previous"] is not None and not (isinstance(s["previous"], str) and s["previous"]):
        raise ValueError(f"imagen.previous must be the folder of the cascade below this stage, or null for a base "
                         f"stage; got {s['previous']!r}")
    if s["noise_schedule"] is not None:
        as_choice(s["noise_schedule"], "imagen.noise_schedule", CONTINUOUS_SCHEDULES)
    as_choice(s["lowres_noise_schedule"], "imagen.lowres_noise_schedule", CONTINUOUS_SCHEDULES)
    s["lowres_sample_noise_level"] = as_number(s["lowres_sample_noise_level"], "imagen.lowres_sample_noise_level",
                                               0.0, below=1.0 + 1e-12)
    as_choice(s["resize_mode"], "imagen.resize_mode", RESIZE_MODES)
    as_bool(s["dynamic_thresholding"], "imagen.dynamic_thresholding")
    s["dynamic_thresholding_percentile"] = as_number(s["dynamic_thresholding_percentile"],
                                                     "imagen.dynamic_thresholding_percentile", 0.0, inclusive=False,
                                                     below=1.0 + 1e-12)
    model = as_mapping(cfg.get("model", {}), "model")
    check_fields(model, EfficientUNetConfig, "model (the Efficient U-Net's EfficientUNetConfig fields)")
    if model.get("cond_images_channels"):
        raise ValueError("model.cond_images_channels: a stage that reads conditioning pictures (imagen-pytorch's "
                         "cond_images) is not trained here (the datasets hold captions and pictures, no conditioning "
                         "pictures); leave it 0. Such stages sample (ImagenPipeline.sample(cond_images=))")
    if "lowres_cond" in model and bool(model["lowres_cond"]) != (s["previous"] is not None):
        raise ValueError("model.lowres_cond is set by the stage (true exactly when imagen.previous names the cascade "
                         "below): leave it out")
    sm = d["sample"]
    if not isinstance(sm["prompts"] or [], list) or not all(isinstance(p, str) and p for p in sm["prompts"] or []):
        raise ValueError(f"sample.prompts must be a list of non-empty prompts; got {sm['prompts']!r}")
    sm["steps"] = as_int(sm["steps"], "sample.steps", 1)
    sm["guidance_scale"] = as_number(sm["guidance_scale"], "sample.guidance_scale")
    sm["seed"] = as_int(sm["seed"], "sample.seed")
    return d


class ImagenTask(CaptionStates, Task):
    """One stage of an Imagen cascade (module doc): `imagine train imagen --config run.yaml`."""

    name = "imagen"

    def __init__(self, cfg: dict, text_encoder=None):
        from imagine.models.efficient_unet import EfficientUNet, EfficientUNetConfig
        from imagine.models.text_encoders import load_text_encoder
        from imagine.pipelines.imagen import ImagenPipeline, stage_noise_schedules

        self.cfg = cfg
        d = self.d = check_imagen_config(cfg)
        s = d["imagen"]
        seed = int(cfg.get("seed", 0))
        self.text_encoder = text_encoder if text_encoder is not None else load_text_encoder(d["text_encoder"])
        # the stages below this one (a super-resolution stage), frozen: they make its sample grids' inputs
        self.previous = None if s["previous"] is None else ImagenPipeline.from_pretrained(s["previous"])
        below = len(self.previous.unets) if self.previous is not None else 0
        if self.previous is not None:
            low = self.previous.image_sizes[-1]
            if not low < s["image_size"]:
                raise ValueError(f"imagen.image_size {s['image_size']} must be larger than the size of the cascade "
                                 f"below ({low}, {s['previous']})")
            if self.previous.imagen_type != s["type"]:
                raise ValueError(f"the cascade below ({s['previous']}) is imagen type {self.previous.imagen_type!r} "
                                 f"and this stage {s['type']!r}: every stage of a cascade is of one type")
            if self.previous.text_embed_dim != self.text_encoder.dim:
                raise ValueError(f"the cascade below ({s['previous']}) reads {self.previous.text_embed_dim}-wide text "
                                 f"states; this run's text encoder gives {self.text_encoder.dim}: train every stage "
                                 "on the same encoder")
        self.noise_schedule = None if s["type"] == "elucidated" else \
            s["noise_schedule"] or stage_noise_schedules("cosine", below + 1)[below]
        model = {**cfg.get("model", {}), "lowres_cond": self.previous is not None}
        model.setdefault("text_embed_dim", self.text_encoder.dim)
        ucfg = EfficientUNetConfig.from_dict(model)
        if ucfg.text_embed_dim != self.text_encoder.dim:
            raise ValueError(f"model.text_embed_dim ({ucfg.text_embed_dim}) must equal the text encoder's width "
                             f"({self.text_encoder.dim})")
        if s["image_size"] % ucfg.downsampling_factor:
            raise ValueError(f"imagen.image_size {s['image_size']} must be a multiple of the U-Net's downsampling "
                             f"factor {ucfg.downsampling_factor} (2 ** (levels - 1), 2 ** levels for memory_efficient)")
        torch.manual_seed(seed)
        self.trainable = EfficientUNet(ucfg)
        self.gen = torch.Generator().manual_seed(seed + 1)     # times and noise
        self.drop_gen = torch.Generator().manual_seed(seed + 2)  # caption dropout
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def generators(self):
        return {"noise": self.gen, "dropout": self.drop_gen}

    def resolved_config(self):
        return {**self.d, "imagen": {**self.d["imagen"], "noise_schedule": self.noise_schedule},
                "model": self.trainable.config.to_dict()}

    def text_inputs(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The U-Net's text keywords: the states with their padding zeroed (imagen-pytorch's t5_encode_text) and the
        mask of real tokens."""
        cond = self.encode_text(captions)
        states = cond["context"]
        mask = cond.get("context_mask")
        mask = torch.ones(states.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        return {"text_embeds": states.masked_fill(~mask[..., None], 0.0), "text_mask": mask}

    def pictures(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the stage's x_0 at its size, the super-resolution input before its noise: averaged down to the size below
        and resized up as the sampler resizes; None for a base stage), in [-1, 1]."""
        s = self.d["imagen"]
        x0 = images if images.shape[-1] == s["image_size"] else F.interpolate(images, s["image_size"], mode="area")
        if self.previous is None:
            return x0, None
        small = F.interpolate(images, self.previous.image_sizes[-1], mode="area")
        return x0, F.interpolate(small, s["image_size"], mode=s["resize_mode"]).clamp(-1, 1)

    def loss(self, batch, step):
        from imagine import edm
        from imagine.diffusion import continuous_training_loss
        from imagine.schedules import alpha_sigma, log_snr

        G, slot = global_slots(batch)
        d, s = self.d, self.d["imagen"]
        dev = self._device()
        dropped = (torch.rand(G, generator=self.drop_gen) < float(d["caption_dropout"]))[slot].to(dev)
        cond = {k: v.to(dev) for k, v in self.text_inputs(list(batch["caption"])).items()}
        cond["text_dropped"] = dropped
        x0, low = self.pictures(batch["image"].to(dev).float())
        if s["type"] == "elucidated":
            z = torch.randn(G, generator=self.gen)[slot]
        else:
            t = torch.rand(G, generator=self.gen, dtype=torch.float64)[slot]
        noise = torch.randn((G, *x0.shape[1:]), generator=self.gen)[slot].to(dev)
        if low is not None:  # noise conditioning augmentation, one level for the batch
            lam_low = log_snr(s["lowres_noise_schedule"], torch.rand(1, generator=self.gen).expand(G)[slot])
            eps_low = torch.randn((G, *low.shape[1:]), generator=self.gen)[slot].to(dev)
            a, b = (v.view(-1, 1, 1, 1).to(dev) for v in alpha_sigma(lam_low))
            cond.update(lowres_cond_img=a * low + b * eps_low, lowres_noise_cond=lam_low.to(dev))
        # a self-conditioned U-Net (model.self_cond): half the batches first estimate x_0 and are given it, one draw
        # for the batch (Chen et al. 2022; imagen-pytorch's), as sampling gives the previous step's estimate
        self_condition = bool(self.trainable.config.self_cond) and float(torch.rand(1, generator=self.gen)) < 0.5
        model = self.trainable if self.model is None else self.model
        if s["type"] == "elucidated":  # EDM: ln(sigma) ~ N(P_mean, P_std^2) (the draw `t` was, from the same stream)
            sigma = edm.training_sigmas(z, s["P_mean"], s["P_std"]).to(dev)
            loss = edm.training_loss(model, x0, sigma, noise, s["sigma_data"], cond=cond,
                                     self_condition=self_condition)
        else:
            lam = log_snr(self.noise_schedule, t.float()).to(dev)
            loss = continuous_training_loss(model, x0, lam, noise, d["prediction_type"], cond=cond,
                                            min_snr_gamma=d["min_snr_gamma"], self_condition=self_condition)
        return loss, {"loss": float(loss.detach())}

    # -- sampling and export -------------------------------------------------------------------
    def pipeline(self, model):
        """The cascade to this stage: the frozen stages below (imagen.previous) and `model` on top."""
        from imagine.pipelines.elucidated_imagen import ElucidatedImagenPipeline
        from imagine.pipelines.imagen import ImagenPipeline

        s, below = self.d["imagen"], self.previous
        steps = int(self.d["sample"]["steps"])
        stage = {"image_sizes": [s["image_size"]], "dynamic_thresholding": [s["dynamic_thresholding"]]}
        if s["type"] == "elucidated":
            stage.update({"num_sample_steps": [steps], **{k: [s[k]] for k in EDM_TRAINING}})
        else:
            stage.update({"timesteps": [steps], "noise_schedules": [self.noise_schedule],
                          "pred_objectives": [OBJECTIVES[self.d["prediction_type"]]]})
        if below is not None:
            for key, ours in stage.items():
                stage[key] = [*getattr(below, key), *ours]
        pipeline = ElucidatedImagenPipeline if s["type"] == "elucidated" else ImagenPipeline
        return pipeline([*(below.unets if below is not None else []), model], **stage,
                              lowres_noise_schedule=s["lowres_noise_schedule"],
                              lowres_sample_noise_level=s["lowres_sample_noise_level"],
                              dynamic_thresholding_percentile=s["dynamic_thresholding_percentile"],
                              resize_mode=s["resize_mode"], text_embed_dim=self.text_encoder.dim,
                              cond_drop_prob=float(self.d["caption_dropout"]), text_encoder=self.text_encoder)

    @torch.no_grad()
    def sample_grid(self, model, path: Path, step: int):
        from imagine.images import save_grid

        sm = self.d["sample"]
        prompts = list(sm.get("prompts") or [])
        if not prompts:
            return
        was = model.training
        model.eval()
        pictures = self.pipeline(model).sample(prompts, cond_scale=float(sm["guidance_scale"]),
                                               seeds=[int(sm["seed"]) + i for i in range(len(prompts))],
                                               output_type="pil", progress=False)
        model.train(was)
        save_grid(pictures, path, cols=min(8, len(prompts)))

    def export(self, model, folder: Path):
        """The cascade to this stage as a folder ImagenPipeline.from_pretrained and `imagine generate --model` load."""
        sm = self.d["sample"]
        self.pipeline(model).save_pretrained(folder, defaults={"steps": int(sm["steps"]),
                                                               "guidance_scale": float(sm["guidance_scale"])},
                                             text_encoder=self.d["text_encoder"], training_config=self.cfg)
