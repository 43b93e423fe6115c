"""unCLIP's own cascade, as Kakao Brain's Karlo releases it (diffusers' UnCLIPPipeline folders).

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", DALL-E 2) makes an
image from a caption y in three steps (sec. 2 and fig. 2):

1. the prior P(z_i | y) (sec. 2.2): a diffusion over CLIP's image embedding z_i, given the caption's CLIP text
   embedding and token states (`imagine.models.prior`; the same prior SD 2.1 unCLIP's text-to-image form borrows,
   run by the same function, `imagine.pipelines.unclip.prior_embeddings`);
2. the decoder P(x | z_i, y) (sec. 2.1): a GLIDE / ADM pixel U-Net at 64 px (`imagine.models.unet`,
   `imagine.models.adm_blocks`) whose time embedding gets projections of z_i and of the text embedding added, and
   whose text is four tokens projected from z_i before the caption's projected states (`UnCLIPTextProj`); guided by
   classifier-free guidance against the learned "no embedding" vector and the empty caption, with Improved DDPM's
   learned variance (Nichol & Dhariwal 2021, eq. 15);
3. super-resolution (sec. 2.1, after CDM, Ho et al. 2022): the 64 px picture upsampled to 256 px (bicubic with
   antialiasing, as diffusers' F.interpolate call) and concatenated to the noisy sample as input channels of an
   unconditional ADM U-Net (`imagine.models.unet.UNet2DModel`): `super_res_first` for every step but the last,
   `super_res_last` for the last one (Karlo's pair).

Every stage samples with diffusers' UnCLIPScheduler rule: DDPM ancestral steps (Ho et al. 2020, eq. 6-7) on the
strided schedule, timesteps round(i (T - 1) / (n - 1)) ("linspace"), x_0 clipped to +-clip_sample_range, the
posterior variance beta_tilde ("fixed_small_log") or the learned one ("learned_range"), no noise on the step to x_0
(`imagine.sampling.sample`, sampler "ddpm"). The random draws come from the generator in diffusers' order: the
prior's start noise and step noises, the decoder's, the super-resolution stage's, so a seed gives diffusers' picture.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from imagine.pipelines.cascade import _check_count, _check_output, _check_scale, _generator, pictures, \
    thresholding_rule

COMPONENTS = ("prior", "decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder", "tokenizer",
              "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
# diffusers' UnCLIPImageVariationPipeline (kakaobrain/karlo-v1-alpha-image-variations): no prior; CLIP's image tower
VARIATION_COMPONENTS = ("decoder", "text_proj", "super_res_first", "super_res_last", "text_encoder", "tokenizer",
                        "image_encoder", "feature_extractor", "decoder_scheduler", "super_res_scheduler")
# diffusers' UnCLIPPipeline defaults
PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS = 25, 25, 7
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 8.0


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of rows of a and b, as unCLIP moves between CLIP embeddings (Ramesh et
    al. 2022, sec. 3.2-3.3): the direction turned from a's towards b's by the fraction t of the angle omega between
    them, (sin((1 - t) omega) a^ + sin(t omega) b^) / sin(omega), and the norm taken linearly from |a| to |b| (CLIP
    compares embeddings on the sphere; Karlo's decoder reads the tower's unnormalized ones). Rows within 1e-6 rad of
    parallel are interpolated linearly; opposite rows have no one great circle between them: an error."""
    if t in (0, 1):  # (the ends exactly: a path's first and last frames are the two embeddings' own)
        return (a if t == 0 else b).clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if bool(((sin <= 1e-6) & (cos < 0)).any()):
        raise ValueError("slerp: the two embeddings point in opposite directions (no one great circle joins them)")
    turned = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin.clamp_min(1e-12)
    direction = torch.where(sin > 1e-6, turned, (1 - t) * ua + t * ub)
    return direction / direction.norm(dim=-1, keepdim=True) * ((1 - t) * na + t * nb)


@dataclass
class Stage:
    """A pixel stage's sampling settings, from its diffusers scheduler_config.json: the training schedule (its
    variance type included), the timestep spacing and the x_0 rule."""

    config: dict[str, Any]
    schedule: Any

    @classmethod
    def from_config(cls, path) -> "Stage":
        from imagine.models import io
        from imagine.models.prior import scheduler_config
        from imagine.schedules import NoiseSchedule

        try:
            config = scheduler_config(io.read_json(path))
            return cls(config, NoiseSchedule.from_diffusers_config(dict(config)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def sample(self, model, start, *, steps: int, generator, progress: bool, callback, **kwargs) -> torch.Tensor:
        from imagine.models.prior import timestep_spacing
        from imagine.sampling import sample

        return sample(model, start, schedule=self.schedule, sampler="ddpm", steps=steps, generator=generator,
                      timestep_spacing=timestep_spacing(self.config), steps_offset=self.config.get("steps_offset"),
                      progress=progress, callback=callback, **thresholding_rule(self.config), **kwargs)


class LastStepSwitch(torch.nn.Module):
    """`first` for every step of a run but the last, `last` for the last (Karlo's super_res_first / super_res_last);
    the sampler names the step through `at_step(i, n)` before each model call."""

    def __init__(self, first, last):
        super().__init__()
        self.first, self.last = first, last
        self.current = first

    def at_step(self, i: int, n: int) -> None:
        self.current = self.last if i == n - 1 else self.first

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.current(x, t, **cond)


def upsample(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The decoder's picture taken to the super-resolution size as diffusers' UnCLIPPipeline takes it: bicubic,
    corners not aligned, with antialiasing (torch's, whose bicubic kernel is then a = -0.5, PIL's)."""
    return F.interpolate(image, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


def _check_steps(steps, name: str) -> int:
    # (UnCLIPScheduler's spacing divides by n - 1: one step has no layout)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"{name} must be a whole number of at least 2 (UnCLIPScheduler spaces its steps "
                         f"round(i (T - 1) / (n - 1))); got {steps!r}")
    return int(steps)


def _stage_callback(callback, stage: str):
    if callback is None:
        return None
    return lambda info: callback({"stage": stage, **info})


class KarloPipeline:
    """Karlo / DALL-E 2's unCLIP cascade: caption -> CLIP image embedding (prior) -> 64 px (decoder) -> 256 px
    (super-resolution). Load a diffusers UnCLIPPipeline folder with `from_pretrained`, call with a prompt; or an
    UnCLIPImageVariationPipeline folder (no prior, CLIP's image tower: `image_embedder`), `variations(picture)`."""

    def __init__(self, prior, text_proj, decoder, super_res_first, super_res_last, decoder_stage: Stage,
                 super_res_stage: Stage, source: str = "", *, text_encoder=None, image_embedder=None):
        if prior is None and (text_encoder is None or image_embedder is None):
            raise ValueError("Karlo without its prior makes variations of pictures: give the text encoder and the "
                             "image embedder (an UnCLIPImageVariationPipeline folder)")
        self.prior, self.text_proj, self.decoder = prior, text_proj, decoder
        self.super_res_first, self.super_res_last = super_res_first, super_res_last
        self.decoder_stage, self.super_res_stage, self.source = decoder_stage, super_res_stage, source
        self._text_encoder = text_encoder if prior is None else prior.text_encoder
        self.image_embedder = image_embedder  # (imagine.models.image_encoder.ImageEmbedder: CLIP's image tower)
        self._check_widths()

    @property
    def text_encoder(self):
        """The CLIP text tower (with projection) that both the prior and the decoder's text projection read."""
        return self._text_encoder

    def _check_widths(self) -> None:
        c, d = self.text_proj.config, self.decoder.config
        clip = self.prior.model.embedding_dim if self.prior is not None else self.image_embedder.dim
        wanted = {"time_embed_dim": d.time_embed_dim, "cross_attention_dim": d.cross_attention_dim,
                  "clip_embeddings_dim": clip}
        got = {k: c[k] for k in wanted}
        if got != wanted:
            raise ValueError(f"{self.source}: text_proj gives {got}, the decoder and prior read {wanted}")
        if d.class_embed_type != "identity":
            raise ValueError(f"{self.source}: Karlo's decoder adds text_proj's embedding as an 'identity' class "
                             f"embedding; this one has class_embed_type {d.class_embed_type!r}")
        sr = self.super_res_first.config
        if sr.in_channels != 2 * d.in_channels or self.super_res_last.config.in_channels != sr.in_channels:
            raise ValueError(f"{self.source}: the super-resolution U-Nets read the sample and the upsampled picture "
                             f"({2 * d.in_channels} channels); they take {sr.in_channels} and "
                             f"{self.super_res_last.config.in_channels}")

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "KarloPipeline":
        """A diffusers UnCLIPPipeline folder (kakaobrain/karlo-v1-alpha's layout): model_index.json naming prior,
        decoder, text_proj, super_res_first, super_res_last, text_encoder (CLIPTextModelWithProjection), tokenizer
        and the three schedulers; or an UnCLIPImageVariationPipeline folder (kakaobrain/karlo-v1-alpha-image-
        variations'), with image_encoder (CLIPVisionModelWithProjection) and feature_extractor in place of the prior
        and its scheduler."""
        from imagine.models import io
        from imagine.models.embeddings import UnCLIPTextProj
        from imagine.models.image_encoder import ImageEmbedder
        from imagine.models.prior import DiffusionPrior, PriorTransformer
        from imagine.models.text_encoders import CLIPPriorTextEncoder
        from imagine.models.unet import UNet2DConditionModel, UNet2DModel

        root = Path(folder)
        index = io.read_json(root / "model_index.json")
        variation = index.get("_class_name") == "UnCLIPImageVariationPipeline"
        kind, needed = (("UnCLIPImageVariationPipeline", VARIATION_COMPONENTS) if variation
                        else ("UnCLIPPipeline", COMPONENTS))
        missing = [k for k in needed if not index.get(k) or not (root / k).is_dir()]
        if missing:
            raise ValueError(f"{root} is not a complete Karlo / unCLIP folder (diffusers' {kind}): missing "
                             f"{', '.join(missing)} (it needs {', '.join(needed)})")
        te_class = index["text_encoder"][1] if isinstance(index["text_encoder"], list) else None
        if te_class != "CLIPTextModelWithProjection":
            raise ValueError(f"{root}: the text encoder is {te_class!r}; Karlo's is CLIPTextModelWithProjection")
        text = CLIPPriorTextEncoder.from_folder(root / "text_encoder", root / "tokenizer", dtype=dtype)
        prior = image = None
        if variation:  # (the picture's own embedding: no statistics to undo)
            image = ImageEmbedder.from_folder(root, dtype, normalizer=False)
        else:
            prior_stage = Stage.from_config(root / "prior_scheduler" / "scheduler_config.json")
            prior = DiffusionPrior(PriorTransformer.from_pretrained(root / "prior", dtype), text,
                                   prior_stage.schedule, prior_stage.config)
        return cls(prior, UnCLIPTextProj.from_pretrained(root / "text_proj", dtype),
                   UNet2DConditionModel.from_pretrained(root / "decoder", dtype),
                   UNet2DModel.from_pretrained(root / "super_res_first", dtype),
                   UNet2DModel.from_pretrained(root / "super_res_last", dtype),
                   Stage.from_config(root / "decoder_scheduler" / "scheduler_config.json"),
                   Stage.from_config(root / "super_res_scheduler" / "scheduler_config.json"), str(root),
                   text_encoder=text, image_embedder=image)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, num_images_per_prompt: int = 1,
                 prior_steps: int = PRIOR_STEPS, decoder_steps: int = DECODER_STEPS,
                 super_res_steps: int = SUPER_RES_STEPS, prior_guidance_scale: float = PRIOR_GUIDANCE,
                 decoder_guidance_scale: float = DECODER_GUIDANCE, generator=None, seed: int | None = None,
                 output_type: str = "pil", progress: bool = True, callback=None):
        """The prompts' pictures at the super-resolution size (Karlo: 256 px). Steps and guidance scales per stage,
        diffusers' UnCLIPPipeline defaults (25 / 25 / 7 steps, guidance 4 for the prior and 8 for the decoder;
        as diffusers, guidance runs in both stages, each at its own scale, when either scale is > 1, a scale below 1
        then extrapolating towards the unconditional output; the super-resolution stage has none). generator: one
        torch.Generator for the batch, or one per image (seed: an int, for torch.Generator().manual_seed(seed)).
        output_type "pil" (pictures) or "pt" (the samples [B, 3, H, W] in [-1, 1]). callback hears every step as the
        sampler's info with "stage": "prior" / "decoder" / "super_res"."""
        from imagine.pipelines.unclip import prior_embeddings

        if self.prior is None:
            raise ValueError(f"{self.source or 'this Karlo model'} is Karlo's image-variation cascade (no prior): it "
                             "makes variations of a picture (variations(picture)), not pictures from text")
        _check_output(output_type)
        prior_steps = _check_steps(prior_steps, "prior_steps")
        decoder_steps = _check_steps(decoder_steps, "decoder_steps")
        super_res_steps = _check_steps(super_res_steps, "super_res_steps")
        prior_scale, decoder_scale = _check_scale(prior_guidance_scale), _check_scale(decoder_guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: give a string, or a non-empty list of them")
        n = _check_count(num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(n)]
        batch = len(prompts)
        generator = _generator(batch, generator, seed)

        # diffusers' switch: guidance in both stages, each at its own scale, when either scale is > 1 (a scale below
        # 1 then extrapolates towards the unconditional output in its stage; at 1 it is the conditional pass)
        guided = prior_scale > 1.0 or decoder_scale > 1.0

        # the prompts through CLIP's text tower once: the prior and the decoder's projection read the same states
        text = self.text_encoder.encode(prompts)
        empty = self.text_encoder.encode([""] * batch) if guided else None

        # 1. the prior: z_i ~ P(z_i | y), un-normalized (sec. 2.2)
        z = prior_embeddings(self.prior, prompts, generator, None, steps=prior_steps, guidance_scale=prior_scale,
                             sampler="ddpm", progress=progress, callback=callback, guided=guided,
                             encoded=(text, empty))
        x = self._decode(z, text, empty, generator, decoder_steps=decoder_steps, super_res_steps=super_res_steps,
                         decoder_scale=decoder_scale if guided else 1.0, progress=progress, callback=callback)
        return x if output_type == "pt" else pictures(x)

    @torch.no_grad()
    def variations(self, image, *, num_images_per_prompt: int = 1, decoder_steps: int = DECODER_STEPS,
                   super_res_steps: int = SUPER_RES_STEPS, decoder_guidance_scale: float = DECODER_GUIDANCE,
                   generator=None, seed: int | None = None, image_embeddings: torch.Tensor | None = None,
                   output_type: str = "pil", progress: bool = True, callback=None):
        """DALL-E 2's variations of a picture (Ramesh et al. 2022, sec. 3.1, fig. 3: "the bipartite latent
        representation (z_i, x_T)"; the decoder inverted no further than z_i, so x_T is fresh noise): its CLIP image
        embedding z_i (`image_embedder`; or `image_embeddings` [B, D] given, e.g. an interpolation of two, sec.
        3.2) decoded with the empty caption, as diffusers' UnCLIPImageVariationPipeline (its defaults: 25 / 7 steps,
        guidance 8 against the learned no-embedding vector, on when the scale is > 1). image: a PIL picture or a list
        of them; num_images_per_prompt variations of each. The rest as __call__."""
        _check_output(output_type)
        decoder_steps = _check_steps(decoder_steps, "decoder_steps")
        super_res_steps = _check_steps(super_res_steps, "super_res_steps")
        scale = _check_scale(decoder_guidance_scale)
        n = _check_count(num_images_per_prompt)
        if image_embeddings is None:
            images = [image] if not isinstance(image, (list, tuple)) else list(image)
            if not images or any(p is None for p in images):
                raise ValueError("image: give a picture, or a non-empty list of them (or image_embeddings)")
            z = self._embeddings(images)
        else:
            z = image_embeddings.float()
            if z.ndim != 2 or z.shape[1] != self.text_proj.config["clip_embeddings_dim"]:
                raise ValueError(f"image_embeddings: expected [B, {self.text_proj.config['clip_embeddings_dim']}]; "
                                 f"got {list(z.shape)}")
        z = z.repeat_interleave(n, dim=0)
        batch = z.shape[0]
        generator = _generator(batch, generator, seed)
        guided = scale > 1.0
        text = self.text_encoder.encode([""] * batch)  # (the empty caption, conditional and unconditional alike)
        x = self._decode(z, text, text if guided else None, generator, decoder_steps=decoder_steps,
                         super_res_steps=super_res_steps, decoder_scale=scale if guided else 1.0, progress=progress,
                         callback=callback)
        return x if output_type == "pt" else pictures(x)

    def interpolations(self, start, end, *, frames: int = 5, seed: int = 0, **options):
        """DALL-E 2's interpolations between two pictures (Ramesh et al. 2022, sec. 3.2, fig. 4): their CLIP image
        embeddings z_1, z_2, and frames decoded from z_theta = slerp(z_1, z_2, theta) as theta goes from 0 to 1 in
        `frames` steps, every frame from the same noise (`seed`'s: the paper fixes x_T along the trajectory), so the
        first frame is `start`'s variation at that seed and the last `end`'s. options: variations' (decoder_steps,
        super_res_steps, decoder_guidance_scale, output_type, progress, callback)."""
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be a whole number of 2 or more (the two pictures' own); got {frames!r}")
        z = self._embeddings([start, end])
        path = torch.cat([slerp(z[:1], z[1:], k / (frames - 1)) for k in range(frames)])
        return self._frames(path, seed, options)

    def text_diff(self, image, description: str, target: str, *, frames: int = 5, max_theta: float = 0.5,
                  seed: int = 0, **options):
        """DALL-E 2's text diffs (sec. 3.3, fig. 5): a picture changed towards a new caption. With z_t0 the CLIP text
        embedding of `description` (a caption of the picture as it is) and z_t of `target`, the text diff z_d =
        norm(z_t - z_t0); the frames decode z_theta = slerp(z_i, z_d, theta) for theta from 0 to `max_theta`
        (the paper: "typically in [0.25, 0.50]"), z_d taken at z_i's norm, every frame from the same noise. The first
        frame is the picture's own variation at that seed."""
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be a whole number of 2 or more; got {frames!r}")
        if not 0 < float(max_theta) <= 1:
            raise ValueError(f"max_theta must be in (0, 1] (of the angle from the picture's embedding to the text "
                             f"diff); got {max_theta!r}")
        z_i = self._embeddings([image])
        z_t = self.text_encoder.encode([target, description]).pooled.float()
        z_d = z_t[:1] - z_t[1:]
        if float(z_d.norm()) == 0:
            raise ValueError("text_diff: the description and the target give the same CLIP text embedding; nothing to "
                             "move towards")
        z_d = z_d / z_d.norm(dim=-1, keepdim=True) * z_i.norm(dim=-1, keepdim=True)
        path = torch.cat([slerp(z_i, z_d, float(max_theta) * k / (frames - 1)) for k in range(frames)])
        return self._frames(path, seed, options)

    def _embeddings(self, pictures: list) -> torch.Tensor:
        if self.image_embedder is None or self.image_embedder.encoder is None:
            raise ValueError(f"{self.source or 'this Karlo model'} has no CLIP image encoder (Karlo's text-to-image "
                             "folder): load an UnCLIPImageVariationPipeline folder")
        return self.image_embedder.embed(pictures)

    def _frames(self, path: torch.Tensor, seed: int, options: dict):
        if "generator" in options or "image_embeddings" in options or "num_images_per_prompt" in options:
            raise ValueError("the frames share one noise, `seed`'s; give seed, not generator, image_embeddings or "
                             "num_images_per_prompt")
        generators = [torch.Generator().manual_seed(int(seed)) for _ in range(path.shape[0])]
        return self.variations(None, image_embeddings=path, generator=generators, **options)

    def _decode(self, z: torch.Tensor, text, empty, generator, *, decoder_steps: int, super_res_steps: int,
                decoder_scale: float, progress: bool, callback) -> torch.Tensor:
        """Steps 2 and 3: the CLIP image embeddings z [B, D] (with the caption's encoding `text`, and `empty`'s,
        the unconditional side's, when guided) -> the pictures [B, 3, H, W] in [-1, 1]."""
        from imagine.sampling import ConcatChannels

        batch = z.shape[0]
        # 2. the decoder at 64 px: x ~ P(x | z_i, y) (sec. 2.1), guided against (learned no-embedding, "")
        context, added = self.text_proj(z, text.pooled, text.states)
        keep = F.pad(text.mask.to(torch.bool), (self.text_proj.extra_tokens, 0), value=True)  # (the z_i tokens: kept)
        cond = {"context": context, "context_mask": keep, "class_labels": added}
        uncond = None
        if empty is not None:
            u_context, u_added = self.text_proj(self.text_proj.unconditional(batch), empty.pooled, empty.states)
            u_keep = F.pad(empty.mask.to(torch.bool), (self.text_proj.extra_tokens, 0), value=True)
            uncond = {"context": u_context, "context_mask": u_keep, "class_labels": u_added}
        d = self.decoder.config
        side = int(d.sample_size)
        small = self.decoder_stage.sample(
            self.decoder, (batch, d.in_channels, side, side), steps=decoder_steps, generator=generator,
            progress=progress, callback=_stage_callback(callback, "decoder"), cond=cond, uncond=uncond,
            guidance_scale=decoder_scale).clamp(-1, 1)

        # 3. super-resolution to 256 px: the upsampled picture on channels (no draw: the start noise is the next)
        sr = self.super_res_first.config
        side = int(sr.sample_size)
        low = upsample(small.float(), (side, side))
        model = LastStepSwitch(ConcatChannels(self.super_res_first, low), ConcatChannels(self.super_res_last, low))
        return self.super_res_stage.sample(model, (batch, sr.in_channels // 2, side, side), steps=super_res_steps,
                                           generator=generator,
                                           progress=progress, callback=_stage_callback(callback, "super_res"))

