"""Embeddings of the diffusion time and of extra conditioning vectors.

- The time t enters the network as a sinusoidal code (Vaswani et al. 2017, sec. 3.5, used for
  t in Ho et al. 2020, appendix B) followed by a two-layer MLP; the result is added into every
  residual block.
- Extra vectors are mapped to the same width and added to that time embedding: a class label
  (nn.Embedding), a second timestep such as the noise level of a super-resolution stage's
  augmented low-res input (Ho et al. 2021, CDM sec. 4.1; Saharia et al. 2022, Imagen sec. 2.5),
  or a CLIP image embedding (Ramesh et al. 2022, unCLIP sec. 2.1: "projecting and adding CLIP
  embeddings to the existing timestep embedding").
- A guidance-distilled latent consistency model (Luo et al. 2023, LCM, sec. 4.2 and Algorithm 1: the U-Net takes
  the guidance scale w as an input) gets w as a sinusoidal code (`guidance_scale_embedding`), which a bias-free
  linear (`TimestepEmbedding.cond_proj`, diffusers' `time_cond_proj_dim`) adds to the time's sinusoidal code
  before the MLP.
- GLIDE (Nichol et al. 2022, sec. 2.3) puts its text transformer's final token embedding in place of ADM's class
  embedding; DeepFloyd IF adds its text encoder's states, attention-pooled to one vector, to the time embedding
  (`TextTimeEmbedding`; diffusers' `addition_embed_type: "text"`).

Module and parameter names follow diffusers (`time_embedding.linear_1`, `class_embedding.*`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}


INPLACE_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "relu": F.relu}


def activation(name: str, inplace: bool = False):
    """The pointwise non-linearity called `name` in a diffusers config; with `inplace`, a version
    that overwrites its argument where torch has one (for inference on tensors we own)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    if inplace and name in INPLACE_ACTIVATIONS:
        return functools.partial(INPLACE_ACTIVATIONS[name], inplace=True)
    return ACTIVATIONS[name]


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of (possibly fractional) timesteps t [B] -> [B, dim], in float32.

    With half = dim // 2 and frequencies w_i = max_period^(-i / (half - freq_shift)), i < half:
        emb(t) = [sin(t w_0), ..., sin(t w_{half-1}), cos(t w_0), ..., cos(t w_{half-1})]
    (Vaswani et al. 2017, sec. 3.5). `flip_sin_to_cos` puts the cosines first (the order of the
    LDM/SD checkpoints); `freq_shift` = 1 is the original DDPM/tensor2tensor spacing,
    0 the LDM one. An odd `dim` gets one zero column at the end.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [B]; got shape {tuple(t.shape)}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"timestep embedding width {dim} is too small for freq_shift {freq_shift}")
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - freq_shift))
    # float32 arguments, as the released checkpoints were trained with.
    args = t.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal code of guidance scales w [B] -> [B, dim] that an LCM distilled with guidance takes
    (diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding, after VDM's model_vdm.py):
    [sin(1000 w f_i), cos(1000 w f_i)] with f_i = 10000^(-i / (half - 1)), sines first, an odd `dim` padded
    with a zero. The callers pass diffusers' w: the classifier-free scale minus 1 (LCM's own w, where w = 0 is
    the prompt alone).

    The frequencies are rounded as diffusers rounds them (float32 log(10000) / (half - 1), then exp of
    i x -that), not as `timestep_embedding` does: at 1000 w ~ 7500 the two roundings part by up to 1e-3 in
    the code."""
    if not torch.is_tensor(w) or w.ndim != 1 or w.dtype == torch.bool or w.is_complex():
        got = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
        raise ValueError(f"guidance scales w must be a real 1-D tensor [B]; got {got}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"guidance embedding width must be at least 4 (time_cond_proj_dim); got {dim}")
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w * 1000.0).float()[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


class SinusoidalTimesteps(nn.Module):
    """`timestep_embedding` as a (parameter-free) module, so the U-Net's `time_proj` reads as in diffusers."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """The MLP after the sinusoidal code: linear -> act -> linear (Ho et al. 2020, appendix B).

    Also used, unchanged, to project arbitrary vectors (unCLIP image embeddings), since it is just
    two linear layers. With `cond_dim` (diffusers' time_cond_proj_dim: a guidance-distilled LCM), a bias-free
    linear `cond_proj` maps a condition vector (`guidance_scale_embedding`) to the code's width and adds it
    to the code before the MLP, where diffusers' TimestepEmbedding adds it."""

    def __init__(self, in_dim: int, dim: int, act_fn: str = "silu", out_dim: int | None = None,
                 cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(self.act(self.linear_1(x)))


CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")


def make_class_embedding(kind: str | None, num_class_embeds: int | None, projection_dim: int | None,
                         time_embed_dim: int, timestep_dim: int, act_fn: str) -> nn.Module | None:
    """The diffusers `class_embedding` module for a config (None when there is none).

    kind (diffusers' `class_embed_type`):
      None + num_class_embeds  integer labels [B] -> a learned table (nn.Embedding)
      "timestep"               a scalar per sample [B] (e.g. a noise-augmentation level) -> the
                               same sinusoidal code as t, then its own MLP (CDM/Imagen)
      "identity"               already time_embed_dim wide [B, time_embed_dim], added as it is
      "projection"             a vector [B, projection_dim] -> MLP (unCLIP image embeddings)
      "simple_projection"      a vector [B, projection_dim] -> one linear layer
    """
    if kind not in CLASS_EMBED_TYPES:
        raise ValueError(f"unsupported class_embed_type {kind!r}; valid: {CLASS_EMBED_TYPES}")
    if kind is None:
        return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
    if kind == "timestep":
        return TimestepEmbedding(timestep_dim, time_embed_dim, act_fn)
    if kind == "identity":
        return nn.Identity()
    if projection_dim is None:
        raise ValueError(f"class_embed_type {kind!r} needs projection_class_embeddings_input_dim "
                         "(the width of the class_labels vectors)")
    if kind == "projection":
        # diffusers builds this MLP with its default SiLU, whatever the config's act_fn.
        return TimestepEmbedding(projection_dim, time_embed_dim, "silu")
    return nn.Linear(projection_dim, time_embed_dim)


class AttentionPooling(nn.Module):
    """Attention pooling of tokens [B, L, D] to one vector [B, D] (CLIP's ResNet head, Radford et al. 2021, as IF
    uses it): a query token, the tokens' mean plus a learned vector, attends over itself and the tokens,

        c = mean(x) + p,  q = c W_q,  K = [c; x] W_k,  V = [c; x] W_v,  out = softmax(q K^T / sqrt(d)) V  (per head).

    Every token counts, padding included (diffusers passes no mask here). Computed in float32: one query."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pooling: width {dim} cannot be split into {heads} heads "
                             "(addition_embed_type_num_heads)")
        self.num_heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim ** 0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        seq = torch.cat([query, x], dim=1)

        def heads(t):  # [B, N, D] -> [B, heads, N, D / heads] in float32
            return t.float().unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(seq)),
                                             heads(self.v_proj(seq)))
        return out.transpose(1, 2).flatten(2)[:, 0].to(x.dtype)


class TextTimeEmbedding(nn.Module):
    """The text states [B, L, D] -> a vector [B, time_embed_dim] added to the time embedding (IF; diffusers'
    `addition_embed_type: "text"`): LayerNorm, attention pooling, a linear to the embedding's width, LayerNorm."""

    def __init__(self, dim: int, time_embed_dim: int, heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.pool = AttentionPooling(heads, dim)
        self.proj = nn.Linear(dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(text))))


# diffusers' UnCLIPTextProjModel config keys and defaults (time_embed_dim and cross_attention_dim have none)
UNCLIP_TEXT_PROJ_DEFAULTS = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768)


class UnCLIPTextProj(nn.Module):
    """unCLIP's decoder conditioning (Ramesh et al. 2022, sec. 2.1: "projecting and adding CLIP embeddings to the
    existing timestep embedding, and by projecting CLIP embeddings into four extra tokens of context that are
    concatenated to the sequence of outputs from the GLIDE text encoder"; diffusers' UnCLIPTextProjModel, its
    parameter names). For a CLIP image embedding z_i [B, D], the caption's CLIP text embedding z_t [B, D] and its
    token states s [B, L, D]:

        e   = W_i z_i + W_t z_t                                   (added to the decoder's time embedding)
        ctx = [ W_c z_i as n tokens ; LayerNorm(W_s s) ]          (the decoder's text, n + L tokens)

    The unconditional side of classifier-free guidance (sec. 2.1: "randomly setting the CLIP embeddings to zero (or
    a learned embedding) 10% of the time") takes the learned embedding in place of z_i (`unconditional`)."""

    def __init__(self, config: dict):
        super().__init__()
        unknown = sorted(k for k in config if not k.startswith("_")
                         and k not in (*UNCLIP_TEXT_PROJ_DEFAULTS, "time_embed_dim", "cross_attention_dim"))
        if unknown:
            raise ValueError(f"unknown UnCLIPTextProjModel config keys {unknown}")
        c = self.config = {**UNCLIP_TEXT_PROJ_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        missing = [k for k in ("time_embed_dim", "cross_attention_dim") if not isinstance(c.get(k), int)]
        if missing:
            raise ValueError(f"UnCLIPTextProjModel config needs integer {missing}")
        d, n, w = c["clip_embeddings_dim"], c["clip_extra_context_tokens"], c["cross_attention_dim"]
        self.extra_tokens = n
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(d))
        self.embedding_proj = nn.Linear(d, c["time_embed_dim"])  # W_t
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(d, c["time_embed_dim"])  # W_i
        self.clip_extra_context_tokens_proj = nn.Linear(d, n * w)  # W_c
        self.encoder_hidden_states_proj = nn.Linear(d, w)  # W_s
        self.text_encoder_hidden_states_norm = nn.LayerNorm(w)

    def unconditional(self, batch: int) -> torch.Tensor:
        """The learned embedding that stands for "no image embedding" [batch, D]."""
        return self.learned_classifier_free_guidance_embeddings[None].expand(batch, -1)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ctx [B, n + L, cross_attention_dim], e [B, time_embed_dim]), in the weights' dtype."""
        dtype = self.embedding_proj.weight.dtype
        image_embeds, text_embeds, states = image_embeds.to(dtype), text_embeds.to(dtype), states.to(dtype)
        b = image_embeds.shape[0]
        e = self.clip_image_embeddings_project_to_time_embeddings(image_embeds) + self.embedding_proj(text_embeds)
        # the n extra tokens: the projection laid out [width, n] (diffusers' reshape(B, -1, n) then permute)
        extra = self.clip_extra_context_tokens_proj(image_embeds).reshape(b, -1, self.extra_tokens).transpose(1, 2)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(states))
        return torch.cat([extra, text], dim=1), e

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "UnCLIPTextProj":
        """A diffusers-layout text_proj folder (config.json + safetensors), in eval mode."""
        from imagine.models import io

        try:
            with io.without_random_init():  # (every weight is loaded next)
                model = cls(io.read_config(folder, "UnCLIPTextProjModel"))
        except ValueError as e:
            raise ValueError(f"{folder}/config.json: {e}") from None
        path = io.find_weights(folder)
        io.load_state_into(model, io.load_tensors(path), str(path))
        return model.to(dtype).eval()
