"""A CLIP image embedding (Radford et al. 2021) for unCLIP-style conditioning: the vision tower with its projection
(transformers' CLIPVisionModelWithProjection), its picture preprocessing (transformers' CLIP image processor: the
shortest side resized, the middle cut out, normalized), and the statistics of the embeddings a model was trained
on (diffusers' StableUnCLIPImageNormalizer: a mean and a standard deviation per dimension), all read offline from a
model folder's image_encoder/, feature_extractor/ and image_normalizer/."""

from __future__ import annotations

from pathlib import Path

import torch


def normalizer_weights(folder: Path) -> Path:
    """The image_normalizer's statistics file: diffusers' own name (diffusion_pytorch_model.safetensors, as every
    component folder is read), else a variant's alone (e.g. diffusion_pytorch_model.fp16.safetensors, what a download
    of that variant holds). A full download holds both, and the variant sorts first: its float16 mean and std are
    the statistics rounded (std to 4e-4), not the ones the model was trained with."""
    from imagine.models.io import WEIGHT_NAMES

    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("*.safetensors"))
    if not variants:
        raise FileNotFoundError(f"{folder}: no .safetensors with the embeddings' mean and std")
    return variants[0]


def flatten_picture(picture):
    """A picture as CLIP's image processor reads it (transformers' convert_to_rgb, which diffusers' unCLIP pipelines
    hand PIL pictures to): its transparency (an alpha band, or a palette's or colour key's) laid on white, where
    convert("RGB") would keep the colours hidden under transparent pixels (often black)."""
    from PIL import Image

    if "A" not in picture.getbands() and picture.info.get("transparency") is None:
        return picture.convert("RGB")
    rgba = picture.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


class ImageEmbedder:
    """encoder None: the statistics alone, for embeddings that come from elsewhere (unCLIP's prior)."""

    def __init__(self, encoder, processor, mean: torch.Tensor, std: torch.Tensor):
        self.encoder = encoder.eval().requires_grad_(False) if encoder is not None else None
        self.processor = processor
        self.mean, self.std = mean.float().reshape(1, -1), std.float().reshape(1, -1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"image_normalizer: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ")

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @classmethod
    def from_folder(cls, root: str | Path, dtype: torch.dtype = torch.float32, encoder: bool = True,
                    normalizer: bool = True) -> "ImageEmbedder":
        """A model folder's image_encoder/, feature_extractor/ and image_normalizer/ (encoder=False: the last alone;
        normalizer=False: the first two, the embeddings as the tower gives them, for Karlo's variations)."""
        import transformers
        from safetensors.torch import load_file

        from imagine.models.io import load_transformers_model

        root = Path(root)
        for sub in ("image_encoder", "feature_extractor")[: 2 * encoder] + ("image_normalizer",)[: int(normalizer)]:
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root}: an image-embedding model needs {sub}/ (with image_encoder/, "
                                        "feature_extractor/ and image_normalizer/)")
        tower = processor = None
        if encoder:
            tower = load_transformers_model(transformers.CLIPVisionModelWithProjection, root / "image_encoder", dtype)
            # (the Pillow processor: the default one wants torchvision, which this build of torch cannot use)
            kind = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
            processor = kind.from_pretrained(root / "feature_extractor", local_files_only=True)
        if not normalizer:  # (no statistics: normalize is the identity)
            width = tower.config.projection_dim
            return cls(tower, processor, torch.zeros(width), torch.ones(width))
        weights = normalizer_weights(root / "image_normalizer")
        stats = load_file(str(weights))
        if not {"mean", "std"} <= stats.keys():
            raise ValueError(f"{weights}: expected 'mean' and 'std'; found {sorted(stats)}")
        embedder = cls(tower, processor, stats["mean"], stats["std"])
        if tower is not None and embedder.dim != tower.config.projection_dim:
            raise ValueError(f"{root}: the image encoder projects to {tower.config.projection_dim}, its normalizer "
                             f"has {embedder.dim} dimensions")
        return embedder

    @torch.no_grad()
    def embed(self, pictures: list) -> torch.Tensor:
        """PIL pictures -> their CLIP image embeddings [B, D] (float32); transparency on white (`flatten_picture`)."""
        if self.encoder is None:
            raise ValueError("this model has no CLIP image encoder (image_encoder/): its image embeddings come from "
                             "its diffusion prior, so it makes images from text, not variations of a picture")
        pixels = self.processor(images=[flatten_picture(p) for p in pictures], return_tensors="pt").pixel_values
        w = next(self.encoder.parameters())
        return self.encoder(pixels.to(device=w.device, dtype=w.dtype)).image_embeds.float()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean
