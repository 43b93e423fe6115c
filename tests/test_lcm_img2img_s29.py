"""An LCM-distilled model's image to image as diffusers' LatentConsistencyModelImg2ImgPipeline runs it (session 29):
LCMScheduler.set_timesteps(steps, strength=s) lays all the steps over the first int(50 s) distillation timesteps
(strength 0.8, 4 steps: 799, 599, 399, 199), where diffusers' SD img2img cuts int(steps s) of the full plan (759,
499, 259). The picture is diffusers' LCM img2img pipeline's on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_lcm_unet_s29 import PROMPT, SEED, SIZE, lcm  # noqa: F401 (fixture)
from test_sd_parity import psnr

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength,steps", [(0.8, 4), (0.5, 4), (0.6, 6)])
def test_lcm_img2img_is_diffusers_lcm_img2img(lcm, strength, steps):
    ref, _, pipe = lcm
    img2img = diffusers.LatentConsistencyModelImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = img2img(PROMPT, image=_picture(), strength=strength, num_inference_steps=steps, guidance_scale=8.5,
                       generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0].float()
    res = pipe.generate(PROMPT, init_image=_picture(), strength=strength, steps=steps, seed=SEED, progress=False,
                        output_type="latent")
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()
    assert psnr(got, want) >= 50, f"PSNR {psnr(got, want):.1f} dB"


def test_too_many_steps_below_the_strength_are_named(lcm):
    _, _, pipe = lcm
    with pytest.raises(ValueError, match=r"at most the 5 timesteps .* below strength 0.1"):
        pipe.generate(PROMPT, init_image=_picture(), strength=0.1, steps=6, seed=SEED, progress=False,
                      output_type="latent")
