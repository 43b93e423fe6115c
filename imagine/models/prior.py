"""unCLIP's diffusion prior: a decoder-only transformer that denoises a CLIP image embedding given the caption.

Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with CLIP Latents", sec. 2.2) generate an image
in two stages: a prior P(z_i | y) gives a CLIP image embedding z_i for the caption y, and a decoder P(x | z_i, y)
(here the SD 2.1 unCLIP U-Net, `imagine.pipelines.unclip`) turns it into pixels. Their diffusion prior is "a
decoder-only Transformer with a causal attention mask on a sequence consisting of, in order: the encoded text, the
CLIP text embedding, an embedding for the diffusion timestep, the noised CLIP image embedding, and a final embedding
whose output from the Transformer is used to predict the unnoised CLIP image embedding"; it predicts z_i itself
(x_0), not the noise. Kakao Brain's Karlo, the prior of SD 2.1 unCLIP's text-to-image form, is that model.

Module and parameter names follow diffusers' `PriorTransformer`, so its folders load as they are. The embeddings
it denoises are normalized by the training set's statistics (`clip_mean`, `clip_std`); `unnormalize` takes a
sample back to CLIP's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagine.models import io
from imagine.models.attention import BasicTransformerBlock
from imagine.models.embeddings import SinusoidalTimesteps, TimestepEmbedding

# diffusers' PriorTransformer config keys and defaults (Karlo's values)
PRIOR_DEFAULTS = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                      num_embeddings=77, additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu",
                      norm_in_type=None, embedding_proj_norm_type=None, encoder_hid_proj_type="linear",
                      added_emb_type="prd", time_embed_dim=None, embedding_proj_dim=None, clip_embed_dim=None)
_CHOICES = {"norm_in_type": (None, "layer"), "embedding_proj_norm_type": (None, "layer"),
            "encoder_hid_proj_type": (None, "linear"), "added_emb_type": (None, "prd")}


def prior_config(cfg: dict) -> dict:
    """diffusers' PriorTransformer config.json -> the full config (defaults filled), checked."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in PRIOR_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown PriorTransformer config keys {unknown}; known: {sorted(PRIOR_DEFAULTS)}")
    c = {**PRIOR_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    for key, allowed in _CHOICES.items():
        if c[key] not in allowed:
            raise ValueError(f"PriorTransformer {key}={c[key]!r} is not supported; valid: {list(allowed)}")
    return c


class PriorTransformer(nn.Module):
    """x_0-prediction of a (normalized) CLIP image embedding [B, D] from its noised value x_t at timestep t, the
    caption's CLIP text embedding `proj_embedding` [B, D'] and its token states `context` [B, L, D] (padded tokens
    marked False in `context_mask` [B, L]). The sequence is [tokens; text embedding; time; x_t; learned query], with
    a learned position embedding, through pre-norm blocks under a causal mask; the query's output, normed and
    projected, is the prediction (unCLIP sec. 2.2)."""

    def __init__(self, config: dict):
        super().__init__()
        c = self.config = prior_config(config)
        inner = c["num_attention_heads"] * c["attention_head_dim"]
        time_dim = c["time_embed_dim"] or inner
        proj_dim = c["embedding_proj_dim"] or c["embedding_dim"]
        clip_dim = c["clip_embed_dim"] or c["embedding_dim"]
        self.time_proj = SinusoidalTimesteps(inner, flip_sin_to_cos=True, freq_shift=0.0)
        self.time_embedding = TimestepEmbedding(inner, time_dim, act_fn=c["time_embed_act_fn"], out_dim=inner)
        self.proj_in = nn.Linear(c["embedding_dim"], inner)
        self.embedding_proj_norm = nn.LayerNorm(proj_dim) if c["embedding_proj_norm_type"] == "layer" else None
        self.embedding_proj = nn.Linear(proj_dim, inner)
        self.encoder_hidden_states_proj = (nn.Linear(c["embedding_dim"], inner)
                                           if c["encoder_hid_proj_type"] == "linear" else None)
        tokens = c["num_embeddings"] + c["additional_embeddings"]
        self.positional_embedding = nn.Parameter(torch.zeros(1, tokens, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if c["added_emb_type"] == "prd" else None
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, c["num_attention_heads"], c["attention_head_dim"], None,
                                  dropout=c["dropout"], attention_bias=True, activation="gelu")
            for _ in range(c["num_layers"])])
        self.norm_in = nn.LayerNorm(inner) if c["norm_in_type"] == "layer" else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_dim)
        # the training embeddings' statistics: the prior denoises (z - mean) / std
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_dim))

    @property
    def embedding_dim(self) -> int:
        return self.config["embedding_dim"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, proj_embedding: torch.Tensor,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, dtype = x.shape[0], x.dtype
        w = self.proj_in.weight.dtype  # (reduced-precision weights: the inputs in their dtype, the output in x's)
        x, proj_embedding = x.to(w), proj_embedding.to(w)
        context = None if context is None else context.to(w)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        time = self.time_embedding(self.time_proj(t).to(w))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        parts = []
        if self.encoder_hidden_states_proj is not None:
            if context is None:
                raise ValueError("this prior reads the caption's token states: give context [B, L, D]")
            parts.append(self.encoder_hidden_states_proj(context))
        elif context is not None:
            parts.append(context)
        text_len = sum(p.shape[1] for p in parts)
        parts += [self.embedding_proj(proj_embedding)[:, None], time[:, None], self.proj_in(x)[:, None]]
        if self.prd_embedding is not None:
            parts.append(self.prd_embedding.to(x.dtype).expand(b, -1, -1))
        h = torch.cat(parts, dim=1)
        pos = self.positional_embedding.to(h.dtype)
        if pos.shape[1] < h.shape[1]:  # a position table without the added tokens: zeros for them
            after = 1 if self.prd_embedding is not None else 0
            pos = F.pad(pos, (0, 0, text_len + 2, after))
        h = h + pos
        n = h.shape[1]
        # causal (each token sees itself and those before it), and no padded caption token is seen; without a caption
        # mask, no mask at all, as diffusers runs it (its causal mask comes with the caption's)
        mask = None
        if context_mask is not None:
            keys = F.pad(context_mask.to(torch.bool), (0, n - context_mask.shape[1]), value=True)
            mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None] & keys[:, None, None, :]
        if self.norm_in is not None:
            h = self.norm_in(h)
        for block in self.transformer_blocks:
            h = block(h, self_mask=mask)
        h = self.norm_out(h)
        h = h[:, -1] if self.prd_embedding is not None else h[:, text_len + 2:]
        return self.proj_to_clip_embeddings(h).to(dtype)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """A sample of the prior -> a CLIP image embedding: z std + mean."""
        return z * self.clip_std.to(z) + self.clip_mean.to(z)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "PriorTransformer":
        """A diffusers-layout prior folder (config.json + safetensors), in eval mode."""
        cfg = io.read_config(folder, "PriorTransformer")
        try:
            with io.without_random_init():  # (every weight is loaded next)
                model = cls(cfg)
        except ValueError as e:
            raise ValueError(f"{folder}/config.json: {e}") from None
        path = io.find_weights(folder)
        io.load_state_into(model, io.load_tensors(path), str(path))
        return model.to(dtype).eval()


def scheduler_config(config: dict) -> dict:
    """A prior_scheduler's config as NoiseSchedule reads it. diffusers' UnCLIPScheduler (Karlo's own prior_scheduler)
    has one beta schedule, squaredcos_cap_v2 (Nichol & Dhariwal's cosine), and configs saved before it took a
    `beta_schedule` argument do not name it (Karlo's, diffusers 0.12.0.dev0): read as every other scheduler's default,
    linear, the prior would sample on another schedule (abar_500 0.078 in place of 0.49). Another named schedule is
    refused, as diffusers refuses it."""
    if config.get("_class_name") != "UnCLIPScheduler":
        return config
    kind = config.get("beta_schedule") or "squaredcos_cap_v2"
    if kind != "squaredcos_cap_v2":
        raise ValueError(f"UnCLIPScheduler has the squaredcos_cap_v2 beta schedule only; got {kind!r}")
    return {**config, "beta_schedule": kind}


def timestep_spacing(config: dict) -> str | None:
    """A scheduler config's timestep spacing: diffusers' UnCLIPScheduler (Karlo's prior, decoder and super-resolution
    schedulers) lays its n steps out as round(i (T - 1) / (n - 1)), linspace spacing, whatever its config; another
    scheduler as its config says."""
    return "linspace" if config.get("_class_name") == "UnCLIPScheduler" else config.get("timestep_spacing")


@dataclass
class DiffusionPrior:
    """A prior with what it reads and how it samples: the model, its caption encoder
    (`imagine.models.text_encoders.CLIPPriorTextEncoder`), its training schedule, and its scheduler's settings (a
    diffusers prior_scheduler config: Karlo's DDPM predicts x_0 and clips it to +-clip_sample_range)."""

    model: PriorTransformer
    text_encoder: Any
    schedule: Any
    scheduler_config: dict

    @property
    def sampler(self) -> str:
        from imagine.loading.folder import SCHEDULER_TO_SAMPLER

        return SCHEDULER_TO_SAMPLER.get(self.scheduler_config.get("_class_name", ""), "ddpm")

    @property
    def timestep_spacing(self) -> str | None:
        """The scheduler's timestep spacing (`timestep_spacing`)."""
        return timestep_spacing(self.scheduler_config)

    @property
    def clip_range(self) -> float | None:
        """The range x_0 is clipped to at every step (diffusers' clip_sample / clip_sample_range), else None. It holds
        for whichever prior sampler runs (diffusers' Euler and DPM-Solver schedulers would not clip: a prior's x_0 is
        kept in the range its scheduler was configured for)."""
        c = self.scheduler_config
        # (diffusers' DDPM and DDIM schedulers clip unless told not to)
        clip = c.get("clip_sample", c.get("_class_name") in ("DDPMScheduler", "DDIMScheduler", "UnCLIPScheduler",
                                                              "DDPMParallelScheduler", "DDIMParallelScheduler"))
        return float(c.get("clip_sample_range", 1.0)) if clip else None

    @classmethod
    def from_folder(cls, root, index: dict, dtype: torch.dtype = torch.float32) -> "DiffusionPrior":
        """diffusers' StableUnCLIPPipeline components prior/, prior_text_encoder/, prior_tokenizer/,
        prior_scheduler/ of a model folder."""
        from pathlib import Path

        from imagine.models.text_encoders import CLIPPriorTextEncoder
        from imagine.schedules import NoiseSchedule

        root = Path(root)
        missing = [k for k in ("prior", "prior_text_encoder", "prior_tokenizer", "prior_scheduler") if not index.get(k)]
        if missing:
            raise ValueError(f"{root}: a diffusion prior needs prior, prior_text_encoder, prior_tokenizer and "
                             f"prior_scheduler in model_index.json; missing {missing}")
        te_class = index["prior_text_encoder"][1] if isinstance(index["prior_text_encoder"], list) else None
        if te_class != "CLIPTextModelWithProjection":
            raise ValueError(f"{root}: the prior's text encoder is {te_class!r}; imagine runs "
                             "CLIPTextModelWithProjection (Karlo's, SD 2.1 unCLIP's)")
        model = PriorTransformer.from_pretrained(root / "prior", dtype)
        made = model.config["clip_embed_dim"] or model.embedding_dim
        if made != model.embedding_dim:  # (its x_0 prediction is the next step's sample: one width for both)
            raise ValueError(f"{root / 'prior'}: the prior predicts {made}-wide embeddings (clip_embed_dim) from "
                             f"{model.embedding_dim}-wide samples (embedding_dim); a diffusion prior samples its own "
                             "predictions, so the two must be equal")
        text = CLIPPriorTextEncoder.from_folder(root / "prior_text_encoder", root / "prior_tokenizer", dtype=dtype)
        path = root / "prior_scheduler" / "scheduler_config.json"
        config = io.read_json(path)
        try:
            config = scheduler_config(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        schedule = NoiseSchedule.from_diffusers_config(config)
        widths = {"text embedding": int(text.model.config.projection_dim), "token states": text.dim}
        inner = model.config["num_attention_heads"] * model.config["attention_head_dim"]
        wanted = {"text embedding": model.config["embedding_proj_dim"] or model.embedding_dim,
                  "token states": model.embedding_dim if model.encoder_hidden_states_proj is not None else inner}
        if widths != wanted:
            raise ValueError(f"{root}: the prior's text encoder gives {widths}, its prior reads {wanted}")
        return cls(model, text, schedule, config)
