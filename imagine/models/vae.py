"""The KL autoencoder: the first stage of latent diffusion.

Kingma & Welling 2013 (the variational autoencoder, a diagonal-Gaussian posterior q(z|x) with a KL
term to N(0, I)); Rombach et al. 2022, sec. 3 and appendix G (the "KL-reg" first stage, a small KL
weight so that the latent keeps detail, downsampling factor f = 2^(levels-1)).

Parameter names follow diffusers' `AutoencoderKL`, so Stable Diffusion's VAE weights (diffusers
layout) load with no mapping. The latent the diffusion model sees is `scaling_factor * (z - shift)`
(LDM sec. 4.3.2: rescale so the latent has roughly unit variance; 0.18215 for SD 1.x/2.x), or, for a VAE
whose config has per-channel `latents_mean` / `latents_std` (Playground v2.5's),
`(z - latents_mean) * scaling_factor / latents_std`, as diffusers' SDXL pipelines take it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import fused_attention, io
from imagine.models.group_norm import group_norm, silu_of_norm

log = logging.getLogger(__name__)

# diffusers AutoencoderKL config keys that are not fields of VAEConfig and do not change the model's
# arithmetic (force_upcast: diffusers' pipelines decode an fp16 VAE in float32, as AUTOMATIC1111's "upcast VAE" /
# NaN check retries one; imagine's VAE runs in float32 or bfloat16, whose range SDXL's VAE does not overflow, and
# never in float16); keys starting with "_"
# (_class_name, _diffusers_version, _name_or_path, ...) are bookkeeping. Any other unknown key is
# ignored with a warning that names it.
HARMLESS_KEYS = frozenset({"force_upcast"})


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # per-channel statistics of the unscaled latent (Playground v2.5's VAE config; diffusers' SDXL pipelines:
    # latent = (z - latents_mean) * scaling_factor / latents_std); None: scaling_factor alone
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    down_block_types: tuple[str, ...] = field(default=())
    up_block_types: tuple[str, ...] = field(default=())

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        n = len(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types) or ("DownEncoderBlock2D",) * n
        self.up_block_types = tuple(self.up_block_types) or ("UpDecoderBlock2D",) * n
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"VAE config: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types; they must match")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"VAE config: unsupported down block type {t!r}; valid: 'DownEncoderBlock2D'")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"VAE config: unsupported up block type {t!r}; valid: 'UpDecoderBlock2D'")
        if self.act_fn != "silu":
            raise ValueError(f"VAE config: unsupported act_fn {self.act_fn!r}; valid: 'silu'")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAE config: channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.flatten().tolist()
            if not isinstance(v, (list, tuple)) or len(v) != self.latent_channels:
                raise ValueError(f"VAE config: {name} must list one number per latent channel "
                                 f"({self.latent_channels}); got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("VAE config: latents_mean and latents_std go together (diffusers applies them only as "
                             "a pair); give both or neither")
        if self.latents_std is not None and any(not x > 0 for x in self.latents_std):
            raise ValueError(f"VAE config: latents_std must be positive; got {self.latents_std}")
        if self.latents_mean is not None and self.shift_factor:
            raise ValueError("VAE config: shift_factor and latents_mean / latents_std both given; the latent "
                             "scaling takes one or the other")

    def latent_space(self) -> dict[str, Any]:
        """What maps the VAE's latent to the diffusion model's (`AutoencoderKL.to_latent`): the scaling factor, the
        shift, the per-channel statistics. Two VAEs with equal ones share a latent space where their weights do."""
        return {k: getattr(self, k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """From a diffusers vae/config.json dict (or ours): fields are used; diffusers' bookkeeping keys
        ("_class_name", ...) and `HARMLESS_KEYS` are dropped; any other key is dropped with a warning naming it
        (it may change the arithmetic, which this VAE then does not follow)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in HARMLESS_KEYS and not str(k).startswith("_"))
        if unknown:
            log.warning("VAE config: ignoring keys imagine's AutoencoderKL does not implement: %s",
                        ", ".join(unknown))
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def sd(cls) -> "VAEConfig":
        """Stable Diffusion 1.x/2.x's VAE (f = 8, 4 latent channels)."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   sample_size=512, scaling_factor=0.18215)


class ResnetBlock(nn.Module):
    """The residual block of the autoencoder (no time embedding): two GroupNorm-SiLU-conv3x3 layers."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu_of_norm(self.norm1, x))
        h = self.conv2(silu_of_norm(self.norm2, h, inplace=not torch.is_grad_enabled()))  # h: conv1's, ours
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h if torch.is_grad_enabled() else h.add_(x)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions of the lowest-resolution feature map."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = group_norm(self.group_norm, x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        a = fused_attention.attention(q, k, v)  # bf16 on AVX512-BF16 CPUs (None elsewhere)
        if a is None:
            a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)
        return x + a


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 conv with asymmetric zero padding (right and bottom), as the LDM autoencoder has it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    def __init__(self, resnets: list[nn.Module], resample: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if resample is not None:
            setattr(self, kind, nn.ModuleList([resample]))
        self._kind = kind if resample is not None else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self._kind is not None:
            x = getattr(self, self._kind)[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block)]
            blocks.append(_Stage(resnets, Downsample(cout) if i < len(ch) - 1 else None, "downsamplers"))
            cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(silu_of_norm(self.conv_norm_out, x, inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            # The decoder has one more residual block per level than the encoder (LDM's layout).
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block + 1)]
            blocks.append(_Stage(resnets, Upsample(cout) if i < len(ch) - 1 else None, "upsamplers"))
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(silu_of_norm(self.conv_norm_out, x, inplace=not torch.is_grad_enabled()))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2013, sec. 2.4 and appendix B)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # The clamp keeps exp() finite for untrained encoders (the LDM code does the same).
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std * eps: eps drawn with `generator` as diffusers' `latent_dist.sample(generator)` draws it
        (its `randn_tensor`: one draw of the whole batch's shape; a list of one generator per image, each drawing
        its image's [1, C, h, w]; on the generator's device, then moved), or given as `noise` (the posterior's
        shape)."""
        if noise is None:
            noise = _randn(tuple(self.mean.shape), generator, self.mean.dtype, self.mean.device)
        elif tuple(noise.shape) != tuple(self.mean.shape):  # (a broadcast would give images one another's noise)
            raise ValueError(f"posterior noise must have the posterior's shape {tuple(self.mean.shape)}; "
                             f"got {tuple(noise.shape)}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over latent dimensions (K&W appendix B)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | dict | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = VAEConfig.from_dict(config)
        self.config = config or VAEConfig()
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None

    # -- the two halves ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image in [-1, 1], [B, C, H, W] -> the posterior q(z|x) (unscaled latent)."""
        self._check_image(x)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image (about [-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects a latent [B, {self.config.latent_channels}, h, w]; got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # -- the latent the diffusion model sees (LDM sec. 4.3.2) --------------------------------
    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z -> the diffusion model's: (z - shift) * scaling_factor, or with per-channel
        statistics (z - latents_mean) * scaling_factor / latents_std (diffusers' SDXL img2img)."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = self._latent_stats(z)
            return (z - mean) * c.scaling_factor / std
        shift = c.shift_factor or 0.0
        return (z - shift) * c.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_latent`: latent / scaling_factor + shift, or latent * latents_std / scaling_factor +
        latents_mean (diffusers' SDXL pipelines before decoding)."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = self._latent_stats(latent)
            return latent * std / c.scaling_factor + mean
        shift = c.shift_factor or 0.0
        return latent / c.scaling_factor + shift

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if like.ndim != 4 or like.shape[1] != c.latent_channels:
            raise ValueError(f"expected a latent [B, {c.latent_channels}, h, w]; got {tuple(like.shape)}")
        return tuple(torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
                     for v in (c.latents_mean, c.latents_std))

    def decode_latent(self, latent: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1]; tiled when `tile` (in latent pixels) is smaller than the latent."""
        z = self.from_latent(latent)
        if tile is not None and (z.shape[-1] > tile or z.shape[-2] > tile):
            return self.tiled_decode(z, tile, overlap)
        return self.decode(z)

    def tiled_decode(self, z: torch.Tensor, tile: int = 32, overlap: int = 8) -> torch.Tensor:
        """Decode overlapping latent tiles (`tile` latent pixels a side, `overlap` shared with the next) and
        blend them with linear ramps over the overlap, each pixel the weighted mean of the tiles that cover it,
        so that the decoder's working memory is bounded by the tile size, not the image size. Each tile has its
        own GroupNorm statistics and mid-block attention, so the picture is close to the whole decode, not
        equal; the seams are hidden by the blend. The trade diffusers' `enable_tiling` makes, but not its
        arithmetic: diffusers steps by 3/4 of its tile, ramps the next tile in from weight 0 (blend_v /
        blend_h) and crops, where here the last tile is moved back to end at the edge and the ramps are
        symmetric (weights 1/(n+1) .. n/(n+1) over n overlapping pixels). (AUTOMATIC1111 decodes whole; its
        Tiled VAE extension shares GroupNorm statistics between tiles, which this does not.)"""
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a whole number of latent pixels >= 1; got {tile!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"tile overlap must be a whole number of latent pixels from 0 to the tile's {tile} "
                             f"(excluded); got {overlap!r}")
        f = self.config.downsampling_factor
        b, _, h, w = z.shape
        # the blend in float32 whatever the latent's dtype (bf16 would round the ramps and the weighted sums),
        # the result in the decoder's dtype
        out = torch.zeros(b, self.config.out_channels, h * f, w * f, dtype=torch.float32, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=z.device)
        out_dtype = z.dtype
        stride = tile - overlap
        ys = list(range(0, max(h - tile, 0) + 1, stride)) or [0]
        xs = list(range(0, max(w - tile, 0) + 1, stride)) or [0]
        if ys[-1] + tile < h:
            ys.append(h - tile)
        if xs[-1] + tile < w:
            xs.append(w - tile)
        for y0 in ys:
            for x0 in xs:
                part = self.decode(z[:, :, y0:y0 + tile, x0:x0 + tile])
                out_dtype = part.dtype
                th, tw = part.shape[-2:]
                ramp_y = _ramp(th, overlap * f, y0 > 0, y0 + tile < h, out)
                ramp_x = _ramp(tw, overlap * f, x0 > 0, x0 + tile < w, out)
                wgt = ramp_y[:, None] * ramp_x[None, :]
                out[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += part.float() * wgt
                weight[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += wgt
        return (out / weight).to(out_dtype)

    def _check_image(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encode expects images [B, {c.in_channels}, H, W]; got {tuple(x.shape)}")
        f = c.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f} for this VAE; got {tuple(x.shape[-2:])}")

    # -- folders -----------------------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        io.save_component(self, self.config.to_dict(), folder, "AutoencoderKL")

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
        cfg = io.read_config(folder, "AutoencoderKL")
        with io.without_random_init():  # (every weight is loaded next)
            model = cls(VAEConfig.from_dict(cfg))
        path = io.find_weights(folder)
        io.load_state_into(model, io.load_tensors(path), str(path))
        return model.to(dtype).eval()


def _randn(shape: tuple[int, ...], generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """N(0, I) draws of `shape` as diffusers' `randn_tensor` makes them: a list of one generator is that
    generator; a list of one per image draws each image's [1, ...] with its own; each on its generator's
    device (without one, on `device`)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one, or one per image")
        else:
            return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                              for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device if generator is not None else device,
                       dtype=dtype)


def _ramp(n: int, overlap: int, fade_in: bool, fade_out: bool, like: torch.Tensor) -> torch.Tensor:
    r = torch.ones(n, dtype=like.dtype, device=like.device)
    if overlap > 0:
        ramp = torch.linspace(0, 1, overlap + 2, dtype=like.dtype, device=like.device)[1:-1]
        if fade_in:
            r[:overlap] = ramp
        if fade_out:
            r[-overlap:] = ramp.flip(0)
    return r
