"""Which words of a caption does a trained model use, and at which noise levels: `imagine eval captions`.

On the generator's own relation images (two objects differing in colour and in shape), the
denoising error of the model at fixed timesteps with the same noise (the training objective,
Ho et al. 2020 eq. 14, expressed as x_0 error) is compared
between the true caption and three altered ones: the relation reversed ("left of" <-> "right of",
"above" <-> "below"), the two shapes swapped between the colours, and the empty caption. A model
that uses a word predicts worse when the word is wrong: its excess error over the true caption is
positive. Zero excess for the reversed relation means the model draws the same thing for "A left
of B" as for "A right of B". No sampling, no judge: a few hundred U-Net calls.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from imagine.data import shapes as S
from imagine.data.judge import parse_caption
from imagine.diffusion import training_loss
from imagine.train.data import image_to_tensor

FLIP = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
TIMESTEPS = (100, 300, 500, 600, 700, 800, 900, 990)


def probe_captions(n: int = 64) -> dict[str, list[str]]:
    """n seeded training-split relation scenes' captions, true and altered, and the scenes."""
    rng = random.Random(5)
    scenes = []
    while len(scenes) < n:
        s = S.sample_scene(rng, "relation", "train")
        a, b = parse_caption(s.caption)["objects"]
        if a["color"] != b["color"] and a["shape"] != b["shape"]:
            scenes.append(s)
    caps: dict[str, list] = {"true": [], "reversed": [], "swapped shapes": [], "empty": []}
    for s in scenes:
        p = parse_caption(s.caption)
        a, b = p["objects"]
        caps["true"].append(s.caption)
        caps["reversed"].append(s.caption.replace(p["relation"], FLIP[p["relation"]]))
        caps["swapped shapes"].append(S.canonical_caption("relation", [(a["color"], b["shape"]), (b["color"], a["shape"])],
                                                          relation=p["relation"]))
        caps["empty"].append("")
    return {"scenes": scenes, **caps}


@torch.no_grad()
def caption_excess(pipe, n: int = 64, timesteps=TIMESTEPS, seed: int = 1) -> list[dict]:
    """Per timestep: snr, the x_0 MSE per caption kind, and each altered kind's excess over the true
    caption (relative). `pipe`: a TextToImagePipeline with a VAE (latent model) or without (pixels)."""
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    T = pipe.schedule.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise ValueError(f"timesteps must lie in 0..{T - 1}; got {bad}")
    caps = probe_captions(n)
    scenes = caps.pop("scenes")
    size = pipe.unet.config.sample_size * (pipe.vae.config.downsampling_factor if pipe.vae is not None else 1)
    x = torch.stack([image_to_tensor(S.render(s), size) for s in scenes])
    x0 = x if pipe.vae is None else pipe.vae.to_latent(pipe.vae.encode(x).mode())
    conds = {k: pipe.encode_prompts(c) for k, c in caps.items()}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in timesteps:
        abar = float(pipe.schedule.alphas_cumprod[t])
        tt = torch.full((len(scenes),), t)
        # the model's own objective, as x_0 error: x_0 - x0_hat = -sigma (v - v_hat) = -(sigma / alpha) (eps - eps_hat)
        to_x0 = {"v_prediction": 1 - abar, "epsilon": (1 - abar) / abar, "sample": 1.0}[pipe.prediction_type]
        mse = {k: to_x0 * float(training_loss(pipe.unet, x0, c, pipe.schedule, pipe.prediction_type, t=tt, noise=noise,
                                              reduction="none").mean()) for k, c in conds.items()}
        rows.append(dict(t=t, snr=abar / (1 - abar), mse=mse,
                         excess={k: mse[k] / mse["true"] - 1 for k in mse if k != "true"}))
    return rows


def format_rows(rows: list[dict]) -> str:
    kinds = [k for k in rows[0]["excess"]]
    lines = ["| t | SNR | error, true caption | " + " | ".join(f"excess: {k}" for k in kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['t']} | {r['snr']:.4g} | {r['mse']['true']:.4f} | "
                     + " | ".join(f"{100 * r['excess'][k]:+.1f}%" for k in kinds) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--n", type=int, default=64, help="relation scenes (default 64)")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)), help="comma-separated timesteps")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")


def run(args) -> int:
    from imagine.pipelines.text_to_image import TextToImagePipeline

    try:
        timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated integers; got {args.timesteps!r}") from None
    pipe = TextToImagePipeline.from_pretrained(args.model)
    rows = caption_excess(pipe, args.n, timesteps)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
