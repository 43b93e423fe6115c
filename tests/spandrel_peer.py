"""spandrel (chaiNNer-org, 0.4.2), the loader ComfyUI and AUTOMATIC1111 run upscaler models through: the peer of
imagine.upscalers, imported offline.

Its package imports every architecture it knows when imported, and two of them (LaMa, RestoreFormer) import
torchvision at the top, which does not work beside this machine's torch build. The import runs with empty stand-ins for
the torchvision names they take (only if torchvision does not import; taken away again after), as tests/imagen_peer.py
does for imagen-pytorch; the ESRGAN and Compact architectures the tests use need none of them.

`load()` returns the `spandrel` package, or skips the calling test if it is not installed
(`pip install --no-deps spandrel==0.4.2`, with einops).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from imagen_peer import _stand_in

# what spandrel's LaMa and RestoreFormer take from torchvision at import time
STAND_IN_NAMES = {"torchvision.transforms.functional": ("normalize", "rotate", "InterpolationMode")}


def load():
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (pip install --no-deps spandrel==0.4.2)")
    stand_ins = {}
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:  # missing, or broken beside this torch (torchvision::nms does not exist)
        for path, names in STAND_IN_NAMES.items():
            parts = path.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                stand_ins.setdefault(name, _stand_in(name))
                if depth > 1:
                    setattr(stand_ins[".".join(parts[:depth - 1])], parts[depth - 1], stand_ins[name])
            for attribute in names:
                setattr(stand_ins[path], attribute, object())
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "torchvision"} \
        if stand_ins else {}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
