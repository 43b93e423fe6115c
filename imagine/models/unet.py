"""The cross-attention U-Net denoiser of latent diffusion.

Ho et al. 2020 (DDPM), appendix B: a U-Net of residual blocks (GroupNorm, SiLU, 3x3 convs) at
several resolutions, the sinusoidal embedding of t added into every residual block, skip
connections from each down-path block to the mirrored up-path block.
Rombach et al. 2022 (LDM), sec. 3.3: spatial transformer blocks after the residual blocks of the
attention levels, whose cross-attention reads the text encoder's token states (LDM eq. 3; see
`imagine.models.attention`). Extra conditioning vectors (class labels, unCLIP image embeddings,
CDM/Imagen noise-augmentation levels) are embedded and added to the time embedding
(`imagine.models.embeddings`); a guidance-distilled latent consistency model's guidance scale (Luo et al. 2023,
LCM; diffusers' `time_cond_proj_dim`) enters as `timestep_cond`, added to the time's sinusoidal code.
The pixel-space ADM / GLIDE family (DeepFloyd IF's cascade, Karlo's unCLIP decoder) is built from the same levels
with BigGAN residual resampling, adaptive group norm and GLIDE's attention to the text appended to every attention
layer's keys and values (`imagine.models.adm_blocks`); their U-Nets output twice the input's channels where they
learn the variance (Nichol & Dhariwal 2021), which this network just returns.

The config uses the field names of diffusers' `UNet2DConditionModel` config.json and the modules
use its parameter names, so a diffusers `unet/` folder loads with `from_pretrained` and a
diffusers state_dict with `load_state_dict(strict=True)`, with no key mapping.

The call follows docs/DESIGN.md: `model(x_t, t, context=..., context_mask=..., class_labels=...)`, an LCM's
`timestep_cond=...` a cond dict entry like the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagine.models import io
from imagine.models.adm_blocks import RESAMPLE_MODES, AddedKVAttention, resample
from imagine.models.attention import ContextRefiner, SpatialTransformer, expand_batch, key_padding_mask
from imagine.models.embeddings import (
    CLASS_EMBED_TYPES, SinusoidalTimesteps, TextTimeEmbedding, TimestepEmbedding, activation, make_class_embedding,
)
from imagine.models.group_norm import silu_of_norm

# LDM's levels (spatial transformers, convolution resampling) and ADM / GLIDE's (residual resampling, GLIDE's
# attention; `imagine.models.adm_blocks`)
ADM_DOWN_BLOCK_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
ADM_UP_BLOCK_TYPES = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D") + ADM_DOWN_BLOCK_TYPES
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D") + ADM_UP_BLOCK_TYPES
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", None)
ADM_BLOCK_TYPES = ADM_DOWN_BLOCK_TYPES + ADM_UP_BLOCK_TYPES + ("UNetMidBlock2DSimpleCrossAttn",)
GLIDE_ATTENTION_TYPES = ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
TIME_SCALE_SHIFTS = ("default", "scale_shift")

# diffusers config keys this U-Net does not implement, with the one value each may take (the
# value under which the feature is off). Any other value is refused rather than silently dropped.
# Keys not listed here and not fields of UNetConfig are ignored.
FIXED_KEYS: dict[str, Any] = {
    "dual_cross_attention": False,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
}


# The config fields of imagine's own extensions (not in diffusers), with their "off" value.
EXTENSIONS_OFF: dict[str, Any] = {"attention_position_embedding": False, "context_refiner_layers": 0,
                                  "context_refiner_heads": None}
# Parameters of those extensions, which start at zero or feed a path that does (`zero_linear`): a
# checkpoint of the same U-Net without them may leave them out (see `new_parameter`).
EXTENSION_MODULES = ("pos_proj", "context_refiner")


def new_parameter(key: str) -> bool:
    """Whether state-dict key `key` belongs to an extension module, so a checkpoint saved before
    the extension was switched on may lack it and the model still starts as that checkpoint."""
    return any(part in EXTENSION_MODULES for part in key.split("."))


@dataclass
class UNetConfig:
    """The U-Net's shape, with diffusers' field names and defaults (so an omitted key means what it
    means in diffusers).

    Heads: in diffusers' UNet2DConditionModel `attention_head_dim` is, for historical reasons, the
    NUMBER of attention heads per level whenever `num_attention_heads` is None (every SD 1.x/2.x
    config); each head is then out_channels // heads wide. `num_attention_heads`, when given,
    is the number of heads and takes precedence (diffusers 0.42 refuses it outright; we accept it
    with that meaning). See `heads_per_block`. In the GLIDE attention blocks (SimpleCrossAttn*) diffusers reads
    attention_head_dim as each head's width instead (IF and Karlo: 64), and so do we (`glide_head_dim`).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # (the residual blocks' only, as in diffusers: `_transformer`)
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    # SDXL's extra conditioning (Podell et al. 2023, sec. 2.2): "text_time" adds an embedding of the pooled
    # text vector and the sinusoidal codes of the six size numbers (addition_time_embed_dim wide each)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    # a guidance-distilled LCM's (Luo et al. 2023): the width of its guidance-scale code, which a bias-free linear
    # adds to the time's sinusoidal code (`timestep_cond`; imagine.models.embeddings.guidance_scale_embedding)
    time_cond_proj_dim: int | None = None
    # ADM (Dhariwal & Nichol 2021): "scale_shift" is adaptive group norm, GN(h) (1 + s) + b with (s, b) from the
    # time embedding, in every residual block; the ADM blocks' residual outputs divided by resnet_out_scale_factor,
    # and with resnet_skip_time_act their projections take the time embedding without act() (IF's stage II, whose
    # embedding went through time_embedding_act_fn once, after the class and text embeddings were added)
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_act_fn: str | None = None
    # IF: a linear from the text encoder's width (T5-XXL's 4096) to cross_attention_dim ("text_proj"), and the
    # attention-pooled text states (addition_embed_type "text", addition_embed_type_num_heads heads) added to the
    # time embedding
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    addition_embed_type_num_heads: int = 64
    # GLIDE's attention (SimpleCrossAttn blocks): the text group-normalised first ("group_norm", IF's), and the
    # mid block's attention reading the text alone (None: only_cross_attention's, when that is one bool)
    cross_attention_norm: str | None = None
    mid_block_only_cross_attention: bool | None = None
    # imagine's own extensions, off in every SD config (and then left out of config.json, so a
    # folder stays diffusers-readable): a 2-D position code in every spatial transformer, and a
    # trainable transformer over the text states (imagine.models.attention.ContextRefiner).
    attention_position_embedding: bool = False
    context_refiner_layers: int = 0
    context_refiner_heads: int | None = None

    def __post_init__(self):
        def tup(v):
            return tuple(v) if isinstance(v, (list, tuple)) else v

        for f in fields(self):
            setattr(self, f.name, tup(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("UNet config: block_out_channels must list at least one level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {n} block_out_channels but {len(self.down_block_types)} down_block_types "
                             f"and {len(self.up_block_types)} up_block_types; all three must have the same length")
        for kind, valid in (("down", DOWN_BLOCK_TYPES), ("up", UP_BLOCK_TYPES)):
            for t in getattr(self, f"{kind}_block_types"):
                if t not in valid:
                    raise ValueError(f"UNet config: unsupported {kind} block type {t!r}; valid: {', '.join(valid)}")
        if self.mid_block_type not in self._mid_block_types:
            raise ValueError(f"UNet config: unsupported mid_block_type {self.mid_block_type!r}; "
                             "valid: 'UNetMidBlock2DCrossAttn', 'UNetMidBlock2DSimpleCrossAttn' or None")
        if isinstance(self.cross_attention_dim, tuple):
            # diffusers allows one per level; one context can only feed them all if they agree.
            if len(set(self.cross_attention_dim)) != 1:
                raise ValueError("UNet config: per-level cross_attention_dim values that differ "
                                 f"{self.cross_attention_dim} are not supported; give one integer")
            self.cross_attention_dim = self.cross_attention_dim[0]
        for name in ("only_cross_attention", "layers_per_block", "transformer_layers_per_block",
                     "attention_head_dim", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"UNet config: {name} lists {len(v)} values for {n} levels")
        if any(isinstance(v, (list, tuple)) for v in self._per_level(self.transformer_layers_per_block)):
            raise ValueError("UNet config: nested transformer_layers_per_block (asymmetric U-Nets) is not supported")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"UNet config: norm_num_groups must be an integer; got {self.norm_num_groups!r}")
        activation(self.act_fn)  # raises on an unknown name
        if not isinstance(self.context_refiner_layers, int) or self.context_refiner_layers < 0:
            raise ValueError(f"UNet config: context_refiner_layers must be an integer >= 0; got {self.context_refiner_layers!r}")
        if self.context_refiner_layers and (self.refiner_heads < 1 or self.cross_attention_dim % self.refiner_heads):
            raise ValueError(f"UNet config: the context refiner's width {self.cross_attention_dim} cannot be split "
                             f"into {self.refiner_heads} heads (context_refiner_heads)")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(f"UNet config: unsupported class_embed_type {self.class_embed_type!r}; "
                             f"valid: {CLASS_EMBED_TYPES}")
        if self.addition_embed_type not in (None, "text_time", "text"):
            raise ValueError(f"UNet config: unsupported addition_embed_type {self.addition_embed_type!r}; valid: "
                             "None or 'text_time' (SDXL) or 'text' (DeepFloyd IF: the pooled text states)")
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim
                                                            and self.projection_class_embeddings_input_dim):
            raise ValueError("UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (the pooled text width + 6 x the time code width; "
                             "the refiner's: + 5 x)")
        if self.class_embed_type in ("projection", "simple_projection") and not self.projection_class_embeddings_input_dim:
            raise ValueError(f"UNet config: class_embed_type {self.class_embed_type!r} needs "
                             "projection_class_embeddings_input_dim")
        if self.time_cond_proj_dim is not None and (isinstance(self.time_cond_proj_dim, bool) or not isinstance(
                self.time_cond_proj_dim, int) or self.time_cond_proj_dim < 1):
            raise ValueError(f"UNet config: time_cond_proj_dim must be None or a positive integer (the width of an "
                             f"LCM's guidance-scale code, 256 in LCM_Dreamshaper_v7); got {self.time_cond_proj_dim!r}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNet config: downsample_padding must be 0 or 1; got {self.downsample_padding}")
        heads, attended = self.heads_per_block, self.attention_levels
        for level, (c, h) in enumerate(zip(self.block_out_channels, heads)):
            if c % self.norm_num_groups:
                raise ValueError(f"UNet config: channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
            # (only where a level has attention: a plain level's head count is never used, as in diffusers)
            if level in attended and (h < 1 or c % h):
                raise ValueError(f"UNet config: {c} channels cannot be split into {h} attention heads "
                                 "(attention_head_dim holds the number of heads when num_attention_heads is None)")
        self._check_adm()

    _mid_block_types = MID_BLOCK_TYPES  # (UNet2DConfig's: its own)

    def _check_adm(self) -> None:
        """The ADM / GLIDE settings (`imagine.models.adm_blocks`)."""
        self._check_residual_settings()
        self._check_text_settings()
        if any(t in GLIDE_ATTENTION_TYPES for t in self._block_types):
            self._check_glide_heads()

    @property
    def _block_types(self) -> tuple:
        return self.down_block_types + self.up_block_types + (self.mid_block_type,)

    def _check_residual_settings(self) -> None:
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(f"UNet config: unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}; "
                             f"valid: {', '.join(map(repr, TIME_SCALE_SHIFTS))}")
        if self.time_embedding_act_fn is not None:
            activation(self.time_embedding_act_fn)  # raises on an unknown name
        s = self.resnet_out_scale_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0:
            raise ValueError(f"UNet config: resnet_out_scale_factor must be a positive number; got {s!r}")
        if self.resnet_skip_time_act and any(t not in ADM_BLOCK_TYPES for t in self._block_types if t is not None):
            raise ValueError("UNet config: resnet_skip_time_act is taken only by the ADM blocks (diffusers' "
                             f"{', '.join(ADM_BLOCK_TYPES)}); with other block types in the same U-Net it is not "
                             "supported")

    def _check_text_settings(self) -> None:
        if self.encoder_hid_dim_type is None and self.encoder_hid_dim is not None:
            self.encoder_hid_dim_type = "text_proj"  # (as diffusers reads such a config)
        if self.encoder_hid_dim_type not in (None, "text_proj"):
            raise ValueError(f"UNet config: unsupported encoder_hid_dim_type {self.encoder_hid_dim_type!r}; valid: "
                             "None or 'text_proj' (DeepFloyd IF's linear from the text encoder's width)")
        if self.encoder_hid_dim_type == "text_proj" and not self.encoder_hid_dim:
            raise ValueError("UNet config: encoder_hid_dim_type 'text_proj' needs encoder_hid_dim (the text "
                             "encoder's width, 4096 for IF's T5-XXL)")
        heads = self.addition_embed_type_num_heads
        if self.addition_embed_type == "text" and (not self.has_cross_attention or self.context_dim % heads):
            raise ValueError(f"UNet config: addition_embed_type 'text' pools the text states ({self.context_dim} "
                             f"wide) with addition_embed_type_num_heads={heads} heads: it needs cross-attention "
                             "blocks and a width the heads divide")
        if self.cross_attention_norm not in (None, "group_norm"):
            raise ValueError(f"UNet config: unsupported cross_attention_norm {self.cross_attention_norm!r}; valid: "
                             "None or 'group_norm' (DeepFloyd IF's)")
        if self.cross_attention_norm and self.cross_attention_dim % 32:
            raise ValueError(f"UNet config: cross_attention_norm 'group_norm' takes 32 groups of the text's "
                             f"{self.cross_attention_dim} channels (cross_attention_dim): not divisible")
        if self.mid_block_only_cross_attention not in (None, True, False):
            raise ValueError("UNet config: mid_block_only_cross_attention must be None, true or false; "
                             f"got {self.mid_block_only_cross_attention!r}")

    def _check_glide_heads(self) -> None:
        """GLIDE attention blocks' heads are attention_head_dim wide (`glide_head_dim`), and must fill the channels
        (diffusers' AttnAddedKVProcessor reshapes the heads' output to the channels)."""
        if self.num_attention_heads is not None:
            raise ValueError("UNet config: num_attention_heads is not supported with the GLIDE attention blocks "
                             f"({', '.join(GLIDE_ATTENTION_TYPES)}), whose attention_head_dim is each head's width")
        for d in self._per_level(self.attention_head_dim):
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise ValueError(f"UNet config: attention_head_dim must be positive integers (each head's "
                                 f"width in the GLIDE attention blocks); got {d!r}")
        rev = tuple(reversed(self.block_out_channels))
        blocks = [*zip(self.down_block_types, self.block_out_channels, range(self.num_levels)),
                  *zip(self.up_block_types, rev, range(self.num_levels)),
                  (self.mid_block_type, self.block_out_channels[-1], -1)]
        for kind, c, i in blocks:
            if kind in GLIDE_ATTENTION_TYPES and c % self.glide_head_dim(i):
                raise ValueError(f"UNet config: a {kind} of {c} channels cannot be split into attention heads "
                                 f"{self.glide_head_dim(i)} wide (attention_head_dim)")

    # -- derived values ------------------------------------------------------------------------
    def _per_level(self, v) -> tuple:
        return tuple(v) if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers: `num_attention_heads or attention_head_dim`)."""
        return self._per_level(self.num_attention_heads if self.num_attention_heads is not None
                               else self.attention_head_dim)

    @property
    def attention_levels(self) -> frozenset[int]:
        """The levels whose blocks have transformers: a cross-attention down block, or the mirrored up block,
        and the last level when the mid block has attention."""
        n = self.num_levels
        levels = {i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"}
        levels |= {n - 1 - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"}
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            levels.add(n - 1)
        return frozenset(levels)

    def glide_head_dim(self, index: int) -> int:
        """The head width of a GLIDE attention block: attention_head_dim of the down block `index` (-1: the mid
        block's, the last level's). diffusers indexes the up blocks' by their own index too, not by the mirrored
        level, and so do we (the same whenever attention_head_dim is one number, as in IF and Karlo)."""
        return self._per_level(self.attention_head_dim)[index]

    @property
    def mid_only_cross(self) -> bool:
        """Whether the GLIDE mid block's attention reads the text alone: mid_block_only_cross_attention, or
        only_cross_attention where that is one bool (diffusers' rule)."""
        if self.mid_block_only_cross_attention is not None:
            return self.mid_block_only_cross_attention
        return self.only_cross_attention if isinstance(self.only_cross_attention, bool) else False

    @property
    def context_dim(self) -> int:
        """The width of the text states the U-Net takes: encoder_hid_dim when a linear maps them to
        cross_attention_dim (IF's "text_proj"), else cross_attention_dim."""
        return self.encoder_hid_dim if self.encoder_hid_dim_type == "text_proj" else self.cross_attention_dim

    @property
    def refiner_heads(self) -> int:
        """The context refiner's heads: context_refiner_heads, else 64-wide heads."""
        return self.context_refiner_heads or max(1, self.cross_attention_dim // 64)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        """How much the contracting path shrinks a map. Inputs need not be multiples of it: where a
        stride-2 convolution rounds an odd size up, the upsampler returns to the skip's size (as diffusers'
        `upsample_size`), so any latent size runs, as in diffusers and AUTOMATIC1111."""
        return 2 ** (self.num_levels - 1)

    @property
    def has_cross_attention(self) -> bool:
        return any(_has_attention(t) for t in self._block_types)

    # -- dict round trip -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """From a diffusers unet/config.json dict: known fields are used, keys of features we do not
        implement must hold their "off" value (else ValueError), other keys are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k in FIXED_KEYS and not _same(v, FIXED_KEYS[k]):
                raise ValueError(f"UNet config: {k}={v!r} is not supported by imagine's UNet2DConditionModel "
                                 f"(only {FIXED_KEYS[k]!r})")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, off in EXTENSIONS_OFF.items():
            if d[k] == off:
                del d[k]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    # -- the released shapes ----------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json): CLIP ViT-L/14
        context (768), 8 heads per level, 1x1-conv projections, 64x64 latents (512 px)."""
        return cls(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1, the 768-v model): OpenCLIP ViT-H
        context (1024), heads (5, 10, 20, 20) i.e. 64 channels per head, linear projections,
        attention upcast to fp32, 96x96 latents (768 px)."""
        return cls(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json; Podell et al.
        2023, sec. 2.1): three levels, no attention on the first, 1/2/10 transformer layers per block, 64-channel
        heads, linear projections, the two text towers' 768 + 1280 = 2048-wide context, the pooled 1280-wide
        vector and six 256-wide size codes added to the time embedding, 128x128 latents (1024 px)."""
        return cls(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                   layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                   transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=1280 + 6 * 256)


# diffusers' UNet2DModel (the unconditional / class-conditional U-Net: Karlo's super-resolution stages): its config
# keys, the levels it may have here (no text: the residual levels of LDM and ADM) and its mid block.
UNET_2D_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_dim",
                "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types",
                "block_out_channels", "layers_per_block", "mid_block_scale_factor", "downsample_padding", "dropout",
                "act_fn", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
                "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds")
UNET_2D_DOWN_BLOCK_TYPES = ("DownBlock2D", "ResnetDownsampleBlock2D")
UNET_2D_UP_BLOCK_TYPES = ("UpBlock2D", "ResnetUpsampleBlock2D")
UNET_2D_CLASS_EMBED_TYPES = (None, "timestep", "identity")


@dataclass
class UNet2DConfig(UNetConfig):
    """diffusers' `UNet2DModel` config (its field names and defaults): the DDPM / ADM U-Net without text, the time
    embedding (and an optional class embedding) its only condition. Its mid block is "UNetMidBlock2D": resnet,
    self-attention over the map (`add_attention`; heads attention_head_dim wide, None: one head), resnet. Its levels
    here are those without attention (DownBlock2D / UpBlock2D, ADM's ResnetDownsampleBlock2D / ResnetUpsampleBlock2D:
    Karlo's super-resolution U-Nets); diffusers' Attn*Block2D, skip and k-diffusion levels are refused, as are the
    Fourier and learned time embeddings. downsample_type / upsample_type change only the refused Attn levels, and are
    ignored."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    attention_head_dim: int | None = 8
    add_attention: bool = True
    attn_norm_num_groups: int | None = None

    _mid_block_types = ("UNetMidBlock2D", None)

    def __post_init__(self):
        for kind, valid in (("down", UNET_2D_DOWN_BLOCK_TYPES), ("up", UNET_2D_UP_BLOCK_TYPES)):
            for t in tuple(getattr(self, f"{kind}_block_types")):
                if t not in valid:
                    raise ValueError(f"UNet2DModel config: unsupported {kind} block type {t!r}; valid: "
                                     f"{', '.join(valid)}")
        if self.mid_block_type not in self._mid_block_types:
            raise ValueError(f"UNet2DModel config: mid_block_type must be 'UNetMidBlock2D' or None; got "
                             f"{self.mid_block_type!r}")
        if self.act_fn != "silu":  # (diffusers' UNet2DModel takes SiLU for its time MLP and output whatever act_fn)
            raise ValueError(f"UNet2DModel config: act_fn {self.act_fn!r} is not supported (only 'silu')")
        if self.class_embed_type not in UNET_2D_CLASS_EMBED_TYPES:
            raise ValueError(f"UNet2DModel config: unsupported class_embed_type {self.class_embed_type!r}; valid: "
                             f"{UNET_2D_CLASS_EMBED_TYPES}")
        super().__post_init__()
        c = self.block_out_channels[-1]
        d = self.attention_head_dim
        if self.mid_block_type is not None and self.add_attention:
            if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1 or c % d):
                raise ValueError(f"UNet2DModel config: the mid block's {c} channels cannot be split into attention "
                                 f"heads {d!r} wide (attention_head_dim)")
            g = self.attn_norm_num_groups
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g):
                raise ValueError(f"UNet2DModel config: attn_norm_num_groups {g!r} does not divide the mid block's "
                                 f"{c} channels")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNet2DConfig":
        """From a diffusers UNet2DModel config.json dict: its keys used, the time embedding checked to be the
        sinusoidal one, other keys ignored."""
        kind = d.get("time_embedding_type", "positional")
        if kind != "positional":
            raise ValueError(f"UNet2DModel config: time_embedding_type {kind!r} is not supported (only 'positional')")
        return cls(**{k: v for k, v in d.items() if k in UNET_2D_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """UNet2DModel's keys alone (so diffusers reads the folder as it wrote it)."""
        d = super().to_dict()
        return {k: d[k] for k in UNET_2D_KEYS}


def _add_residual(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """h + a ControlNet's residual, either of which may hold one copy of a guidance batch the other holds k of."""
    rows = max(h.shape[0], residual.shape[0])
    return expand_batch(h, rows) + expand_batch(residual.to(h.dtype), rows)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """Residual block with the time embedding injected between its two convolutions
    (DDPM appendix B; the Wide-ResNet block with GroupNorm):

        h = conv1(act(GN1(x))) + W act(emb);  h = conv2(dropout(act(GN2(h))));  out = (skip(x) + h) / s

    `time_scale_shift` "scale_shift" is ADM's adaptive group norm (Dhariwal & Nichol 2021, sec. 3, AdaGN):
    (y_s, y_b) = W act(emb),  h = conv2(dropout(act(GN2(conv1(act(GN1(x)))) (1 + y_s) + y_b))).
    `resample` "down" / "up" is ADM's BigGAN-style resampling residual block: both x and act(GN1(x)) are
    resampled before conv1 (`imagine.models.adm_blocks.resample`). The caller passes act(emb) as `emb_act`, or emb
    itself where the U-Net skips that act (diffusers' resnet_skip_time_act)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, act_fn: str,
                 dropout: float = 0.0, output_scale_factor: float = 1.0, time_scale_shift: str = "default",
                 resample: str | None = None):
        super().__init__()
        if time_scale_shift not in TIME_SCALE_SHIFTS or resample not in RESAMPLE_MODES:
            raise ValueError(f"ResnetBlock: time_scale_shift must be one of {TIME_SCALE_SHIFTS} and resample one of "
                             f"{RESAMPLE_MODES}; got {time_scale_shift!r}, {resample!r}")
        self.act_fn = act_fn
        self.act = activation(act_fn)
        self.act_ = activation(act_fn, inplace=True)
        self.output_scale_factor = output_scale_factor
        self.scale_shift = time_scale_shift == "scale_shift"
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout if self.scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _act_of_norm(self, norm: nn.GroupNorm, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """act(norm(x)) at inference: SiLU's in one kernel with the norm on bf16 maps (`group_norm`)."""
        if self.act_fn == "silu":
            return silu_of_norm(norm, x, inplace=inplace)
        return self.act_(norm(x))

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """emb_act: act(time embedding) [B, temb], computed once per forward by the U-Net; `size`: the map size an
        upsampling block reaches where it is not twice x's (`resample`)."""
        grad = torch.is_grad_enabled()
        h = self.act(self.norm1(x)) if grad else self._act_of_norm(self.norm1, x)
        if self.resample is not None:
            h, x = resample(h, self.resample, size), resample(x, self.resample, size)
        h = self.conv1(h)
        e = self.time_emb_proj(emb_act)
        if e.shape[0] != h.shape[0]:  # a guidance batch: per-copy embeddings part its copies here;
            n = max(h.shape[0], e.shape[0])  # after they parted, the shared embedding serves every copy
            h, x, e = expand_batch(h, n), expand_batch(x, n), expand_batch(e, n)
        h = self.conv2(self.dropout(self._time_conditioned(h, e[:, :, None, None], grad)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if grad:
            out = skip + h
            return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor
        # Inference: the residual sums go in place into the block's own intermediates, which saves
        # allocating (and page-faulting) a full feature map per step on a CPU.
        h += skip
        if self.output_scale_factor != 1.0:
            h /= self.output_scale_factor
        return h

    def _time_conditioned(self, h: torch.Tensor, e: torch.Tensor, grad: bool) -> torch.Tensor:
        """act(GN2(h + e)) (DDPM), or with scale_shift act(GN2(h) (1 + y_s) + y_b), (y_s, y_b) = e (ADM's AdaGN).
        Without autograd h (the block's own conv output) is overwritten."""
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
            return self.act(h) if grad else self.act_(h)
        if grad:
            return self.act(self.norm2(h + e))
        h += e
        return self._act_of_norm(self.norm2, h, inplace=True)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. `padding` 1 is symmetric; 0 pads only right and bottom (LDM's layout)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (DDPM appendix B)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`size`: the map size to reach, where it is not twice x's (an odd size on the way down, whose
        stride-2 convolution rounded it: diffusers' `upsample_size`)."""
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class _Checkpointable(nn.Module):
    gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


def _transformer(cfg: UNetConfig, channels: int, heads: int, layers: int, only_cross: bool) -> SpatialTransformer:
    # no dropout inside the attention blocks: diffusers' CrossAttnDownBlock2D / CrossAttnUpBlock2D /
    # UNetMidBlock2DCrossAttn build their Transformer2DModel without it (as LDM's SpatialTransformer is built), so
    # the config's `dropout` is the residual blocks' alone
    return SpatialTransformer(channels, heads, channels // heads, cfg.cross_attention_dim, layers,
                              cfg.norm_num_groups, cfg.use_linear_projection, only_cross, cfg.upcast_attention,
                              0.0, cfg.attention_position_embedding)


def _resnet(cfg: UNetConfig, cin: int, cout: int, adm: bool, output_scale_factor: float | None = None,
            resample: str | None = None) -> ResnetBlock:
    """A residual block of the config: every block type takes resnet_time_scale_shift; diffusers gives
    resnet_out_scale_factor to the ADM levels only (the mid blocks take mid_block_scale_factor)."""
    if output_scale_factor is None:
        output_scale_factor = cfg.resnet_out_scale_factor if adm else 1.0
    return ResnetBlock(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.dropout,
                       output_scale_factor, cfg.resnet_time_scale_shift, resample)


def _attention(cfg: UNetConfig, kind: str, channels: int, level: int, index: int, only_cross: bool) -> nn.Module:
    """The attention after a residual block: LDM's spatial transformer (CrossAttn* blocks; `level`'s heads) or
    GLIDE's attention over the map and the text (SimpleCrossAttn* blocks; heads attention_head_dim[index] wide)."""
    if kind in GLIDE_ATTENTION_TYPES:
        d = cfg.glide_head_dim(index)
        return AddedKVAttention(channels, channels // d, d, cfg.cross_attention_dim, cfg.norm_num_groups,
                                only_cross, cfg.cross_attention_norm == "group_norm")
    return _transformer(cfg, channels, cfg.heads_per_block[level],
                        cfg._per_level(cfg.transformer_layers_per_block)[level], only_cross)


def _map_attention(cfg: "UNet2DConfig", channels: int) -> AddedKVAttention:
    """UNet2DModel's mid-block attention (diffusers' UNetMidBlock2D): self-attention over the map, heads
    attention_head_dim wide (None: one head), the output rescaled by mid_block_scale_factor; group-normalised with
    attn_norm_num_groups groups, or by default norm_num_groups, except under AdaGN ("scale_shift"), where diffusers
    builds no norm there."""
    d = cfg.attention_head_dim or channels
    groups = cfg.attn_norm_num_groups
    if groups is None and cfg.resnet_time_scale_shift == "default":
        groups = cfg.norm_num_groups
    return AddedKVAttention(channels, channels // d, d, None, groups, eps=cfg.norm_eps,
                            rescale_output_factor=cfg.mid_block_scale_factor)


def _has_attention(kind: str | None) -> bool:
    return kind is not None and "CrossAttn" in kind


class DownBlock(_Checkpointable):
    """One level of the contracting path: residual blocks, each followed by attention on attention levels, then a
    downsampler. Every intermediate output is kept as a skip for the expanding path.

    LDM's levels (diffusers' CrossAttnDownBlock2D / DownBlock2D): spatial transformers, a stride-2 convolution.
    ADM's (ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D): GLIDE's attention, and a residual block that
    average-pools inside (BigGAN's, Dhariwal & Nichol 2021 sec. 3)."""

    def __init__(self, cfg: UNetConfig, level: int, cin: int, cout: int):
        super().__init__()
        kind = cfg.down_block_types[level]
        adm = kind in ADM_DOWN_BLOCK_TYPES
        n = cfg._per_level(cfg.layers_per_block)[level]
        self.resnets = nn.ModuleList([_resnet(cfg, cin if i == 0 else cout, cout, adm) for i in range(n)])
        only_cross = cfg._per_level(cfg.only_cross_attention)[level]
        self.attentions = nn.ModuleList([_attention(cfg, kind, cout, level, level, only_cross) for _ in range(n)]) \
            if _has_attention(kind) else None
        self.downsamplers = None if level == cfg.num_levels - 1 else nn.ModuleList([
            _resnet(cfg, cout, cout, adm, resample="down") if adm else Downsample(cout, cfg.downsample_padding)])

    def forward(self, x, emb_act, context, mask):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, emb_act)
            if self.attentions is not None:
                x = self._run(self.attentions[i], x, context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            x = self._run(down, x, emb_act) if isinstance(down, ResnetBlock) else down(x)
            skips.append(x)
        return x, skips


class MidBlock(_Checkpointable):
    """The bottleneck: resnet, attention, resnet. LDM's (diffusers' UNetMidBlock2DCrossAttn) transformer always
    has self-attention (diffusers does not pass only_cross_attention there); GLIDE's (UNetMidBlock2DSimpleCrossAttn)
    attention follows `mid_only_cross`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, kind = cfg.block_out_channels[-1], cfg.mid_block_type
        adm = kind in ADM_BLOCK_TYPES
        self.resnets = nn.ModuleList([
            _resnet(cfg, c, c, adm, output_scale_factor=cfg.mid_block_scale_factor) for _ in range(2)])
        if kind == "UNetMidBlock2D":  # (UNet2DModel's: self-attention over the map alone, or none)
            self.attentions = nn.ModuleList([_map_attention(cfg, c)]) if cfg.add_attention else None
        else:
            self.attentions = nn.ModuleList([
                _attention(cfg, kind, c, cfg.num_levels - 1, -1, cfg.mid_only_cross if adm else False)])

    def forward(self, x, emb_act, context, mask):
        x = self._run(self.resnets[0], x, emb_act)
        if self.attentions is not None:
            x = self._run(self.attentions[0], x, context, mask)
        return self._run(self.resnets[1], x, emb_act)


class UpBlock(_Checkpointable):
    """One level of the expanding path: layers_per_block + 1 residual blocks, each taking the previous output
    concatenated (on channels) with the next skip, each followed by attention on attention levels, then an
    upsampler: LDM's (diffusers' CrossAttnUpBlock2D / UpBlock2D) nearest x2 and a convolution, ADM's
    (ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D) a residual block that upsamples inside."""

    def __init__(self, cfg: UNetConfig, i: int):
        super().__init__()
        rev = tuple(reversed(cfg.block_out_channels))
        level = cfg.num_levels - 1 - i  # the mirrored down level
        kind = cfg.up_block_types[i]
        adm = kind in ADM_UP_BLOCK_TYPES
        cout, cprev = rev[i], rev[max(i - 1, 0)]
        cskip_last = rev[min(i + 1, cfg.num_levels - 1)]  # the skip from the level below (or conv_in)
        n = cfg._per_level(cfg.layers_per_block)[level] + 1
        self.resnets = nn.ModuleList([
            _resnet(cfg, (cprev if j == 0 else cout) + (cskip_last if j == n - 1 else cout), cout, adm)
            for j in range(n)])
        only_cross = cfg._per_level(cfg.only_cross_attention)[level]
        self.attentions = nn.ModuleList([_attention(cfg, kind, cout, level, i, only_cross) for _ in range(n)]) \
            if _has_attention(kind) else None
        self.upsamplers = None if i == cfg.num_levels - 1 else nn.ModuleList([
            _resnet(cfg, cout, cout, adm, resample="up") if adm else Upsample(cout)])

    def forward(self, x, skips, emb_act, context, mask, size=None):
        for j, resnet in enumerate(self.resnets):
            skip = skips[-1 - j]
            n = max(x.shape[0], skip.shape[0])  # a skip from before a guidance batch parted
            x = torch.cat([expand_batch(x, n), expand_batch(skip, n)], dim=1)
            x = self._run(resnet, x, emb_act)
            if self.attentions is not None:
                x = self._run(self.attentions[j], x, context, mask)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            x = self._run(up, x, emb_act, size) if isinstance(up, ResnetBlock) else up(x, size)
        return x


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------
class UNet2DConditionModel(nn.Module):
    """eps/x0/v-prediction network f(x_t, t, context) of latent diffusion; see the module docstring."""

    config_class = UNetConfig
    diffusers_class = "UNet2DConditionModel"  # (config.json's _class_name)
    # the activation of the "timestep" class embedding's MLP: None = the config's act_fn (diffusers' U-Net);
    # the ControlNet's is SiLU whatever act_fn (diffusers' ControlNetModel)
    class_embedding_act_fn: str | None = None

    def __init__(self, config: UNetConfig | dict | None = None, encoder_only: bool = False):
        """`encoder_only`: the embeddings, conv_in, the contracting path and the bottleneck, no expanding path
        (what a ControlNet copies of the U-Net, imagine.models.controlnet)."""
        super().__init__()
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        self.config = c = config if config is not None else self.config_class()
        ch = c.block_out_channels
        self.act = activation(c.act_fn)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_proj = SinusoidalTimesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, c.act_fn, cond_dim=c.time_cond_proj_dim)
        self.class_embedding = make_class_embedding(c.class_embed_type, c.num_class_embeds,
                                                    c.projection_class_embeddings_input_dim, c.time_embed_dim,
                                                    ch[0], self.class_embedding_act_fn or c.act_fn)
        if c.addition_embed_type == "text_time":  # SDXL: pooled text + size codes, added to the time embedding
            self.add_time_proj = SinusoidalTimesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            # (diffusers builds this MLP with its default SiLU, whatever the config's act_fn)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim, "silu")
        elif c.addition_embed_type == "text":  # IF: the attention-pooled text states, added to the time embedding
            self.add_embedding = TextTimeEmbedding(c.context_dim, c.time_embed_dim, c.addition_embed_type_num_heads)
        # IF: after the embeddings are summed (diffusers' time_embed_act; no parameters)
        self.time_embed_act = activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None
        # IF: the text encoder's states (T5-XXL: 4096 wide) -> cross_attention_dim, for every attention layer
        self.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.cross_attention_dim) \
            if c.encoder_hid_dim_type == "text_proj" else None
        self.context_refiner = (ContextRefiner(c.cross_attention_dim, c.context_refiner_layers, c.refiner_heads)
                                if c.context_refiner_layers and c.has_cross_attention else None)
        self.down_blocks = nn.ModuleList([DownBlock(c, i, ch[max(i - 1, 0)], ch[i]) for i in range(c.num_levels)])
        self.mid_block = MidBlock(c) if c.mid_block_type is not None else None
        if encoder_only:
            return
        self.up_blocks = nn.ModuleList([UpBlock(c, i) for i in range(c.num_levels)])
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def shares_guidance_batch(self) -> bool:
        """Whether `forward` takes a guidance batch (x of B rows, context of k*B): with cross-attention."""
        return self.config.has_cross_attention

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def enable_gradient_checkpointing(self, on: bool = True) -> "UNet2DConditionModel":
        """Recompute each residual block and transformer in the backward pass (training memory)."""
        for m in self.modules():
            if isinstance(m, _Checkpointable):
                m.gradient_checkpointing = on
        return self

    # -- the denoiser call (docs/DESIGN.md) ------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in_channels, H, W] (any H, W); t a scalar or [B]
        (training-timestep units, may be fractional); context [B, L, cross_attention_dim] (IF's: [B, L,
        encoder_hid_dim], the text encoder's states); context_mask [B, L] bool, True = attend to that token (in
        the attention layers; IF's pooled text and text norm read every token, as diffusers');
        class_labels per config.class_embed_type;
        text_embeds [B, D] and time_ids [B, 6] for addition_embed_type "text_time" (SDXL: the pooled text
        vector, and the original size, crop corner and target size, each (height, width));
        timestep_cond [B, time_cond_proj_dim] for a guidance-distilled LCM (its guidance-scale code,
        imagine.models.embeddings.guidance_scale_embedding); left out (None) on such a U-Net, cond_proj adds
        nothing, as in diffusers' TimestepEmbedding (`if condition is not None`);
        down_block_additional_residuals (one per skip, conv_in's first) and mid_block_additional_residual: a
        ControlNet's outputs, added to the skips and to the bottleneck's output (Zhang et al. 2023, eq. 4).
        Returns [B, out_channels, H, W] in x's dtype (the network runs in its weights' dtype).

        A guidance batch: context (and class_labels, if any) of k*B rows with x and t of B rows is
        the call on torch.cat([x] * k) and torch.cat([t] * k) (classifier-free guidance: k = 2, the
        rows [uncond; cond]). The copies share every layer before the first one that sees a per-copy
        input (the class embedding, else the first cross-attention: in SD, conv_in, the first
        residual block and the first self-attention over the largest map), which then run once."""
        out_dtype = x.dtype
        x, emb_act, context, mask, rows = self.embed(x, t, context, context_mask, class_labels, text_embeds, time_ids,
                                                     timestep_cond)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb_act, context, mask)
            skips.extend(s)
        if self.mid_block is not None:
            h = self.mid_block(h, emb_act, context, mask)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals: {len(down_block_additional_residuals)} tensors for "
                                 f"this U-Net's {len(skips)} skips")
            skips = [_add_residual(s, r) for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = _add_residual(h, mid_block_additional_residual)
        for block in self.up_blocks:
            n = len(block.resnets)
            size = tuple(skips[-n - 1].shape[-2:]) if len(skips) > n else None  # the next level's skip's size
            h = block(h, skips[-n:], emb_act, context, mask, size)
            del skips[-n:]
        return expand_batch(self.conv_out(self.act(self.conv_norm_out(h))), rows).to(out_dtype)

    def embed(self, x, t, context=None, context_mask=None, class_labels=None, text_embeds=None, time_ids=None,
              timestep_cond=None):
        """The inputs checked and embedded, as the contracting path takes them: (x in the weights' dtype,
        act(time embedding + any class / SDXL / IF text embedding), context (through encoder_hid_proj, if any), the
        key padding mask, the rows of the call:
        k * B for a guidance batch). `timestep_cond` None on a U-Net with time_cond_proj_dim leaves cond_proj out,
        as diffusers does (its ControlNets and plain calls run so)."""
        c = self.config
        t, context, context_mask = self._check_inputs(x, t, context, context_mask)
        rows = x.shape[0] if context is None else context.shape[0]  # k * B for a guidance batch
        # Compute in the weights' dtype (e.g. bf16) and answer in the caller's (samplers keep fp32).
        x = x.to(self.dtype)
        if context is not None:
            context = context.to(x.dtype)
        # Time embedding (DDPM appendix B): sinusoidal code in float32, then the MLP in the model's dtype.
        code = self.time_proj(t).to(x.dtype)
        if timestep_cond is not None:  # an LCM's guidance code, added to the time's code (diffusers' TimestepEmbedding)
            timestep_cond = self._timestep_cond(timestep_cond, x, rows)
            emb = self.time_embedding(expand_batch(code, timestep_cond.shape[0]), timestep_cond)
        else:
            emb = self.time_embedding(code)
        if self.class_embedding is not None:
            class_emb = self._class_embedding(class_labels, x, rows)
            emb = expand_batch(emb, class_emb.shape[0]) + class_emb
        elif class_labels is not None:
            raise ValueError("class_labels given, but this UNet has no class embedding (config.class_embed_type "
                             "and num_class_embeds are None)")
        emb = self._added_embedding(emb, text_embeds, time_ids, context, x, rows)
        if self.time_embed_act is not None:  # IF: once, on the sum
            emb = self.time_embed_act(emb)
        # every residual block applies act() before its projection (ADM blocks with resnet_skip_time_act: not)
        emb_act = emb if c.resnet_skip_time_act else self.act(emb)
        mask = key_padding_mask(context_mask)
        if self.encoder_hid_proj is not None:  # IF: the encoder's width -> cross_attention_dim (after the pooling)
            context = self.encoder_hid_proj(context)
        if self.context_refiner is not None:
            context = self.context_refiner(context, mask)
        if c.center_input_sample:
            x = 2 * x - 1.0
        return x, emb_act, context, mask, rows

    def _added_embedding(self, emb, text_embeds, time_ids, context, x: torch.Tensor, rows: int) -> torch.Tensor:
        """emb plus SDXL's embedding of the pooled text and size numbers ("text_time"), or IF's attention-pooled
        text states ("text": from the encoder's states before encoder_hid_proj, every token counted, as diffusers
        pools them unmasked), per config.addition_embed_type."""
        kind = self.config.addition_embed_type
        if kind != "text_time" and (text_embeds is not None or time_ids is not None):
            raise ValueError(f"text_embeds / time_ids given, but this UNet takes no such conditioning "
                             f"(config.addition_embed_type is {kind!r}; SDXL's is 'text_time')")
        if kind is None:
            return emb
        add = self._text_time_embedding(text_embeds, time_ids, x, rows) if kind == "text_time" \
            else self.add_embedding(context)
        return expand_batch(emb, add.shape[0]) + add

    def _timestep_cond(self, cond, x: torch.Tensor, rows: int) -> torch.Tensor:
        """An LCM's guidance code [B or rows, time_cond_proj_dim] checked, in x's dtype."""
        d = self.config.time_cond_proj_dim
        if d is None:
            raise ValueError("timestep_cond given, but this UNet takes no guidance-scale code "
                             "(config.time_cond_proj_dim is None; a guidance-distilled LCM's is e.g. 256)")
        b = x.shape[0]
        if not torch.is_tensor(cond) or cond.ndim != 2 or cond.shape[1] != d or cond.shape[0] not in (b, rows):
            got = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            batch = f", or [{rows}, {d}] for the guidance batch" if rows != b else ""
            raise ValueError(f"timestep_cond must be a tensor [{b}, {d}] (x's batch by time_cond_proj_dim{batch}); "
                             f"got {got}")
        return cond.to(x.dtype)

    def _text_time_embedding(self, text_embeds, time_ids, x: torch.Tensor, rows: int) -> torch.Tensor:
        """SDXL's added embedding (Podell et al. 2023, sec. 2.2): MLP(cat[pooled text, sinusoidal codes of the
        size numbers]), for x's batch B or a guidance batch's k * B rows. The base model takes six numbers
        (original size, crop corner, target size); the refiner five (original size, crop corner, aesthetic
        score): the MLP's input width, projection_class_embeddings_input_dim, is the pooled width plus their codes."""
        c = self.config
        d, total = c.addition_time_embed_dim, c.projection_class_embeddings_input_dim
        if not torch.is_tensor(text_embeds) or not torch.is_tensor(time_ids):
            raise ValueError(f"this UNet (SDXL's) needs text_embeds [B, {total - 6 * d}] (the pooled text vector) and "
                             f"time_ids [B, 6] (original size, crop corner, target size), or for the refiner "
                             f"[B, {total - 5 * d}] and [B, 5] (original size, crop corner, aesthetic score)")
        b = rows if text_embeds.ndim == 2 and text_embeds.shape[0] == rows else x.shape[0]
        n = time_ids.shape[-1] if time_ids.ndim == 2 else 0
        if text_embeds.ndim != 2 or text_embeds.shape[0] != b or tuple(time_ids.shape) != (b, n) or \
                text_embeds.shape[1] + n * d != total:
            raise ValueError(f"text_embeds [{b}, W] and time_ids [{b}, N] must fill this UNet's added embedding: "
                             f"W + N x {d} = {total} (SDXL base: N = 6, W = {total - 6 * d}; refiner: N = 5, "
                             f"W = {total - 5 * d}); got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        codes = self.add_time_proj(time_ids.flatten().float()).reshape(b, -1)
        return self.add_embedding(torch.cat([text_embeds.to(codes.dtype), codes], dim=-1).to(x.dtype))

    def _class_embedding(self, labels: torch.Tensor | None, x: torch.Tensor, rows: int) -> torch.Tensor:
        """labels of x's batch B, or of `rows` (a guidance batch's k * B) -> the embedding [B or rows, temb]."""
        c = self.config
        b = rows if torch.is_tensor(labels) and labels.ndim >= 1 and labels.shape[0] == rows else x.shape[0]
        kind = c.class_embed_type
        if labels is None:
            raise ValueError(f"this UNet needs class_labels (class_embed_type={kind!r}, "
                             f"num_class_embeds={c.num_class_embeds})")
        if not torch.is_tensor(labels):
            raise TypeError(f"class_labels must be a tensor; got {type(labels).__name__}")
        if kind is None:  # a table of num_class_embeds learned vectors
            if labels.shape != (b,) or labels.dtype.is_floating_point:
                raise ValueError(f"class_labels must be integer class ids of shape [{b}]; "
                                 f"got {tuple(labels.shape)} {labels.dtype}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= c.num_class_embeds):
                raise ValueError(f"class_labels must be in [0, {c.num_class_embeds}); got values "
                                 f"{labels.min().item()}..{labels.max().item()}")
            return self.class_embedding(labels).to(x.dtype)
        if kind == "timestep":  # e.g. a noise-augmentation level (CDM sec. 4.1): same code as t
            labels = self._batch_vector(labels, b, "class_labels")
            return self.class_embedding(self.time_proj(labels).to(x.dtype))
        width = c.time_embed_dim if kind == "identity" else c.projection_class_embeddings_input_dim
        if labels.shape != (b, width):
            raise ValueError(f"class_labels for class_embed_type={kind!r} must have shape [{b}, {width}]; "
                             f"got {tuple(labels.shape)}")
        return self.class_embedding(labels.to(x.dtype)).to(x.dtype)

    @staticmethod
    def _batch_vector(t, b: int, name: str) -> torch.Tensor:
        """A scalar, [1] or [B] number/tensor -> a [B] tensor."""
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"{name} must be a number or a tensor; got {type(t).__name__}")
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a real number tensor; got {t.dtype}")
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"{name} must be a scalar or have shape [{b}] (the batch size of x); "
                             f"got shape {tuple(t.shape)}")
        return t.expand(b)

    def _check_inputs(self, x, t, context, context_mask):
        c = self.config
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c.in_channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a tensor [B, {c.in_channels}, H, W] (in_channels={c.in_channels}); got {got}")
        b = x.shape[0]
        if x.shape[-2] < 1 or x.shape[-1] < 1:
            raise ValueError(f"x must have a height and width of at least 1; got {tuple(x.shape[-2:])}")
        t = self._batch_vector(t, b, "t").to(x.device)
        if not c.has_cross_attention:
            if context is not None or context_mask is not None:
                raise ValueError("this UNet has no cross-attention blocks; pass context=None and context_mask=None")
            return t, None, None
        d = c.context_dim
        if context is None:
            raise ValueError(f"this UNet cross-attends to text: pass context [B, L, {d}]")
        if not torch.is_tensor(context) or context.ndim != 3:
            got = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(f"context must be a tensor [B, L, {d}]; got {got}")
        if context.shape[-1] != d:
            what = "encoder_hid_dim" if c.encoder_hid_dim_type else "cross_attention_dim"
            raise ValueError(f"context width {context.shape[-1]} does not match the UNet's {what} {d}")
        if context.shape[0] != b and (b == 0 or context.shape[0] % b):
            raise ValueError(f"batch mismatch: x has {b} samples but context has {context.shape[0]} (it must have "
                             f"as many, or k times as many for a guidance batch whose k copies share x)")
        if context_mask is not None:
            if not torch.is_tensor(context_mask) or tuple(context_mask.shape) != tuple(context.shape[:2]):
                got = tuple(context_mask.shape) if torch.is_tensor(context_mask) else type(context_mask).__name__
                raise ValueError(f"context_mask must have shape [B, L] = {tuple(context.shape[:2])} "
                                 f"(True = attend); got {got}")
            if context_mask.dtype.is_floating_point:
                raise TypeError("context_mask must be bool (True = keep) or 0/1 integers; "
                                f"got {context_mask.dtype}")
        return t, context, context_mask

    # -- folders (diffusers' layout) -------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        """Write config.json (with _class_name and _imagine_version) and diffusion_pytorch_model.safetensors."""
        io.save_component(self, self.config.to_dict(), folder, self.diffusers_class)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "UNet2DConditionModel":
        """Load a diffusers-layout unet folder (config.json + diffusion_pytorch_model.safetensors or
        model.safetensors), in eval mode."""
        cfg = io.read_config(folder, cls.diffusers_class)
        try:
            config = cls.config_class.from_dict(cfg)
        except ValueError as e:
            raise ValueError(f"{folder}/config.json: {e}") from None
        # Build on the meta device (no init work: the weights are about to be replaced) and let the loaded
        # tensors become the parameters (assign). Not to_empty(): on meta tensors it goes through torch._refs,
        # whose import (torch.fx symbolic shapes) cost a second of every cold start.
        with torch.device("meta"), io.without_random_init():
            model = cls(config)
        path = io.find_weights(folder)
        state = io.load_tensors(path)
        io.load_state_into(model, state, str(path), assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{cls.__name__}.from_pretrained: {left[:3]} not set by the weights")
        return model.to(dtype).eval()


class UNet2DModel(UNet2DConditionModel):
    """diffusers' `UNet2DModel`: the U-Net of DDPM (Ho et al. 2020, appendix B) and ADM without text, f(x_t, t) or
    with a class embedding f(x_t, t, class_labels). Karlo's super-resolution stages (Ramesh et al. 2022, sec. 2.1:
    "two diffusion upsampler models ... 64x64 -> 256x256 -> 1024x1024"; Karlo's 64 -> 256 pair) are such U-Nets of
    ADM's BigGAN residual levels and AdaGN, reading the noisy sample and the upsampled picture on channels. The same
    network as `UNet2DConditionModel`, with its config (`UNet2DConfig`) and diffusers' key names, so a diffusers
    UNet2DModel folder loads with `from_pretrained`."""

    config_class = UNet2DConfig
    diffusers_class = "UNet2DModel"
    class_embedding_act_fn = "silu"  # (diffusers' UNet2DModel builds its "timestep" class MLP with SiLU)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in_channels, H, W]; t a scalar or [B]; class_labels per config.class_embed_type. Returns
        [B, out_channels, H, W] in x's dtype."""
        return super().forward(x, t, class_labels=class_labels)
