"""Training a text-conditioned diffusion model, in pixel space or on a frozen VAE's latents.

DDPM's simplified objective (Ho et al. 2020, eq. 14) with epsilon or v prediction (Salimans & Ho
2022), optional min-SNR weighting (Hang et al. 2023), offset noise (`noise_offset`, diffusers' and
kohya's option of that name) and input perturbation (`input_perturbation`, Ning et al. 2023, as
diffusers' train_text_to_image); latent diffusion when a VAE is given
(Rombach et al. 2022: the U-Net learns on scaling_factor * z); a frozen text encoder whose states
the U-Net cross-attends to; captions dropped to the empty prompt with probability
`caption_dropout` so the same network learns the unconditional model for classifier-free
guidance (Ho & Salimans 2022, Alg. 1). Text states and VAE latent moments can be cached, since
both encoders are frozen.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from imagine.models.io import atomic_write_json
from imagine.train.config import check_keys
from imagine.train.loop import Task, global_slots

DIFFUSION_DEFAULTS = {
    "prediction_type": "epsilon", "caption_dropout": 0.1, "min_snr_gamma": None, "noise_offset": 0.0,
    "input_perturbation": 0.0,
    # Improved DDPM's lambda (sec. 3.1) for a U-Net that learns its variance (out_channels = 2 x in_channels): the
    # hybrid loss L_simple + lambda L_vlb (imagine.diffusion.training_loss); unused by any other U-Net
    "vlb_weight": 0.001,
    "schedule": {"kind": "scaled_linear", "num_train_timesteps": 1000},
    "text_encoder": {"type": "minilm", "max_length": 32},
    "vae": None, "cache_text": True, "cache_latents": True,
    "sample": {"prompts": [], "steps": 20, "guidance_scale": 5.0, "sampler": "dpmpp_2m", "seed": 0,
               "sigma_schedule": None, "final_step": "euler", "threshold_range": None},
}


# the text encoders' keys (imagine.models.text_encoders.load_text_encoder)
TEXT_ENCODER_KEYS = {"minilm": {"type", "path", "max_length"}, "clip": {"type", "path", "tokenizer", "clip_skip"},
                     "t5": {"type", "path", "tokenizer", "max_length"}}
# NoiseSchedule.from_config's keywords a training schedule may give (the prediction type is the config's own)
SCHEDULE_KEYS = {"kind", "num_train_timesteps", "beta_start", "beta_end", "zero_terminal_snr", "trained_betas",
                 "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "variance_type"}


def check_diffusion_config(cfg: dict) -> dict:
    """Every section of a diffusion run's config but `train` (loop.check_run) and `data` (data.check_data_config)
    checked before anything is built: unknown keys, values of the wrong kind, sampling settings the sampler would
    refuse at the first sample grid or at export. Returns the task's settings with their defaults filled in."""
    from imagine.models.unet import UNetConfig
    from imagine.samplers import resolve_sampler
    from imagine.schedules import NoiseSchedule
    from imagine.train.config import as_bool, as_choice, as_int, as_mapping, as_number, check_fields

    check_keys(cfg, {"seed", "output", "data", "model", "train", *DIFFUSION_DEFAULTS}, "the diffusion config")
    as_int(cfg.get("seed", 0), "seed")
    check_keys(cfg.get("sample") or {}, set(DIFFUSION_DEFAULTS["sample"]), "sample")
    d = {**DIFFUSION_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIFFUSION_DEFAULTS}}
    d["sample"] = {**DIFFUSION_DEFAULTS["sample"], **(cfg.get("sample") or {})}
    if d["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample'; got {d['prediction_type']!r}")
    d["caption_dropout"] = as_number(d["caption_dropout"], "caption_dropout", 0.0, below=1.0)
    d["min_snr_gamma"] = as_number(d["min_snr_gamma"], "min_snr_gamma", 0.0, inclusive=False, none=True)
    d["noise_offset"] = as_number(d["noise_offset"], "noise_offset", 0.0)
    d["input_perturbation"] = as_number(d["input_perturbation"], "input_perturbation", 0.0)
    d["vlb_weight"] = as_number(d["vlb_weight"], "vlb_weight", 0.0)
    for key in ("cache_text", "cache_latents"):
        as_bool(d[key], key)
    if d["vae"] is not None and not (isinstance(d["vae"], str) and d["vae"]):
        raise ValueError(f"vae must be the path of a VAE folder, or null for pixel space; got {d['vae']!r}")
    te = as_mapping(d["text_encoder"], "text_encoder")
    kind = as_choice(te.get("type"), "text_encoder.type", tuple(TEXT_ENCODER_KEYS))
    check_keys(te, TEXT_ENCODER_KEYS[kind], f"text_encoder (type {kind})")
    if "max_length" in te:
        as_int(te["max_length"], "text_encoder.max_length", 1)
    if "clip_skip" in te:
        as_int(te["clip_skip"], "text_encoder.clip_skip", 0)
    for key in ("path", "tokenizer"):
        if key in te and not (isinstance(te[key], str) and te[key]):
            raise ValueError(f"text_encoder.{key} must be a path; got {te[key]!r}")
    sched = as_mapping(d["schedule"], "schedule")
    check_keys(sched, SCHEDULE_KEYS, "schedule")
    try:
        schedule = NoiseSchedule.from_config(**sched)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule: {e}") from None
    if schedule.variance_type == "learned":  # (the hybrid loss trains Improved DDPM's interpolation, eq. 15)
        raise ValueError("schedule.variance_type 'learned' (a raw variance output, diffusers' DDPMScheduler's) is "
                         "sampled, not trained, here: train 'learned_range' (Improved DDPM's interpolation, with "
                         "out_channels = 2 x in_channels) or a fixed one ('fixed_small', 'fixed_large')")
    if float(schedule.alphas_cumprod[-1]) == 0 and d["prediction_type"] == "epsilon":
        # (kohya's sd-scripts warns the same; diffusers' scripts say nothing)
        warnings.warn("schedule.zero_terminal_snr with prediction_type epsilon: at the last timestep x_t is the noise "
                      "itself, so the eps target is trivial there and x_0 cannot be recovered from it; Lin et al. "
                      "2023 train zero terminal SNR with v_prediction")
    # the U-Net's keys must be its config's fields (UNetConfig.from_dict ignores other keys, as diffusers' folders
    # hold some; a misspelt key in a run's config would be dropped silently)
    check_fields(as_mapping(cfg.get("model", {}), "model"), UNetConfig, "model (the U-Net's UNetConfig fields)")
    model = {**{f: getattr(UNetConfig, f) for f in ("in_channels", "out_channels")}, **cfg.get("model", {})}
    learned = model["out_channels"] == 2 * model["in_channels"]
    if (schedule.variance_type == "learned_range") != learned:
        raise ValueError("schedule.variance_type 'learned_range' samples with a learned variance, which a U-Net "
                         "with out_channels = 2 x in_channels learns (Improved DDPM; trained by the hybrid loss, "
                         f"vlb_weight): the model has in_channels {model['in_channels']} and out_channels "
                         f"{model['out_channels']}, the schedule variance_type {schedule.variance_type!r}; give both "
                         "or neither")
    s = d["sample"]
    if not isinstance(s["prompts"] or [], list) or not all(isinstance(p, str) for p in s["prompts"] or []):
        raise ValueError(f"sample.prompts must be a list of prompts; got {s['prompts']!r}")
    s["steps"] = as_int(s["steps"], "sample.steps", 1)
    s["guidance_scale"] = as_number(s["guidance_scale"], "sample.guidance_scale")
    s["seed"] = as_int(s["seed"], "sample.seed")
    try:
        resolve_sampler(s["sampler"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"sample.sampler: {e}") from None
    from imagine.schedules import SIGMA_SCHEDULES

    if s["sigma_schedule"] is not None:
        as_choice(s["sigma_schedule"], "sample.sigma_schedule (or null)", SIGMA_SCHEDULES)
    as_choice(s["final_step"] or "euler", "sample.final_step", ("euler", "heun"))
    s["threshold_range"] = as_number(s["threshold_range"], "sample.threshold_range", 0.0, inclusive=False, none=True)
    # The combination, as the sampler will see it at a sample grid and as the exported model's defaults: a dry run
    # on a 1-element sample with a model that predicts zeros (milliseconds).
    from imagine.sampling import sample

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample(lambda x, t, **k: torch.zeros_like(x).repeat(1, 2 if learned else 1, 1, 1), (1, 1, 1, 1),
                   schedule=schedule,
                   prediction_type=d["prediction_type"], sampler=s["sampler"], steps=s["steps"], cond={}, uncond={},
                   guidance_scale=s["guidance_scale"], seeds=[0], progress=False, sigma_schedule=s["sigma_schedule"],
                   final_step=s["final_step"] or "euler")
    except (TypeError, ValueError) as e:
        raise ValueError(f"sample (sampler {s['sampler']!r}, steps {s['steps']}, sigma_schedule "
                         f"{s['sigma_schedule']!r}, final_step {s['final_step']!r}): {e}") from None
    return d


class CaptionStates:
    """A frozen text encoder's states for the captions, cached (`cache_text`) since the encoder never changes; shared
    by the tasks that train a text-conditioned denoiser (needs `text_encoder`, `text_cache` and `d["cache_text"]`)."""

    def bind(self, model, accelerator) -> None:
        super().bind(model, accelerator)
        # the frozen encoder beside the denoiser (the accelerator placed it); the cache stays on the CPU
        if isinstance(self.text_encoder, torch.nn.Module):
            self.text_encoder.to(accelerator.device)

    def _device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    def precompute_text(self, captions: list[str], batch: int = 256) -> None:
        """Encode and cache `captions` in chunks of `batch` (sorted, so the chunks, and with them the
        float rounding of each caption's states, depend only on the list given). Captions past the text encoder's
        window are told once, counted (the encoder's own warning per prompt would be thousands of lines for a
        dataset's captions)."""
        todo = sorted(set(captions) - set(self.text_cache))
        cut = _CountedWarnings()
        encoder_log = logging.getLogger("imagine.models.text_encoders")
        encoder_log.addFilter(cut)
        try:
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                enc = self.text_encoder.encode(chunk)
                for j, c in enumerate(chunk):
                    # (kept in fp32 on the CPU: a caption first met under autocast is not stored in bf16 beside fp32
                    # ones)
                    self.text_cache[c] = (enc.states[j].float().cpu().clone(),
                                          None if enc.mask is None else enc.mask[j].cpu().clone())
        finally:
            encoder_log.removeFilter(cut)
        if cut.count:
            logging.getLogger(__name__).warning(
                "%d of %d captions are longer than the text encoder's window and were cut (the first: %s)",
                cut.count, len(todo), cut.first)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.d["cache_text"]:
            # A caption not cached up front is encoded on its own: its states must not depend on
            # which captions shared its batch (they do, by float rounding), or a resumed run would
            # differ from an uninterrupted one.
            for c in sorted(set(captions) - set(self.text_cache)):
                self.precompute_text([c])
            states = torch.stack([self.text_cache[c][0] for c in captions])
            masks = [self.text_cache[c][1] for c in captions]
            cond = {"context": states}
            if masks[0] is not None:
                cond["context_mask"] = torch.stack(masks)
            return cond
        return self.text_encoder.encode(captions).as_cond()


class _CountedWarnings:
    # (a logging filter that holds back the warnings of a logger and counts them, keeping the first's text)
    def __init__(self):
        self.count, self.first = 0, None

    def filter(self, record) -> bool:
        if record.levelno == logging.WARNING:
            self.count += 1
            self.first = self.first or record.getMessage()
            return False
        return True


class DiffusionTask(CaptionStates, Task):
    name = "diffusion"

    def __init__(self, cfg: dict, dataset_len: int | None = None, text_encoder=None):
        """`text_encoder`: an already built encoder (with `.dim` and `.encode`) instead of the one
        the config names, e.g. when every caption's states are put in `text_cache` beforehand."""
        from imagine.models.text_encoders import load_text_encoder
        from imagine.models.unet import UNet2DConditionModel, UNetConfig
        from imagine.schedules import NoiseSchedule

        self.cfg = cfg
        d = self.d = check_diffusion_config(cfg)
        seed = int(cfg.get("seed", 0))
        self.text_encoder = text_encoder if text_encoder is not None else load_text_encoder(d["text_encoder"])
        self.vae = None
        if d["vae"]:
            from imagine.models.vae import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(d["vae"]).eval().requires_grad_(False)
        self.schedule = NoiseSchedule.from_config(**d["schedule"])
        torch.manual_seed(seed)
        ucfg = UNetConfig.from_dict(cfg.get("model", {}))
        if ucfg.cross_attention_dim != self.text_encoder.dim:
            raise ValueError(f"model.cross_attention_dim ({ucfg.cross_attention_dim}) must equal the text encoder's "
                             f"width ({self.text_encoder.dim})")
        self.trainable = UNet2DConditionModel(ucfg)
        self.gen = torch.Generator().manual_seed(seed + 1)     # timesteps and noise
        self.drop_gen = torch.Generator().manual_seed(seed + 2)  # caption dropout
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.latent_cache = None
        self.latent_filled = None
        if self.vae is not None and d["cache_latents"] and dataset_len is not None:
            c = self.vae.config
            f = c.downsampling_factor
            res = int(cfg.get("data", {}).get("resolution", 64))
            # one slot per (record, flip): with data.flip a record is drawn both ways (data.flip_draw)
            ways = 2 if cfg.get("data", {}).get("flip", False) else 1
            self.latent_cache = torch.zeros(dataset_len * ways, 2 * c.latent_channels, res // f, res // f,
                                            dtype=torch.float16)
            self.latent_filled = torch.zeros(dataset_len * ways, dtype=torch.bool)
            self.latent_ways = ways

    def bind(self, model, accelerator) -> None:
        super().bind(model, accelerator)  # (the text encoder: CaptionStates.bind)
        if self.vae is not None:
            self.vae.to(accelerator.device)

    def new_parameter(self, key: str) -> bool:
        from imagine.models.unet import new_parameter

        return new_parameter(key)

    def generators(self):
        return {"noise": self.gen, "dropout": self.drop_gen}

    def resolved_config(self):
        return {**self.d, "model": self.trainable.config.to_dict()}

    # -- data to x_0 -----------------------------------------------------------------------------
    @torch.no_grad()
    def to_x0(self, batch) -> torch.Tensor:
        G, slot = global_slots(batch)
        dev = self._device()
        x = batch["image"].to(dev)
        if self.vae is None:
            return x
        if self.latent_cache is None:
            moments = torch.cat([(q := self.vae.encode(x)).mean, q.logvar], dim=1)
        else:
            flip = batch.get("flip")
            idx = batch["index"] * self.latent_ways + (flip.long() if flip is not None and self.latent_ways > 1 else 0)
            for k in (~self.latent_filled[idx]).nonzero().flatten().tolist():
                if self.latent_filled[idx[k]]:
                    continue   # (the same record twice in a batch)
                # Each record encoded on its own: the encoder's float rounding depends on the batch's size (its
                # kernels differ by size), so a record encoded beside others would get other moments in a resumed
                # run, which refills the store (it is not in the checkpoint) in batches made otherwise. Stored in
                # fp16 and always read back from the store, so every read of a record sees the same values.
                q = self.vae.encode(x[k:k + 1])
                self.latent_cache[idx[k]] = torch.cat([q.mean, q.logvar], dim=1)[0].to("cpu", torch.float16)
                self.latent_filled[idx[k]] = True
            moments = self.latent_cache[idx].float().to(dev)
        mean, logvar = moments.chunk(2, dim=1)
        # LDM samples z from the posterior (not its mode) when building the training latents.
        eps = torch.randn((G, *mean.shape[1:]), generator=self.gen)[slot].to(dev)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.vae.to_latent(z)

    def loss(self, batch, step):
        from imagine.diffusion import training_loss

        # Every random choice is drawn for the whole global batch and indexed by the sample's slot
        # in it, so sample j sees the same dropout, timestep and noise on any number of processes
        # (and the gradient averaged by DDP is the one-process gradient). The draws are made on the
        # CPU generators (the same on any device) and moved to the model's device.
        G, slot = global_slots(batch)
        d = self.d
        captions = list(batch["caption"])
        drop = (torch.rand(G, generator=self.drop_gen) < float(d["caption_dropout"]))[slot]
        captions = ["" if dr else c for c, dr in zip(captions, drop.tolist())]
        dev = self._device()
        cond = {k: v.to(dev) for k, v in self.encode_text(captions).items()}
        x0 = self.to_x0(batch).float()   # (an encode under autocast gives bf16 latents: x_t and the target in fp32)
        t = torch.randint(0, self.schedule.num_train_timesteps, (G,), generator=self.gen)[slot]
        shape = (G, *x0.shape[1:])
        noise = torch.randn(shape, generator=self.gen, dtype=x0.dtype)[slot]
        if d["noise_offset"]:
            # offset noise (Guttenberg 2023; diffusers' --noise_offset, kohya's noise_offset): a per-channel constant
            # added to the noise, so the model learns to change an image's mean (very dark or bright images); the
            # target is this noise
            noise = noise + d["noise_offset"] * torch.randn((G, shape[1], *([1] * (len(shape) - 2))),
                                                            generator=self.gen, dtype=x0.dtype)[slot]
        input_noise = None
        if d["input_perturbation"]:
            # input perturbation (Ning et al. 2023; diffusers' --input_perturbation): x_t is made with a perturbed
            # noise, the target stays the unperturbed one
            input_noise = (noise + d["input_perturbation"]
                           * torch.randn(shape, generator=self.gen, dtype=x0.dtype)[slot]).to(dev)
        loss = training_loss(self.trainable if self.model is None else self.model, x0, cond, self.schedule,
                             d["prediction_type"], t=t.to(dev), noise=noise.to(dev), min_snr_gamma=d["min_snr_gamma"],
                             input_noise=input_noise, vlb_weight=d["vlb_weight"])
        return loss, {"loss": float(loss.detach())}

    # -- sampling and export -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompts: list[str], steps: int, guidance_scale: float, sampler: str, seed: int,
                 sigma_schedule: str | None = None, final_step: str = "euler"):
        from imagine.sampling import sample

        model.eval()
        dev = next(model.parameters()).device
        cond = {k: v.to(dev) for k, v in self.encode_text(prompts).items()}
        uncond = {k: v.to(dev) for k, v in self.encode_text([""] * len(prompts)).items()}
        c = model.config
        res = int(self.cfg.get("data", {}).get("resolution", 64))
        f = self.vae.config.downsampling_factor if self.vae is not None else 1
        # (the sample's channels: half the output's where the U-Net also outputs its learned variance)
        shape = (c.out_channels // (2 if self.schedule.variance_type == "learned_range" else 1), res // f, res // f)
        x = sample(model, (len(prompts), *shape), schedule=self.schedule, prediction_type=self.d["prediction_type"],
                   sampler=sampler, steps=steps, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                   seeds=[seed + i for i in range(len(prompts))], progress=False, sigma_schedule=sigma_schedule,
                   final_step=final_step)
        if self.vae is not None:
            x = self.vae.decode_latent(x.to(self._device()))
        return x.clamp(-1, 1).cpu()

    def sample_grid(self, model, path: Path, step: int):
        from imagine.images import save_grid, to_pil

        s = self.d["sample"]
        prompts = list(s.get("prompts") or [])
        if not prompts:
            return
        was = model.training
        x = self.generate(model, prompts, int(s["steps"]), float(s["guidance_scale"]), s["sampler"], int(s["seed"]),
                          s.get("sigma_schedule"), s.get("final_step") or "euler")
        model.train(was)
        save_grid([to_pil(t) for t in x], path, cols=min(8, len(prompts)))

    def export(self, model, folder: Path):
        """A model folder that `imagine generate --model` and TextToImagePipeline load."""
        folder = Path(folder)
        model.save_pretrained(folder / "unet")
        sched = {"_class_name": "NoiseSchedule", **self.schedule.to_config(),
                 "prediction_type": self.d["prediction_type"]}
        atomic_write_json(folder / "scheduler" / "scheduler_config.json", sched)
        comps = {"unet": "unet", "scheduler": "scheduler"}
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
            comps["vae"] = "vae"
        s = self.d["sample"]
        te = {k: v for k, v in self.d["text_encoder"].items()}
        atomic_write_json(folder / "model_index.json", {
            "_class_name": "TextToImagePipeline", "_imagine_version": __import__("imagine").__version__,
            **comps, "text_encoder": te,
            "defaults": {"steps": int(s["steps"]), "guidance_scale": float(s["guidance_scale"]), "sampler": s["sampler"],
                         "height": int(self.cfg.get("data", {}).get("resolution", 64)),
                         "width": int(self.cfg.get("data", {}).get("resolution", 64)),
                         # the sampler's noise levels and last step (docs/samplers.md), when the run names them
                         **({"sigma_schedule": s["sigma_schedule"]} if s.get("sigma_schedule") else {}),
                         **({"final_step": s["final_step"]} if s.get("final_step", "euler") != "euler" else {}),
                         # the latent's range [-R, R] that thresholding holds x_0 to (guidance.latent_threshold_range)
                         **({"threshold_range": float(s["threshold_range"])} if s.get("threshold_range") else {})},
            "training_config": self.cfg,
        })
