"""Loading a ControlNet (Zhang, Rao & Agrawala 2023; `imagine.models.controlnet`), offline.

Three layouts load:

- a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model.safetensors`):
  `ControlNetModel.from_pretrained`, the config as written (SD 1.x/2.x and SDXL ControlNets alike);
- lllyasviel's original files (ControlNet 1.0 `control_sd15_canny.pth`, 1.1 `control_v11p_sd15_canny.pth`,
  the SD 2.x ones, and the `.safetensors` copies people keep), read with `single_file.read_checkpoint`
  (pickles only through `torch.load(weights_only=True)`). Their names are those of `cldm.py`'s ControlNet
  module, with or without its `control_model.` prefix (a 1.0 file also carries the whole SD model beside it,
  which is left out): the U-Net's `time_embed.*`, `input_blocks.*`, `middle_block.*` (and SDXL's
  `label_emb.*`) in the LDM layout, `zero_convs.N.0` (the zero 1x1 convolutions, one per skip),
  `middle_block_out.0`, and `input_hint_block.{0,2,...,14}` (the hint encoder: a Sequential of 3x3
  convolutions with a SiLU after each but the last). A file carries no config, so it is read off the weights
  by the U-Net single-file loader's inference (`single_file.infer_unet_config`, `encoder_only`; SDXL's
  `sdxl.infer_unet_config`) and the names mapped by `keymap.controlnet_module_table`, which extends the
  U-Net's table (diffusers' `convert_controlnet_checkpoint` maps the same names the same way);
- diffusers-named weights in one file (`controlnet_cond_embedding.*`, as AUTOMATIC1111's extension keeps
  `diffusers_xl_canny_full.safetensors`): with the `config.json` beside it, that config; else the layout is
  read off the names and mapped to the original names, then read as above.

What the weights do not say follows the released models, as for a single-file U-Net: 8 attention heads with
1x1-conv projections (SD 1.x), 64-wide heads with linear projections or a 1024-wide context (SD 2.x, SDXL);
SDXL's size codes 256 wide (so the pooled text width is label_emb's inputs - 6 x 256); the hint encoder's
even convolutions at stride 2 (each width taken twice, diffusers' `ControlNetConditioningEmbedding`).
`global_pool_conditions` (the shuffle ControlNet averages its residuals over the map) comes from
`global_average_pooling` in the `.yaml` beside the file (ControlNet 1.1 ships one per model), else from
"shuffle" in the file's name (AUTOMATIC1111's extension's rule). `unet_config=` overrides any of it (e.g.
`{"attention_head_dim": ...}`).

Refused with one clear error: a missing file, a U-Net or a whole SD checkpoint given as a ControlNet, and
the other control models people keep beside ControlNets (T2I-Adapters, Control-LoRAs, ControlNet-LLLite,
IP-Adapters, SparseCtrl, and the "difference" ControlNets stored relative to SD 1.5's U-Net).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from imagine.loading import keymap
from imagine.loading import single_file as sf
from imagine.models import io

log = logging.getLogger(__name__)

PREFIX = "control_model."  # cldm.py's ControlLDM keeps its ControlNet under this name
UNET_PARTS = ("time_embed.", "input_blocks.", "middle_block.", "label_emb.")
SDXL_SIZE_CODE_WIDTH = 256  # SDXL's addition_time_embed_dim (label_emb's inputs: pooled text + 6 codes)
# other control models, by a key they have (AUTOMATIC1111's extension tells them apart the same way)
OTHER_KINDS = (
    (lambda k: k == "lora_controlnet", "a Control-LoRA (Stability's low-rank ControlNet, lora_controlnet), "
                                       "which needs its base model's U-Net to build a ControlNet from"),
    (lambda k: "lllite" in k, "a ControlNet-LLLite (kohya-ss's lllite_* modules)"),
    (lambda k: "motion_modules" in k, "a SparseCtrl model (AnimateDiff's motion_modules)"),
    (lambda k: k.startswith(("image_proj.", "ip_adapter.")), "an IP-Adapter (image_proj / ip_adapter)"),
    (lambda k: k == "difference", "a 'difference' ControlNet (stored as its difference from SD 1.5's U-Net; add "
                                  "the U-Net back, or use the full ControlNet file)"),
    (lambda k: k.startswith(("adapter.body.", "body.")) or k == "style_embedding",
     "a T2I-Adapter (Mou et al. 2023: body.* / adapter.body.*)"),
)


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                    unet_config: dict[str, Any] | None = None):
    """A ControlNetModel from a diffusers ControlNet folder, lllyasviel's original file (.pth / .ckpt /
    .safetensors, with or without `control_model.`), or diffusers-named weights in one file; see the module
    docstring. `unet_config`: entries that override what is read off a file's weights."""
    path = Path(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    if not path.exists():
        raise FileNotFoundError(f"ControlNet not found: {path} (give a diffusers ControlNet folder with config.json, "
                                "or a ControlNet .safetensors / .pth / .ckpt file)")
    if path.is_dir():
        net = _load_folder(path, dtype, unet_config)
    else:
        try:
            state = sf.read_checkpoint(path)
        except ValueError as e:  # h94's IP-Adapter .bin files nest their two parts
            if "'image_proj'" in str(e) and "'ip_adapter'" in str(e):
                raise ValueError(f"{path} looks like an IP-Adapter (image_proj / ip_adapter), not a ControlNet; "
                                 "imagine does not run IP-Adapters") from None
            raise
        beside = path.parent / "config.json"
        config = io.read_json(beside) if beside.is_file() else None
        if config is not None and config.get("_class_name") != "ControlNetModel":
            config = None  # e.g. the config of something else in the same folder
        try:
            net = controlnet_from_state(state, str(path), dtype, unet_config=unet_config,
                                        global_pool=_global_pool(path), diffusers_config=config)
        except ValueError as e:
            if config is None and any(k.startswith("controlnet_cond_embedding.") for k in state) \
                    and "cross-attention" in str(e):
                # SDXL's "small" ControlNets hold attention blocks with no transformer layer: no text width to read
                raise ValueError(f"{path}: a diffusers-named ControlNet whose attention blocks hold no transformer "
                                 "layer; its text width and depths cannot be read off the weights: put its "
                                 "config.json beside the file, or load its diffusers folder") from None
            raise
    net.source = str(path)  # where it came from (the server's model list hashes it, as AUTOMATIC1111's does)
    return net


def _load_folder(path: Path, dtype: torch.dtype, unet_config):
    from imagine.models.controlnet import ControlNetModel

    if (path / "model_index.json").is_file():
        if (path / "controlnet" / "config.json").is_file():  # a ControlNet pipeline's folder: its ControlNet
            return _load_folder(path / "controlnet", dtype, unet_config)
        raise ValueError(f"{path} is a whole model folder (model_index.json), not a ControlNet; give a ControlNet "
                         "folder (config.json with _class_name ControlNetModel) or file")
    if (path / "config.json").is_file():
        cfg = io.read_json(path / "config.json")
        kind = cfg.get("_class_name", "ControlNetModel")
        if kind != "ControlNetModel":
            what = {"UNet2DConditionModel": "a U-Net", "T2IAdapter": "a T2I-Adapter",
                    "AutoencoderKL": "a VAE"}.get(kind, kind)
            raise ValueError(f"{path}: config.json is for {what} ({kind}), not a ControlNet (ControlNetModel)")
        if unet_config:
            raise ValueError(f"unet_config: {path} is a diffusers folder, whose config.json says it all")
        return ControlNetModel.from_pretrained(path, dtype)
    files = [p for p in sorted(path.iterdir()) if p.suffix.lower() in (".safetensors", *sf.PICKLE_SUFFIXES)]
    if len(files) == 1:
        return load_controlnet(files[0], dtype, unet_config=unet_config)
    found = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(f"{path}: no config.json (a diffusers ControlNet folder) and not one weights file to "
                            f"read; found {found or 'nothing'}")


def _global_pool(path: Path) -> bool:
    """Whether the ControlNet averages its residuals over the map (ControlNet 1.1's shuffle model): the
    `global_average_pooling` of the .yaml beside the file, else "shuffle" in its name (AUTOMATIC1111's rule)."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"^\s*global_average_pooling\s*:\s*(\w+)", yaml.read_text(errors="replace"), re.MULTILINE)
        return bool(m) and m.group(1).lower() == "true"
    return "shuffle" in path.stem.lower()


def controlnet_from_state(state: dict[str, torch.Tensor], source: str = "ControlNet", dtype=torch.float32, *,
                          unet_config: dict[str, Any] | None = None, global_pool: bool = False,
                          diffusers_config: dict[str, Any] | None = None):
    """`load_controlnet` after the file is read: a state dict in lllyasviel's or diffusers' names -> a
    ControlNetModel (meta tensors give one on the meta device: shape checks without memory)."""
    from imagine.models.controlnet import ControlNetModel

    name = Path(source).name
    state = _controlnet_part(state, name)
    if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers' names
        if diffusers_config is not None and not unet_config:
            with torch.device("meta"):
                model = ControlNetModel.from_config_dict(diffusers_config)
            sf._assign(model, sf._cast(state, dtype), f"{name} (with the config.json beside it)")
            return model.eval()
        state = _diffusers_to_original(state, name)
    hint = _hint_convs(state, name)
    unet = {k: v for k, v in state.items() if k.startswith(UNET_PARTS)}
    what = f"{name} (the ControlNet's input_blocks / middle_block)"
    text_time = any(k.startswith("label_emb.") for k in unet)
    if text_time:  # SDXL: the pooled text and six size codes go into the time embedding
        from imagine.loading import sdxl

        adm_in = sf._need(unet, "label_emb.0.0.weight", what).shape[1]
        time_dim = int((unet_config or {}).get("addition_time_embed_dim") or SDXL_SIZE_CODE_WIDTH)
        if adm_in - 6 * time_dim < 1:
            raise ValueError(f"{what}: label_emb.0.0 takes {adm_in} inputs, too few for a pooled text vector and 6 "
                             f"size codes {time_dim} wide (SDXL: 1280 + 6 x 256 = 2816); give the width as "
                             "unet_config={'addition_time_embed_dim': ...}")
        ucfg, layers, attention = sdxl.infer_unet_config(unet, adm_in - 6 * time_dim, encoder_only=True, what=what)
    else:
        ucfg, layers, attention = sf.infer_unet_config(unet, encoder_only=True, what=what)
    ucfg.pop("up_block_types", None)  # (the ControlNet has no expanding path)
    ucfg.update(unet_config or {})
    mapped = keymap.controlnet_to_diffusers(state, layers, attention, len(hint), ucfg["mid_block_type"] is not None,
                                            text_time)
    first = state["input_hint_block.0.weight"]
    # the encoder's widths: conv_in's, then each stride-2 convolution's (blocks 1, 3, ...: hint convs 4, 8, ...)
    widths = [int(first.shape[0])] + [int(state[f"input_hint_block.{i}.weight"].shape[0]) for i in hint[2:-1:2]]
    cfg = {**ucfg, "conditioning_channels": int(first.shape[1]), "conditioning_embedding_out_channels": widths,
           "global_pool_conditions": bool(global_pool)}
    try:
        with torch.device("meta"):
            model = ControlNetModel.from_config_dict(cfg)
    except ValueError as e:
        raise ValueError(f"{name}: the ControlNet read off the weights is not buildable: {e}") from None
    sf._assign(model, sf._cast(mapped, dtype), f"{name} (ControlNet)")
    if global_pool:
        log.info("%s: a ControlNet that averages its residuals over the map (global_average_pooling)", name)
    return model.eval()


def _controlnet_part(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The ControlNet's weights without `control_model.` (a ControlNet 1.0 file's SD networks left out), or a
    clear error for what is not a ControlNet."""
    keys = list(state)
    for test, what in OTHER_KINDS:
        if any(test(k) for k in keys):
            raise ValueError(f"{name} looks like {what}, not a ControlNet; imagine runs ControlNets (lllyasviel's "
                             "files or diffusers' ControlNetModel)")
    inner = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if inner:
        rest = len(state) - len(inner)
        if rest:
            log.info("%s: %d weights beside control_model.* (a ControlNet 1.0 file carries the SD model it was "
                     "trained with) left out", name, rest)
        state = inner
    if "input_hint_block.0.weight" in state or "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    keys = list(state)
    if any(k.startswith(keymap.UNET_PREFIX) for k in keys):
        raise ValueError(f"{name} is a Stable Diffusion checkpoint (model.diffusion_model.*: its U-Net), not a "
                         "ControlNet: a ControlNet file has input_hint_block.* (the control picture's encoder) and "
                         "zero_convs.*; load it with --model, and the ControlNet with --controlnet")
    if "input_blocks.0.0.weight" in state and (any(k.startswith("output_blocks.") for k in keys) or "out.2.weight" in state):
        raise ValueError(f"{name} holds a U-Net (input_blocks, output_blocks, out.*: the LDM layout), not a "
                         "ControlNet, which has input_hint_block.* and zero_convs.* and no output blocks")
    if any(k.startswith("up_blocks.") for k in keys) or "conv_out.weight" in state:
        raise ValueError(f"{name} holds a diffusers U-Net (down_blocks, up_blocks, conv_out), not a ControlNet "
                         "(controlnet_cond_embedding.*, controlnet_down_blocks.*)")
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        raise ValueError(f"{name} holds a VAE (encoder.*, decoder.*), not a ControlNet")
    tops = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(tops[:10]) + (f" ... ({len(tops)} groups)" if len(tops) > 10 else "")
    raise ValueError(f"{name}: not a ControlNet layout imagine knows: expected lllyasviel's names (input_hint_block.*, "
                     f"zero_convs.*, input_blocks.*, middle_block_out.*, optionally under control_model.) or "
                     f"diffusers' (controlnet_cond_embedding.*, controlnet_down_blocks.*); found {shown}")


def _hint_convs(state: dict[str, torch.Tensor], name: str) -> list[int]:
    """The indices of the hint encoder's convolutions, 0, 2, ..., 2(m - 1), m even (a width and its stride-2
    step per level of the encoder: diffusers' ControlNetConditioningEmbedding), checked."""
    found = sorted({int(k.split(".")[1]) for k in state if re.match(r"input_hint_block\.\d+\.(weight|bias)$", k)})
    expected = list(range(0, 2 * len(found), 2))
    if found != expected or len(found) < 2 or len(found) % 2:
        raise ValueError(f"{name}: input_hint_block has convolutions at {found}; expected an even number of them at "
                         "0, 2, 4, ... (lllyasviel's hint encoder: 0, 2, ..., 14)")
    for i in found:
        w = state.get(f"input_hint_block.{i}.weight")
        if w is None or w.ndim != 4:
            raise ValueError(f"{name}: input_hint_block.{i}.weight should be a convolution's weight; got "
                             f"{None if w is None else tuple(w.shape)}")
    return found


def _diffusers_to_original(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Diffusers-named ControlNet weights without a config -> lllyasviel's names, the layout read off the names
    (levels, residual blocks per level, which levels attend, the hint encoder's depth), so that the original
    layout's shape inference reads them."""
    levels = {int(m[1]) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    if not levels or levels != set(range(len(levels))):
        raise ValueError(f"{name}: diffusers ControlNet weights without down_blocks.0 ... ; found levels {sorted(levels)}")
    layers = [len({int(m[1]) for k in state if (m := re.match(rf"down_blocks\.{i}\.resnets\.(\d+)\.", k))})
              for i in range(len(levels))]
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(len(levels))]
    blocks = {int(m[1]) for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    return keymap.controlnet_to_original(state, layers, attention, len(blocks) + 2,
                                         any(k.startswith("mid_block.") for k in state),
                                         any(k.startswith("add_embedding.") for k in state))
