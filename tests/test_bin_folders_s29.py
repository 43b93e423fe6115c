"""Diffusers folders saved before safetensors (session 29): `diffusion_pytorch_model.bin` (and `.bin` shards with their
index), which diffusers' from_pretrained loads, load here too, through torch.load(weights_only=True) only; the whole
folder gives diffusers' image. A variant's file alone (e.g. fp16) is named with what to do."""

from __future__ import annotations

import pytest
import torch

from test_loading import save_diffusers_folder
from test_sd_parity import _diffusers_image, _our_image, psnr

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _as_bin(folder, max_shard_size=None):
    """Re-save the folder's U-Net and VAE as diffusers did before safetensors (pickles)."""
    for name in ("unet", "vae"):
        cls = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
        model = cls.from_pretrained(folder / name, local_files_only=True)
        for p in (folder / name).glob("*.safetensors*"):
            p.unlink()
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder / name, safe_serialization=False, **kw)


@pytest.mark.parametrize("shards", [None, "40KB"])
def test_a_bin_folder_gives_diffusers_image(tmp_path, shards):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "sd", "sd1", scheduler="ddim")
    _as_bin(tmp_path / "sd", shards)
    files = sorted(p.name for p in (tmp_path / "sd" / "unet").iterdir())
    assert not any(f.endswith(".safetensors") for f in files)
    assert ("diffusion_pytorch_model.bin.index.json" in files) == bool(shards), files
    ours = TextToImagePipeline.from_pretrained(tmp_path / "sd")
    assert psnr(_our_image(ours, "ddim"), _diffusers_image(ref)) >= 50


def test_a_bin_that_needs_more_than_tensors_is_refused(tmp_path):
    from imagine.models import io

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    folder = tmp_path / "unet"
    folder.mkdir()
    torch.save({"w": Payload()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds more than weights \(it needs (builtins\.)?print\)"):
        io.load_tensors(io.find_weights(folder))
    torch.save([torch.zeros(2)], folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        io.load_tensors(io.find_weights(folder))


def test_a_variants_file_alone_is_named_with_what_to_do(tmp_path):
    from imagine.models import io

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.fp16\.safetensors is a variant's file, "
                                                r"e\.g\. fp16: rename it to diffusion_pytorch_model\.safetensors"):
        io.find_weights(folder)
