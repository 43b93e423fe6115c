"""A VAE loaded on its own, in place of a model's (AUTOMATIC1111's "SD VAE", diffusers'
`StableDiffusionPipeline(vae=...)`): every layout people keep such files in decodes and encodes as
diffusers' AutoencoderKL with the same weights does, and a generation with the swapped VAE gives
diffusers' image with the same swap.

The original-layout files are written with test_loading.py's own diffusers -> CompVis mapping,
independent of imagine.loading.keymap."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_loading import rel_err, save_diffusers_folder, tiny_diffusers_parts, vae_to_compvis, write_single_file  # noqa: E402
from test_sd_parity import _diffusers_image, _our_image, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from imagine.loading.vae import load_vae  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _other_vae(seed: int = 9):
    """A diffusers AutoencoderKL of the tiny SD shape with weights of its own (not the model's)."""
    return tiny_diffusers_parts("sd1", seed=seed)[1]


def _original_state(vae) -> dict:
    state = vae_to_compvis(vae.state_dict(), len(vae.config.block_out_channels))
    return {k[len("first_stage_model."):]: v.detach().contiguous() for k, v in state.items()}


def _old_diffusers_names(state: dict) -> dict:
    """diffusers < 0.14's names for the mid-block attention (query/key/value/proj_attn)."""
    back = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in state.items():
        for new, old in back.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[k] = v
    return out


def _write(layout: str, vae, folder) -> object:
    """The VAE in one of the layouts people have on disk; returns the path to load."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "original.safetensors":  # vae-ft-mse-840000-ema-pruned.safetensors
        path = folder / "vae-ft-mse.safetensors"
        save_file(_original_state(vae), str(path))
    elif layout == "original.ckpt":  # the .ckpt: under state_dict, with LDM's training entries
        path = folder / "vae-ft-mse.ckpt"
        state = _original_state(vae)
        state["loss.logvar"] = torch.zeros(())
        state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
        state["model_ema.decay"] = torch.tensor(0.9999)
        torch.save({"state_dict": state, "global_step": 840000}, path)
    elif layout == "diffusers.safetensors":  # one diffusers-named file
        path = folder / "diffusion_pytorch_model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(path))
    elif layout == "old-diffusers.safetensors":
        path = folder / "vae.safetensors"
        save_file(_old_diffusers_names({k: v.detach().contiguous() for k, v in vae.state_dict().items()}), str(path))
    elif layout == "diffusers folder":
        path = folder / "vae"
        vae.save_pretrained(path, safe_serialization=True)
    elif layout == "whole checkpoint":  # a whole SD file: its first_stage_model.* is taken
        path = folder / "other-model.safetensors"
        unet, vae2, _ = write_single_file(path, "sd1", seed=9)
        return path, vae2
    else:
        raise AssertionError(layout)
    return path, vae


LAYOUTS = ["original.safetensors", "original.ckpt", "diffusers.safetensors", "old-diffusers.safetensors",
           "diffusers folder", "whole checkpoint"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_decodes_and_encodes_as_diffusers(tmp_path, layout):
    path, ref = _write(layout, _other_vae(), tmp_path)
    ours = load_vae(path)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4
        assert rel_err(ours.encode(img).mean, ref.encode(img).latent_dist.mean) < 1e-4
    assert ours.config.scaling_factor == pytest.approx(ref.config.scaling_factor)


def test_a_whole_diffusers_model_folder_gives_its_vae(tmp_path):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", seed=4)
    ours = load_vae(tmp_path / "folder")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.vae.decode(z).sample) < 1e-4


def test_generation_with_a_swapped_vae_matches_diffusers(tmp_path):
    """The model's U-Net and text encoder with another VAE: diffusers' image with the same swap, to the
    50 dB of the whole-generation parity test, and far from the image of the model's own VAE."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    single = tmp_path / "single" / "model.safetensors"
    write_single_file(single, "sd1")
    own = _diffusers_image(ref)
    other = _other_vae()
    vae_path, _ = _write("original.safetensors", other, tmp_path / "vae")
    ref.vae = other
    want = _diffusers_image(ref)
    assert psnr(own, want) < 30  # the swap shows in the picture
    for model in (tmp_path / "folder", single):
        ours = TextToImagePipeline.from_pretrained(model, vae=vae_path)
        got = _our_image(ours, "ddim")
        assert psnr(got, want) >= 50, f"{model}: PSNR {psnr(got, want):.1f} dB"
        assert ours.vae.config.scaling_factor == pytest.approx(0.18215)


def test_generate_cli_takes_vae_and_records_it(tmp_path, capsys):
    from imagine.cli import main

    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    vae_path, _ = _write("original.safetensors", _other_vae(), tmp_path / "vae")
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(single), "--vae", str(vae_path), "a red circle", "--steps", "2",
                 "--seed", "3", "--height", "32", "--width", "32", "-o", str(out), "-q"]) == 0
    img = Image.open(out)
    assert json.loads(img.text["imagine"])["vae"] == vae_path.name
    assert f"VAE: {vae_path.name}" in img.text["parameters"]


def test_bad_vae_files_get_clear_errors(tmp_path, capsys):
    from imagine.cli import main

    with pytest.raises(FileNotFoundError, match="VAE not found"):
        load_vae(tmp_path / "nope.safetensors")
    unet_only = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(8, 8)},
              str(unet_only))
    with pytest.raises(ValueError, match=r"not a KL autoencoder.*found conv_in.weight"):
        load_vae(unet_only)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_vae(empty)
    # a VAE of another latent width (e.g. SD3's 16 channels) cannot decode this model's latents
    wide = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=8,
                                   norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2)
    wide_path, _ = _write("original.safetensors", wide, tmp_path / "wide")
    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    code = main(["generate", "--model", str(single), "--vae", str(wide_path), "x", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "latent_channels is 8" in err and "Traceback" not in err


def test_server_names_the_swapped_vae(tmp_path):
    """The A1111 API reports the VAE as AUTOMATIC1111 does: in /sdapi/v1/sd-vae, the sd_vae option and
    each image's infotext."""
    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    vae_path, _ = _write("original.safetensors", _other_vae(), tmp_path / "vae")
    pipe = TextToImagePipeline.from_pretrained(single, vae=vae_path)
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        assert httpx.get(f"{srv.url}/sdapi/v1/sd-vae").json() == [{"model_name": vae_path.name,
                                                                   "filename": str(vae_path)}]
        assert httpx.get(f"{srv.url}/sdapi/v1/options").json()["sd_vae"] == vae_path.name
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 32,
                                                            "height": 32, "seed": 1}, timeout=120)
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] == vae_path.name and f"VAE: {vae_path.name}" in info["infotexts"][0]
    plain = TextToImagePipeline.from_pretrained(single)
    with BackgroundServer(create_app(plain, ServerConfig(max_width=64, max_height=64))) as srv:
        assert httpx.get(f"{srv.url}/sdapi/v1/sd-vae").json() == []
        assert httpx.get(f"{srv.url}/sdapi/v1/options").json()["sd_vae"] == "Automatic"


def test_a_vae_file_takes_the_models_per_channel_latent_statistics(tmp_path):
    """A model whose VAE config carries latents_mean / latents_std (Playground v2.5's): a VAE file put in its place
    (no config of its own) keeps the model's latent space, as it keeps a plain model's scaling factor; a refiner whose
    VAE maps latents otherwise is refused."""
    from imagine.pipelines.text_to_image import replace_vae

    save_diffusers_folder(tmp_path / "folder", "sd1")
    base = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    c = base.vae.config
    c.latents_mean, c.latents_std = (0.5, -0.25, 0.1, 0.0), (2.0, 1.5, 0.5, 1.0)
    file, _ = _write("original.safetensors", _other_vae(), tmp_path / "vae")
    new = replace_vae(base.c, file).vae
    assert new.config.latent_space() == c.latent_space()
    z = torch.randn(1, 4, 4, 4)
    assert torch.allclose(new.from_latent(z), z * torch.tensor(c.latents_std).view(1, -1, 1, 1) / c.scaling_factor
                          + torch.tensor(c.latents_mean).view(1, -1, 1, 1))
    other = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="same latent space"):
        base.load_refiner(other)
