"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's contracting path and bottleneck reads a control picture (edges, depth, a pose)
and adds its features to the frozen U-Net's skips and bottleneck through convolutions that start at zero:

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)          (eq. 2)

The control picture c (in [0, 1], at the image's size) is taken to the latents' size by a small encoder of
3x3 convolutions (sec. 3.3: "a tiny network E of four convolution layers", diffusers'
`controlnet_cond_embedding`), added to the copy's conv_in output; each of the copy's skips and its
bottleneck output then pass through a zero-initialised 1x1 convolution and are added to the U-Net's
(eq. 4; `UNet2DConditionModel.forward`'s `down_block_additional_residuals`). Parameter names and config
keys are diffusers' `ControlNetModel`'s, so a diffusers ControlNet folder loads as it is.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from imagine.models import io
from imagine.models.attention import expand_batch
from imagine.models.unet import EXTENSIONS_OFF, UNet2DConditionModel, UNetConfig

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels default
MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}  # a down block's up block
# diffusers' ControlNetModel's config keys (its __init__'s arguments). It ignores any other key of a config.json (a
# U-Net's center_input_sample, time_embedding_dim, time_cond_proj_dim, conv_in_kernel, ...), and so does
# `ControlNetConfig.from_dict`; imagine's own extensions (`EXTENSIONS_OFF`) are kept.
CONTROLNET_KEYS = frozenset({
    "in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions", "addition_embed_type_num_heads"})
# the U-Net fields a ControlNet has no use for (no expanding path, no output): any value is harmless
NO_EXPANDING_PATH = frozenset({"up_block_types", "out_channels", "sample_size"})
# the class embeddings diffusers' ControlNetModel builds (any other class_embed_type: none, the labels unread)
CONTROLNET_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")


class ControlNetConditioningEmbedding(nn.Module):
    """The control picture -> a map of the U-Net's first width at the latents' size: 3x3 convolutions with SiLU,
    each width taken twice (once at stride 2), the last one starting at zero."""

    def __init__(self, out_channels: int, in_channels: int = 3, channels: tuple[int, ...] = DEFAULT_EMBEDDING_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(c))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


@dataclass
class ControlNetConfig(UNetConfig):
    """A ControlNet's config: the U-Net's (diffusers' ControlNetModel keys; it has no expanding path, so the
    mirror of the contracting path stands in for `up_block_types`, unused) and the control picture's."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = DEFAULT_EMBEDDING_CHANNELS
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the picture's channels are flipped first
    global_pool_conditions: bool = False  # residuals averaged over the map (the shuffle ControlNet's)

    def __post_init__(self):
        # no expanding path: its block types are the contracting path's mirror, whatever was given (a 2-level
        # ControlNet built directly would otherwise inherit the U-Net's four defaults)
        self.up_block_types = tuple(MIRROR.get(t, t) for t in reversed(tuple(self.down_block_types)))
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":  # (before the U-Net's check, which allows None)
            raise ValueError(f"ControlNet config: unsupported mid_block_type {self.mid_block_type!r}; valid: "
                             "'UNetMidBlock2DCrossAttn' (a ControlNet adds its bottleneck's output to the U-Net's)")
        for f in fields(self):
            if (f.name not in CONTROLNET_KEYS | NO_EXPANDING_PATH and f.name not in EXTENSIONS_OFF
                    and f.default is not MISSING and getattr(self, f.name) != f.default):
                raise ValueError(f"ControlNet config: {f.name}={getattr(self, f.name)!r} is a U-Net setting diffusers' "
                                 f"ControlNetModel does not have (it ignores the key); leave it at {f.default!r}")
        if self.class_embed_type not in CONTROLNET_CLASS_EMBED_TYPES:
            raise ValueError(f"ControlNet config: class_embed_type {self.class_embed_type!r} is not one diffusers' "
                             "ControlNetModel builds (it would run without a class embedding); valid: None, "
                             "'timestep', 'identity', 'projection'")
        super().__post_init__()
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("controlnet_conditioning_channel_order must be 'rgb' or 'bgr'; got "
                             f"{self.controlnet_conditioning_channel_order!r}")
        if not self.conditioning_embedding_out_channels:
            self.conditioning_embedding_out_channels = DEFAULT_EMBEDDING_CHANNELS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlNetConfig":
        """From a diffusers ControlNet config.json dict, or a U-Net's (a new ControlNet's): read as diffusers'
        ControlNetModel reads it, the keys it does not take ignored (`CONTROLNET_KEYS`)."""
        ignored = sorted(k for k in d if not str(k).startswith("_") and k not in CONTROLNET_KEYS
                         and k not in EXTENSIONS_OFF and k not in NO_EXPANDING_PATH)
        if ignored:
            log.info("ControlNet config: ignoring keys diffusers' ControlNetModel does not take: %s",
                     ", ".join(ignored))
        return super().from_dict({k: v for k, v in d.items() if k in CONTROLNET_KEYS or k in EXTENSIONS_OFF})

    def to_dict(self) -> dict[str, Any]:
        """diffusers' ControlNetModel's keys (and imagine's extensions where on)."""
        return {k: v for k, v in super().to_dict().items() if k in CONTROLNET_KEYS or k in EXTENSIONS_OFF}


class ControlNetModel(UNet2DConditionModel):
    """The copy of the U-Net's contracting path and bottleneck (the parent's modules, `encoder_only`), the
    control picture's encoder, and the zero convolutions. `forward(x, t, context, control, scale)` returns
    (the residuals for the U-Net's skips, the residual for its bottleneck). A new one starts with the zero
    convolutions (and the control encoder's last convolution) at zero, as diffusers builds it, so it adds nothing
    until trained."""

    class_embedding_act_fn = "silu"  # diffusers' ControlNetModel: a "timestep" class embedding's MLP uses SiLU

    def __init__(self, config: ControlNetConfig | UNetConfig | dict | None = None):
        if isinstance(config, UNetConfig) and not isinstance(config, ControlNetConfig):
            config = config.to_dict()  # a U-Net's: its copy (diffusers' ControlNetModel.from_unet)
        if config is not None and not isinstance(config, (ControlNetConfig, dict)):
            raise TypeError("ControlNetModel takes a ControlNetConfig, a UNetConfig or a config dict; got "
                            f"{type(config).__name__}")
        if not isinstance(config, ControlNetConfig):
            config = ControlNetConfig.from_dict(config or {})
        super().__init__(config, encoder_only=True)
        c = self.config
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c.block_out_channels[0], c.conditioning_channels, tuple(c.conditioning_embedding_out_channels))
        widths = [c.block_out_channels[0]]
        for level, block in enumerate(self.down_blocks):
            widths += [c.block_out_channels[level]] * len(block.resnets)
            if block.downsamplers is not None:
                widths.append(c.block_out_channels[level])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(w, w, 1) for w in widths])
        self.controlnet_mid_block = nn.Conv2d(c.block_out_channels[-1], c.block_out_channels[-1], 1)
        # the zero convolutions (eq. 2's Z; sec. 3.1) and the control encoder's last layer start at zero
        for conv in (self.controlnet_cond_embedding.conv_out, *self.controlnet_down_blocks, self.controlnet_mid_block):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def embed_control(self, control: torch.Tensor) -> torch.Tensor:
        """The control picture [B, 3, H, W] in [0, 1] -> its features at the latents' size (the same at every step:
        a sampler's loop computes them once, `Controlled`)."""
        c = self.config
        if not torch.is_tensor(control) or control.ndim != 4 or control.shape[1] != c.conditioning_channels:
            got = tuple(control.shape) if torch.is_tensor(control) else type(control).__name__
            raise ValueError(f"control must be a picture tensor [B, {c.conditioning_channels}, H, W] in [0, 1]; "
                             f"got {got}")
        if c.controlnet_conditioning_channel_order == "bgr":
            control = control.flip(1)
        return self.controlnet_cond_embedding(control.to(self.dtype))

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None, control: torch.Tensor | None = None,
                scale: float = 1.0, context_mask=None, class_labels=None, text_embeds=None, time_ids=None,
                control_features: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """x [B, C, h, w] and t as the U-Net takes them (a guidance batch too); control [B, 3, 8h, 8w] in [0, 1], or
        control_features, its `embed_control` computed already; scale: the residuals' weight (diffusers'
        controlnet_conditioning_scale, A1111's control weight)."""
        cond = self.embed_control(control) if control_features is None else control_features
        x, emb_act, context, mask, rows = self.embed(x, t, context, context_mask, class_labels, text_embeds, time_ids)
        if cond.shape[-2:] != x.shape[-2:]:
            factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)  # (one stride-2 conv a width)
            raise ValueError(f"the control picture maps to {tuple(cond.shape[-2:])} features, the latents are "
                             f"{tuple(x.shape[-2:])}: give it at the image's size (the latents' times {factor})")
        h = self.conv_in(x)
        h = _add(h, cond)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb_act, context, mask)
            skips.extend(s)
        h = self.mid_block(h, emb_act, context, mask)
        down = [zero_conv(s) * scale for s, zero_conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h) * scale
        if self.config.global_pool_conditions:
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid

    # -- folders (diffusers' layout) -------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        io.save_component(self, self.config.to_dict(), folder, "ControlNetModel")

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> "ControlNetModel":
        return cls(ControlNetConfig.from_dict(cfg))

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "ControlNetModel":
        """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)."""
        cfg = io.read_config(folder, "ControlNetModel")
        try:
            with torch.device("meta"), io.without_random_init():
                model = cls.from_config_dict(cfg)
        except ValueError as e:
            raise ValueError(f"{folder}/config.json: {e}") from None
        path = io.find_weights(folder)
        io.load_state_into(model, io.load_tensors(path), str(path), assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"ControlNetModel.from_pretrained: {left[:3]} not set by the weights")
        return model.to(dtype).eval()



CONTROL_MODES = ("balanced", "prompt", "controlnet", "guess")


def mode_scales(mode: str, n: int) -> list[float] | None:
    """The factors on a ControlNet's n residuals (the down ones, then the middle's) for a control mode, or None:
    "guess" (the ControlNet paper's guess mode as diffusers runs it: logspace(-1, 0) over the n), "prompt" and
    "controlnet" (AUTOMATIC1111's extension: 0.825 ** (12 - i) for i = 0..12, the first n of them, so that SDXL's
    10 residuals take 0.825 ** 12 .. 0.825 ** 3)."""
    if mode == "guess":
        return torch.logspace(-1, 0, n).tolist()
    if mode in ("prompt", "controlnet"):
        return [0.825 ** float(12 - i) for i in range(13)][:n]
    return None


def _add(h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    rows = max(h.shape[0], cond.shape[0])
    return torch.cat([h] * (rows // h.shape[0])) + torch.cat([cond] * (rows // cond.shape[0]))


def a1111_acts(i: int, n: int, window: tuple[float, float]) -> bool:
    """Whether a unit acts at the model call of sampler step i of n, by the ControlNet extension's rule (its
    hook.py guidance_schedule_handler: stopped when `sampling_step / total < start or > end`). Its sampling_step
    is A1111's state.sampling_step, which the sampler's callback sets to i after step i: step i's call sees
    max(i - 1, 0) (both calls of a two-call sampler's step the same); total is state.sampling_steps, the steps run."""
    done = max(i - 1, 0) / n
    return not (done < window[0] or done > window[1])


class Controlled(nn.Module):
    """The denoiser a sampler calls with ControlNets: each ControlNet reads (x_t, t, the text) and its control
    picture, and the sum of their residuals (scaled) goes into the U-Net's skips and bottleneck (diffusers'
    MultiControlNet sums them alike). `model` is the U-Net as the sampler would call it (its exact or fast copy),
    `controls` (ControlNet as it is to be run, control [B, 3, H, W] in [0, 1], scale, (start, end)[, mode]) per
    ControlNet; mode (`CONTROL_MODES`): "balanced" (both halves of the guidance batch, the residuals at the scale),
    "guess" (diffusers' guess_mode: the conditional rows only, the residuals scaled up the levels, `mode_scales`),
    AUTOMATIC1111's "prompt" ("My prompt is more important": A1111's level factors, both halves) and "controlnet"
    ("ControlNet is more important": its level factors, the conditional rows only). A pooled ControlNet (shuffle)
    always acts on the conditional rows only, as diffusers runs it, unscaled by level in guess mode.
    A ControlNet acts on the steps i of n with start <= i / n and (i + 1) / n <= end (diffusers'
    control_guidance_start / end), which the sampler's denoiser tells through `at_step`; outside them it is not
    run. window_rule "a1111" (A1111's rules: its ControlNet extension's) reads them by `a1111_acts` over the step
    and steps its denoiser tells through `at_call`; "comfyui" (ComfyUI's ControlNetApplyAdvanced: start and end
    percents) acts where the call's noise level, told through `at_level`, lies between the levels of the end and the
    start percent (`schedules.comfyui_percent_sigma` over `schedule`, the run's NoiseSchedule). A ControlNet at scale
    0 is not run (its residuals would be 0). A guidance batch (x once, k rows of conditioning) passes
    through: the control pictures are the same for every copy. Conditional and unconditional texts of different
    lengths come in two calls, each told its `guidance_half` ("uncond" / "cond")."""

    takes_guidance_half = True

    def __init__(self, model, controls: list[tuple], window_rule: str = "diffusers", schedule=None):
        super().__init__()
        self.model = model
        self.nets = nn.ModuleList([c[0] for c in controls])
        # the pictures in each ControlNet's dtype and the copies' channels-last layout, once for the run
        self.controls = [(c[1].to(next(c[0].parameters()).dtype).contiguous(memory_format=torch.channels_last),
                          float(c[2]), tuple(c[3]) if len(c) > 3 else (0.0, 1.0), c[4] if len(c) > 4 else "balanced")
                         for c in controls]
        for c in self.controls:
            if c[3] not in CONTROL_MODES:
                raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}; got {c[3]!r}")
        self.shares_guidance_batch = bool(getattr(model, "shares_guidance_batch", False))
        self.config = getattr(model, "config", None)
        if window_rule not in ("diffusers", "a1111", "comfyui"):
            raise ValueError(f"window_rule must be 'diffusers', 'a1111' or 'comfyui'; got {window_rule!r}")
        self.window_rule = window_rule
        self.levels: list[tuple[float, float]] = []  # ComfyUI's rule: per ControlNet the (low, high) level it acts in
        if window_rule == "comfyui":
            from imagine.schedules import comfyui_percent_sigma

            if schedule is None:
                raise ValueError("window_rule 'comfyui' reads its percents over the run's noise schedule: give it")
            table = schedule.kdiffusion_log_sigmas()
            self.levels = [(comfyui_percent_sigma(table, c[2][1]), comfyui_percent_sigma(table, c[2][0]))
                           for c in self.controls]
        self.sigma: float | None = None  # the call's noise level (at_level), for ComfyUI's rule
        self.step: tuple[int, int] | None = None  # (i, n), set by the denoiser before each call
        self.a1111_step: tuple[int, int] | None = None  # (step, A1111's sampling_steps), set by the denoiser
        self._features: dict[int, torch.Tensor] = {}  # per unit: its picture's features, made at its first call

    def at_step(self, i: int, n: int) -> None:
        self.step = (i, n)

    def at_level(self, sigma: float) -> None:
        self.sigma = sigma

    def at_call(self, k: int, n: int, i: int, steps: int) -> None:
        """The sampler's denoiser: model call k of n as A1111 counts them, within its step i of `steps` (its
        state.sampling_steps), which the extension's window rule reads."""
        self.a1111_step = (i, steps)

    def _acts(self, window: tuple[float, float], k: int = 0) -> bool:
        if self.window_rule == "comfyui":  # (its get_control: not run where sigma > its start's or < its end's)
            low, high = self.levels[k]
            return self.sigma is None or low <= self.sigma <= high
        if self.step is None:
            return True
        if self.window_rule == "a1111" and self.a1111_step is not None:
            return a1111_acts(*self.a1111_step, window)
        i, n = self.step
        return not (i / n < window[0] or (i + 1) / n > window[1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance_half: str | None = None, **cond) -> torch.Tensor:
        down, mid = None, None
        keys = ("context", "context_mask", "class_labels", "text_embeds", "time_ids")
        for k, (net, (picture, scale, window, mode)) in enumerate(zip(self.nets, self.controls)):
            if scale == 0 or not self._acts(window, k):
                continue
            dtype = next(net.parameters()).dtype
            xin = x.to(dtype).contiguous(memory_format=torch.channels_last)  # the layout the fast and exact copies run
            if k not in self._features:  # (by unit: one ControlNet may come twice, with two pictures)
                with torch.no_grad():
                    self._features[k] = net.embed_control(picture.to(x.device))
            features = self._features[k]
            if features.shape[0] != x.shape[0]:
                features = torch.cat([features] * (x.shape[0] // features.shape[0]))
            given = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "time_ids" else v)
                     for k, v in cond.items() if k in keys}
            context = given.get("context")
            rows, b = (context.shape[0], x.shape[0]) if torch.is_tensor(context) else (0, 0)
            pooled = bool(net.config.global_pool_conditions)
            cond_only = pooled or mode in ("guess", "controlnet")
            factors = None if pooled and mode == "guess" else mode_scales(mode, len(net.controlnet_down_blocks) + 1)
            if cond_only and b and rows >= 2 * b and rows % b == 0:
                # the conditional part of the guidance batch [uncond; cond...] (one part, or AND's several) only,
                # with zero residuals for the unconditional rows (a pooled ControlNet reads the prompt only;
                # diffusers runs it, and guess mode, so)
                rest = {k: (v[b:] if torch.is_tensor(v) and v.shape[0] == rows else v) for k, v in given.items()}
                d, m = net(xin, t, control_features=features, scale=scale, **rest)
                # (a residual from before the net's own guidance batch parted holds one copy for all the parts)
                d = [torch.cat([torch.zeros_like(r[:b]), expand_batch(r, rows - b)]) for r in d]
                m = torch.cat([torch.zeros_like(m[:b]), expand_batch(m, rows - b)])
            elif cond_only and guidance_half == "uncond":
                continue  # (the same in two calls: no residuals for the unconditional half)
            else:
                d, m = net(xin, t, control_features=features, scale=scale, **given)
            if factors is not None:  # the control mode's level factors
                d, m = [r * f for r, f in zip(d, factors)], m * factors[-1]
            down = list(d) if down is None else [_add(a, b.to(a.dtype)) for a, b in zip(down, d)]
            mid = m if mid is None else _add(mid, m.to(mid.dtype))
        if down is None:  # no ControlNet acts at this step
            return self.model(x, t, **cond)
        return self.model(x, t, **cond, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
