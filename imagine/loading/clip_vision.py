"""CLIP image towers as files of their own: ComfyUI's models/clip_vision (clip_vision_g.safetensors, the ViT-bigG/14
tower SDXL's Revision reads; clip_vision_h, ViT-H/14; OpenAI's ViT-L/14), for its CLIPVisionLoader.

A file holds transformers' CLIPVisionModelWithProjection names (`vision_model.*`, `visual_projection.weight`), or
OpenCLIP's (`visual.*`: conv1, transformer.resblocks.N.*, proj), which ComfyUI converts as it loads. The tower's
shape is read off its weights, its heads by width (keymap.CLIP_VISION_HEADS: not visible in the weights), its MLP's
activation as ComfyUI's configs give it: quick_gelu for OpenAI's ViT-L/14 (1024 wide, 24 layers, its
clip_vision_config_vitl), GELU for the OpenCLIP towers. The pictures are read as CLIP reads them (its mean and std,
the tower's size); the embeddings are the tower's projected ones (ComfyUI's image_embeds), statistics the identity."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from imagine.loading import keymap

OPENAI_VIT_L = (1024, 24)  # (width, layers) of OpenAI's ViT-L/14: quick_gelu


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def clip_vision_config(state: dict[str, torch.Tensor], what: str) -> dict:
    """transformers' CLIPVisionConfig arguments for a CLIPVisionModelWithProjection state dict, read off its shapes."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise keymap.KeyMapError(f"{what}: no {key}; a CLIP image tower has vision_model.* and "
                                     "visual_projection.weight (transformers' names) or visual.* (OpenCLIP's)")
        return state[key]

    conv = need("vision_model.embeddings.patch_embedding.weight")
    pos = need("vision_model.embeddings.position_embedding.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    side = round((pos.shape[0] - 1) ** 0.5)
    if conv.ndim != 4 or side * side != pos.shape[0] - 1:
        raise keymap.KeyMapError(f"{what}: patch_embedding {tuple(conv.shape)} and position_embedding "
                                 f"{tuple(pos.shape)} are not a ViT's square grid of patches and a class token")
    layers = 1 + max((int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")), default=-1)
    if not layers:
        raise keymap.KeyMapError(f"{what}: no vision_model.encoder.layers.*")
    return {"hidden_size": width, "patch_size": patch, "image_size": side * patch, "num_hidden_layers": layers,
            "num_attention_heads": keymap.CLIP_VISION_HEADS.get(width, max(1, width // 64)),
            "intermediate_size": need("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0],
            "projection_dim": need("visual_projection.weight").shape[0], "layer_norm_eps": 1e-5}


def load_clip_vision(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A CLIP image tower file -> an ImageEmbedder (imagine.models.image_encoder): its encoder, CLIP's picture
    processing at its size, identity statistics. A file that is not one is refused naming what it holds."""
    from imagine.loading.single_file import clip_image_embedder, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP vision file not found: {path}")
    state = read_checkpoint(path)  # (safetensors; a pickle only through torch.load(weights_only=True))
    what = f"{path.name} (CLIP vision)"
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in state or "conv1.weight" in state:
        tower = _prefixed(state, "visual.") if "visual.conv1.weight" in state else state
        config, state = keymap.openclip_visual_to_transformers(tower, what)
    else:
        state = {k: v for k, v in state.items() if k != "vision_model.embeddings.position_ids"}
        config = clip_vision_config(state, what)
    # (the activation as ComfyUI's configs give it: OpenAI's ViT-L/14 quick_gelu, the OpenCLIP towers GELU)
    config["hidden_act"] = "quick_gelu" if (config["hidden_size"], config["num_hidden_layers"]) == OPENAI_VIT_L \
        else "gelu"
    return clip_image_embedder(config, state, what, dtype)
