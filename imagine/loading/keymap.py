"""Parameter names of the original (CompVis / Stability) Stable Diffusion checkpoints <-> ours.

Our U-Net and VAE use diffusers' parameter names (docs/DESIGN.md); the text encoder is a
transformers `CLIPTextModel`. An original single-file checkpoint names the same tensors after the
LDM code base (Rombach et al. 2022, github.com/CompVis/latent-diffusion, `openaimodel.py`,
`model.py`) and, for SD 2.x, after OpenCLIP (Cherti et al. 2023). The maps here are written from
the structure of those modules:

U-Net (`model.diffusion_model.*`): the LDM U-Net is flat lists of sequential blocks.
    input_blocks.0.0                      conv_in
    input_blocks.n.0 / .1                 down_blocks.i.resnets.j / .attentions.j,
                                          n = 1 + i (layers + 1) + j
    input_blocks.n.0.op                   down_blocks.i.downsamplers.0.conv, n = (i + 1)(layers + 1)
    middle_block.0 / .1 / .2              mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.n.0 / .1                up_blocks.i.resnets.j / .attentions.j, n = i (layers + 1) + j
    output_blocks.n.(1|2).conv            up_blocks.i.upsamplers.0.conv (last j of a level; index 2
                                          when the level also has a transformer)
    time_embed.0 / .2, out.0 / .2         time_embedding.linear_1 / 2, conv_norm_out / conv_out
  inside a residual block: in_layers.0 / .2 = norm1 / conv1, emb_layers.1 = time_emb_proj,
  out_layers.0 / .3 = norm2 / conv2, skip_connection = conv_shortcut. Spatial transformers use
  the same names on both sides.

VAE (`first_stage_model.*`): encoder.down.i.block.j -> encoder.down_blocks.i.resnets.j,
  .downsample -> .downsamplers.0, mid.block_1 / attn_1 / block_2 -> mid_block.resnets.0 /
  attentions.0 / resnets.1, norm_out -> conv_norm_out, nin_shortcut -> conv_shortcut. The decoder
  counts its levels from the bottom (decoder.up.0 is the full-resolution one), diffusers from the
  top, so decoder.up.k is up_blocks.(levels - 1 - k). The mid-block attention is 1x1 convs there
  (norm, q, k, v, proj_out) and linear layers here (group_norm, to_q, to_k, to_v, to_out.0).

Text encoder, SD 1.x (`cond_stage_model.transformer.*`): a transformers CLIPTextModel already,
  saved with the `text_model.` prefix that transformers >= 5.6 no longer has in its state dict.
Text encoder, SD 2.x (`cond_stage_model.model.*`): OpenCLIP's text tower. Its attention keeps q,
  k and v in one `in_proj_weight` [3D, D] (torch.nn.MultiheadAttention), split here into
  q_proj / k_proj / v_proj. SD 2.x conditions on the penultimate layer's states through the final
  LayerNorm (Stability's `FrozenOpenCLIPEmbedder(layer="penultimate")`), which a CLIPTextModel
  with one layer fewer computes exactly: its last_hidden_state is final_layer_norm(layer L-1);
  the unused last block (where the file has it: a file converted from diffusers does not) and the
  contrastive `text_projection` / `logit_scale` are dropped.

`to_diffusers(...)` functions take the part of a checkpoint under one prefix (prefix removed)
and return a new dict with our names; the tensors are not copied (only reshaped or split
views). The `*_to_original` functions go the other way (for export), from the same tables.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

Tensor = torch.Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

# inside one LDM ResBlock -> inside one diffusers ResnetBlock2D
RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
SAME = {}
# inside one VAE block: the residual block differs only in the shortcut's name
VAE_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class KeyMapError(ValueError):
    """Weights that do not fit the expected layout; the message says what was found."""


# ---------------------------------------------------------------------------------------------
# Module tables: original module prefix -> (our module prefix, renames inside the module)
# ---------------------------------------------------------------------------------------------
def unet_module_table(layers_per_block: Sequence[int], attention: Sequence[bool],
                      has_mid_block: bool = True) -> dict[str, tuple[str, dict[str, str]]]:
    """The LDM U-Net's module prefixes for a U-Net with len(layers_per_block) levels.

    layers_per_block[i]: residual blocks of down level i (the up path has one more);
    attention[i]: whether level i (down and its mirrored up level) has spatial transformers."""
    levels = len(layers_per_block)
    if len(attention) != levels:
        raise ValueError(f"{levels} levels but {len(attention)} attention flags")
    table: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", SAME),
        "time_embed.2": ("time_embedding.linear_2", SAME),
        "input_blocks.0.0": ("conv_in", SAME),
        "out.0": ("conv_norm_out", SAME),
        "out.2": ("conv_out", SAME),
    }
    n = 1
    for i in range(levels):
        for j in range(layers_per_block[i]):
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{i}.resnets.{j}", RESNET_RENAMES)
            if attention[i]:
                table[f"input_blocks.{n}.1"] = (f"down_blocks.{i}.attentions.{j}", SAME)
            n += 1
        if i < levels - 1:
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{i}.downsamplers.0", {"op": "conv"})
            n += 1
    if has_mid_block:
        table["middle_block.0"] = ("mid_block.resnets.0", RESNET_RENAMES)
        table["middle_block.1"] = ("mid_block.attentions.0", SAME)
        table["middle_block.2"] = ("mid_block.resnets.1", RESNET_RENAMES)
    n = 0
    for i in range(levels):  # up block i mirrors down level (levels - 1 - i)
        level = levels - 1 - i
        blocks = layers_per_block[level] + 1
        for j in range(blocks):
            table[f"output_blocks.{n}.0"] = (f"up_blocks.{i}.resnets.{j}", RESNET_RENAMES)
            if attention[level]:
                table[f"output_blocks.{n}.1"] = (f"up_blocks.{i}.attentions.{j}", SAME)
            if j == blocks - 1 and i < levels - 1:
                slot = 2 if attention[level] else 1
                table[f"output_blocks.{n}.{slot}"] = (f"up_blocks.{i}.upsamplers.0", SAME)
            n += 1
    return table


def vae_module_table(levels: int, layers_per_block: int, mid_attention: bool = True
                     ) -> dict[str, tuple[str, dict[str, str]]]:
    table: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv": ("quant_conv", SAME), "post_quant_conv": ("post_quant_conv", SAME)}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", SAME)
        table[f"{part}.conv_out"] = (f"{part}.conv_out", SAME)
        table[f"{part}.norm_out"] = (f"{part}.conv_norm_out", SAME)
        table[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET_RENAMES)
        table[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET_RENAMES)
        if mid_attention:
            table[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION_RENAMES)
    for i in range(levels):
        for j in range(layers_per_block):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET_RENAMES)
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample"] = (f"encoder.down_blocks.{i}.downsamplers.0", SAME)
        k = levels - 1 - i  # the decoder's levels are numbered from the bottom in LDM
        for j in range(layers_per_block + 1):
            table[f"decoder.up.{k}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET_RENAMES)
        if i < levels - 1:
            table[f"decoder.up.{k}.upsample"] = (f"decoder.up_blocks.{i}.upsamplers.0", SAME)
    return table


def _split_module(key: str, table: Mapping[str, object]) -> tuple[str, str] | None:
    """'input_blocks.1.0.in_layers.0.weight' -> ('input_blocks.1.0', 'in_layers.0.weight'):
    the longest prefix of `key` (at a dot) that is in `table`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return head, ".".join(parts[cut:])
    return None


def _rename_inside(rest: str, renames: Mapping[str, str]) -> str:
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in renames:
            return renames[head] + "." + ".".join(parts[cut:])
    return rest


def apply_table(state: Mapping[str, Tensor], table: Mapping[str, tuple[str, Mapping[str, str]]], what: str,
                ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rename every key of `state` through `table`; keys in no module of the table are an error
    (they would be silently dropped otherwise), except those starting with one of `ignore`."""
    out: dict[str, Tensor] = {}
    unknown = []
    ignore = tuple(ignore)
    for key, value in state.items():
        hit = _split_module(key, table)
        if hit is None:
            if not (ignore and key.startswith(ignore)):
                unknown.append(key)
            continue
        module, rest = hit
        target, renames = table[module]
        out[f"{target}.{_rename_inside(rest, renames)}"] = value
    if unknown:
        show = ", ".join(unknown[:6]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 6 else "")
        raise KeyMapError(f"{what}: weights that fit no module of the layout inferred from the checkpoint: {show}")
    return out


def _invert(table: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, tuple[str, dict[str, str]]]:
    return {ours: (orig, {v: k for k, v in renames.items()}) for orig, (ours, renames) in table.items()}


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------
def unet_to_diffusers(state: Mapping[str, Tensor], layers_per_block: Sequence[int], attention: Sequence[bool],
                      has_mid_block: bool = True) -> dict[str, Tensor]:
    """LDM U-Net weights (without `model.diffusion_model.`) -> our/diffusers names."""
    return apply_table(state, unet_module_table(layers_per_block, attention, has_mid_block), "U-Net")


def unet_to_original(state: Mapping[str, Tensor], layers_per_block: Sequence[int], attention: Sequence[bool],
                     has_mid_block: bool = True) -> dict[str, Tensor]:
    """Our/diffusers U-Net weights -> LDM names (without `model.diffusion_model.`)."""
    return apply_table(state, _invert(unet_module_table(layers_per_block, attention, has_mid_block)), "U-Net")


# ---------------------------------------------------------------------------------------------
# ControlNet (lllyasviel's ControlNet 1.0 / 1.1 files, `cldm.py`'s ControlNet module)
# ---------------------------------------------------------------------------------------------
def controlnet_module_table(layers_per_block: Sequence[int], attention: Sequence[bool], hint_convs: int,
                            has_mid_block: bool = True, text_time: bool = False
                            ) -> dict[str, tuple[str, dict[str, str]]]:
    """A ControlNet's module prefixes: the LDM U-Net's input blocks, middle block and time embedding
    (`unet_module_table`, no output blocks), plus

        zero_convs.n.0                        controlnet_down_blocks.n (one 1x1 conv per skip, n from 0)
        middle_block_out.0                    controlnet_mid_block
        input_hint_block.0                    controlnet_cond_embedding.conv_in
        input_hint_block.2k, 0 < k < m - 1    controlnet_cond_embedding.blocks.(k - 1)
        input_hint_block.2(m - 1)             controlnet_cond_embedding.conv_out (14 in the released files)
        label_emb.0.0 / .0.2                  add_embedding.linear_1 / 2 (SDXL's, `text_time`)

    `hint_convs` = m, the convolutions of the hint encoder (a Sequential of convs with a SiLU after each but
    the last, so at the even indices); 8 in the released files."""
    if hint_convs < 2:
        raise ValueError(f"a ControlNet's hint encoder has at least 2 convolutions; got {hint_convs}")
    table = {k: v for k, v in unet_module_table(layers_per_block, attention, has_mid_block).items()
             if not k.startswith(("output_blocks.", "out."))}
    skips = 1 + sum(layers_per_block) + len(layers_per_block) - 1  # conv_in, every resnet, every downsampler
    for n in range(skips):
        table[f"zero_convs.{n}.0"] = (f"controlnet_down_blocks.{n}", SAME)
    table["middle_block_out.0"] = ("controlnet_mid_block", SAME)
    table["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", SAME)
    for k in range(1, hint_convs - 1):
        table[f"input_hint_block.{2 * k}"] = (f"controlnet_cond_embedding.blocks.{k - 1}", SAME)
    table[f"input_hint_block.{2 * (hint_convs - 1)}"] = ("controlnet_cond_embedding.conv_out", SAME)
    if text_time:
        table["label_emb.0.0"] = ("add_embedding.linear_1", SAME)
        table["label_emb.0.2"] = ("add_embedding.linear_2", SAME)
    return table


def controlnet_to_diffusers(state: Mapping[str, Tensor], layers_per_block: Sequence[int], attention: Sequence[bool],
                            hint_convs: int, has_mid_block: bool = True, text_time: bool = False) -> dict[str, Tensor]:
    """ControlNet weights in lllyasviel's names (without `control_model.`) -> our/diffusers names."""
    table = controlnet_module_table(layers_per_block, attention, hint_convs, has_mid_block, text_time)
    return apply_table(state, table, "ControlNet")


def controlnet_to_original(state: Mapping[str, Tensor], layers_per_block: Sequence[int], attention: Sequence[bool],
                           hint_convs: int, has_mid_block: bool = True, text_time: bool = False) -> dict[str, Tensor]:
    """Our/diffusers ControlNet weights -> lllyasviel's names (without `control_model.`)."""
    table = controlnet_module_table(layers_per_block, attention, hint_convs, has_mid_block, text_time)
    return apply_table(state, _invert(table), "ControlNet")


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
def _is_mid_attention_conv(key: str) -> bool:
    # q, k, v, proj_out of the LDM mid-block attention (the GroupNorm's weight is 1-D and never matches ndim)
    return ".mid.attn_1." in key


def vae_to_diffusers(state: Mapping[str, Tensor], levels: int, layers_per_block: int,
                     mid_attention: bool = True) -> dict[str, Tensor]:
    """LDM autoencoder weights (without `first_stage_model.`) -> our/diffusers names. The mid
    attention's 1x1 conv weights [C, C, 1, 1] become linear weights [C, C]. LDM's training-only
    `loss.*` (discriminator, LPIPS) is dropped."""
    table = vae_module_table(levels, layers_per_block, mid_attention)
    state = {k: (v[:, :, 0, 0] if _is_mid_attention_conv(k) and v.ndim == 4 else v) for k, v in state.items()}
    return apply_table(state, table, "VAE", ignore=("loss.",))


def vae_to_original(state: Mapping[str, Tensor], levels: int, layers_per_block: int,
                    mid_attention: bool = True) -> dict[str, Tensor]:
    out = apply_table(state, _invert(vae_module_table(levels, layers_per_block, mid_attention)), "VAE")
    return {k: (v[:, :, None, None] if _is_mid_attention_conv(k) and v.ndim == 2 else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------
def clip_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SD 1.x `cond_stage_model.transformer.*` (prefix removed) -> CLIPTextModel's state dict
    keys. The checkpoints name them `text_model.<...>` (older transformers) or `<...>`; the
    `position_ids` buffer (0..76, not a weight) is dropped."""
    out = {}
    for k, v in state.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        if k.endswith("position_ids"):
            continue
        out[k] = v
    return out


OPENCLIP_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# dropped by exact name: the contrastive projection (OpenCLIP's `text_projection` [width, proj], or the Linear
# weight `text_projection.weight` [proj, width] older diffusers scripts wrote; `openclip_projection` reads it where
# it is used), the logit scale, the causal mask buffer
OPENCLIP_DROPPED = ("text_projection", "text_projection.weight", "logit_scale", "attn_mask")


# heads of the CLIP image towers in use (not visible in the weights: OpenCLIP's head_width, OpenAI's width / 64);
# another width: width / 64
CLIP_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def openclip_visual_to_transformers(state: Mapping[str, Tensor], what: str, act: str = "gelu"
                                    ) -> tuple[dict, dict[str, Tensor]]:
    """A CLIP image tower in OpenCLIP's / OpenAI's names (`visual.*`, prefix removed: conv1, class_embedding,
    positional_embedding, ln_pre, transformer.resblocks.N.*, ln_post, proj) -> (transformers' CLIPVisionConfig
    arguments read off its shapes, CLIPVisionModelWithProjection's state dict). `act`: its MLP's activation (OpenAI's
    towers quick_gelu, OpenCLIP's gelu)."""
    for key in ("conv1.weight", "positional_embedding", "class_embedding", "proj", "ln_post.weight"):
        if key not in state:
            raise KeyMapError(f"{what}: no {key}; found {sorted(state)[:8]}")
    conv, pos = state["conv1.weight"], state["positional_embedding"]
    width, patch = conv.shape[0], conv.shape[2]
    side = round((pos.shape[0] - 1) ** 0.5)
    if conv.ndim != 4 or side * side != pos.shape[0] - 1:
        raise KeyMapError(f"{what}: conv1 {tuple(conv.shape)} and positional_embedding {tuple(pos.shape)} are not a "
                          "ViT's square grid of patches and a class token")
    layers = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")), default=-1)
    if not layers:
        raise KeyMapError(f"{what}: no transformer.resblocks.*")
    config = {"hidden_size": width, "patch_size": patch, "image_size": side * patch, "num_hidden_layers": layers,
              "num_attention_heads": CLIP_VISION_HEADS.get(width, max(1, width // 64)),
              "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "projection_dim": state["proj"].shape[1], "hidden_act": act, "layer_norm_eps": 1e-5}
    out = {"vision_model.embeddings.patch_embedding.weight": conv,
           "vision_model.embeddings.class_embedding": state["class_embedding"],
           "vision_model.embeddings.position_embedding.weight": pos,
           "visual_projection.weight": state["proj"].t().contiguous()}
    names = {"ln_pre": "vision_model.pre_layrnorm", "ln_post": "vision_model.post_layernorm"}
    unknown = []
    for k, v in state.items():
        if k in ("conv1.weight", "positional_embedding", "class_embedding", "proj"):
            continue
        module, _, leaf = k.rpartition(".")
        if module in names:
            out[f"{names[module]}.{leaf}"] = v
        elif k.startswith("transformer.resblocks."):
            _, _, layer, rest = k.split(".", 3)
            base = f"vision_model.encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for x, part in zip("qkv", v.chunk(3, dim=0)):
                    out[base + f"self_attn.{x}_proj.{rest.rsplit('_', 1)[-1]}"] = part
            elif rest.rpartition(".")[0] in OPENCLIP_BLOCK_RENAMES:
                module, _, leaf = rest.rpartition(".")
                out[base + OPENCLIP_BLOCK_RENAMES[module] + "." + leaf] = v
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise KeyMapError(f"{what}: unexpected weights {unknown[:6]}" + (f" ... ({len(unknown)})" if len(unknown) > 6
                                                                         else ""))
    return config, out


def openclip_layers(state: Mapping[str, Tensor]) -> int:
    """Number of transformer blocks in an OpenCLIP text tower (prefix removed)."""
    ids = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    return max(ids) + 1 if ids else 0


def openclip_projection(state: Mapping[str, Tensor], what: str = "text encoder (OpenCLIP)") -> Tensor | None:
    """An OpenCLIP text tower's projection P (prefix removed), applied as x @ P, [width, proj], or None: OpenCLIP's
    `text_projection`, or `text_projection.weight` = P^T, the Linear weight diffusers' convert script wrote before
    its fix (ComfyUI reads both)."""
    if "text_projection" in state and "text_projection.weight" in state:
        raise KeyMapError(f"{what}: has both text_projection and text_projection.weight; expected one projection")
    if "text_projection.weight" in state:
        return state["text_projection.weight"].t()
    return state.get("text_projection")


def openclip_to_transformers(state: Mapping[str, Tensor], keep_layers: int) -> dict[str, Tensor]:
    """SD 2.x `cond_stage_model.model.*` (prefix removed) -> a CLIPTextModel of `keep_layers`
    layers (Stable Diffusion 2.x: those it uses, see the module docstring and
    `single_file.openclip_is_whole_tower`)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k.endswith("position_ids"):
            # transformers' 0..76 index buffer, not a weight: diffusers' converter leaves it in files made from
            # folders saved by transformers < 4.31, where it was persistent; CLIPTextModel rebuilds it
            continue
        if k == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["final_layer_norm." + k[len("ln_final."):]] = v
        elif k.startswith("transformer.resblocks."):
            _, _, layer, rest = k.split(".", 3)
            if int(layer) >= keep_layers:
                continue
            base = f"encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # weight | bias
                if v.shape[0] % 3:
                    raise KeyMapError(f"text encoder: {k} has {v.shape[0]} rows, not 3 x width (q, k, v)")
                q, kk, vv = v.chunk(3, dim=0)
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = kk
                out[base + f"self_attn.v_proj.{kind}"] = vv
            else:
                module, _, leaf = rest.rpartition(".")
                if module not in OPENCLIP_BLOCK_RENAMES:
                    unknown.append(k)
                    continue
                out[base + OPENCLIP_BLOCK_RENAMES[module] + "." + leaf] = v
        elif k in OPENCLIP_DROPPED:
            continue
        else:
            unknown.append(k)
    if unknown:
        raise KeyMapError("text encoder (OpenCLIP): weights not in the expected layout: " + ", ".join(unknown[:6])
                          + (f" ... ({len(unknown)} in all)" if len(unknown) > 6 else ""))
    return out


def transformers_to_openclip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel state dict -> OpenCLIP text tower names (for export); q, k, v are fused."""
    back = {v: k for k, v in OPENCLIP_BLOCK_RENAMES.items()}
    out: dict[str, Tensor] = {}
    fused: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k[len("final_layer_norm."):]] = v
        elif k.startswith("encoder.layers."):
            _, _, layer, rest = k.split(".", 3)
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, leaf), {})[module.split(".")[1][0]] = v  # "q" | "k" | "v"
            else:
                out[f"transformer.resblocks.{layer}.{back[module]}.{leaf}"] = v
        else:
            raise KeyMapError(f"text encoder: {k} has no OpenCLIP name")
    for (layer, leaf), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out
