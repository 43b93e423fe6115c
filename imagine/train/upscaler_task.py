"""Training an upscaler model: Real-ESRGAN's compact net (or ESRGAN's RRDBNet) on pairs made from high-resolution
pictures.

Each picture x (data at the high resolution: the shapes task's scenes k times finer, `data.resolution: 256`, or a
folder of photos) is area-averaged down by the model's scale s to y (for the shapes' renderings their 64-pixel picture but for a few
levels at the edges: both are sub-pixel coverage), degraded as the pictures it will meet are (Gaussian noise of a
standard deviation drawn per picture from [0, `degrade.noise`], and, with probability `degrade.blur_prob`, a
3x3 binomial blur: a VAE's decode softens edges and adds grain), and the net learns f(y) ~ x with a pixel loss
(`loss.pixel`: L1, the loss of Real-ESRGAN's PSNR-oriented stage, Wang et al. 2021 sec. 4.1, without its GAN stage; or
L2, which weighs the few wrong edge pixels of mostly flat pictures more). Pictures are
in [0, 1] for the net, as upscalers take them. The export is a folder of `config.json` plus `model.safetensors` in
Real-ESRGAN's parameter names (io.save_component), which `imagine.upscalers.load_upscale_model` reads (and spandrel,
given the weights file).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from imagine.train.config import check_keys
from imagine.train.loop import Task, global_slots

MODEL_DEFAULTS = {"architecture": "compact", "scale": 4, "features": 32, "convs": 8, "blocks": 4}
DEGRADE_DEFAULTS = {"noise": 0.02, "blur_prob": 0.3}
LOSS_DEFAULTS = {"pixel": "l1"}


def check_upscaler_config(cfg: dict) -> tuple[dict, dict]:
    """The model and degrade sections with their defaults (a ValueError naming the key otherwise)."""
    from imagine.train.config import as_choice, as_int, as_mapping, as_number

    check_keys(cfg, {"seed", "output", "data", "model", "degrade", "loss", "train"}, "the upscaler's config")
    check_keys(as_mapping(cfg.get("loss", {}), "loss"), set(LOSS_DEFAULTS), "loss")
    as_choice({**LOSS_DEFAULTS, **cfg.get("loss", {})}["pixel"], "loss.pixel", ("l1", "l2"))
    as_int(cfg.get("seed", 0), "seed")
    model = as_mapping(cfg.get("model", {}), "model")
    check_keys(model, set(MODEL_DEFAULTS), "model")
    m = {**MODEL_DEFAULTS, **model}
    as_choice(m["architecture"], "model.architecture", ("compact", "rrdb"))
    for key in ("scale", "features", "convs", "blocks"):
        m[key] = as_int(m[key], f"model.{key}", 1)
    if m["architecture"] == "rrdb" and m["scale"] & (m["scale"] - 1):
        raise ValueError(f"model.scale must be a power of 2 for an RRDBNet; got {m['scale']}")
    degrade = as_mapping(cfg.get("degrade", {}), "degrade")
    check_keys(degrade, set(DEGRADE_DEFAULTS), "degrade")
    d = {**DEGRADE_DEFAULTS, **degrade}
    d["noise"] = as_number(d["noise"], "degrade.noise", 0.0)
    d["blur_prob"] = as_number(d["blur_prob"], "degrade.blur_prob", 0.0)
    if d["blur_prob"] > 1:
        raise ValueError(f"degrade.blur_prob must be in [0, 1]; got {d['blur_prob']}")
    data = cfg.get("data", {})
    resolution = int(data.get("resolution", 64))
    if resolution % m["scale"]:
        raise ValueError(f"data.resolution {resolution} is not a multiple of model.scale {m['scale']}: the pictures "
                         "are made smaller by it")
    if data.get("type", "shapes") == "shapes" and resolution != 64 * m["scale"]:
        raise ValueError(f"the shapes data gives the 64-pixel picture of each scene as the input: data.resolution must "
                         f"be 64 x model.scale = {64 * m['scale']}; got {resolution}")
    return m, d


def build_net(m: dict) -> torch.nn.Module:
    from imagine.models.esrgan import CompactSRNet, RRDBNet

    if m["architecture"] == "compact":
        return CompactSRNet(features=m["features"], convs=m["convs"], scale=m["scale"])
    return RRDBNet(features=m["features"], blocks=m["blocks"], scale=m["scale"])


def degrade(x: torch.Tensor, scale: int, noise: float, blur_prob: float, generator: torch.Generator,
            slot: torch.Tensor, global_batch: int, low: torch.Tensor | None = None) -> torch.Tensor:
    """x ([-1, 1], high resolution) -> its low-resolution input in [0, 1]: area average by `scale` (or `low`, the
    data's own small picture: the shapes' 64-pixel rendering of a scene drawn finer), the blur and the noise drawn
    for the whole global batch and indexed by slot (a picture's draws do not depend on the processes)."""
    y = F.avg_pool2d((x.float() + 1) / 2, scale) if low is None else (low.float() + 1) / 2
    u = torch.rand(global_batch, 2, generator=generator)[slot]
    eps = torch.randn((global_batch, *y.shape[1:]), generator=generator)[slot]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(y.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernel, groups=y.shape[1])
    y = torch.where((u[:, 0] < blur_prob)[:, None, None, None], blurred, y)
    return (y + eps * (u[:, 1] * noise)[:, None, None, None]).clamp(0, 1)


def psnr01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per picture, pictures in [0, 1]."""
    mse = ((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


class UpscalerTask(Task):
    name = "upscaler"

    def __init__(self, cfg: dict, eval_images: torch.Tensor | None = None, eval_low: torch.Tensor | None = None):
        """`eval_images`: held-out pictures at the high resolution ([-1, 1]); `eval_low`: their small pictures where
        the data has its own (the shapes' 64-pixel renderings; else area averages)."""
        self.cfg = cfg
        self.m, self.d = check_upscaler_config(cfg)
        torch.manual_seed(int(cfg.get("seed", 0)))
        self.trainable = build_net(self.m)
        self.gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)) + 1)
        self.eval_images, self.eval_low = eval_images, eval_low
        self.pixel = {**LOSS_DEFAULTS, **cfg.get("loss", {})}["pixel"]

    def generators(self):
        return {"degrade": self.gen}

    def resolved_config(self):
        return {"model": self.m, "degrade": self.d, "loss": {"pixel": self.pixel}}

    def loss(self, batch, step):
        dev = self.accelerator.device if self.accelerator is not None else "cpu"
        x = batch["image"]
        G, slot = global_slots(batch)
        y = degrade(x, self.m["scale"], self.d["noise"], self.d["blur_prob"], self.gen, slot, G,
                    low=batch.get("low")).to(dev)
        target = ((x.float() + 1) / 2).to(dev)
        out = (self.trainable if self.model is None else self.model)(y)
        diff = out.float() - target
        loss = diff.abs().mean() if self.pixel == "l1" else (diff ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def _eval_pairs(self):
        """The held-out pictures (in [0, 1]) and their inputs, undegraded (a fixed test): the data's own small
        pictures, else area averages."""
        x = (self.eval_images.float() + 1) / 2
        if self.eval_low is not None:
            return x, (self.eval_low.float() + 1) / 2
        return x, F.avg_pool2d(x, self.m["scale"])

    @torch.no_grad()
    def evaluate(self, model, step):
        if self.eval_images is None:
            return {}
        model.eval()
        x, y = self._eval_pairs()
        dev = next(model.parameters()).device
        out = torch.cat([model(c.to(dev)).float().cpu() for c in y.split(16)])
        bicubic = F.interpolate(y, scale_factor=self.m["scale"], mode="bicubic", align_corners=False)
        return {"psnr": float(psnr01(out, x).mean()), "psnr_bicubic": float(psnr01(bicubic, x).mean())}

    @torch.no_grad()
    def sample_grid(self, model, path: Path, step: int):
        if self.eval_images is None:
            return
        from imagine.images import save_grid, to_pil

        x, y = self._eval_pairs()
        x, y = x[:4], y[:4]
        out = model(y.to(next(model.parameters()).device)).float().cpu()
        near = F.interpolate(y, scale_factor=self.m["scale"], mode="nearest")
        save_grid([to_pil(t * 2 - 1) for t in torch.cat([near, out.clamp(0, 1), x])], path, cols=4)

    def export(self, model, folder: Path):
        from imagine.models.io import save_component

        save_component(model.float(), {**self.m, "degrade": self.d}, folder, "UpscaleModel",
                       weights_name="model.safetensors")

