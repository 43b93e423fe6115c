"""Training a text-conditioned diffusion model, in pixel space or on a frozen VAE's latents.

DDPM's simplified objective (Ho et al. 2020, eq. 14) with epsilon or v prediction (Salimans & Ho
2022), optional min-SNR weighting (Hang et al. 2023); latent diffusion when a VAE is given
(Rombach et al. 2022: the U-Net learns on scaling_factor * z); a frozen text encoder whose states
the U-Net cross-attends to; captions dropped to the empty prompt with probability
`caption_dropout` so the same network learns the unconditional model for classifier-free
guidance (Ho & Salimans 2022, Alg. 1). Text states and VAE latent moments can be cached, since
both encoders are frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagine.models.io import atomic_write_json
from imagine.train.config import check_keys
from imagine.train.loop import Task, global_slots

DIFFUSION_DEFAULTS = {
    "prediction_type": "epsilon", "caption_dropout": 0.1, "min_snr_gamma": None,
    "schedule": {"kind": "scaled_linear", "num_train_timesteps": 1000},
    "text_encoder": {"type": "minilm", "max_length": 32},
    "vae": None, "cache_text": True, "cache_latents": True,
    "sample": {"prompts": [], "steps": 20, "guidance_scale": 5.0, "sampler": "dpmpp_2m", "seed": 0,
               "sigma_schedule": None, "final_step": "euler", "threshold_range": None},
}


class DiffusionTask(Task):
    name = "diffusion"

    def __init__(self, cfg: dict, dataset_len: int | None = None, text_encoder=None):
        """`text_encoder`: an already built encoder (with `.dim` and `.encode`) instead of the one
        the config names, e.g. when every caption's states are put in `text_cache` beforehand."""
        from imagine.models.text_encoders import load_text_encoder
        from imagine.models.unet import UNet2DConditionModel, UNetConfig
        from imagine.schedules import NoiseSchedule

        self.cfg = cfg
        check_keys(cfg, {"seed", "output", "data", "model", "train", *DIFFUSION_DEFAULTS}, "the diffusion config")
        check_keys(cfg.get("sample") or {}, set(DIFFUSION_DEFAULTS["sample"]), "sample")
        d = {**DIFFUSION_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIFFUSION_DEFAULTS}}
        d["sample"] = {**DIFFUSION_DEFAULTS["sample"], **(cfg.get("sample") or {})}
        self.d = d
        if d["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample'; got {d['prediction_type']!r}")
        if not 0.0 <= float(d["caption_dropout"]) < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1); got {d['caption_dropout']}")
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
            self.latent_cache = torch.zeros(dataset_len, 2 * c.latent_channels, res // f, res // f, dtype=torch.float16)
            self.latent_filled = torch.zeros(dataset_len, dtype=torch.bool)

    def new_parameter(self, key: str) -> bool:
        from imagine.models.unet import new_parameter

        return new_parameter(key)

    def generators(self):
        return {"noise": self.gen, "dropout": self.drop_gen}

    def resolved_config(self):
        return {**self.d, "model": self.trainable.config.to_dict()}

    # -- conditioning --------------------------------------------------------------------------
    def precompute_text(self, captions: list[str], batch: int = 256) -> None:
        """Encode and cache `captions` in chunks of `batch` (sorted, so the chunks, and with them the
        float rounding of each caption's states, depend only on the list given)."""
        todo = sorted(set(captions) - set(self.text_cache))
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            enc = self.text_encoder.encode(chunk)
            for j, c in enumerate(chunk):
                self.text_cache[c] = (enc.states[j].clone(), None if enc.mask is None else enc.mask[j].clone())

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

    # -- data to x_0 -----------------------------------------------------------------------------
    @torch.no_grad()
    def to_x0(self, batch) -> torch.Tensor:
        G, slot = global_slots(batch)
        x = batch["image"]
        if self.vae is None:
            return x
        if self.latent_cache is None:
            moments = torch.cat([(q := self.vae.encode(x)).mean, q.logvar], dim=1)
        else:
            idx = batch["index"]
            missing = ~self.latent_filled[idx]
            if missing.any():
                q = self.vae.encode(x[missing])
                # Stored in fp16 and always read back from the store, so a resumed run sees the
                # same values as an uninterrupted one.
                self.latent_cache[idx[missing]] = torch.cat([q.mean, q.logvar], dim=1).to(torch.float16)
                self.latent_filled[idx[missing]] = True
            moments = self.latent_cache[idx].float()
        mean, logvar = moments.chunk(2, dim=1)
        # LDM samples z from the posterior (not its mode) when building the training latents.
        eps = torch.randn((G, *mean.shape[1:]), generator=self.gen)[slot]
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.vae.to_latent(z)

    def loss(self, batch, step):
        from imagine.diffusion import training_loss

        # Every random choice is drawn for the whole global batch and indexed by the sample's slot
        # in it, so sample j sees the same dropout, timestep and noise on any number of processes
        # (and the gradient averaged by DDP is the one-process gradient).
        G, slot = global_slots(batch)
        captions = list(batch["caption"])
        drop = (torch.rand(G, generator=self.drop_gen) < float(self.d["caption_dropout"]))[slot]
        captions = ["" if dr else c for c, dr in zip(captions, drop.tolist())]
        cond = self.encode_text(captions)
        x0 = self.to_x0(batch)
        t = torch.randint(0, self.schedule.num_train_timesteps, (G,), generator=self.gen)[slot]
        noise = torch.randn((G, *x0.shape[1:]), generator=self.gen, dtype=x0.dtype)[slot]
        loss = training_loss(self.trainable if self.model is None else self.model, x0, cond, self.schedule, self.d["prediction_type"],
                             t=t, noise=noise, min_snr_gamma=self.d["min_snr_gamma"])
        return loss, {"loss": float(loss.detach())}

    # -- sampling and export -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompts: list[str], steps: int, guidance_scale: float, sampler: str, seed: int,
                 sigma_schedule: str | None = None, final_step: str = "euler"):
        from imagine.sampling import sample

        model.eval()
        cond = self.encode_text(prompts)
        uncond = self.encode_text([""] * len(prompts))
        c = model.config
        res = int(self.cfg.get("data", {}).get("resolution", 64))
        f = self.vae.config.downsampling_factor if self.vae is not None else 1
        shape = (c.out_channels, res // f, res // f)
        x = sample(model, (len(prompts), *shape), schedule=self.schedule, prediction_type=self.d["prediction_type"],
                   sampler=sampler, steps=steps, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                   seeds=[seed + i for i in range(len(prompts))], progress=False, sigma_schedule=sigma_schedule,
                   final_step=final_step)
        if self.vae is not None:
            x = self.vae.decode_latent(x)
        return x.clamp(-1, 1)

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
