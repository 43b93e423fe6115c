"""Checkpoints saved without their VAE (session 29): pruned "no VAE" releases hold no first_stage_model.* weights.
With a VAE given (--vae, from_pretrained(vae=...)), as diffusers' from_single_file takes vae= and A1111 its "SD VAE",
they load and make the image the whole checkpoint makes with that VAE; without one, the error says to give one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_loading import write_single_file
from test_sd_parity import _our_image, psnr
from test_sdxl_single_file import no_tokenizer_env, write_sdxl_single_file  # noqa: F401 (fixture)
from test_vae_override import _original_state

pytest.importorskip("diffusers")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_of_its_vae(whole, vae, folder):
    """The checkpoint without first_stage_model.*, and the VAE it had as a file of its own (A1111's layout)."""
    state = load_file(str(whole))
    kept = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    assert len(kept) < len(state)
    pruned = folder / f"{whole.stem}-novae.safetensors"
    save_file(kept, str(pruned))
    vae_file = folder / "its-vae.safetensors"
    save_file(_original_state(vae), str(vae_file))
    return pruned, vae_file


def test_an_sd_checkpoint_without_its_vae_runs_with_one_given(tmp_path):
    whole = tmp_path / "m" / "tiny-sd.safetensors"
    _, vae, _ = write_single_file(whole, "sd1")
    pruned, vae_file = _pruned_of_its_vae(whole, vae, whole.parent)
    want = _our_image(TextToImagePipeline.from_pretrained(whole), "ddim")
    pipe = TextToImagePipeline.from_pretrained(pruned, vae=vae_file)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.c.vae_source == str(vae_file)
    assert psnr(_our_image(pipe, "ddim"), want) == float("inf")
    with pytest.raises(ValueError, match=r"no VAE weights found.*saved without its VAE: give one, --vae FILE"):
        TextToImagePipeline.from_pretrained(pruned)


def test_an_sdxl_checkpoint_without_its_vae_runs_with_one_given(tmp_path, no_tokenizer_env):
    whole = tmp_path / "x" / "tiny-sdxl.safetensors"
    _, vae, _, _ = write_sdxl_single_file(whole)
    pruned, vae_file = _pruned_of_its_vae(whole, vae, whole.parent)
    pipe = TextToImagePipeline.from_pretrained(pruned, vae=vae_file)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z), TextToImagePipeline.from_pretrained(whole).vae.decode(z))
    with pytest.raises(ValueError, match=r"no VAE weights found.*--vae FILE"):
        TextToImagePipeline.from_pretrained(pruned)


def test_the_cli_takes_a_checkpoint_without_its_vae(tmp_path, capsys):
    from imagine.cli import main

    whole = tmp_path / "m" / "tiny-sd.safetensors"
    _, vae, _ = write_single_file(whole, "sd1")
    pruned, vae_file = _pruned_of_its_vae(whole, vae, whole.parent)
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(pruned), "--vae", str(vae_file), "a red circle", "--steps", "2",
                 "--seed", "3", "--height", "32", "--width", "32", "-o", str(out), "-q"]) == 0
    assert out.is_file()
    assert main(["generate", "--model", str(pruned), "a red circle", "--steps", "2", "-o", str(out), "-q"]) != 0
    assert "--vae FILE" in capsys.readouterr().err
