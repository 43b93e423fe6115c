"""Upscaler models: ESRGAN-family, Real-ESRGAN compact, SwinIR, HAT, DAT, SPAN and RealPLKSR files read from disk,
run over tiles, as the apps run them.

People keep super-resolution networks beside their Stable Diffusion checkpoints ("4x-UltraSharp.pth",
"RealESRGAN_x4plus.pth", ...) and use them in three places: to enlarge a picture (AUTOMATIC1111's Extras tab,
ComfyUI's "Upscale Image (using Model)"), and in the hires. fix, where the first pass's pictures are enlarged by the
model before the second pass. Their networks are in `imagine.models` (esrgan, swinir, hat, dat, span, plksr); this
module reads the files (any of the layouts in use: ESRGAN's original "model.N" sequence, BSRGAN/RealSR's,
Real-ESRGAN's, the transformers' authors' names, with "params_ema" / "params" wrappers and "module." prefixes), and
runs a model over a picture the way each app does, so that its pictures are the app's:

- `tiled_scale`: ComfyUI's tiling (comfy.utils.tiled_scale_multidim, as its ImageUpscaleWithModel calls it: 512-pixel
  tiles overlapping by 32, each tile's result weighted by a ramp over the overlap, in float). Our default too.
- `a1111_tiled`: AUTOMATIC1111's (modules/upscaler_utils.upscale_with_model: 192-pixel tiles overlapping by 8 cut
  with images.split_grid, each run on its own as an 8-bit picture and pasted back with images.combine_grid's
  8-bit masks; its pictures go in as BGR, as it passes them).
- `a1111_tiled_2`: A1111's upscale_2, the way it runs SwinIR (the same tiles' results averaged in float, BGR).
- `a1111_upscale`: A1111's Upscaler.upscale: the model run up to 3 times until the picture reaches the size
  (its sides to a multiple of 8 below), then Lanczos to that size; its "Lanczos", "Nearest" and "None" upscalers.

`UpscaleModel.__call__` runs the network as spandrel (the loader ComfyUI and A1111 use) does: the picture padded
to the model's size multiple (reflect, then replicate), the padding cut off after, the result clamped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from imagine.models.dat import DAT
from imagine.models.esrgan import CompactSRNet, RRDBNet
from imagine.models.hat import HAT
from imagine.models.plksr import RealPLKSR
from imagine.models.span import SPAN
from imagine.models.swinir import SwinIR

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
# A1111's names for Real-ESRGAN's published files (modules/realesrgan_model.get_realesrgan_models): its API and
# infotexts name these models so, and the others by their file name without the suffix
A1111_REALESRGAN_NAMES = {"RealESRGAN_x4plus": "R-ESRGAN 4x+", "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
                          "RealESRGAN_x2plus": "R-ESRGAN 2x+", "realesr-general-x4v3": "R-ESRGAN General 4xV3",
                          "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
                          "realesr-animevideov3": "R-ESRGAN AnimeVideo"}
# ... and every model's: SwinIR's built-in one is saved as SwinIR_4x.pth (extensions-builtin/SwinIR), its DAT ones as
# DAT_x2.pth ... (modules/dat_model.get_dat_models)
A1111_NAMES = {**A1111_REALESRGAN_NAMES, "SwinIR_4x": "SwinIR 4x", "DAT_x2": "DAT x2", "DAT_x3": "DAT x3",
               "DAT_x4": "DAT x4"}
# the embedded upscaler: Real-ESRGAN's compact net, x4, trained here on the shapes task's scenes (64 -> 256 px) by
# imagine train upscaler --config configs/shapes-upscaler-x4.yaml (docs/upscalers.md)
EMBEDDED_UPSCALER = Path(__file__).resolve().parent / "weights" / "upscaler-shapes-x4"
A1111_TILE, A1111_OVERLAP = 192, 8  # A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults
COMFYUI_TILE, COMFYUI_OVERLAP = 512, 32  # ComfyUI's ImageUpscaleWithModel
A1111_PASSES = 3  # Upscaler.upscale runs the model at most this many times


@dataclass(eq=False)  # (one object per file version, compared and hashed as itself: a server's jobs hold it)
class UpscaleModel:
    """A loaded upscaler: `net` (RRDBNet, CompactSRNet, SwinIR, HAT, DAT, SPAN or RealPLKSR), `scale` (how much
    larger its pictures come out), `architecture` ("ESRGAN", "ESRGAN+", "Real-ESRGAN Compact", "SwinIR", "HAT",
    "DAT", "SPAN", "RealPLKSR"), `multiple_of` and `minimum` (the sizes its input is padded to, as spandrel pads),
    `name` (the file's stem) and `path`."""

    net: torch.nn.Module
    scale: int
    architecture: str
    multiple_of: int = 1
    minimum: int = 2
    name: str = ""
    path: str = ""
    precision: str = "exact"  # "exact": float32; "fast": bf16 where the CPU has it (`with_precision`)

    def with_precision(self, precision: str) -> "UpscaleModel":
        """This model run in `precision`: "exact" (float32, its weights packed once for oneDNN: the same
        arithmetic, 2e-6 from plain float32) or "fast" (text_to_image.fast_copy: bf16 channels-last on a CPU with
        native bf16; 2.4x spandrel's float32 on ESRGAN's 4x network on a Zen 4, see `imagine bench upscale`).
        The copies are made once per network and shared."""
        if precision not in ("exact", "fast"):
            raise ValueError(f"precision must be 'exact' or 'fast'; got {precision!r}")
        return self if precision == self.precision else dataclasses.replace(self, precision=precision)

    @property
    def a1111_name(self) -> str:
        """The name AUTOMATIC1111 lists this model under (Real-ESRGAN's published files by its own names)."""
        return A1111_NAMES.get(self.name, self.name)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 3, h, w) in [0, 1] -> (batch, 3, h * scale, w * scale) in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"an upscaler takes pictures as (batch, 3, height, width); got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        size = lambda n: max(self.minimum, -(-n // self.multiple_of) * self.multiple_of)  # noqa: E731
        pad_h, pad_w = size(h) - h, size(w) - w
        if pad_h or pad_w:  # reflect as far as it reaches (size - 1), then replicate, as spandrel pads
            rh, rw = min(pad_h, h - 1), min(pad_w, w - 1)
            x = torch.nn.functional.pad(x, (0, rw, 0, rh), "reflect")
            x = torch.nn.functional.pad(x, (0, pad_w - rw, 0, pad_h - rh), "replicate")
        return self.raw(x)[..., :h * self.scale, :w * self.scale].clamp_(0, 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself in this precision, on pictures of sizes it takes: float32 out, not clamped."""
        from imagine.pipelines.text_to_image import exact_copy, fast_copy

        net = fast_copy(self.net) if self.precision == "fast" else exact_copy(self.net)
        return net(x.to(next(net.parameters()).dtype)).float()


# ---------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------
def load_upscale_model(path: str | os.PathLike) -> UpscaleModel:
    """An upscaler file (.pth / .pt read with torch.load(weights_only=True), or .safetensors) as an UpscaleModel,
    its architecture and sizes found from its weights. A file of another kind gets an error naming what it holds."""
    from imagine.loading.single_file import read_weights_file

    from imagine.models import io

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"upscaler model not found: {path}")
    if path.is_dir():  # (a folder of config.json and weights: imagine train upscaler's export)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json; an upscaler model is one file (.pth, .pt or "
                             ".safetensors), or a folder imagine train upscaler exported")
        model = upscale_model_from_state(io.load_tensors(io.find_weights(path)), str(path))
        model.name, model.path = path.name, str(path)
        return model
    state = read_weights_file(path)
    model = upscale_model_from_state(state, str(path))
    model.name, model.path = path.stem, str(path)
    return model


def upscale_model_from_state(state: dict, source: str = "upscaler") -> UpscaleModel:
    """`load_upscale_model` on weights already read."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a dict of weights")
    for wrapper in ("params_ema", "params", "state_dict", "model"):  # (BasicSR's and Lightning's nestings)
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()
             if isinstance(k, str) and torch.is_tensor(v)}
    # (each architecture by a name only it has; a weight its reader needs and the file lacks is named)
    for kind, found, read in (
            ("Real-ESRGAN Compact", "body.0.weight" in state and "body.1.weight" in state
             and state["body.1.weight"].ndim == 1, lambda: _compact(state)),
            ("HAT", "layers.0.residual_group.overlap_attn.relative_position_bias_table" in state,
             lambda: _hat(state, source)),
            ("SwinIR", "layers.0.residual_group.blocks.0.norm1.weight" in state, lambda: _swinir(state, source)),
            ("DAT", "before_RG.1.weight" in state and "layers.0.blocks.0.ffn.sg.conv.weight" in state,
             lambda: _dat(state, source)),
            ("SPAN", "conv_1.sk.weight" in state and "block_1.c1_r.sk.weight" in state, lambda: _span(state, source)),
            ("RealPLKSR", "feats.0.weight" in state and "feats.1.refine.weight" in state,
             lambda: _plksr(state, source))):
        if found:
            try:
                return read()
            except KeyError as e:
                raise ValueError(f"{source}: a {kind} upscaler without {e.args[0]}, which its weights need") from None
    renamed = esrgan_state(state, source)
    return _rrdb(renamed, source)


def _compact(state: dict) -> UpscaleModel:
    last = max(int(m.group(1)) for k in state if (m := re.fullmatch(r"body\.(\d+)\.weight", k)))
    in_ch, features = state["body.0.weight"].shape[1], state["body.0.weight"].shape[0]
    out_ch, scale = _shuffled_out(state[f"body.{last}.weight"].shape[0], in_ch, "a compact upscaler")
    net = CompactSRNet(in_ch, out_ch, features, (last - 2) // 2, scale)
    _load(net, state, "Real-ESRGAN Compact")
    return UpscaleModel(net.eval(), scale, "Real-ESRGAN Compact")


# the layouts' names for RRDBNet's parts (ESRGAN's "old arch" is handled apart: its parts are numbered in sequence)
_RENAMES = (
    (re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)"), r"body.\1.rdb\2.conv\3.\4"),  # BSRGAN/RealSR
    (re.compile(r"trunk_conv\.(weight|bias)"), r"conv_body.\1"),
    (re.compile(r"upconv(\d)\.(weight|bias)"), r"conv_up\1.\2"),
    (re.compile(r"HRconv\.(weight|bias)"), r"conv_hr.\1"),
)


def esrgan_state(state: dict, source: str = "upscaler") -> dict:
    """An ESRGAN-family state dict in RRDBNet's names (Real-ESRGAN's), whichever layout it came in: Real-ESRGAN's
    as it is; BSRGAN/RealSR's "RRDB_trunk"/"trunk_conv"/"upconvN"/"HRconv"; ESRGAN's original sequence, where
    model.0 is the first convolution, model.1.sub.i the RRDBs (their convolutions at .0) and model.1.sub.<blocks>
    the trunk's last convolution, then per x2 an upsample, a convolution and an activation (model.3, .6, ...), the
    high-resolution convolution two places later and the last one two after that."""
    if "conv_first.weight" in state:
        out = {}
        for k, v in state.items():
            for rx, new in _RENAMES:
                if rx.fullmatch(k):
                    k = rx.sub(new, k)
                    break
            out[k] = v
        return out
    if "model.0.weight" not in state or not any(k.startswith("model.1.sub.") for k in state):
        found = ", ".join(sorted(state)[:6])
        raise ValueError(f"{source} is not an upscaler model this program reads (ESRGAN / Real-ESRGAN RRDBNet, "
                         f"Real-ESRGAN's compact net, SwinIR, HAT, DAT, SPAN, RealPLKSR): its weights start {found} "
                         "...; expected 'conv_first.weight' and 'body.0.rdb1.conv1.weight', 'model.0.weight' and "
                         "'model.1.sub.0.RDB1.conv1.0.weight', 'body.0.weight' and 'body.1.weight', "
                         "'layers.0.residual_group.blocks.0.norm1.weight' (SwinIR; HAT's with overlap_attn), "
                         "'before_RG.1.weight', 'conv_1.sk.weight' or 'feats.1.refine.weight'")
    out = {"conv_first.weight": state["model.0.weight"], "conv_first.bias": state["model.0.bias"]}
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    for k, v in state.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv1x1\.(weight|bias)", k):
            out[f"body.{m[1]}.rdb{m[2]}.conv1x1.{m[3]}"] = v
    out["conv_body.weight"] = state[f"model.1.sub.{blocks}.weight"]
    out["conv_body.bias"] = state[f"model.1.sub.{blocks}.bias"]
    convs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k)) and m[1] != "0")
    if len(convs) < 2:
        raise ValueError(f"{source}: an ESRGAN sequence without its last convolutions (found model.{convs})")
    *ups, hr, last = convs
    if ups != [3 * (i + 1) for i in range(len(ups))] or hr != 3 * len(ups) + 2 or last != hr + 2:
        raise ValueError(f"{source}: ESRGAN convolutions at model.{convs}; expected upsampling ones at model.3, "
                         "model.6, ... (x2 each: other scales are not read), then two more two places apart")
    for i, n in enumerate(ups, 1):
        out[f"conv_up{i}.weight"], out[f"conv_up{i}.bias"] = state[f"model.{n}.weight"], state[f"model.{n}.bias"]
    out["conv_hr.weight"], out["conv_hr.bias"] = state[f"model.{hr}.weight"], state[f"model.{hr}.bias"]
    out["conv_last.weight"], out["conv_last.bias"] = state[f"model.{last}.weight"], state[f"model.{last}.bias"]
    return out


def _rrdb(state: dict, source: str) -> UpscaleModel:
    need = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_hr.weight", "conv_last.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{source}: an RRDBNet upscaler without {', '.join(missing)}")
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.rdb", k)))
    ups = sum(1 for k in state if re.fullmatch(r"conv_up\d\.weight", k))
    in_ch = state["conv_first.weight"].shape[1]
    out_ch = state["conv_last.weight"].shape[0]
    unshuffle = next((f for f in (2, 4) if in_ch == out_ch * f * f), None)  # (Real-ESRGAN's x2 and x1 models)
    plus = any(".conv1x1." in k for k in state)
    net = RRDBNet(in_ch // (unshuffle or 1) ** 2, out_ch, state["conv_first.weight"].shape[0], blocks,
                  state["body.0.rdb1.conv1.weight"].shape[0], 2 ** ups, plus, unshuffle)
    _load(net, state, "ESRGAN")
    # (spandrel asks the pixel-unshuffle models for sizes a multiple of 4, at least 4, and pads to them)
    return UpscaleModel(net.eval(), net.picture_scale, "ESRGAN+" if plus else "ESRGAN",
                        multiple_of=4 if unshuffle else 1, minimum=4 if unshuffle else 2)


def _swinir(state: dict, source: str) -> UpscaleModel:
    """A SwinIR file (the authors' network_swinir.py names), its configuration read from the weights' names and
    shapes as spandrel reads it: the reconstruction from which of conv_before_upsample / conv_up1 / upsample.0 are
    there, the scale from the upsampling layers, depths and heads per RSTB, the window from the bias index, the
    training crop from the stored shift mask, img_range 255 for window 7 (the JPEG models)."""
    state = dict(state)
    if "conv_first.1.weight" in state:  # (community files starting with a pixel unshuffle: Sequential(unshuffle, conv))
        for p in ("weight", "bias"):
            state[f"conv_first.{p}"] = state.pop(f"conv_first.1.{p}")
    if "absolute_pos_embed" in state:
        raise ValueError(f"{source}: a SwinIR with an absolute position embedding (ape), which ties it to one picture "
                         "size; the released models have none and only those are read")
    first = state["conv_first.weight"]
    embed_dim, in_ch = first.shape[0], first.shape[1]
    if "conv_before_upsample.0.weight" in state:
        upsampler = "nearest+conv" if "conv_up1.weight" in state else "pixelshuffle"
    else:
        upsampler = "pixelshuffledirect" if "upsample.0.weight" in state else ""
    out_ch = state["conv_last.weight"].shape[0] if "conv_last.weight" in state else in_ch
    features = state["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in state else 64
    if upsampler == "nearest+conv":
        scale = 2 ** sum(1 for k in state if re.fullmatch(r"conv_up\d\.weight", k))
    elif upsampler == "pixelshuffle":
        scale = _upsample_scale(state, features)
    elif upsampler == "pixelshuffledirect":
        scale = math.isqrt(state["upsample.0.bias"].shape[0] // out_ch)
    else:
        scale = 1
    block0 = "layers.0.residual_group.blocks.0."
    window = math.isqrt(state[block0 + "attn.relative_position_index"].shape[0]) \
        if block0 + "attn.relative_position_index" in state \
        else (math.isqrt(state[block0 + "attn.relative_position_bias_table"].shape[0]) + 1) // 2
    mask = state.get("layers.0.residual_group.blocks.1.attn_mask")
    img_size = math.isqrt(mask.shape[0]) * window if mask is not None else 64
    n_layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    depths = [1 + max(int(m[1]) for k in state if (m := re.match(rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.", k)))
              for i in range(n_layers)]
    heads = [state[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
             for i in range(n_layers)]
    mlp_ratio = state[block0 + "mlp.fc1.bias"].shape[0] / embed_dim
    unshuffle = next((u for u in (1, 2, 4) if in_ch % (u * u) == 0 and in_ch // (u * u) in (1, 3, 4)
                      and (u == 1 or in_ch // (u * u) == out_ch)), 1)
    net = SwinIR(in_ch // unshuffle ** 2, out_ch, embed_dim, depths, heads, window, mlp_ratio, upsampler, scale,
                 features, "1conv" if "conv_after_body.weight" in state else "3conv", 255.0 if window == 7 else 1.0,
                 "patch_embed.norm.weight" in state, img_size, unshuffle)
    # the buffers its files carry: the shift masks for the training crop (made per size here) and the bias index
    state = {k: v for k, v in state.items() if not k.endswith(".attn_mask")}
    for k, v in net.state_dict().items():
        if k.endswith("relative_position_index"):
            if k in state and not torch.equal(state[k].long(), v):
                raise ValueError(f"{source}: its {k} is not the relative position index of a {window}x{window} window")
            state[k] = v
    _load(net, state, "SwinIR")
    # (spandrel asks SwinIR for pictures of at least 16 pixels, a multiple of unshuffle^2, and pads to them)
    return UpscaleModel(net.eval(), net.picture_scale, "SwinIR", multiple_of=unshuffle ** 2, minimum=16)


def _shuffled_out(channels: int, in_ch: int, what: str) -> tuple[int, int]:
    """(output channels, scale) of a last convolution making `channels` = out * scale^2 for a pixel shuffle."""
    square = lambda n: math.isqrt(n) ** 2 == n  # noqa: E731
    out_ch = next((c for c in (in_ch, 3, 4, 1) if channels % c == 0 and square(channels // c)), None)
    if out_ch is None:
        raise ValueError(f"{what} whose last layer makes {channels} channels: not out * scale^2 for 1, 3 or 4 output "
                         "channels")
    return out_ch, math.isqrt(channels // out_ch)


def _upsample_scale(state: dict, features: int) -> int:
    """The scale of a "pixelshuffle" reconstruction (SwinIR's, DAT's): the product of its convolutions' shuffles."""
    convs = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"upsample\.(\d+)\.weight", k)))
    return math.prod(math.isqrt(state[f"upsample.{i}.weight"].shape[0] // features) for i in convs)


def _dat(state: dict, source: str) -> UpscaleModel:
    """A DAT file (the authors' names): width, blocks and heads per group (heads from a channel block's temperature,
    or twice a spatial block's bias heads), the rectangles from the stored offsets, the FFN's expansion, the
    reconstruction and its scale, the 1conv / 3conv residual, as spandrel reads them; the upsampling width from the
    weights (spandrel builds 64 always)."""
    first = state["conv_first.weight"]
    dim, in_ch = first.shape[0], first.shape[1]
    groups = 1 + max(int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.blocks\.", k)))
    depths = [1 + max(int(m[1]) for k in state if (m := re.match(rf"layers\.{g}\.blocks\.(\d+)\.", k)))
              for g in range(groups)]
    heads = [state[f"layers.{g}.blocks.1.attn.temperature"].shape[0] if depths[g] >= 2 else
             2 * state[f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0] for g in range(groups)]
    offsets = state.get("layers.0.blocks.0.attn.attns.0.rpe_biases")
    if offsets is None:
        raise ValueError(f"{source}: a DAT without layers.0.blocks.0.attn.attns.0.rpe_biases, which gives its "
                         "attention rectangles")
    split = tuple(int(v) + 1 for v in offsets[-1])
    pixelshuffle = "conv_last.weight" in state
    features = state["conv_before_upsample.0.weight"].shape[0] if pixelshuffle else dim
    scale = _upsample_scale(state, features) if pixelshuffle else \
        math.isqrt(state["upsample.0.weight"].shape[0] // in_ch)
    net = DAT(in_ch, dim, split, depths, heads, state["layers.0.blocks.0.ffn.fc1.weight"].shape[0] / dim,
              "layers.0.blocks.0.attn.qkv.bias" in state, scale, features,
              "1conv" if "conv_after_body.weight" in state else "3conv",
              "pixelshuffle" if pixelshuffle else "pixelshuffledirect")
    own = net.state_dict()
    state = {k: v for k, v in state.items() if ".attn_mask_" not in k}  # (shift masks for the training crop)
    for k, v in own.items():  # (the offsets and their index: recomputed, checked where the file has them)
        if k.endswith("rpe_biases") or k.endswith("relative_position_index"):
            if k in state and not torch.equal(state[k].to(v.dtype), v):
                raise ValueError(f"{source}: its {k} is not that of a {split[0]}x{split[1]} rectangle")
            state[k] = v
    _load(net, state, "DAT")
    return UpscaleModel(net.eval(), scale, "DAT", minimum=16)  # (spandrel pads DAT's pictures to 16 at least)


def _hat(state: dict, source: str) -> UpscaleModel:
    """A HAT file (the authors' names): width, blocks and heads per group, the window from its bias table, the
    overlapping window from the OCAB's, every hidden width from its layer's shape (where spandrel turns them into
    ratios and back), the 1conv / identity residual, the patch norm; the CAB's weight alpha = 0.01 as all HAT
    models use (the weights cannot say)."""
    if "absolute_pos_embed" in state:
        raise ValueError(f"{source}: a HAT with an absolute position embedding (ape), which ties it to one picture "
                         "size; the released models have none and only those are read")
    first = state["conv_first.weight"]
    dim, in_ch = first.shape[0], first.shape[1]
    groups = 1 + max(int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    g = lambda i, rest: f"layers.{i}.residual_group.{rest}"  # noqa: E731
    depths = [1 + max(int(m[1]) for k in state if (m := re.match(re.escape(g(i, "blocks.")) + r"(\d+)\.", k)))
              for i in range(groups)]
    heads = [state[g(i, "overlap_attn.relative_position_bias_table")].shape[1] for i in range(groups)]
    window = (math.isqrt(state[g(0, "blocks.0.attn.relative_position_bias_table")].shape[0]) + 1) // 2
    overlap = math.isqrt(state[g(0, "overlap_attn.relative_position_bias_table")].shape[0]) + 1 - window
    features = state["conv_last.weight"].shape[1]
    net = HAT(in_ch, dim, depths, heads, window, overlap, state[g(0, "blocks.0.mlp.fc1.weight")].shape[0],
              state[g(0, "blocks.0.conv_block.cab.0.weight")].shape[0],
              state[g(0, "blocks.0.conv_block.cab.3.attention.1.weight")].shape[0],
              state[g(0, "overlap_attn.mlp.fc1.weight")].shape[0], g(0, "blocks.0.attn.qkv.bias") in state,
              _upsample_scale(state, features), features,
              "1conv" if "conv_after_body.weight" in state else "identity", "patch_embed.norm.weight" in state)
    for k, v in net.state_dict().items():  # (the position indices: recomputed, checked where the file has them)
        if k.startswith("relative_position_index_"):
            if k in state and not torch.equal(state[k].long(), v):
                raise ValueError(f"{source}: its {k} is not that of a {window}-pixel window with {overlap}-pixel "
                                 "overlapping ones")
            state = {**state, k: v}
    _load(net, state, "HAT")
    return UpscaleModel(net.eval(), net.scale, "HAT", minimum=16)  # (spandrel pads HAT's pictures to 16 at least)


def _span(state: dict, source: str) -> UpscaleModel:
    """A SPAN file: features and input channels from conv_1's skip, output channels and scale from the upsampler, the
    input normalisation unless the file has its "no_norm" buffer; the re-parameterised 3x3s rebuilt from their
    branches (`SPAN.fuse`), as the authors' code does at each call."""
    first = state["conv_1.sk.weight"]
    features, in_ch = first.shape[0], first.shape[1]
    out_ch, scale = _shuffled_out(state["upsampler.0.weight"].shape[0], in_ch, f"{source}: a SPAN")
    net = SPAN(in_ch, out_ch, features, scale, norm="no_norm" not in state)
    own = net.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("eval_conv.weight") or k.endswith("eval_conv.bias")},
             **state}  # (the 3x3s are rebuilt below: a file may leave them out)
    _load(net, state, "SPAN")
    net.fuse()
    return UpscaleModel(net.eval(), scale, "SPAN")


def _plksr(state: dict, source: str) -> UpscaleModel:
    """A RealPLKSR file (`feats.N` names): width, blocks, kernel, the partial channels, element-wise attention and the
    LayerNorm variant from its weights; GroupNorm's 4 groups as the community trains them (the weights cannot say)."""
    if "feats.1.channe_mixer.0.weight" in state:
        raise ValueError(f"{source} is a PLKSR of the paper's own code (feats.N.channe_mixer): only RealPLKSR files "
                         "(feats.N.channel_mixer) are read")
    if "to_img.init_pos" in state:
        raise ValueError(f"{source} is a RealPLKSR with DySample's learned upsampler (to_img.*), which is not read "
                         "here; RealPLKSR files with a pixel shuffle are")
    if "feats.1.lk.conv.weight" not in state:
        raise ValueError(f"{source}: a RealPLKSR without feats.1.lk.conv.weight (its large kernel)")
    dim = state["feats.0.weight"].shape[0]
    last = max(int(m[1]) for k in state if (m := re.fullmatch(r"feats\.(\d+)\.weight", k)))
    _, scale = _shuffled_out(state[f"feats.{last}.weight"].shape[0], 3, f"{source}: a RealPLKSR")
    lk = state["feats.1.lk.conv.weight"]
    net = RealPLKSR(dim, last - 2, scale, lk.shape[2], lk.shape[0] / dim, "feats.1.attn.f.0.weight" in state,
                    "feats.1.layer_norm.weight" in state)
    _load(net, state, "RealPLKSR")
    return UpscaleModel(net.eval(), scale, "RealPLKSR")


def _load(net: torch.nn.Module, state: dict, kind: str) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"a {kind} upscaler whose weights do not fit the network inferred from them: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"a {kind} upscaler whose {k} is {tuple(state[k].shape)}, not {tuple(own[k].shape)} as the "
                         "rest of its weights imply")
    net.load_state_dict({k: v.float() for k, v in state.items()})


# the subfolders of A1111's and ComfyUI's models/ folders that hold upscalers: a models/ folder given as a whole is
# read through these only (its checkpoints, LoRAs and VAEs are not upscalers)
UPSCALER_SUBFOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "upscale_models")


def find_upscalers(folder: str | os.PathLike) -> dict[str, Path]:
    """The upscaler files in `folder` (and its subfolders), by file stem, sorted by name; for a models/ folder of A1111
    or ComfyUI (one with an ESRGAN, RealESRGAN, SwinIR, DAT, HAT or upscale_models subfolder) those subfolders' only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"upscaler folder not found: {folder}")
    roots = [folder / name for name in UPSCALER_SUBFOLDERS if (folder / name).is_dir()] or [folder]
    files = sorted(p for root in roots for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES)
    return {p.stem: p for p in files}


def upscaler_named(name: str, folder: str | os.PathLike | None = None) -> UpscaleModel | None:
    """The upscaler model `name` stands for: a file path (or a folder imagine train upscaler exported), or (with
    `folder`) a file there by its stem or by the name A1111 lists it under ("R-ESRGAN 4x+" for
    RealESRGAN_x4plus.pth), or "default": the embedded shapes upscaler (EMBEDDED_UPSCALER, x4, trained for the
    embedded default model's pictures) unless `folder` has a model of that name; None when it names no model (a
    built-in upscaler's name such as "Lanczos" or "Latent", or a model that is not there). Loaded once per file
    version."""
    path = Path(name)
    if (path.suffix.lower() in UPSCALER_SUFFIXES and path.is_file()) or (path / "config.json").is_file():
        return cached_upscale_model(path)
    found = None
    if folder is not None:
        files = find_upscalers(folder)
        by_a1111 = {A1111_NAMES.get(stem, stem).lower(): p for stem, p in files.items()}
        found = files.get(name) or by_a1111.get(name.lower())
    if found is None and name == "default":
        found = EMBEDDED_UPSCALER
    return None if found is None else cached_upscale_model(found)


def cached_upscale_model(path: str | os.PathLike) -> UpscaleModel:
    """`load_upscale_model`, loaded once per file version (the last 4 kept): a server's requests share it."""
    path = Path(path).resolve()
    return _load_cached(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> UpscaleModel:
    return load_upscale_model(path)


# ---------------------------------------------------------------------------------------------
# Running one over a picture
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def tiled_scale(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], scale: float, tile: int = COMFYUI_TILE,
                overlap: int = COMFYUI_OVERLAP, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`fn` (a picture -> `scale` times larger) over tiles of `x` (batch, c, h, w), ComfyUI's tiled_scale: a picture
    that fits one tile runs whole; else tiles start every tile - overlap pixels (the last ones cut by the edge,
    shifted back to start at most `overlap` before it), and each result is weighted, along each side longer than
    the ramp, by (t + 1) / ramp at its t-th row from either edge (ramp = overlap * scale), the weighted sum
    divided by the weights. `progress(done, total)` after each tile."""
    b, _, h, w = x.shape
    out_h, out_w = round(h * scale), round(w * scale)
    ramp = round(overlap * scale)
    starts = [range(0, n - overlap, tile - overlap) if n > tile else [0] for n in (h, w)]
    total = b * (1 if h <= tile and w <= tile else len(starts[0]) * len(starts[1]))
    results, done = [], 0
    for i in range(b):
        one = x[i:i + 1]
        if h <= tile and w <= tile:
            results.append(fn(one).float())
            done += 1
            if progress:
                progress(done, total)
            continue
        acc = torch.zeros(1, 3, out_h, out_w)
        weight = torch.zeros_like(acc)
        for y0 in starts[0]:
            for x0 in starts[1]:
                y = max(0, min(h - overlap, y0))
                xx = max(0, min(w - overlap, x0))
                part = fn(one[..., y:y + min(tile, h - y), xx:xx + min(tile, w - xx)]).float()
                mask = torch.ones_like(part)
                for dim in (2, 3):
                    n = mask.shape[dim]
                    if ramp >= n:
                        continue
                    for t in range(ramp):
                        mask.narrow(dim, t, 1).mul_((t + 1) / ramp)
                        mask.narrow(dim, n - 1 - t, 1).mul_((t + 1) / ramp)
                oy, ox = round(y * scale), round(xx * scale)
                acc[..., oy:oy + part.shape[2], ox:ox + part.shape[3]] += part * mask
                weight[..., oy:oy + part.shape[2], ox:ox + part.shape[3]] += mask
                done += 1
                if progress:
                    progress(done, total)
        results.append(acc / weight)
    return torch.cat(results)


def upscale_pictures(model: UpscaleModel, x: torch.Tensor, tile: int = COMFYUI_TILE, overlap: int = COMFYUI_OVERLAP,
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """ComfyUI's ImageUpscaleWithModel on (batch, 3, h, w) pictures in [0, 1]: the model over `tiled_scale`'s tiles
    (`tile` 0: whole), the result clamped to [0, 1]."""
    if tile < 0 or overlap < 0 or (tile and overlap >= tile):
        raise ValueError(f"tile must be 0 (whole pictures) or more than overlap >= 0; got tile {tile}, "
                         f"overlap {overlap}")
    if not tile:
        return model(x).clamp(0, 1)
    return tiled_scale(x, model, model.scale, tile, overlap, progress).clamp(0, 1)


def upscale_image(model: UpscaleModel, image: Image.Image, scale: float | None = None,
                  size: tuple[int, int] | None = None, tile: int = COMFYUI_TILE, overlap: int = COMFYUI_OVERLAP,
                  progress: Callable[[int, int], None] | None = None) -> Image.Image:
    """`image` made `scale` times larger (default: the model's own scale), or to `size` (width, height): the model
    run until the picture is at least that large (at most A1111_PASSES times), then Lanczos to the size wanted,
    rounded to whole pixels. Tiles as `upscale_pictures` (blended in float, RGB, rounded to 8 bits at the end)."""
    if size is None:
        scale = float(model.scale if scale is None else scale)
        if not scale > 0:
            raise ValueError(f"scale must be more than 0; got {scale}")
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    elif scale is not None:
        raise ValueError("give scale or size, not both")
    image = image.convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    for _ in range(A1111_PASSES):
        if x.shape[3] >= size[0] and x.shape[2] >= size[1]:
            break
        x = upscale_pictures(model, x, tile, overlap, progress)
    out = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGB")
    return out if out.size == tuple(size) else out.resize(tuple(size), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111's way
# ---------------------------------------------------------------------------------------------
def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """images.split_grid's tile positions along a side of n pixels: ceil((n - overlap) / (tile - overlap)) tiles
    spread evenly (int of k * (n - tile) / (count - 1)), a tile reaching the edge moved to end at it (so a side
    shorter than a tile gets one tile starting before the picture, its outside black)."""
    count = math.ceil((n - overlap) / (tile - overlap))
    step = (n - tile) / (count - 1) if count > 1 else 0
    return [n - tile if int(k * step) + tile >= n else int(k * step) for k in range(count)]


def _model_on_8bit(model: UpscaleModel, tile: Image.Image) -> Image.Image:
    """A1111's upscale_pil_patch: an 8-bit RGB picture in as BGR in [0, 1], the result clamped, rounded to 8 bits
    and turned back to RGB."""
    bgr = np.ascontiguousarray(np.asarray(tile.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255
    out = model(torch.from_numpy(bgr)[None].float())[0]
    arr = (255.0 * out.clamp(0, 1).permute(1, 2, 0).numpy()).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1]), "RGB")


@dataclass
class Grid:
    """A1111's images.Grid: `rows` of (y, [(x, tile picture)]), the tiles' size, the whole picture's, the overlap."""

    rows: list
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """A1111's images.split_grid: `image` cut into tile_w x tile_h tiles overlapping by at least `overlap`
    (`_tile_starts` along each side; a tile reaching past the picture is black there)."""
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"the tiles' overlap must be at least 0 and less than a tile's side ({tile_w}x{tile_h}); "
                         f"got {overlap}")
    w, h = image.size
    rows = [(y, [(x, image.crop((x, y, x + tile_w, y + tile_h))) for x in _tile_starts(w, tile_w, overlap)])
            for y in _tile_starts(h, tile_h, overlap)]
    return Grid(rows, tile_w, tile_h, w, h, overlap)


def combine_grid(grid: Grid) -> Image.Image:
    """A1111's images.combine_grid: within a row, each tile after the first pasted over its left neighbour through an
    8-bit mask rising from 0 over its first `overlap` columns (int(255 t / overlap)), then the rest of it on top; the
    rows likewise, top to bottom."""
    ov, th = grid.overlap, grid.tile_h
    ramp = (np.arange(ov, dtype=np.float32) * 255 / max(ov, 1)).astype(np.uint8)
    mask_w = Image.fromarray(np.repeat(ramp[None, :], th, 0), "L") if ov else None
    mask_h = Image.fromarray(np.repeat(ramp[:, None], grid.image_w, 1), "L") if ov else None
    picture = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, row in grid.rows:
        line = Image.new("RGB", (grid.image_w, th))
        for x, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            if ov:
                line.paste(tile.crop((0, 0, ov, th)), (x, 0), mask=mask_w)
            line.paste(tile.crop((ov, 0, tile.width, th)), (x + ov, 0))
        if y == 0:
            picture.paste(line, (0, 0))
            continue
        if ov:
            picture.paste(line.crop((0, 0, line.width, ov)), (0, y), mask=mask_h)
        picture.paste(line.crop((0, ov, line.width, th)), (0, y + ov))
    return picture


def a1111_tiled(model: UpscaleModel, image: Image.Image, tile: int = A1111_TILE,
                overlap: int = A1111_OVERLAP) -> Image.Image:
    """A1111's upscale_with_model: `image` cut into tiles (`split_grid`), each run on its own (`_model_on_8bit`),
    and put together by `combine_grid` at the model's scale. `tile` <= 0: the whole picture at once."""
    if tile <= 0:
        return _model_on_8bit(model, image)
    grid = split_grid(image, tile, tile, overlap)
    s = model.scale
    rows = [(y * s, [(x * s, _model_on_8bit(model, t)) for x, t in row]) for y, row in grid.rows]
    return combine_grid(Grid(rows, tile * s, tile * s, grid.image_w * s, grid.image_h * s, overlap * s))


def a1111_tiled_2(model: UpscaleModel, image: Image.Image, tile: int = A1111_TILE,
                  overlap: int = A1111_OVERLAP) -> Image.Image:
    """A1111's upscale_2 (upscaler_utils.tiled_upscale_2, the way it runs SwinIR: SWIN_tile 192, SWIN_tile_overlap
    8): the picture as BGR in float, tiles of min(tile, h, w) starting every tile - overlap pixels with the last one
    at the edge, each tile's result added in and the sum divided by how many tiles cover each pixel (no ramp), then
    clamped and rounded to 8 bits. `tile` <= 0: the whole picture at once."""
    bgr = torch.from_numpy(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255)
    x = bgr.float()[None]
    _, c, h, w = x.shape
    tile, s = min(tile, h, w), model.scale
    if tile <= 0:
        out = model(x)
    else:
        if not 0 <= overlap < tile:
            raise ValueError(f"the tiles' overlap must be at least 0 and less than a tile's side ({tile}); "
                             f"got {overlap}")
        starts = lambda n: list(range(0, n - tile, tile - overlap)) + [n - tile]  # noqa: E731
        out, count = torch.zeros(1, c, h * s, w * s), torch.zeros(1, 1, h * s, w * s)
        for y in starts(h):
            for x0 in starts(w):
                out[..., y * s:(y + tile) * s, x0 * s:(x0 + tile) * s] += model(x[..., y:y + tile, x0:x0 + tile])
                count[..., y * s:(y + tile) * s, x0 * s:(x0 + tile) * s] += 1
        out = out / count
    arr = (255.0 * out[0].clamp(0, 1).permute(1, 2, 0).numpy()).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1]), "RGB")


def a1111_upscale(image: Image.Image, scale: float, upscaler: UpscaleModel | str,
                  tile: int = A1111_TILE, overlap: int = A1111_OVERLAP) -> Image.Image:
    """A1111's Upscaler.upscale: the size wanted is int(side * scale) down to a multiple of 8; `upscaler` (a model,
    or "Lanczos" / "Nearest", which resize by `scale` in one go) runs until the picture is at least that large (at
    most 3 times; at once for scale 1 only if smaller), then a Lanczos resize to that size. "None" returns the
    picture as it is."""
    if isinstance(upscaler, str):
        kind = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "none": None}.get(upscaler.lower(), "?")
        if kind == "?":
            raise ValueError(f"upscaler must be a model, 'Lanczos', 'Nearest' or 'None'; got {upscaler!r}")
        if kind is None:
            return image
    dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    for i in range(A1111_PASSES):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        before = image.size
        if isinstance(upscaler, str):
            image = image.resize((int(image.width * scale), int(image.height * scale)), kind)
        else:  # (A1111's SwinIR upscaler tiles with upscale_2, its ESRGAN ones with upscale_with_model)
            tiled = a1111_tiled_2 if upscaler.architecture == "SwinIR" else a1111_tiled
            image = tiled(upscaler, image, tile, overlap)
        if image.size == before:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), Image.LANCZOS)
    return image


def a1111_resize(image: Image.Image, width: int, height: int, upscaler: UpscaleModel | str | None) -> Image.Image:
    """A1111's images.resize_image(0, ...) with an upscaler, as its hires. fix enlarges the first pass's pictures:
    where the picture must grow, `a1111_upscale` by max(width / w, height / h), then Lanczos to (width, height)
    if it is not that size yet."""
    if upscaler is None or (isinstance(upscaler, str) and upscaler.lower() == "none"):
        return image.resize((width, height), Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = a1111_upscale(image, scale, upscaler)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image
