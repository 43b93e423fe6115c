"""Tiny random models for tests and benchmarks (no download: the text encoder is the packaged
MiniLM, the U-Net and VAE are random and a few hundred kB)."""

from __future__ import annotations

from pathlib import Path

import torch

from imagine.models.io import atomic_write_json

TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 384, "norm_num_groups": 8}
TINY_VAE = {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
            "scaling_factor": 0.5}


def make_tiny_model(folder: str | Path, seed: int = 0, latent: bool = True,
                    defaults: dict | None = None) -> Path:
    """Write a tiny text-to-image model folder (ours: model_index.json, unet/, vae/, scheduler/)
    that TextToImagePipeline.from_pretrained loads. Images are 16x16 by default (8x8 latents, f=2)."""
    from imagine.models.unet import UNet2DConditionModel
    from imagine.models.vae import AutoencoderKL
    from imagine.schedules import NoiseSchedule

    folder = Path(folder)
    torch.manual_seed(seed)
    ucfg = dict(TINY_UNET)
    if not latent:
        ucfg.update(in_channels=3, out_channels=3, sample_size=16)
    UNet2DConditionModel(ucfg).save_pretrained(folder / "unet")
    index = {"_class_name": "TextToImagePipeline", "unet": "unet", "scheduler": "scheduler",
             "text_encoder": {"type": "minilm", "max_length": 16},
             "defaults": {"steps": 4, "guidance_scale": 3.0, "sampler": "euler", "height": 16, "width": 16,
                          **(defaults or {})}}
    if latent:
        torch.manual_seed(seed + 1)
        AutoencoderKL(TINY_VAE).save_pretrained(folder / "vae")
        index["vae"] = "vae"
    sched = NoiseSchedule.from_config("scaled_linear", num_train_timesteps=1000)
    atomic_write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": "NoiseSchedule", **sched.to_config()})
    atomic_write_json(folder / "model_index.json", index)
    return folder


def make_image_folder(root: str | Path, n: int = 24, size: int = 16, bad: int = 0, uncaptioned: int = 0) -> Path:
    """A captioned image folder in the imagefolder convention (metadata.jsonl): one coloured square a picture
    on white, its place in the caption; plus `bad` corrupt files and `uncaptioned` records without text, which
    a trainer must skip and count."""
    import json

    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        a = torch.full((size, size, 3), 255, dtype=torch.uint8)
        colour = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
        x0 = int(torch.randint(0, size // 2, (1,), generator=g))
        a[size // 4:size // 4 + size // 2, x0:x0 + size // 2] = colour
        Image.fromarray(a.numpy()).save(root / f"{i}.png")
        lines.append({"file_name": f"{i}.png", "text": f"a square at {x0}, colour {i % 5}"})
    for j in range(bad):
        (root / f"bad{j}.png").write_bytes(b"not a png at all")
        lines.append({"file_name": f"bad{j}.png", "text": "broken"})
    for j in range(uncaptioned):
        Image.new("RGB", (size, size)).save(root / f"nocap{j}.png")
        lines.append({"file_name": f"nocap{j}.png"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


def run_cli(*argv, check: bool = False, threads: int | None = None):
    """`imagine ARGV` in this process, reported as a subprocess would be (a CompletedProcess: exit code, stdout,
    stderr), for tests. A new interpreter spends 3-5 s importing torch before it reads a flag; this spends none.
    What a command changes for the whole process (torch's threads, deterministic algorithms, the global RNG, the
    environment) is put back after it, so the tests after it see none of it. `threads`: torch's threads during the
    command (None: this process's). A command that must be killed or signalled still needs a process of its own."""
    import contextlib
    import io
    import logging
    import os
    import subprocess

    from imagine.cli import main

    argv = [str(a) for a in argv]
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.random.get_rng_state(), dict(os.environ))
    out, err = io.StringIO(), io.StringIO()
    # (its log to its stderr, as main's logging.basicConfig would send it in a process of its own)
    handler, root = logging.StreamHandler(err), logging.getLogger()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    level = root.level
    root.setLevel(logging.INFO if {"-v", "--verbose"} & set(argv) else logging.WARNING)
    root.addHandler(handler)
    torch.set_num_threads(threads or saved[0])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # (argparse's usage errors)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        threads_before, deterministic, warn_only, rng, environ = saved
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.random.set_rng_state(rng)
        os.environ.clear()
        os.environ.update(environ)
    result = subprocess.CompletedProcess(["imagine", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise subprocess.CalledProcessError(code, result.args, result.stdout, result.stderr)
    return result
