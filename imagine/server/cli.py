"""Serve the AUTOMATIC1111- and OpenAI-style HTTP API and the web page: `imagine serve [--model M]`."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the annotation's; the app loads when a server starts)
    from imagine.server.app import ServerConfig

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imagine.hardware import PRECISION_HELP
    from imagine.server.app import ServerConfig

    d = ServerConfig()
    p.add_argument("--model", "-m", default=None,
                   help="model folder (ours or diffusers') or single-file checkpoint, or a pixel cascade's folder (an "
                        "Imagen cascade, Karlo's UnCLIPPipeline or UnCLIPImageVariationPipeline, DeepFloyd IF's stage "
                        "I with --stage-2); default: the embedded model (with --ckpt-dir: the folder's first)")
    p.add_argument("--ckpt-dir", default=None, metavar="DIR",
                   help="a folder of checkpoints (.safetensors, .ckpt, model folders), AUTOMATIC1111's: "
                        "/sdapi/v1/sd-models lists them, and a client picks one through /sdapi/v1/options' "
                        "sd_model_checkpoint or a request's override_settings; --model (default: the folder's first) "
                        "is served at start, and the other flags apply to each")
    p.add_argument("--checkpoints-in-memory", type=int, default=None, metavar="N",
                   help="with --ckpt-dir: how many checkpoints stay loaded (A1111's sd_checkpoints_limit; default 1: "
                        "the one served leaves memory before the next loads)")
    p.add_argument("--stage-2", default=None, metavar="FOLDER",
                   help="DeepFloyd IF: the super-resolution stage's folder (IFSuperResolutionPipeline) after --model's "
                        "stage I; served pictures are its size")
    p.add_argument("--text-encoder", default=None, metavar="FOLDER",
                   help="an imagen-pytorch checkpoint (--model FILE): a local copy of the T5 encoder it was trained "
                        "with, with its tokenizer")
    p.add_argument("--ema-weights", action="store_true",
                   help="an imagen-pytorch checkpoint: serve its trainer's EMA unets (what its trainer samples with)")
    p.add_argument("--vae", default=None,
                   help="a VAE file or folder to decode with instead of the model's own (AUTOMATIC1111's SD VAE)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH[:UNET]]",
                   help="a LoRA file to merge into the model at start, repeatable (strength default 1; a second number "
                        "is the U-Net's, the first then the text encoders', as A1111's <lora:name:te:unet>)")
    p.add_argument("--styles", default=None, metavar="CSV",
                   help="AUTOMATIC1111's styles.csv (columns name, prompt, negative_prompt): requests name styles in "
                        "`styles`; /sdapi/v1/prompt-styles lists them")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="a folder of LoRA files that prompts ask for as AUTOMATIC1111's <lora:name:STRENGTH> (merged "
                        "for the requests that ask, and put back exactly after)")
    p.add_argument("--vae-dir", default=None, metavar="DIR",
                   help="a folder of VAE files (and VAE folders) that ComfyUI graphs load with VAELoader by name")
    p.add_argument("--clip-vision-dir", default=None, metavar="DIR",
                   help="a folder of CLIP image tower files (ComfyUI's models/clip_vision: clip_vision_g.safetensors "
                        "for SDXL's Revision) that ComfyUI graphs load with CLIPVisionLoader by name")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="a folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, RealPLKSR: "
                        "A1111's models/ESRGAN, RealESRGAN, SwinIR, DAT, or its whole models/ folder; ComfyUI's "
                        "models/upscale_models): A1111's hr_upscaler, Extras and SD upscale, ComfyUI's "
                        "UpscaleModelLoader")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:WORD]",
                   help="a textual-inversion embedding to load at start, repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet to load at start (a diffusers ControlNet folder, or lllyasviel's .pth/"
                        ".safetensors file), repeatable; requests use it by its name (the file's or folder's name) "
                        "through AUTOMATIC1111's ControlNet extension API (alwayson_scripts.controlnet)")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="SDXL's refiner (a diffusers folder or the original sd_xl_refiner file), for the requests that "
                        "name it in AUTOMATIC1111's refiner_checkpoint (with refiner_switch_at, default 0.8)")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="use the CLIP states N layers before the last (diffusers' clip_skip; A1111's 'Clip skip' N + 1)")
    p.add_argument("--comfyui-dir", default=None, metavar="DIR",
                   help="the folder of ComfyUI's output, input and temp folders for its API (/prompt, /view, "
                        "/upload/image; SaveImage writes DIR/output). Default: a new temporary folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; there is no authentication, "
                        "so bind another address only on a network you trust)")
    p.add_argument("--port", type=int, default=7860,
                   help="port (default 7860, AUTOMATIC1111's; 0: a free one, which the start line names); taken "
                        "before the model loads, so a port in use is said at once")
    p.add_argument("--precision", choices=["exact", "fast"], default="exact", help=PRECISION_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the weights as loaded: bfloat16 halves the model's memory, for --precision fast only, whose "
                        "copies compute in bf16 anyway")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"jobs that may wait; past it requests get 429 with Retry-After (default {d.queue_size})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per forward pass when compatible requests are batched (default {d.max_batch})")
    p.add_argument("--max-controlnet-units", type=int, default=d.max_controlnet_units,
                   help=f"ControlNet units a request may send (default {d.max_controlnet_units}; each runs at every "
                        "step)")
    p.add_argument("--max-width", type=int, default=d.max_width,
                   help="the widest picture a request may ask for, in pixels (default: twice the model's own width: "
                        "1024 for SD 1.x, 2048 for SDXL; 422 past it)")
    p.add_argument("--max-height", type=int, default=d.max_height,
                   help="the highest picture a request may ask for (default: twice the model's own height)")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help=f"the most sampling steps a request may ask for (default {d.max_steps})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images per request: batch_size x n_iter, or n (default {d.max_images})")
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length,
                   help=f"characters in a prompt or negative prompt (default {d.max_prompt_length})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads, at least 1 (default: torch's "
                                                                 "choice)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")


def config_from_args(args) -> "ServerConfig":
    from imagine.server.app import ServerConfig

    return ServerConfig(max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
                        max_images=args.max_images, max_prompt_length=args.max_prompt_length,
                        queue_size=args.queue_size, max_batch=args.max_batch,
                        max_controlnet_units=args.max_controlnet_units)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_limits(args) -> None:
    """The limits and queue flags by their names (ServerConfig would name its fields)."""
    for flag in ("queue_size", "max_batch", "max_controlnet_units", "max_width", "max_height", "max_steps",
                 "max_images", "max_prompt_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1; got {value}")
    if args.checkpoints_in_memory is not None:
        if args.ckpt_dir is None:
            raise ValueError("--checkpoints-in-memory is for --ckpt-dir (a folder of checkpoints); one model is served "
                             "without it")
        if args.checkpoints_in_memory < 1:
            raise ValueError(f"--checkpoints-in-memory must be at least 1; got {args.checkpoints_in_memory}")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise ValueError(f"--clip-skip must be 0 (the last layer) or more; got {args.clip_skip}")


def listen(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, listening now (before the model loads, which takes minutes for SDXL), so that an address
    this machine has not, a port in use or one it may not take is said at once, in one line; held while the model
    loads (another server cannot take the port meanwhile) and closed just before uvicorn binds it again. Bound as
    uvicorn binds (address reuse; each address `host` names, IPv6 ones IPv6 only)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    socks: list[socket.socket] = []
    failed: OSError | None = None
    for family, kind, proto, _, addr in {(i[0], i[1], i[2], None, i[4]): None for i in infos}:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and socks:  # (a free port: the same one on every address)
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(2048)  # (uvicorn's backlog; listening holds the port: bound alone, another could bind it too)
            socks.append(sock)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and failed is None:
                failed = e  # (one of a name's addresses this machine lacks, e.g. ::1 without IPv6: the others serve)
                continue
            for s in socks:
                s.close()
            why = {errno.EADDRINUSE: "the port is in use (another server? give another --port)",
                   errno.EACCES: "permission denied (ports below 1024 need privileges; give another --port)"}
            raise ValueError(f"--host {host} --port {port}: cannot listen there: "
                             f"{why.get(e.errno, e.strerror or str(e))}") from None
    if not socks:
        raise ValueError(f"--host {host}: not an address of this machine ({failed.strerror if failed else 'none'})")
    return socks


def run(args) -> int:
    import torch

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535; got {args.port}")
    _check_limits(args)
    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    for path in args.controlnet:  # before the model loads
        if not Path(path).exists():
            raise FileNotFoundError(f"--controlnet: {path} not found")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise FileNotFoundError(f"--lora-dir: {args.lora_dir} is not a folder")
    if getattr(args, "vae_dir", None) is not None and not Path(args.vae_dir).is_dir():
        raise FileNotFoundError(f"--vae-dir: {args.vae_dir} is not a folder")
    if getattr(args, "clip_vision_dir", None) is not None and not Path(args.clip_vision_dir).is_dir():
        raise FileNotFoundError(f"--clip-vision-dir: {args.clip_vision_dir} is not a folder")
    if getattr(args, "upscaler_dir", None) is not None and not Path(args.upscaler_dir).is_dir():
        raise FileNotFoundError(f"--upscaler-dir: {args.upscaler_dir} is not a folder")
    if args.ckpt_dir is not None and not Path(args.ckpt_dir).is_dir():
        raise FileNotFoundError(f"--ckpt-dir: {args.ckpt_dir} is not a folder")
    if args.refiner is not None and not Path(args.refiner).exists():
        raise FileNotFoundError(f"--refiner: {args.refiner} not found")
    from imagine.styles import read_styles

    styles = read_styles(args.styles) if args.styles else None  # (read before the model loads: a bad file fails fast)

    if args.dtype == "bfloat16" and args.precision != "fast":
        raise ValueError("--dtype bfloat16 is for --precision fast (exact mode computes in float32 on float32 weights)")
    socks = listen(args.host, args.port)  # (last of the checks: held while the model loads)
    if not is_loopback(args.host):
        print(f"imagine serve: warning: binding {args.host}: other machines can reach this server, and it has no "
              "authentication", file=sys.stderr)
    try:
        return _serve(args, socks, config, styles)
    finally:
        for s in socks:
            s.close()


# the flags that change a latent model (its VAE, LoRAs, embeddings, ControlNets, refiner, CLIP), which a pixel cascade
# has none of: refused by name
LATENT_ONLY_FLAGS = ("vae", "vae_dir", "clip_vision_dir", "upscaler_dir", "lora", "lora_dir", "embedding", "controlnet",
                     "refiner", "clip_skip")


def _cascade(args, config):
    """A pixel cascade folder's pipeline behind the server's interface (imagine.server.cascade): an Imagen cascade,
    Karlo's unCLIP cascade, or DeepFloyd IF (stage I, and --stage-2); None for anything else (a latent model, loaded
    by TextToImagePipeline)."""
    from imagine.commands.generate import _cascade_model, _imagen_checkpoint

    checkpoint = _imagen_checkpoint(args.model)
    kind = "ImagenPipeline" if checkpoint is not None else _cascade_model(args.model)
    stage_2 = getattr(args, "stage_2", None)
    if kind != "ImagenPipeline":
        for flag in ("text_encoder", "ema_weights"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is for an imagen-pytorch checkpoint (--model FILE); "
                                 f"{args.model or 'the embedded model'} is not one")
    if stage_2 is not None and kind != "IFPipeline":
        raise ValueError(f"--stage-2 is DeepFloyd IF's super-resolution stage after its stage I (--model, an IFPipeline "
                         f"folder); {args.model or 'the embedded model'} is not one")
    if kind is None:
        return None
    what = {"ImagenPipeline": "an Imagen cascade", "UnCLIPPipeline": "Karlo's unCLIP cascade",
            "UnCLIPImageVariationPipeline": "Karlo's image-variation cascade", "IFPipeline": "DeepFloyd IF"}.get(kind)
    if what is None:  # (IFSuperResolutionPipeline)
        raise ValueError(f"{args.model} is a {kind} folder, DeepFloyd IF's super-resolution stage: serve stage I "
                         f"(--model IF-I folder) with it as --stage-2")
    given = [f"--{f.replace('_', '-')}" for f in LATENT_ONLY_FLAGS if getattr(args, f, None) not in (None, [], False)]
    if given:
        raise ValueError(f"{args.model} is {what} (pixels, no VAE or SD text encoder): {', '.join(given)} "
                         "change a latent model; leave them out")
    import torch

    from imagine.server import cascade

    # (IF and Karlo run as loaded: their fast form is bf16 weights, half the memory)
    dtype = torch.bfloat16 if args.precision == "fast" and kind != "ImagenPipeline" else getattr(torch, args.dtype)
    if kind == "IFPipeline":
        from imagine.pipelines import cascade as if_cascade

        if stage_2 is not None and _cascade_model(stage_2) != "IFSuperResolutionPipeline":
            raise ValueError(f"--stage-2 {stage_2}: not a DeepFloyd IF super-resolution folder (model_index.json: "
                             "IFSuperResolutionPipeline)")
        first = if_cascade.IFStage.from_pretrained(args.model, dtype)
        second = None if stage_2 is None else if_cascade.IFStage.from_pretrained(stage_2, dtype,
                                                                                 encoder=first.encoder)
        return cascade.IFServing(first, second, source=args.model)
    if kind in ("UnCLIPPipeline", "UnCLIPImageVariationPipeline"):
        from imagine.pipelines.karlo import KarloPipeline

        return cascade.KarloServing(KarloPipeline.from_pretrained(args.model, dtype), source=args.model)
    from imagine.commands.generate import load_imagen

    return cascade.ImagenServing(load_imagen(args, checkpoint), source=args.model, max_steps=config.max_steps)


def _model_app(args, config, styles, model_name: str | None = None, comfyui=None):
    """The app serving `args.model` as the flags load it; `comfyui`: the ComfyUI API's state shared by a checkpoint
    server's models (None: its own, in --comfyui-dir)."""
    from imagine.commands.generate import parse_embeddings, parse_loras
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import create_app

    pipe = _cascade(args, config)
    if pipe is None:
        pipe = TextToImagePipeline.from_pretrained(args.model, precision=args.precision, vae=args.vae,
                                                   dtype=getattr(__import__("torch"), args.dtype),
                                                   loras=parse_loras(args.lora),
                                                   embeddings=parse_embeddings(args.embedding),
                                                   controlnets=list(args.controlnet), clip_skip=args.clip_skip,
                                                   refiner=args.refiner)
    if pipe.c.low_res_schedule is not None:  # (an unCLIP decoder serves OpenAI's variations)
        raise ValueError(f"{args.model} is {pipe.picture_model}, which a picture conditions throughout; imagine serve "
                         "runs text-to-image models and unCLIP decoders: use imagine generate --init-image PICTURE")
    pipe.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    pipe.vae_dir = Path(args.vae_dir) if getattr(args, "vae_dir", None) else None
    pipe.upscaler_dir = Path(args.upscaler_dir) if getattr(args, "upscaler_dir", None) else None
    pipe.clip_vision_dir = Path(args.clip_vision_dir) if getattr(args, "clip_vision_dir", None) else None
    app = create_app(pipe, config, styles=styles, model_name=model_name, comfyui=comfyui or args.comfyui_dir)
    app.state.listen = not is_loopback(args.host)
    return app


def _checkpoint_server(args, config, styles):
    """imagine serve --ckpt-dir: the folder's checkpoints behind one server (imagine.server.checkpoints), --model (else
    the folder's first, else the embedded model) served first."""
    from functools import partial

    from imagine.server.checkpoints import Checkpoint, CheckpointServer, scan
    from imagine.server.comfyui import new_state

    listed = partial(scan, Path(args.ckpt_dir).resolve())
    found = listed()
    if args.model is not None:
        path = Path(args.model).resolve()
        first = next((c for c in found if c.path == path), Checkpoint(path, path.name))
    else:
        first = found[0] if found else Checkpoint(None, "default")

    def load(checkpoint):
        # (the flags apply to each: a folder's cascade refuses a latent model's, by name, as at start)
        model = str(checkpoint.path) if checkpoint.path is not None else None
        return _model_app(argparse.Namespace(**{**vars(args), "model": model}), config, styles, checkpoint.name,
                          comfyui)

    comfyui = new_state(args.comfyui_dir)  # (one queue, history and set of folders for the models' ComfyUI API)
    return CheckpointServer(first, load(first), load, listed, keep=args.checkpoints_in_memory or 1, comfyui=comfyui)


def _serve(args, socks, config, styles) -> int:
    import uvicorn

    if args.ckpt_dir is not None:
        app = _checkpoint_server(args, config, styles)
        source = f"{app.current.name} (of {len(app.checkpoints)} in {args.ckpt_dir})"
    else:
        app = _model_app(args, config, styles)
        source = app.state.worker.pipe.c.source or "default model"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    port = socks[0].getsockname()[1]  # (the one taken, for --port 0)
    print(f"imagine serve: {source} on http://{shown}:{port}/ "
          f"(API: /sdapi/v1/txt2img, /v1/images/generations, ComfyUI's /prompt; queue {config.queue_size}, "
          f"batch {config.max_batch})",
          file=sys.stderr, flush=True)
    for s in socks:  # (held while the model loaded; uvicorn binds the same port again at once)
        s.close()
    uvicorn.run(app, host=args.host, port=port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
