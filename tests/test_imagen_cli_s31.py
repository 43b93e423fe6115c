"""`imagine generate --model` on Imagen cascades (session 31): an imagen-pytorch trainer checkpoint file, its prompts
read by a local T5 (--text-encoder), and imagine's own cascade folder (ImagenPipeline.save_pretrained), run through
imagine.cli's main in this process as `imagine generate` (imagine.testing.run_cli: exit code, stdout, stderr).

The truth is imagen-pytorch 2.1.0 on the same weights: its own loader (load_imagen_from_checkpoint, the 'model' or the
EMA unets) and Imagen.sample after torch.manual_seed(seed), the prompts encoded by its own t5_encode_text on the same
tiny T5 (registered under the checkpoint's text_encoder_name); its pictures taken to 8 bits as its return_pil_images
does (torchvision's ToPILImage: 255 x, truncated). Other step counts are the peer's sampler on a grid of that many
timesteps (the same unets declared with them). Ours (EfficientUNet) differs from the peer's U-Net by float32 rounding
(about 1e-4 at most after a cascade), so a pixel may truncate one level apart; the CLI's PNG and
ImagenPipeline.sample's picture in this process must be equal to the pixel."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import imagen_peer
from test_cascade_if_s29 import T5_DIM, t5, tokenizer
from test_imagen_s31 import SIZES, TIMESTEPS, UNETS, spread, trainer_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ip = imagen_peer.load()

from imagine.pipelines.imagen import ImagenPipeline  # noqa: E402
from imagine.testing import run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

T5_NAME = "tiny-t5"  # (the checkpoint's text_encoder_name, under which the peer finds the tiny T5)
MINILM_DIM = 384  # all-MiniLM-L6-v2's width, the folder cascade's text_embed_dim
PROMPT = "a red circle on the left"


def cli(*argv) -> subprocess.CompletedProcess:
    # (on one thread, as this module's own sampling (one_thread): the same float32 sums, so pictures equal to the pixel)
    return run_cli("generate", *argv, "-q", threads=1)


def peer_imagen(unets, text_embed_dim: int, timesteps=TIMESTEPS):
    """imagen-pytorch's Imagen over these unets (a grid of `timesteps` steps per stage: what it samples)."""
    return ip.Imagen(list(unets), image_sizes=SIZES, timesteps=timesteps, text_embed_dim=text_embed_dim,
                     cond_drop_prob=0.5, text_encoder_name=T5_NAME).eval()


def peer_picture(imagen, seed: int, **kw) -> np.ndarray:
    """Imagen.sample at batch 1 after torch.manual_seed(seed), as 8 bits (return_pil_images' 255 x, truncated)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        x = imagen.sample(use_tqdm=False, **kw)
    return (x[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def pixels(picture) -> np.ndarray:
    return np.asarray(Image.open(picture).convert("RGB") if not isinstance(picture, Image.Image) else picture)


def near_peer(got: np.ndarray, want: np.ndarray) -> tuple[int, float]:
    """(the largest pixel difference, the fraction of pixels not equal), printed."""
    diff = np.abs(got.astype(int) - want.astype(int))
    worst, share = int(diff.max()), float((diff > 0).mean())
    print(f"vs imagen-pytorch: max {worst} level(s), {share:.2%} of values differ; picture std {want.std():.1f}")
    return worst, share


def record(path) -> dict:
    return json.loads(Image.open(path).text["imagine"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A two-stage Imagen built by ImagenConfig(...).create() (so its _config is real) over the tiny T5's width, saved
    as ImagenTrainer.save writes it with EMA unets of other weights; the T5 saved as a folder and registered with the
    peer; the peer's own loader's Imagen ('model' and EMA)."""
    from ema_pytorch import EMA

    root = tmp_path_factory.mktemp("imagen_ckpt")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        imagen = ip.ImagenConfig(unets=[{**u, "text_embed_dim": T5_DIM} for u in UNETS], image_sizes=SIZES,
                                 timesteps=TIMESTEPS, text_embed_dim=T5_DIM, cond_drop_prob=0.5,
                                 text_encoder_name=T5_NAME).create()
        spread(imagen, 1)
        ema = torch.nn.ModuleList([EMA(u) for u in imagen.unets])
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # (the EMA copies only: the online models are the Imagen's own unets)
            for p in (p for e in ema for p in e.ema_model.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = root / "checkpoint.42.pt"
    torch.save(trainer_checkpoint(imagen, ema=ema.state_dict()), path)
    encoder, tok = t5(), tokenizer()
    encoder.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    peer_tok = tokenizer()  # (transformers 5 folded batch_encode_plus, which the peer calls, into __call__)
    peer_tok.batch_encode_plus = peer_tok.__call__
    ip.t5.T5_CONFIGS[T5_NAME] = {"model": encoder, "tokenizer": peer_tok}
    loaded = {ema_: ip.load_imagen_from_checkpoint(str(path), load_ema_if_available=ema_).eval()
              for ema_ in (False, True)}
    yield path, root / "t5", loaded
    del ip.t5.T5_CONFIGS[T5_NAME]


def test_checkpoint_is_imagen_sample(checkpoint, tmp_path):
    """--steps 4 --guidance-scale 3 --seed 3: ImagenPipeline.from_imagen_pytorch(...).sample's picture to the pixel,
    and imagen-pytorch's Imagen.sample(texts=...) over a 4-step grid on the loaded unets, cond_scale 3."""
    path, t5_dir, loaded = checkpoint
    out = tmp_path / "out.png"
    run = cli("--model", path, "--text-encoder", t5_dir, PROMPT, "--seed", 3, "--steps", 4, "--guidance-scale", 3,
              "-o", out)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    ours = ImagenPipeline.from_imagen_pytorch(path, t5_folder=t5_dir).sample(
        [PROMPT], seeds=[3], steps=4, cond_scale=3.0, output_type="pil", progress=False)[0]
    got = pixels(out)
    assert got.shape == (16, 16, 3) and np.array_equal(got, pixels(ours))
    want = peer_picture(peer_imagen(loaded[False].unets, T5_DIM, timesteps=4), 3, texts=[PROMPT], cond_scale=3.0)
    worst, share = near_peer(got, want)
    assert worst <= 1 and share < 0.05 and want.std() > 10
    assert record(out) == {"prompt": PROMPT, "seed": 3, "steps": 4, "guidance_scale": 3.0, "sampler": "ddpm",
                           "model": path.name, "stages": 2, "text_encoder": "t5", "width": 16, "height": 16}


def test_checkpoint_defaults_ema_and_seeds_are_the_peers(checkpoint, tmp_path):
    """No --steps or --guidance-scale: each stage's trained timesteps (6, 5) and cond_scale 1, imagen-pytorch's
    Imagen.sample defaults; --ema-weights: the EMA unets, as the peer's loader gives them; --num-images 2 --seed 5:
    images 5 and 6, each the peer's picture at batch 1 after its own manual_seed."""
    path, t5_dir, loaded = checkpoint
    run = cli("--model", path, "--text-encoder", t5_dir, PROMPT, "--seed", 5, "--num-images", 2, "--ema-weights",
              "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000-5.png", "00001-6.png"]
    plain = peer_picture(loaded[False], 5, texts=[PROMPT])
    for f, seed in zip(files, (5, 6)):
        want = peer_picture(loaded[True], seed, texts=[PROMPT])
        worst, share = near_peer(pixels(f), want)
        assert worst <= 1 and share < 0.05
        assert record(f)["steps"] == [6, 5] and record(f)["guidance_scale"] == 1.0 and record(f)["ema_weights"]
    assert np.abs(pixels(files[0]).astype(int) - plain.astype(int)).max() > 10  # (the EMA weights made a difference)
    lines = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"]) for r in lines] == [("00000-5.png", 5), ("00001-6.png", 6)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """imagine's cascade folder: EfficientUNets (a peer Imagen's unets at MiniLM's width, loaded through
    from_imagen_pytorch), the MiniLM encoder described, sampling defaults 3 steps at guidance 2."""
    root = tmp_path_factory.mktemp("imagen_folder")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        imagen = ip.ImagenConfig(unets=[{**u, "text_embed_dim": MINILM_DIM} for u in UNETS], image_sizes=SIZES,
                                 timesteps=TIMESTEPS, text_embed_dim=MINILM_DIM, cond_drop_prob=0.5).create()
        spread(imagen, 3)
    pipe = ImagenPipeline.from_imagen_pytorch(trainer_checkpoint(imagen))
    pipe.save_pretrained(root / "cascade", text_encoder={"type": "minilm", "max_length": 8},
                         defaults={"steps": 3, "guidance_scale": 2.0})
    return root / "cascade", imagen.eval()


def test_folder_samples_at_its_defaults(folder, tmp_path):
    """No --steps or --guidance-scale: the folder's defaults (3 steps, guidance 2), the picture
    ImagenPipeline.from_pretrained(...).sample gives to the pixel, and the peer's on MiniLM's states at those."""
    cascade, imagen = folder
    out = tmp_path / "folder.png"
    run = cli("--model", cascade, PROMPT, "--seed", 4, "-o", out)
    assert run.returncode == 0, run.stderr
    ours = ImagenPipeline.from_pretrained(cascade)
    got = pixels(out)
    assert np.array_equal(got, pixels(ours.sample([PROMPT], seeds=[4], steps=3, cond_scale=2.0, output_type="pil",
                                                  progress=False)[0]))
    states, mask = ours.encode_text([PROMPT])
    assert mask.shape[1] <= 8  # (the folder's max_length)
    want = peer_picture(peer_imagen(imagen.unets, MINILM_DIM, timesteps=3), 4, text_embeds=states, text_masks=mask,
                        cond_scale=2.0)
    worst, share = near_peer(got, want)
    assert worst <= 1 and share < 0.05 and want.std() > 10
    assert {k: record(out)[k] for k in ("steps", "guidance_scale", "model", "stages")} == {
        "steps": 3, "guidance_scale": 2.0, "model": "cascade", "stages": 2}
    # --sampler: another solver on the stages' grids, recorded
    out = tmp_path / "dpm.png"
    run = cli("--model", cascade, PROMPT, "--seed", 4, "--sampler", "DPM++ 2M", "-o", out)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(pixels(out), pixels(ours.sample([PROMPT], seeds=[4], steps=3, cond_scale=2.0,
                                                          output_type="pil", progress=False, sampler="dpmpp_2m")[0]))
    assert record(out)["sampler"] == "dpmpp_2m" and not np.array_equal(pixels(out), got)


def test_from_file_numbered_pngs_and_jsonl(folder, tmp_path):
    """--from-file: NNNNN-SEED.png in the output folder, numbered on from the highest there, one images.jsonl line each
    (as every other model's run writes them); each image its prompt's at its seed, alone."""
    cascade, _ = folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on the right\n", encoding="utf-8")
    out = tmp_path / "many"
    out.mkdir()
    (out / "00007-1.png").write_bytes(b"")  # (an earlier run's picture: the count goes on from it)
    run = cli("--model", cascade, "--from-file", prompts, "--seed", 8, "--steps", 2, "--guidance-scale", 1.5,
              "-o", out)
    assert run.returncode == 0, run.stderr
    assert sorted(f.name for f in out.glob("*.png")) == ["00007-1.png", "00008-8.png", "00009-9.png"]
    lines = [json.loads(line) for line in (out / "images.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["prompt"], r["seed"], r["steps"], r["guidance_scale"]) for r in lines] == [
        ("00008-8.png", "a red circle", 8, 2, 1.5), ("00009-9.png", "a blue square on the right", 9, 2, 1.5)]
    alone = ImagenPipeline.from_pretrained(cascade).sample(["a blue square on the right"], seeds=[9], steps=2,
                                                           cond_scale=1.5, output_type="pil", progress=False)[0]
    assert np.array_equal(pixels(out / "00009-9.png"), pixels(alone))


def test_refusals(checkpoint, folder, tmp_path, capsys):
    """Said before a picture is drawn, exit 2 (run in this process, imagine.cli.main, as the other cascades' refusals:
    a subprocess each would add seconds of imports for nothing checked)."""
    from imagine.cli import main

    def refused(*argv) -> str:
        code = main(["generate", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2, err
        return err

    path, t5_dir, _ = checkpoint
    cascade, _ = folder
    err = refused("--model", path, PROMPT, "-o", tmp_path / "x.png")
    assert "imagen-pytorch checkpoint" in err and f"({T5_NAME})" in err and "give --text-encoder FOLDER" in err
    err = refused("--model", cascade, PROMPT, "--eta", 0.5, "--negative-prompt", "blue", "--height", 32)
    assert "--eta, --height, --negative-prompt: not for an Imagen cascade" in err
    assert "does not run on an Imagen stage's log-SNR grid here" in refused("--model", cascade, PROMPT, "--sampler",
                                                                             "dpmpp_2m_sde")
    assert "--text-encoder is for an imagen-pytorch checkpoint" in refused("--model", cascade, PROMPT,
                                                                           "--text-encoder", t5_dir)
    err = refused("--model", path, PROMPT, "--text-encoder", tmp_path / "nowhere")
    assert "--text-encoder" in err and "is not a folder" in err
    no_ema = tmp_path / "no_ema.pt"
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "ema"}, no_ema)
    err = refused("--model", no_ema, "--text-encoder", t5_dir, PROMPT, "--ema-weights")
    assert "--ema-weights" in err and "holds no EMA unets" in err
    assert "--steps must be at least 1" in refused("--model", path, "--text-encoder", t5_dir, PROMPT, "--steps", 0)
    # a file that is no imagen-pytorch checkpoint keeps the other loaders' errors; the flag is named
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    assert "--text-encoder is for an imagen-pytorch checkpoint" in refused("--model", other, PROMPT,
                                                                           "--text-encoder", t5_dir)
    assert "holds no tensors at its top level" in refused("--model", other, PROMPT)
    assert not list(tmp_path.glob("*.png"))
