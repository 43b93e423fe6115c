"""Importing a peer library that does not import plainly beside this machine's torch build (it pulls torchvision,
kornia or the hub at import time): through the repository's offline loader in tests/ (stand-ins for those modules),
in a source checkout."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def import_peer(package: str, loader: str, install_hint: str):
    """`package` imported; where a plain import fails, tests/`loader`'s load() (the tests' offline import)."""
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(f"this benchmark compares against {package}: {install_hint}")
    try:
        return importlib.import_module(package)
    except Exception:  # noqa: BLE001 - torchvision / kornia / the hub: the offline loader below
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]  # (a half-imported package)
    path = Path(__file__).resolve().parents[2] / "tests" / loader
    if not path.is_file():
        raise ModuleNotFoundError(f"{package} does not import here (torchvision / kornia / the hub) and this is not a "
                                  f"source checkout with tests/{loader}")
    tests = str(path.parent)
    added = tests not in sys.path
    if added:  # (the loaders import each other: tests/ on the path while one runs)
        sys.path.insert(0, tests)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.load()
    finally:
        if added:
            sys.path.remove(tests)
