"""Imagen's Efficient U-Net, with the parameter names of lucidrains' imagen-pytorch (2.1.0) `Unet`.

Saharia et al. 2022 ("Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding", Imagen)
denoise pixels at 64 px and super-resolve them to 256 and 1024 px with U-Nets conditioned on a frozen T5's token
states. Appendix B.1 and Fig. A.28-A.30 describe the Efficient U-Net of the super-resolution stages:

- more residual blocks at the low resolutions, fewer at the high ones (`num_resnet_blocks` per level);
- skip connections scaled by 1/sqrt(2) (`scale_skip_connection`);
- in a DBlock the map is downsampled *before* its convolutions, in a UBlock upsampled *after* them
  (`memory_efficient`: the convolutions run at the lower resolution);
- text conditioning by cross-attention at the low resolutions (`layer_cross_attns`), and "a pooled embedding
  vector added to the diffusion timestep embedding" (sec. 2.3, after GLIDE, Nichol et al. 2022, sec. 2.3),
  the text states layer-normalised in the attention and pooling layers (App. B; here `norm_cond`);
- the noise level of the augmented low-resolution picture as a second condition (sec. 2.5, "noise conditioning
  augmentation"; `lowres_noise_cond`).

imagen-pytorch, the implementation people train, adds its own pieces, all reproduced here: the text tokens pooled by
a Perceiver resampler (Jaegle et al. 2021; Alayrac et al. 2022, Flamingo sec. 2.1, whose keys also hold the latents)
before conditioning; attention with l2-normalised queries and keys times learned per-dimension scales and a fixed
temperature 8 (QK-norm, Henry et al. 2020) and a learned null key/value; a global-context gate in the residual blocks
(Cao et al. 2019, GCNet); the self-attention layers' keys and values holding the conditioning tokens too (GLIDE's
added keys) with one key/value head (multi-query attention, Shazeer 2019); pixel-unshuffle downsampling (SP-conv,
Sunkara & Luo 2022) and pixel-shuffle upsampling (Shi et al. 2016, ICNR-initialised, Aitken et al. 2017); and the
continuous-time noise condition (its log-SNR) through learned random Fourier features (Kingma et al. 2021, VDM).

`EfficientUNetConfig`'s fields are imagen-pytorch's `Unet.__init__` keywords with its defaults, so the unet configs an
imagen-pytorch checkpoint stores build the model (`unet_config_from_imagen` applies what `Imagen` casts on top), and
`EfficientUNet`'s state_dict keys are `Unet`'s, so its weights load with load_state_dict(strict=True)
(`unet_state_from_imagen` takes one unet's out of an `Imagen`'s). No randomness in forward: classifier-free
guidance's unconditional rows (imagen-pytorch's `cond_drop_prob=1.`) and training's text dropout come in as
`text_dropped`. All attention goes through torch.nn.functional.scaled_dot_product_attention.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import io
from imagine.models.attention import merge_heads, split_heads

# imagen-pytorch's fixed temperature of the cosine-similarity attention (its `scale = 8`)
COSINE_SIM_SCALE = 8.0
# the Perceiver resampler's fixed settings in imagen-pytorch's Unet (PerceiverResampler's defaults; depth 2 there)
POOL_DEPTH, POOL_MEAN_LATENTS, POOL_MAX_SEQ_LEN, POOL_FF_MULT = 2, 4, 512, 4
# the bottleneck's residual blocks get CrossAttention's own defaults, not the config's heads (imagen-pytorch builds
# them with ResnetBlock(...) directly, not through its partial with the attention settings)
MID_CROSS_ATTN_HEADS, MID_CROSS_ATTN_DIM_HEAD = 8, 64
# d_model of the T5 encoders imagen-pytorch names (its text_embed_dim when an Imagen config gives only the name)
T5_WIDTHS = {"google/t5-v1_1-small": 512, "google/t5-v1_1-base": 768, "google/t5-v1_1-large": 1024,
             "google/t5-v1_1-xl": 2048, "google/t5-v1_1-xxl": 4096}
INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


@dataclass
class EfficientUNetConfig:
    """imagen-pytorch's `Unet.__init__` keywords and defaults (2.1.0), so `EfficientUNetConfig(**unet_kwargs)` holds
    what `Unet(**unet_kwargs)` builds. A per-level setting is one value or a tuple with one value per `dim_mults`
    entry. `num_image_tokens`, `out_dim`, `dropout`, `layer_attns_add_text_cond` and
    `cross_embed_downsample_kernel_sizes` are accepted and, as in imagen-pytorch's Unet, change nothing here (the
    self-attention layers always read the conditioning tokens). `cond_images_channels` > 0: the U-Net reads a
    conditioning picture of that many channels (imagen-pytorch's cond_images), resized to x's size by `resize_mode`
    and put before x's channels."""

    dim: int
    text_embed_dim: int | None = T5_WIDTHS["google/t5-v1_1-base"]
    num_resnet_blocks: int | tuple[int, ...] = 1
    cond_dim: int | None = None
    num_image_tokens: int = 4
    num_time_tokens: int = 2
    learned_sinu_pos_emb_dim: int = 16
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    cond_images_channels: int = 0
    channels: int = 3
    channels_out: int | None = None
    attn_dim_head: int = 64
    attn_heads: int = 8
    ff_mult: float = 2.0
    lowres_cond: bool = False
    layer_attns: bool | tuple[bool, ...] = True
    layer_attns_depth: int | tuple[int, ...] = 1
    layer_mid_attns_depth: int = 1
    layer_attns_add_text_cond: bool = True
    attend_at_middle: bool = True
    layer_cross_attns: bool | tuple[bool, ...] = True
    use_linear_attn: bool | tuple[bool, ...] = False
    use_linear_cross_attn: bool | tuple[bool, ...] = False
    cond_on_text: bool = True
    max_text_len: int = 256
    init_dim: int | None = None
    init_conv_kernel_size: int = 7
    init_cross_embed: bool = True
    init_cross_embed_kernel_sizes: tuple[int, ...] = (3, 7, 15)
    cross_embed_downsample: bool = False
    cross_embed_downsample_kernel_sizes: tuple[int, ...] = (2, 4)
    attn_pool_text: bool = True
    attn_pool_num_latents: int = 32
    dropout: float = 0.0
    memory_efficient: bool = False
    init_conv_to_final_conv_residual: bool = False
    use_global_context_attn: bool = True
    scale_skip_connection: bool = True
    final_resnet_block: bool = True
    final_conv_kernel_size: int = 3
    self_cond: bool = False
    resize_mode: str = "nearest"
    combine_upsample_fmaps: bool = False
    pixel_shuffle_upsample: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self.dim_mults = tuple(self.dim_mults)
        n = len(self.dim_mults)
        if n < 1:
            raise ValueError("EfficientUNet config: dim_mults must list at least one level")
        for name, value in (("dim", self.dim), ("attn_heads", self.attn_heads), ("attn_dim_head", self.attn_dim_head),
                            ("num_time_tokens", self.num_time_tokens), ("max_text_len", self.max_text_len),
                            ("attn_pool_num_latents", self.attn_pool_num_latents), ("channels", self.channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EfficientUNet config: {name} must be a positive integer; got {value!r}")
        # what imagen-pytorch has and imagine does not build
        unsupported = {"use_linear_attn": "False (softmax attention; the linear attention layers are not built)",
                       "use_linear_cross_attn": "False (softmax cross-attention)",
                       "cross_embed_downsample": "False (pixel-unshuffle downsampling)",
                       "combine_upsample_fmaps": "False (the upsampling levels' maps are not combined)"}
        for name, valid in unsupported.items():
            if any(self.per_level(name)):  # (one value, or one per level)
                raise ValueError(f"EfficientUNet config: {name}={getattr(self, name)!r} is not supported; "
                                 f"valid: {valid}")
        if isinstance(self.cond_images_channels, bool) or not isinstance(self.cond_images_channels, int) \
                or self.cond_images_channels < 0:
            raise ValueError(f"EfficientUNet config: cond_images_channels must be a whole number, 0 (no conditioning "
                             f"picture) or more; got {self.cond_images_channels!r}")
        if self.resize_mode not in INTERPOLATION_MODES:
            raise ValueError(f"EfficientUNet config: resize_mode {self.resize_mode!r} is not one of "
                             f"{', '.join(INTERPOLATION_MODES)}")
        for name in ("num_resnet_blocks", "layer_attns", "layer_attns_depth", "layer_cross_attns"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"EfficientUNet config: {name} lists {len(value)} values for {n} levels (dim_mults)")
        if self.cond_on_text and not self.text_embed_dim:
            raise ValueError("EfficientUNet config: cond_on_text needs text_embed_dim (the text encoder's width)")
        if self.learned_sinu_pos_emb_dim % 2:
            raise ValueError(f"EfficientUNet config: learned_sinu_pos_emb_dim must be even (sines and cosines); "
                             f"got {self.learned_sinu_pos_emb_dim}")
        if self.init_cross_embed and any(k % 2 == 0 for k in self.init_cross_embed_kernel_sizes):
            raise ValueError("EfficientUNet config: init_cross_embed_kernel_sizes must be odd (stride 1, 'same' "
                             f"padding); got {self.init_cross_embed_kernel_sizes}")
        if self.attn_pool_text and self.max_text_len > POOL_MAX_SEQ_LEN:
            raise ValueError(f"EfficientUNet config: attn_pool_text reads at most {POOL_MAX_SEQ_LEN} tokens (its "
                             f"position table); max_text_len is {self.max_text_len}")

    def per_level(self, name: str) -> tuple:
        """A setting as one value per level (imagen-pytorch's cast_tuple: one value is every level's)."""
        value = getattr(self, name)
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.dim_mults)

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the bottleneck is than the input: every level halves the map in the Efficient U-Net
        (downsampling first), all but the last otherwise."""
        n = len(self.dim_mults)
        return 2 ** (n if self.memory_efficient else n - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EfficientUNetConfig":
        """From imagen-pytorch Unet keywords (a checkpoint's `imagen_params["unets"][i]`, a `Unet._locals`, or our
        config.json): keys starting with "_" (our file's class name and version) are skipped, any other unknown key
        is refused."""
        if not isinstance(d, dict):
            raise TypeError("EfficientUNet config must be a dict of imagen-pytorch Unet keywords; got "
                            f"{type(d).__name__}")
        if d.get("is_null"):
            raise ValueError("EfficientUNet config: this is imagen-pytorch's NullUnet (is_null), a stage with no "
                             "network; there is nothing to build")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not str(k).startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"EfficientUNet config: unknown keys {unknown}; known: imagen-pytorch Unet's keywords "
                             f"{sorted(names)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if required:
            raise ValueError(f"EfficientUNet config: {', '.join(required)} must be given (imagen-pytorch's Unet has "
                             "no default for it)")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    # -- the Imagen paper's shapes (imagen-pytorch's BaseUnet64, SRUnet256, SRUnet1024) --------------------------
    @classmethod
    def base_unet64(cls, **overrides) -> "EfficientUNetConfig":
        """Imagen's 64 px base model (App. B / imagen-pytorch BaseUnet64): width 512, 3 blocks a level, attention
        and cross-attention at 32, 16 and 8 px, the plain (not memory-efficient) ordering."""
        return cls(**{**PRESETS["BaseUnet64"], **overrides})

    @classmethod
    def sr_unet256(cls, **overrides) -> "EfficientUNetConfig":
        """Imagen's 64 -> 256 px Efficient U-Net (App. B.1, Fig. A.31 / imagen-pytorch SRUnet256): blocks
        (2, 4, 8, 8) from high resolution to low, attention and cross-attention at the lowest level only."""
        return cls(**{**PRESETS["SRUnet256"], **overrides})

    @classmethod
    def sr_unet1024(cls, **overrides) -> "EfficientUNetConfig":
        """Imagen's 256 -> 1024 px Efficient U-Net (App. B.1 / imagen-pytorch SRUnet1024): as SRUnet256 with no
        self-attention, cross-attention at the lowest level only."""
        return cls(**{**PRESETS["SRUnet1024"], **overrides})


# imagen-pytorch's predefined unets (the keywords its subclasses put over Unet's defaults)
PRESETS = {
    "BaseUnet64": dict(dim=512, dim_mults=(1, 2, 3, 4), num_resnet_blocks=3, layer_attns=(False, True, True, True),
                       layer_cross_attns=(False, True, True, True), attn_heads=8, ff_mult=2.0, memory_efficient=False),
    "SRUnet256": dict(dim=128, dim_mults=(1, 2, 4, 8), num_resnet_blocks=(2, 4, 8, 8),
                      layer_attns=(False, False, False, True), layer_cross_attns=(False, False, False, True),
                      attn_heads=8, ff_mult=2.0, memory_efficient=True),
    "SRUnet1024": dict(dim=128, dim_mults=(1, 2, 4, 8), num_resnet_blocks=(2, 4, 8, 8), layer_attns=False,
                       layer_cross_attns=(False, False, False, True), attn_heads=8, ff_mult=2.0,
                       memory_efficient=True),
}


# ---------------------------------------------------------------------------------------------
# Norms, attention and the blocks (imagen-pytorch's parameter names)
# ---------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """Layer norm over the last dimension with a gain `g` and no bias (imagen-pytorch's LayerNorm); its epsilon is
    1e-5 in float32 and 1e-3 in half precision, as there."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        return F.layer_norm(x, x.shape[-1:], self.g.to(x.dtype), None, eps)


class ChanRMSNorm(nn.Module):
    """RMS norm over channels of a map [B, C, H, W]: x / ||x||_C * sqrt(C) * gamma (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * self.gamma.to(x.dtype)


def cosine_sim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                         k_scale: torch.Tensor) -> torch.Tensor:
    """QK-norm attention (Henry et al. 2020) as imagen-pytorch has it, q [B, h, N, d], k, v [B, h, M, d]:

        softmax(8 (q/|q| * s_q) . (k/|k| * s_k)) v      (s_q, s_k learned per dimension; 8 a fixed temperature)

    -> [B, N, h d]."""
    q = F.normalize(q, dim=-1) * q_scale.to(q.dtype)
    k = F.normalize(k, dim=-1) * k_scale.to(k.dtype)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, scale=COSINE_SIM_SCALE))


def null_key_value(null_kv: torch.Tensor, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned null key and value [2, d] as one more token per head, [B, heads, 1, d] each: a query that finds
    nothing in the text can attend there (imagen-pytorch's "null key / value for classifier free guidance")."""
    return tuple(t.expand(batch, heads, 1, -1) for t in null_kv[:, None, None, None, :])


class CrossAttention(nn.Module):
    """A residual block's cross-attention of the map's tokens x [B, N, dim] over the conditioning tokens c
    [B, L, context_dim] (Imagen sec. 2.3, App. B Fig. A.28): K, V = [null; c W_kv] per head, QK-norm attention,
    a linear and a layer norm out."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), LayerNorm(dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        null_k, null_v = null_key_value(self.null_kv, x.shape[0], self.heads)
        k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
        return self.to_out(cosine_sim_attention(q, k, v, self.q_scale, self.k_scale))


class ContextAttention(nn.Module):
    """The self-attention of a transformer layer, whose keys and values also hold the conditioning tokens (GLIDE's
    added keys, Nichol et al. 2022 sec. 2.3): queries in `heads` heads, keys and values in one head shared by them
    all (multi-query attention, Shazeer 2019),

        K = [LN(c) W_c; null; LN(x) W_kv]_k,  V likewise,  out = LN(W_o QKNormAttention(LN(x) W_q, K, V)).

    Without `context_dim` (the bottleneck's) the keys are the null token and the map's own."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.heads = heads
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_context = (nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, 2 * dim_head))
                           if context_dim is not None else None)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), LayerNorm(dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        q = split_heads(self.to_q(x), self.heads)
        keys, values = self.to_kv(x).chunk(2, dim=-1)  # [B, N, d]: one head
        null_k, null_v = null_key_value(self.null_kv, x.shape[0], 1)
        k, v = [null_k[:, 0], keys], [null_v[:, 0], values]
        if context is not None:
            if self.to_context is None:
                raise ValueError("this attention layer reads no conditioning tokens (built without context_dim)")
            context_k, context_v = self.to_context(context).chunk(2, dim=-1)
            k, v = [context_k, *k], [context_v, *v]
        k, v = (torch.cat(t, dim=1)[:, None].expand(-1, self.heads, -1, -1) for t in (k, v))
        return self.to_out(cosine_sim_attention(q, k, v, self.q_scale, self.k_scale))


def feed_forward(dim: int, mult: float) -> nn.Sequential:
    """LN, linear to mult x width, GELU, LN, linear back, all bias-free (imagen-pytorch's feed-forward; the norm
    after the activation is NormFormer's, Shleifer et al. 2021)."""
    hidden = int(dim * mult)
    return nn.Sequential(LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(), LayerNorm(hidden),
                         nn.Linear(hidden, dim, bias=False))


class TransformerBlock(nn.Module):
    """`depth` layers of x = x + Attention(x, c); x = x + FF(x) over a map's tokens (Imagen App. B's self-attention
    layers at the low resolutions; with the conditioning tokens c among the keys, `ContextAttention`)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: float, context_dim: int | None):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([ContextAttention(dim, heads, dim_head, context_dim),
                                                    feed_forward(dim, ff_mult)]) for _ in range(depth)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for attention, feed_forward in self.layers:
            tokens = attention(tokens, context) + tokens
            tokens = feed_forward(tokens) + tokens
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class GlobalContext(nn.Module):
    """GCNet's global context block (Cao et al. 2019) as a channel gate: pixels pooled by a softmax over one learned
    map, p = sum_n softmax(W_k x)_n x_n, then gate = sigmoid(W_2 SiLU(W_1 p)) [B, C, 1, 1]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.to_k = nn.Conv2d(dim_in, 1, 1)
        hidden = max(3, dim_out // 2)
        self.net = nn.Sequential(nn.Conv2d(dim_in, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, dim_out, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.to_k(x).flatten(2).softmax(dim=-1)  # [B, 1, HW]
        pooled = torch.einsum("bin,bcn->bci", weights, x.flatten(2))[..., None]  # [B, C, 1, 1]
        return self.net(pooled)


class Block(nn.Module):
    """RMS norm, the time embedding's scale and shift (x (1 + s) + b, FiLM / AdaGN, Dhariwal & Nichol 2021 sec. 3),
    SiLU, a 3x3 convolution."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.norm = ChanRMSNorm(dim)
        self.project = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.project(F.silu(x))


class ResnetBlock(nn.Module):
    """Imagen's ResNetBlock (App. B, Fig. A.28): conv block, [cross-attention to the conditioning tokens], conv block
    modulated by the time embedding, [the global-context gate], plus the (1x1-projected) input."""

    def __init__(self, dim: int, dim_out: int, time_cond_dim: int, cond_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, use_gca: bool = False):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, 2 * dim_out))
        self.cross_attn = CrossAttention(dim_out, cond_dim, heads, dim_head) if cond_dim is not None else None
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.gca = GlobalContext(dim_out, dim_out) if use_gca else None
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = self.time_mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x)
        if self.cross_attn is not None:
            b, c, height, width = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            tokens = self.cross_attn(tokens, cond) + tokens
            h = tokens.transpose(1, 2).reshape(b, c, height, width)
        h = self.block2(h, scale_shift)
        if self.gca is not None:
            h = h * self.gca(h)
        return h + (x if self.res_conv is None else self.res_conv(x))


class PerceiverAttention(nn.Module):
    """The resampler's attention: latents attend over [LN(x); LN(latents)] (Flamingo sec. 2.1: the keys hold the
    latents too), QK-norm, a linear and a layer norm (with bias) out."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(torch.cat([self.norm(x), latents], dim=1)).chunk(2, -1))
        return self.to_out(cosine_sim_attention(q, k, v, self.q_scale, self.k_scale))


class PerceiverResampler(nn.Module):
    """The text tokens [B, L, D] -> a fixed number of latent tokens (Jaegle et al. 2021; Flamingo's resampler):
    learned latents, with 4 more made from the tokens' mean, refined by `depth` layers of
    latents += PerceiverAttention(x + position, latents); latents += FF(latents)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_latents: int):
        super().__init__()
        self.pos_emb = nn.Embedding(POOL_MAX_SEQ_LEN, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.to_latents_from_mean_pooled_seq = nn.Sequential(
            LayerNorm(dim), nn.Linear(dim, dim * POOL_MEAN_LATENTS), nn.Unflatten(-1, (POOL_MEAN_LATENTS, dim)))
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads, dim_head),
                                                    feed_forward(dim, POOL_FF_MULT)]) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_with_position = x + self.pos_emb.weight[:x.shape[1]].to(x.dtype)
        latents = torch.cat([self.to_latents_from_mean_pooled_seq(x.mean(dim=1)),
                             self.latents.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        for attention, feed_forward in self.layers:
            latents = attention(x_with_position, latents) + latents
            latents = feed_forward(latents) + latents
        return latents


class LearnedSinusoidalPosEmb(nn.Module):
    """A scalar condition (the log-SNR) -> [x, sin(2 pi x w), cos(2 pi x w)] with learned frequencies w (random
    Fourier features; VDM, Kingma et al. 2021, App. B; k-diffusion's learned variant)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None]
        freqs = x * self.weights[None, :] * 2 * math.pi
        return torch.cat([x, freqs.sin(), freqs.cos()], dim=-1)


def noise_level_embedding(sinusoid_dim: int, time_cond_dim: int, cond_dim: int, num_time_tokens: int):
    """A noise level's three maps (imagen-pytorch's to_time_hiddens, to_time_cond, to_time_tokens; the same for the
    low-resolution picture's level): Fourier features -> hidden [B, T] -> (the embedding added in every residual
    block [B, T], `num_time_tokens` conditioning tokens [B, n, cond_dim])."""
    hiddens = nn.Sequential(LearnedSinusoidalPosEmb(sinusoid_dim), nn.Linear(sinusoid_dim + 1, time_cond_dim),
                            nn.SiLU())
    cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
    tokens = nn.Sequential(nn.Linear(time_cond_dim, cond_dim * num_time_tokens),
                           nn.Unflatten(-1, (num_time_tokens, cond_dim)))
    return hiddens, cond, tokens


class CrossEmbedLayer(nn.Module):
    """Convolutions of several kernel sizes side by side, their outputs concatenated (CrossFormer's cross-scale
    embedding, Wang et al. 2021): half the channels from the smallest kernel, a quarter from the next, ..."""

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: tuple[int, ...]):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        widths = [int(dim_out / 2 ** i) for i in range(1, len(kernel_sizes))]
        widths.append(dim_out - sum(widths))
        self.convs = nn.ModuleList([nn.Conv2d(dim_in, w, k, padding=(k - 1) // 2)
                                    for k, w in zip(kernel_sizes, widths)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def pixel_unshuffle_downsample(dim: int, dim_out: int) -> nn.Sequential:
    """Pixel unshuffle (each 2x2 patch to 4 channels, no information lost) then a 1x1 convolution (SP-conv, Sunkara &
    Luo 2022; PixelUnshuffle's channel order is imagen-pytorch's 'b c (h s1) (w s2) -> b (c s1 s2) h w')."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


def nearest_upsample(dim: int, dim_out: int) -> nn.Sequential:
    """Nearest-neighbour x2, then a 3x3 convolution."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


class PixelShuffleUpsample(nn.Module):
    """A 1x1 convolution to 4x the channels, SiLU, pixel shuffle (Shi et al. 2016), the convolution initialised so
    the four sub-pixels start equal (ICNR, Aitken et al. 2017: no checkerboard at the start)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim_out * 4, 1), nn.SiLU(), nn.PixelShuffle(2))
        conv = self.net[0]
        with torch.no_grad():
            weight = torch.empty(dim_out, dim, 1, 1, device=conv.weight.device)
            nn.init.kaiming_uniform_(weight)
            conv.weight.copy_(weight.repeat_interleave(4, dim=0))
            conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Parallel(nn.Module):
    """The sum of its modules' outputs (the plain U-Net's last level: a 3x3 and a 1x1 convolution in place of a
    downsampling)."""

    def __init__(self, *fns: nn.Module):
        super().__init__()
        self.fns = nn.ModuleList(fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(fn(x) for fn in self.fns)


class DownLevel(nn.ModuleList):
    """One resolution of the contracting path (Imagen's DBlock, Fig. A.29), imagen-pytorch's ModuleList
    [pre_downsample, first_block, resnet_blocks, transformer, post_downsample] (absent ones None)."""

    pre_downsample = property(lambda self: self[0])
    first_block = property(lambda self: self[1])
    resnet_blocks = property(lambda self: self[2])
    transformer = property(lambda self: self[3])
    post_downsample = property(lambda self: self[4])


class UpLevel(nn.ModuleList):
    """One resolution of the expanding path (Imagen's UBlock, Fig. A.30), imagen-pytorch's ModuleList
    [first_block, resnet_blocks, transformer, upsample] (absent ones None)."""

    first_block = property(lambda self: self[0])
    resnet_blocks = property(lambda self: self[1])
    transformer = property(lambda self: self[2])
    upsample = property(lambda self: self[3])


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class EfficientUNet(nn.Module):
    """Imagen's (Efficient) U-Net, imagen-pytorch's `Unet` (2.1.0) in its parameter names and arithmetic.

    `forward(x, noise_cond, *, text_embeds, text_mask, lowres_cond_img, lowres_noise_cond, self_cond, text_dropped)`
    returns the prediction [B, channels_out, H, W] (what the model was trained to predict: for imagen-pytorch's
    default objective the noise)."""

    def __init__(self, config: EfficientUNetConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = EfficientUNetConfig.from_dict(config)
        if not isinstance(config, EfficientUNetConfig):
            raise TypeError(f"EfficientUNet takes an EfficientUNetConfig or a dict of imagen-pytorch Unet keywords; "
                            f"got {type(config).__name__}")
        self.config = c = config
        dim, n = c.dim, len(c.dim_mults)
        init_dim = c.init_dim or dim
        cond_dim = c.cond_dim or dim
        # the time embedding is twice as wide with a second (low-resolution) noise level
        time_cond_dim = dim * 4 * (2 if c.lowres_cond else 1)
        heads = dict(heads=c.attn_heads, dim_head=c.attn_dim_head)
        self.channels_out = c.channels_out or c.channels

        # x, then [self-conditioning x_0 estimate], then [the upsampled low-resolution picture] (CDM, Ho et al. 2021)
        init_channels = c.channels * (1 + int(c.lowres_cond) + int(c.self_cond)) + c.cond_images_channels
        self.init_conv = (CrossEmbedLayer(init_channels, init_dim, c.init_cross_embed_kernel_sizes)
                          if c.init_cross_embed else
                          nn.Conv2d(init_channels, init_dim, c.init_conv_kernel_size,
                                    padding=c.init_conv_kernel_size // 2))
        self.to_time_hiddens, self.to_time_cond, self.to_time_tokens = noise_level_embedding(
            c.learned_sinu_pos_emb_dim, time_cond_dim, cond_dim, c.num_time_tokens)
        if c.lowres_cond:  # Imagen sec. 2.5: the augmentation's noise level conditions like the time
            self.to_lowres_time_hiddens, self.to_lowres_time_cond, self.to_lowres_time_tokens = noise_level_embedding(
                c.learned_sinu_pos_emb_dim, time_cond_dim, cond_dim, c.num_time_tokens)
        self.norm_cond = nn.LayerNorm(cond_dim)
        self.text_to_cond = nn.Linear(c.text_embed_dim, cond_dim) if c.cond_on_text else None
        self.attn_pool = (PerceiverResampler(cond_dim, POOL_DEPTH, num_latents=c.attn_pool_num_latents, **heads)
                          if c.attn_pool_text else None)
        # the learned "no text" of classifier-free guidance (Ho & Salimans 2022): tokens and pooled vector
        self.null_text_embed = nn.Parameter(torch.randn(1, c.max_text_len, cond_dim))
        self.null_text_hidden = nn.Parameter(torch.randn(1, time_cond_dim))
        # the pooled text added to the time embedding (Imagen sec. 2.3)
        self.to_text_non_attn_cond = (nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, time_cond_dim),
                                                    nn.SiLU(), nn.Linear(time_cond_dim, time_cond_dim))
                                      if c.cond_on_text else None)

        blocks, attns, depths, cross = (c.per_level(k) for k in ("num_resnet_blocks", "layer_attns",
                                                                 "layer_attns_depth", "layer_cross_attns"))
        widths = [init_dim, *(dim * m for m in c.dim_mults)]
        in_out = list(zip(widths[:-1], widths[1:]))
        gca = c.use_global_context_attn
        self.init_resnet_block = (ResnetBlock(init_dim, init_dim, time_cond_dim, use_gca=gca)
                                  if c.memory_efficient else None)
        self.skip_connect_scale = 2 ** -0.5 if c.scale_skip_connection else 1.0  # Imagen App. B.1

        def transformer(width, level):
            return (TransformerBlock(width, depths[level], ff_mult=c.ff_mult, context_dim=cond_dim, **heads)
                    if attns[level] else None)

        self.downs = nn.ModuleList()
        skip_widths = []
        for level, (w_in, w_out) in enumerate(in_out):
            width = w_out if c.memory_efficient else w_in  # the Efficient U-Net's DBlock downsamples first
            skip_widths.append(width)
            post = None
            if not c.memory_efficient:
                post = (pixel_unshuffle_downsample(width, w_out) if level < n - 1 else
                        Parallel(nn.Conv2d(w_in, w_out, 3, padding=1), nn.Conv2d(w_in, w_out, 1)))
            self.downs.append(DownLevel([
                pixel_unshuffle_downsample(w_in, w_out) if c.memory_efficient else None,
                ResnetBlock(width, width, time_cond_dim, cond_dim if cross[level] else None, **heads),
                nn.ModuleList([ResnetBlock(width, width, time_cond_dim, use_gca=gca) for _ in range(blocks[level])]),
                transformer(width, level),
                post]))

        mid = widths[-1]
        mid_heads = dict(heads=MID_CROSS_ATTN_HEADS, dim_head=MID_CROSS_ATTN_DIM_HEAD)
        self.mid_block1 = ResnetBlock(mid, mid, time_cond_dim, cond_dim, **mid_heads)
        self.mid_attn = (TransformerBlock(mid, c.layer_mid_attns_depth, ff_mult=2.0, context_dim=None, **heads)
                         if c.attend_at_middle else None)
        self.mid_block2 = ResnetBlock(mid, mid, time_cond_dim, cond_dim, **mid_heads)

        upsample = PixelShuffleUpsample if c.pixel_shuffle_upsample else nearest_upsample
        self.ups = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(reversed(in_out)):
            level, skip = n - 1 - i, skip_widths.pop()
            self.ups.append(UpLevel([
                ResnetBlock(w_out + skip, w_out, time_cond_dim, cond_dim if cross[level] else None, **heads),
                nn.ModuleList([ResnetBlock(w_out + skip, w_out, time_cond_dim, use_gca=gca)
                               for _ in range(blocks[level])]),
                transformer(w_out, level),
                # the Efficient U-Net's UBlock upsamples last, at every level
                upsample(w_out, w_in) if level > 0 or c.memory_efficient else None]))

        final_width = dim + (dim if c.init_conv_to_final_conv_residual else 0)
        self.final_res_block = (ResnetBlock(final_width, dim, time_cond_dim, use_gca=True)
                                if c.final_resnet_block else None)
        final_in = (dim if c.final_resnet_block else final_width) + (c.channels if c.lowres_cond else 0)
        self.final_conv = nn.Conv2d(final_in, self.channels_out, c.final_conv_kernel_size,
                                    padding=c.final_conv_kernel_size // 2)
        nn.init.zeros_(self.final_conv.weight)  # imagen-pytorch's zero_init_: a new model predicts 0 at first
        nn.init.zeros_(self.final_conv.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_conv.weight.dtype

    # -- conditioning ----------------------------------------------------------------------------
    def text_conditioning(self, text_embeds: torch.Tensor, text_mask: torch.Tensor | None,
                          text_dropped: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text states [B, L, text_embed_dim] -> (conditioning tokens [B, n, cond_dim], the pooled vector
        [B, time_cond_dim] added to the time embedding). Tokens past max_text_len are cut; masked-out tokens and
        the padding up to max_text_len are the learned null text's (with no mask the padding stays zero, as
        imagen-pytorch has it), and a dropped row's are all of them, its pooled vector the null one."""
        c = self.config
        tokens = self.text_to_cond(text_embeds)[:, :c.max_text_len]
        keep = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if text_dropped is not None:
            keep = ~text_dropped
        pad = c.max_text_len - tokens.shape[1]
        tokens = F.pad(tokens, (0, 0, 0, pad))
        keep_token = keep[:, None, None]
        if text_mask is not None:
            keep_token = keep_token & F.pad(text_mask[:, :c.max_text_len], (0, pad), value=False)[:, :, None]
        tokens = torch.where(keep_token, tokens, self.null_text_embed.to(tokens.dtype))
        if self.attn_pool is not None:
            tokens = self.attn_pool(tokens)
        pooled = self.to_text_non_attn_cond(tokens.mean(dim=-2))
        pooled = torch.where(keep[:, None], pooled, self.null_text_hidden.to(pooled.dtype))
        return tokens, pooled

    def _check_inputs(self, x, noise_cond, text_embeds, text_mask, lowres_cond_img, lowres_noise_cond, self_cond,
                      text_dropped, cond_images=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inputs checked against the config (an error says what is wrong and what is valid); returns the noise
        levels as float tensors [B]."""
        c = self.config
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c.channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a picture tensor [B, {c.channels}, H, W] (channels={c.channels}); got {got}")
        b, (h, w), factor = x.shape[0], x.shape[-2:], c.downsampling_factor
        if h % factor or w % factor:
            raise ValueError(f"x is {h}x{w}; this U-Net halves the map {int(math.log2(factor))} times, so the sides "
                             f"must be multiples of {factor}")

        def levels(value, name):
            value = torch.as_tensor(value, device=x.device)
            if value.ndim == 0:
                value = value.expand(b)
            if value.shape != (b,) or value.dtype == torch.bool or value.is_complex():
                raise ValueError(f"{name} must be a real number or a tensor [B] = [{b}]; got shape "
                                 f"{tuple(value.shape)}")
            return value.float()

        def picture(value, name):
            if not torch.is_tensor(value) or value.shape != x.shape:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{name} must be a picture tensor of x's shape {tuple(x.shape)}; got {got}")

        if c.lowres_cond:
            picture(lowres_cond_img, "lowres_cond_img (the low-resolution picture, upsampled to x's size)")
            if lowres_noise_cond is None:
                raise ValueError("this super-resolution U-Net needs lowres_noise_cond [B], the augmentation's noise "
                                 "level (its log-SNR, imagen-pytorch's lowres_noise_times)")
            lowres_noise_cond = levels(lowres_noise_cond, "lowres_noise_cond")
        elif lowres_cond_img is not None or lowres_noise_cond is not None:
            raise ValueError("this U-Net takes no low-resolution picture (lowres_cond=False); pass lowres_cond_img and "
                             "lowres_noise_cond only to a super-resolution stage")
        if c.cond_images_channels:
            wanted = f"[B, {c.cond_images_channels}, H, W] with B = {b}"
            if not torch.is_tensor(cond_images) or cond_images.ndim != 4 or cond_images.shape[0] != b \
                    or cond_images.shape[1] != c.cond_images_channels:
                got = tuple(cond_images.shape) if torch.is_tensor(cond_images) else type(cond_images).__name__
                raise ValueError(f"this U-Net reads a conditioning picture (cond_images_channels="
                                 f"{c.cond_images_channels}): cond_images must be a tensor {wanted}; got {got}")
        elif cond_images is not None:
            raise ValueError("this U-Net reads no conditioning picture (cond_images_channels=0); pass cond_images=None")
        if self_cond is not None:
            if not c.self_cond:
                raise ValueError("this U-Net is not self-conditioned (self_cond=False); pass self_cond=None")
            picture(self_cond, "self_cond (the previous x_0 estimate)")
        if text_embeds is not None:
            if not torch.is_tensor(text_embeds):
                raise ValueError(f"text_embeds must be a tensor [B, L, {c.text_embed_dim}]; got "
                                 f"{type(text_embeds).__name__}")
            if not c.cond_on_text:
                raise ValueError("this U-Net reads no text (cond_on_text=False); pass text_embeds=None")
            if text_embeds.ndim != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != c.text_embed_dim:
                raise ValueError(f"text_embeds must be [B, L, {c.text_embed_dim}] with B = {b}; got "
                                 f"{tuple(text_embeds.shape)}")
            if text_mask is not None and (not torch.is_tensor(text_mask) or text_mask.shape != text_embeds.shape[:2]
                                          or text_mask.dtype != torch.bool):
                raise ValueError(f"text_mask must be a bool tensor [B, L] = {list(text_embeds.shape[:2])} (True: a "
                                 f"token); got {text_mask.dtype} {tuple(text_mask.shape)}")
        elif text_mask is not None or text_dropped is not None:
            raise ValueError("text_mask and text_dropped need text_embeds (the null text replaces given text)")
        if text_dropped is not None and (not torch.is_tensor(text_dropped) or text_dropped.dtype != torch.bool
                                         or text_dropped.shape != (b,)):
            got = f"{text_dropped.dtype} {tuple(text_dropped.shape)}" if torch.is_tensor(text_dropped) else \
                type(text_dropped).__name__
            raise ValueError(f"text_dropped must be None or a bool tensor [B] = [{b}] (True: the null text); got {got}")
        return levels(noise_cond, "noise_cond"), lowres_noise_cond

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, *, text_embeds: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, lowres_cond_img: torch.Tensor | None = None,
                lowres_noise_cond: torch.Tensor | None = None, self_cond: torch.Tensor | None = None,
                text_dropped: torch.Tensor | None = None, cond_images: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, channels, H, W], the noised picture; noise_cond [B] the noise level it was trained on (imagen-pytorch's
        `time`: GaussianDiffusionContinuousTimes.get_condition, the log-SNR); text_embeds [B, L, text_embed_dim] with
        text_mask [B, L] (True: a token); for a super-resolution stage, lowres_cond_img (the noise-augmented
        low-resolution picture at x's size) and lowres_noise_cond [B] its level; self_cond the previous x_0 estimate
        (zeros when None, for a self-conditioned model); text_dropped [B] bool, True where the row takes the null
        text (classifier-free guidance's unconditional rows); cond_images [B, cond_images_channels, H', W'] for a
        U-Net that reads a conditioning picture (any size: resized to x's by resize_mode, as imagen-pytorch's; read
        as given, no normalization; kept in the unconditional rows too)."""
        c = self.config
        noise_cond, lowres_noise_cond = self._check_inputs(x, noise_cond, text_embeds, text_mask, lowres_cond_img,
                                                           lowres_noise_cond, self_cond, text_dropped, cond_images)
        dtype, w = x.dtype, self.dtype
        x = x.to(w)
        if c.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if self_cond is None else self_cond.to(w)], dim=1)
        if c.lowres_cond:
            lowres_cond_img = lowres_cond_img.to(w)
            x = torch.cat([x, lowres_cond_img], dim=1)
        if c.cond_images_channels:  # (imagen-pytorch: resized to x's side, put first)
            if cond_images.shape[-2:] != x.shape[-2:]:
                cond_images = F.interpolate(cond_images.float(), x.shape[-1], mode=c.resize_mode)
            x = torch.cat([cond_images.to(w), x], dim=1)
        x = self.init_conv(x)
        init_conv_residual = x if c.init_conv_to_final_conv_residual else None

        # the embedding t every residual block reads and the conditioning tokens the attention layers read
        time_hiddens = self.to_time_hiddens(noise_cond.to(w))
        time_tokens = self.to_time_tokens(time_hiddens)
        t = self.to_time_cond(time_hiddens)
        if c.lowres_cond:
            lowres_hiddens = self.to_lowres_time_hiddens(lowres_noise_cond.to(w))
            t = t + self.to_lowres_time_cond(lowres_hiddens)
            time_tokens = torch.cat([time_tokens, self.to_lowres_time_tokens(lowres_hiddens)], dim=-2)
        tokens = time_tokens
        if text_embeds is not None:
            text_tokens, text_pooled = self.text_conditioning(text_embeds.to(w), text_mask, text_dropped)
            t = t + text_pooled
            tokens = torch.cat([time_tokens, text_tokens], dim=-2)
        cond = self.norm_cond(tokens)

        if self.init_resnet_block is not None:
            x = self.init_resnet_block(x, t)
        skips = []
        for level in self.downs:
            if level.pre_downsample is not None:
                x = level.pre_downsample(x)
            x = level.first_block(x, t, cond)
            for block in level.resnet_blocks:
                x = block(x, t)
                skips.append(x)
            if level.transformer is not None:
                x = level.transformer(x, cond)
            skips.append(x)
            if level.post_downsample is not None:
                x = level.post_downsample(x)

        x = self.mid_block1(x, t, cond)
        if self.mid_attn is not None:
            x = self.mid_attn(x)
        x = self.mid_block2(x, t, cond)

        def with_skip(h):  # Imagen App. B.1: skip connections scaled by 1/sqrt(2)
            return torch.cat([h, skips.pop() * self.skip_connect_scale], dim=1)

        for level in self.ups:
            x = level.first_block(with_skip(x), t, cond)
            for block in level.resnet_blocks:
                x = block(with_skip(x), t)
            if level.transformer is not None:
                x = level.transformer(x, cond)
            if level.upsample is not None:
                x = level.upsample(x)

        if init_conv_residual is not None:
            x = torch.cat([x, init_conv_residual], dim=1)
        if self.final_res_block is not None:
            x = self.final_res_block(x, t)
        if c.lowres_cond:
            x = torch.cat([x, lowres_cond_img], dim=1)
        return self.final_conv(x).to(dtype)

    # -- weights and folders ---------------------------------------------------------------------
    def load_state(self, state: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
        """imagen-pytorch Unet weights (its state_dict keys, ours), strictly: an error names the keys missing,
        unexpected or misshapen."""
        io.load_state_into(self, state, source, layout="as configured (imagen-pytorch Unet keys)")

    @classmethod
    def from_imagen_checkpoint(cls, checkpoint: dict | str | Path, index: int, *, text_embed_dim: int | None = None,
                               ema: bool = False) -> "EfficientUNet":
        """Unet `index` (0: the base) of an imagen-pytorch ImagenTrainer checkpoint (what `trainer.save` writes: the
        Imagen's state dict under "model", its ImagenConfig under "imagen_params"; read with torch.load
        weights_only), in eval mode. `ema` takes the EMA copy's weights ("ema": ema_unets' state)."""
        if not isinstance(checkpoint, dict):
            from imagine.loading.single_file import read_weights_file

            checkpoint = read_weights_file(checkpoint)
            if not isinstance(checkpoint, dict):
                raise ValueError(f"an imagen-pytorch checkpoint is a dict (ImagenTrainer.save's); got "
                                 f"{type(checkpoint).__name__}")
        if "imagen_params" not in checkpoint:
            raise ValueError("this imagen-pytorch checkpoint has no imagen_params (the Imagen was not built from an "
                             "ImagenConfig); build EfficientUNetConfig from the Unet keywords and use load_state")
        model = cls(unet_config_from_imagen(checkpoint["imagen_params"], index, text_embed_dim=text_embed_dim))
        key = "ema" if ema else "model"
        if key not in checkpoint:
            raise ValueError(f"this imagen-pytorch checkpoint has no {key!r} weights; it has {sorted(checkpoint)}")
        state = unet_state_from_imagen(checkpoint[key], index, ema=ema)
        model.load_state(state, f"the checkpoint's unet {index}")
        return model.eval()

    def save_pretrained(self, folder) -> None:
        """config.json (the full config, our class name and version) and diffusion_pytorch_model.safetensors."""
        io.save_component(self, self.config.to_dict(), folder, type(self).__name__)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "EfficientUNet":
        """A folder `save_pretrained` wrote, in eval mode."""
        cfg = io.read_config(folder, cls.__name__)
        try:
            config = EfficientUNetConfig.from_dict(cfg)
        except ValueError as e:
            raise ValueError(f"{folder}/config.json: {e}") from None
        with torch.device("meta"), io.without_random_init():
            model = cls(config)
        path = io.find_weights(folder)
        io.load_state_into(model, io.load_tensors(path), str(path), assign=True)
        return model.to(dtype).eval()


def unet_state_from_imagen(state: dict[str, torch.Tensor], index: int, ema: bool = False) -> dict:
    """Unet `index`'s weights, keys as the Unet's own, out of an imagen-pytorch `Imagen` state dict (its unets under
    "unets.{index}.") or, with `ema`, out of an ImagenTrainer's EMA state (ema_unets: "{index}.ema_model.")."""
    head = f"{index}.ema_model." if ema else f"unets.{index}."
    own = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    if not own:
        found = sorted({k.split(".")[0 if ema else 1] for k in state
                        if (".ema_model." in k if ema else k.startswith("unets."))})
        raise ValueError(f"no weights under {head!r} in this {'EMA ' if ema else ''}state dict; it holds unets "
                         f"{', '.join(found) or 'none'}")
    return own


def unet_config_from_imagen(imagen_params: dict, index: int, text_embed_dim: int | None = None) -> EfficientUNetConfig:
    """Unet `index`'s config from an imagen-pytorch checkpoint's `imagen_params` (its ImagenConfig dict), with what
    `Imagen.__init__` casts on every unet (`cast_model_parameters`): lowres_cond for all but the first, the Imagen's
    channels in and out, its condition_on_text, and its text encoder's width (`text_embed_dim`, else the config's,
    else the width of the T5 it names)."""
    unets = imagen_params.get("unets") if isinstance(imagen_params, dict) else None
    if not isinstance(unets, (list, tuple)) or not unets:
        raise ValueError("imagen_params must be an imagen-pytorch ImagenConfig dict with a list of unets")
    if not isinstance(index, int) or not 0 <= index < len(unets):
        raise ValueError(f"unet index {index!r} out of range: this Imagen has {len(unets)} unets "
                         f"(0 .. {len(unets) - 1})")
    cond_on_text = bool(imagen_params.get("condition_on_text", True))
    if text_embed_dim is None and cond_on_text:
        text_embed_dim = imagen_params.get("text_embed_dim")
        if text_embed_dim is None:
            name = imagen_params.get("text_encoder_name", "google/t5-v1_1-base")
            if name not in T5_WIDTHS:
                raise ValueError(f"the Imagen's text encoder {name!r} is not one whose width imagine knows "
                                 f"({', '.join(T5_WIDTHS)}); pass text_embed_dim")
            text_embed_dim = T5_WIDTHS[name]
    channels = imagen_params.get("channels", 3)
    return EfficientUNetConfig.from_dict({**unets[index], "lowres_cond": index > 0, "channels": channels,
                                          "channels_out": channels, "cond_on_text": cond_on_text,
                                          "text_embed_dim": text_embed_dim if cond_on_text else None})
