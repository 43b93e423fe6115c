"""imagen-pytorch (lucidrains, 2.1.0), the peer of imagine's Imagen pieces, imported offline.

Its package imports torchvision and kornia at the top (used only to turn samples into PIL pictures and for training's
random crops), which do not work beside this machine's torch build, and datasets (for a user agent string), and its Unet's default text width is read with
`T5Config.from_pretrained("google/t5-v1_1-base")` when the module is imported, a hub call. So the import runs with
empty stand-ins for those modules (only if the real ones do not import; taken away again after the import) and with T5Config answering
t5-v1_1-base's d_model (768) without a download. Tests pass `text_embed_dim` explicitly anyway.

`load()` returns the `imagen_pytorch` package, or skips the calling test if it is not installed
(`pip install --no-deps imagen-pytorch==2.1.0`, with einops, beartype, ema-pytorch and pytorch-warmup).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest

# what imagen_pytorch imports from modules it uses only for data, pictures and training augmentation
STAND_INS = {"torchvision.transforms": {}, "kornia.augmentation": {},
             "datasets.utils.file_utils": {"get_datasets_user_agent": lambda: "imagine-tests"}}
T5_BASE_WIDTH = 768  # google/t5-v1_1-base's d_model, imagen-pytorch's default text_embed_dim


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = "an empty stand-in so imagen_pytorch imports offline (tests/imagen_peer.py)"
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec("torchvision")
    return module


def load():
    """The imagen_pytorch package, imported without torchvision, kornia or the hub."""
    if "imagen_pytorch" in sys.modules:
        return sys.modules["imagen_pytorch"]
    if importlib.util.find_spec("imagen_pytorch") is None:
        pytest.skip("imagen-pytorch is not installed (pip install --no-deps imagen-pytorch==2.1.0)")
    import transformers

    # transformers (and diffusers) decide once, when imported, whether torchvision is there: import what imagen_pytorch
    # takes from transformers before the stand-ins exist, and take the stand-ins away again after the import.
    transformers.T5Tokenizer, transformers.T5EncoderModel, transformers.T5Config  # noqa: B018 (resolve the lazy names)
    stand_ins = {}
    for path, names in STAND_INS.items():
        top = path.split(".")[0]
        try:
            importlib.import_module(top)
        except Exception:  # missing, or broken beside this torch (torchvision::nms does not exist)
            parts = path.split(".")
            for depth in range(1, len(parts) + 1):
                stand_ins.setdefault(".".join(parts[:depth]), _stand_in(".".join(parts[:depth])))
                if depth > 1:
                    setattr(stand_ins[".".join(parts[:depth - 1])], parts[depth - 1], stand_ins[".".join(parts[:depth])])
            for attribute, value in names.items():
                setattr(stand_ins[path], attribute, value)
    sys.modules.update(stand_ins)

    def offline_config(cls, name, *args, **kwargs):
        return transformers.T5Config(d_model=T5_BASE_WIDTH)

    transformers.T5Config.from_pretrained = classmethod(offline_config)
    try:
        return importlib.import_module("imagen_pytorch")
    finally:
        del transformers.T5Config.from_pretrained  # T5Config inherits from_pretrained again
        for name in stand_ins:
            sys.modules.pop(name, None)
