"""What a pipeline keeps between calls must not change an image: the same seed gives the same image
whatever ran before in the process, a sampler's aliases bring the model's defaults like its own name,
cached copies follow the weights (and can be told to), are built once under concurrent first calls
and die with what they copy; bad counts get clear errors."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from imagine.pipelines import text_to_image as t2i
from imagine.pipelines.text_to_image import TextToImagePipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=3, progress=False, output_type="latent")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from imagine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), defaults={"sampler": "dpmpp_2m",
                                                                     "sigma_schedule": "karras",
                                                                     "final_step": "heun"})


def test_an_image_does_not_depend_on_what_ran_before():
    """Two pipelines on the embedded model's weights: one generates the image first, the other after a
    batch of another size (the packed linear layers once took their layout from the first call's rows)."""
    a = TextToImagePipeline.from_pretrained(None)
    b = TextToImagePipeline.from_pretrained(None)
    first = a.generate("a red circle", seed=102, **KW).latents
    b.generate("a blue square", seed=5, num_images_per_prompt=3, height=128, width=96, **KW)
    assert torch.equal(b.generate("a red circle", seed=102, **KW).latents, first)


def test_sampler_aliases_bring_the_models_defaults(tiny):
    pipe = TextToImagePipeline.from_pretrained(tiny)
    ref = pipe.generate("x", seed=3, **KW)
    for name in ("DPM++ 2M", "dpmpp-2m", "DPMSolverMultistepScheduler"):
        r = pipe.generate("x", seed=3, sampler=name, **KW)
        assert torch.equal(r.latents, ref.latents), name
        assert (r.parameters["schedule_type"], r.parameters["final_step"]) == ("karras", "heun")
    assert "final_step" not in pipe.generate("x", seed=3, sampler="euler", **KW).parameters


@pytest.mark.parametrize("n", [0, -1, True, 1.5])
def test_bad_image_counts_are_clear_errors(tiny, n):
    pipe = TextToImagePipeline.from_pretrained(tiny)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        pipe.generate("x", "neg", num_images_per_prompt=n, **KW)


def test_weights_changed_rebuilds_the_copies(tiny):
    """A change through `.data` moves no version counter; after weights_changed() the pipeline computes with
    the new weights, as a fresh pipeline given them does."""
    pipe = TextToImagePipeline.from_pretrained(tiny)
    pipe.generate("x", seed=1, **KW)  # builds the cached copy
    fresh = TextToImagePipeline.from_pretrained(tiny)
    for p, q in zip(pipe.unet.parameters(), fresh.unet.parameters()):
        p.data.mul_(1.1)
        q.data.mul_(1.1)
    pipe.weights_changed()
    assert torch.equal(pipe.generate("x", seed=1, **KW).latents, fresh.generate("x", seed=1, **KW).latents)


def test_a_copy_is_built_once_under_concurrent_first_calls():
    module = torch.nn.Linear(2, 2)
    cache = weakref.WeakKeyDictionary()
    built = []

    def build():
        built.append(1)
        time.sleep(0.2)  # a slow build: the second thread arrives meanwhile
        return torch.nn.Linear(2, 2)

    got = []
    threads = [threading.Thread(target=lambda: got.append(t2i._cached_copy(cache, module, build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and got[0] is got[1]


def test_a_compiled_copy_dies_with_its_copy():
    copy = torch.nn.Linear(2, 2)
    compiled = t2i._compiled(copy)  # (torch.compile is lazy: nothing compiles until a call)
    assert t2i._compiled(copy) is compiled
    assert dict(copy.named_modules()).keys() == {""}  # not registered: the state dict is unchanged
    gone = weakref.ref(copy)
    del copy, compiled
    gc.collect()
    assert gone() is None


def test_a_bf16_module_gets_no_bf16_winograd_in_the_float32_fast_copy(no_bf16_mode):
    """On CPUs without native bf16 the fast copy of a float32 module runs Winograd in float32; a module loaded
    in bf16 keeps direct convolutions (Winograd in bf16 loses 9x the accuracy)."""
    from imagine.models.winograd import WinogradConv2d

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1)).eval()

    assert any(isinstance(m, WinogradConv2d) for m in t2i.fast_copy(net()).modules())
    assert not any(isinstance(m, WinogradConv2d) for m in t2i.fast_copy(net().bfloat16()).modules())


def test_sizes_need_only_the_vae_factor(bf16_mode):
    """SD takes any multiple of 8 px, as in diffusers and AUTOMATIC1111 (not of 64): the embedded model (VAE
    factor 4, three U-Net levels) at 36 x 44 px runs a 9 x 11 latent, in both modes, the fast image close to the
    exact one; 38 px is refused with the rule."""
    from imagine.bench.speed import psnr
    from imagine.images import from_pil

    pipe = TextToImagePipeline.from_pretrained(None)
    kw = dict(steps=4, seed=3, height=36, width=44, progress=False)
    exact = pipe.generate("a red circle", **kw)
    assert exact.latents.shape[-2:] == (9, 11) and exact.images[0].size == (44, 36)
    fast = TextToImagePipeline.from_pretrained(None, precision="fast").generate("a red circle", **kw)
    assert psnr(from_pil(fast.images[0]), from_pil(exact.images[0])) > 30
    with pytest.raises(ValueError, match="height 38 is not a multiple of 4"):
        pipe.generate("x", steps=1, height=38, width=44, progress=False)


def test_a_nan_guidance_scale_is_refused():
    """NaN is not above 1: read as no guidance, it ran unguided without a word; now named, as inf was."""
    from imagine.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(None)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            pipe.generate("a red circle", steps=2, seed=1, guidance_scale=bad, progress=False, output_type="latent")
