"""imagine.models.io.without_random_init (session 40): the loaders build their modules without nn.init's random draws,
since every weight is loaded next (a tiny pipeline's load: 0.39 -> 0.17 s on session 40's Zen 3). What must hold: no
random draw is made inside (the global generator is where it was), the module is built whole (its deterministic
fills, LayerNorm's ones and zeros, kept), other threads' modules are drawn as usual, and a loaded model is its
weights."""

from __future__ import annotations

import threading

import torch

from imagine.models.io import without_random_init


def build():
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Conv2d(2, 4, 3),
                               torch.nn.LayerNorm(8))


def test_no_draw_is_made_and_the_module_is_whole():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    with without_random_init():
        m = build()
        t = torch.empty(4, 4)
        assert torch.nn.init.kaiming_uniform_(t) is t and torch.nn.init.normal_(tensor=t) is t
        assert t.uniform_() is t
    assert torch.equal(torch.random.get_rng_state(), before)
    assert [tuple(p.shape) for p in m.parameters()] == [(50, 8), (8, 8), (8,), (4, 2, 3, 3), (4,), (8,), (8,)]
    assert torch.equal(m[3].weight, torch.ones(8)) and torch.equal(m[3].bias, torch.zeros(8))
    # outside it, the same build draws from the generator
    build()
    assert not torch.equal(torch.random.get_rng_state(), before)


def test_other_threads_draw_as_usual():
    seen = {}

    def other():
        torch.manual_seed(1)
        seen["weight"] = torch.nn.Linear(8, 8).weight.detach().clone()

    with without_random_init():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    torch.manual_seed(1)
    assert torch.equal(seen["weight"], torch.nn.Linear(8, 8).weight.detach())


def test_a_loaded_pipeline_is_its_weights(tmp_path):
    from imagine.models.io import load_tensors
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.testing import make_tiny_model

    make_tiny_model(tmp_path / "m")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "m", precision="exact")
    for part, module in (("unet", pipe.unet), ("vae", pipe.vae)):
        saved = load_tensors(next((tmp_path / "m" / part).glob("*.safetensors")))
        own = module.state_dict()
        assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in saved), part
