"""Training the KL autoencoder (Kingma & Welling 2013; the LDM first stage, Rombach et al. 2022 app. G).

Loss = reconstruction (L1 or L2, summed per image as LDM does) + kl_weight * KL(q(z|x) || N(0, I))
(LDM uses about 1e-6), plus, when enabled, a PatchGAN discriminator with the hinge loss (Isola et
al. 2017; Lim & Ye 2017) switched on after a warm-up, its generator term weighted adaptively by
the ratio of the gradient norms at the decoder's last layer (Esser et al. 2021, eq. 7).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models.vae import AutoencoderKL, VAEConfig
from imagine.train.config import check_keys
from imagine.train.loop import Task, global_slots

VAE_LOSS_DEFAULTS = {"reconstruction": "l1", "kl_weight": 1e-6, "discriminator": False, "disc_start": 5000,
                     "disc_weight": 0.5, "disc_lr": None, "disc_layers": 3}


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided convs to a map of real/fake logits."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_next = width * min(2 ** i, 8)
            seq += [nn.Conv2d(c, c_next, 4, 2 if i < layers else 1, 1, bias=False),
                    nn.GroupNorm(min(32, c_next // 4), c_next), nn.LeakyReLU(0.2)]
            c = c_next
        seq += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x):
        return self.net(x)


class ReconstructionStep(nn.Module):
    """x -> (reconstruction, q(z|x)) with z = mean + std * eps, eps drawn for the whole global
    batch and indexed by slot (so a sample's eps does not depend on the number of processes).
    A forward of its own so that DDP, which hooks `forward`, averages the VAE's gradients."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x, slot, global_batch: int, generator: torch.Generator):
        posterior = self.vae.encode(x)
        m = posterior.mean
        # (drawn on the generator's device, the CPU, and moved: the same draws whatever device trains)
        eps = torch.randn((global_batch, *m.shape[1:]), generator=generator, device=generator.device,
                          dtype=m.dtype)[slot].to(m.device)
        return self.vae.decode(m + posterior.std * eps), posterior


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image for tensors in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def check_vae_config(cfg: dict) -> dict:
    """Every section of a VAE run's config but `train` (loop.check_run) and `data` (data.check_data_config), checked
    before anything is built. Returns the loss settings with their defaults filled in."""
    from imagine.train.config import as_bool, as_int, as_mapping, as_number, check_fields

    check_keys(cfg, {"seed", "output", "data", "model", "loss", "train"}, "the VAE's config")
    as_int(cfg.get("seed", 0), "seed")
    check_keys(cfg.get("loss", {}), set(VAE_LOSS_DEFAULTS), "loss")
    lc = {**VAE_LOSS_DEFAULTS, **cfg.get("loss", {})}
    if lc["reconstruction"] not in ("l1", "l2"):
        raise ValueError(f"loss.reconstruction must be 'l1' or 'l2'; got {lc['reconstruction']!r}")
    lc["kl_weight"] = as_number(lc["kl_weight"], "loss.kl_weight", 0.0)
    lc["disc_weight"] = as_number(lc["disc_weight"], "loss.disc_weight", 0.0)
    lc["disc_lr"] = as_number(lc["disc_lr"], "loss.disc_lr", 0.0, inclusive=False, none=True)
    lc["disc_start"] = as_int(lc["disc_start"], "loss.disc_start", 0)
    lc["disc_layers"] = as_int(lc["disc_layers"], "loss.disc_layers", 1)
    as_bool(lc["discriminator"], "loss.discriminator")
    model = as_mapping(cfg.get("model", {}), "model")
    # the keys must be VAEConfig's fields (its from_dict reads diffusers' folders, so it drops other keys)
    check_fields(model, VAEConfig, "model (the VAE's VAEConfig fields)")
    sf = model.get("scaling_factor", VAEConfig.scaling_factor)
    if sf != "auto":
        try:
            as_number(sf, "model.scaling_factor", 0.0, inclusive=False)
        except ValueError:
            raise ValueError(f"model.scaling_factor must be 'auto' (1 / std of the latents, measured at export) or a "
                             f"finite number > 0; got {sf!r}") from None
    return lc


class VAETask(Task):
    name = "vae"

    def __init__(self, cfg: dict, eval_images: torch.Tensor | None = None, scale_images=None):
        """`scale_images`: when there are no held-out images (`eval_images` None), a callable giving training
        images for `model.scaling_factor: auto` (read at export only)."""
        self.cfg = cfg
        self.lc = check_vae_config(cfg)
        torch.manual_seed(int(cfg.get("seed", 0)))
        mcfg = dict(cfg.get("model", {}))
        # scaling_factor "auto": set at export to 1 / std of the model's own latents (LDM sec. 4.3.2,
        # which is how 0.18215 was found for SD's VAE); not given: SD's 0.18215 (VAEConfig's default).
        self.auto_scale = mcfg.get("scaling_factor") == "auto"
        self.scale_given = "scaling_factor" in mcfg
        if self.auto_scale:
            mcfg["scaling_factor"] = 1.0
        self.trainable = AutoencoderKL(VAEConfig.from_dict(mcfg))
        self.step = ReconstructionStep(self.trainable)
        self.gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)) + 1)
        self.eval_images = eval_images
        self.scale_images = scale_images
        self.disc = None
        self.extra_optimizers = {}
        if self.lc["discriminator"]:
            self.disc = PatchDiscriminator(self.trainable.config.in_channels, layers=self.lc["disc_layers"])
            lr = self.lc["disc_lr"] or cfg.get("train", {}).get("lr", 1e-4)
            self.extra_optimizers = {"disc": torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))}

    def generators(self):
        return {"noise": self.gen}

    def resolved_config(self):
        return {"loss": self.lc, "model": self.trainable.config.to_dict()}

    def step_module(self):
        return self.step

    def checkpoint_modules(self):
        return {"disc": self.disc} if self.disc is not None else {}

    def bind(self, model, accelerator) -> None:
        super().bind(model, accelerator)
        if self.disc is not None:   # (outside the prepared module: placed beside it by hand)
            self.disc.to(accelerator.device)

    def _gan_on(self, step):
        return self.disc is not None and step >= self.lc["disc_start"]

    def loss(self, batch, step):
        model = self.trainable
        x = batch["image"].to(self.accelerator.device if self.accelerator is not None else "cpu")
        G, slot = global_slots(batch)
        rec, posterior = (self.step if self.model is None else self.model)(x, slot, G, self.gen)
        diff = (rec.float() - x).abs() if self.lc["reconstruction"] == "l1" else (rec.float() - x) ** 2
        nll = diff.flatten(1).sum(1).mean()
        kl = posterior.kl().float().mean()
        loss = nll + self.lc["kl_weight"] * kl
        parts = {"rec": float(diff.detach().mean()), "kl": float(kl.detach())}
        # the discriminator's inputs, one entry per micro-batch of this step (train.grad_accum): it steps once a step
        # on all of them, as the autoencoder does
        if self.disc is not None:
            if getattr(self, "_pending_step", None) != step:
                self._pending, self._pending_step = [], step
            self._pending.append((x, rec.detach(), float(batch.get("loss_scale", 1.0))))
        if self._gan_on(step):
            g_loss = -self.disc(rec).mean()
            last = model.decoder.conv_out.weight
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach() * self.lc["disc_weight"]
            loss = loss + d_weight * g_loss
            parts["g_loss"], parts["d_weight"] = float(g_loss.detach()), float(d_weight)
        parts["loss"] = float(loss.detach())
        return loss, parts

    def after_backward(self, batch, step):
        pending, self._pending, self._pending_step = getattr(self, "_pending", []), [], None
        if not self._gan_on(step):
            return {}
        opt = self.extra_optimizers["disc"]
        opt.zero_grad(set_to_none=True)
        logged = 0.0
        for x, rec, scale in pending:
            # Hinge loss (Lim & Ye 2017): push real logits above 1 and fake logits below -1; each micro-batch
            # weighted by its slice weight, as the loop's (1.0 on one process), over the micro-batches
            d_loss = 0.5 * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec)).mean())
            (d_loss * (scale / len(pending))).backward()
            logged += float(d_loss.detach()) * (scale / len(pending))
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            # The discriminator is outside DDP (it runs twice a step): average its gradients by
            # hand so that every process keeps the same discriminator.
            import torch.distributed as dist

            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= acc.num_processes
        opt.step()
        return {"d_loss": logged}

    @torch.no_grad()
    def evaluate(self, model, step):
        if self.eval_images is None:
            return {}
        model.eval()
        scores = []
        dev = next(model.parameters()).device
        for chunk in self.eval_images.split(64):
            chunk = chunk.to(dev)
            scores.append(psnr(model.decode(model.encode(chunk).mode()), chunk).cpu())
        return {"psnr": float(torch.cat(scores).mean())}

    @torch.no_grad()
    def sample_grid(self, model, path: Path, step: int):
        if self.eval_images is None:
            return
        from imagine.images import save_grid, to_pil

        x = self.eval_images[:8]
        rec = model.decode(model.encode(x.to(next(model.parameters()).device)).mode()).cpu()
        save_grid([to_pil(t) for t in torch.cat([x, rec])], path, cols=8)

    def latent_scale(self, model) -> tuple[float, str] | None:
        """1 / std of the model's latents z ~ q(z|x) (LDM sec. 4.3.2), and which images they are of: the held-out
        ones, else training images (`scale_images`); None if there are neither. The posterior samples are drawn
        from a generator seeded with the config's seed, so the figure does not depend on how training went."""
        images, which = self.eval_images, "held-out"
        if images is None and self.scale_images is not None:
            images, which = self.scale_images(), "training"
        if images is None or len(images) == 0:
            return None
        g = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        was = model.training
        model.eval()
        with torch.no_grad():
            dev = next(model.parameters()).device
            zs = []
            for c in images.split(64):
                q = model.encode(c.to(dev))   # (eps from the CPU generator, whatever the device)
                zs.append(q.sample(noise=torch.randn(q.mean.shape, generator=g, dtype=q.mean.dtype)).cpu())
            z = torch.cat(zs)
        model.train(was)
        return float(1.0 / z.float().flatten().std()), f"{len(images)} {which} images"

    def export(self, model, folder: Path):
        if self.auto_scale:
            found = self.latent_scale(model)
            if found is None:
                raise ValueError("model.scaling_factor auto: no images to measure the latents' std on")
            model.config.scaling_factor = found[0]
            print(f"model.scaling_factor auto: {found[0]:.6g} (1 / std of the latents of {found[1]})")
        elif not self.scale_given:
            found = self.latent_scale(model)
            print(f"model.scaling_factor not set: exported Stable Diffusion's {model.config.scaling_factor:g} "
                  + (f"(this VAE's latents have 1 / std {found[0]:.4g} on {found[1]}: set model.scaling_factor: "
                     f"auto to use that)" if found else "(set model.scaling_factor: auto to measure this VAE's)"))
        model.save_pretrained(folder)
