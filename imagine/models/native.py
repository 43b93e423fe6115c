"""Our C++ kernels (`imagine/models/csrc/*.cpp`): compiled on first use, with a fallback.

torch.utils.cpp_extension builds each source once per machine and torch version (it caches the
build under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), with the system's C++ compiler and
ninja (a dependency of ours, from PyPI); the ops register themselves under `torch.ops.imagine`. Where
a build fails (no compiler, no headers), one warning says so and the caller's torch-only path serves
from then on: the build is not retried in that process.

The sources use AVX-512 intrinsics, so the build flags name the instruction sets, never
-march=native: a cached build stays valid on any CPU that has them, and each caller checks the CPU's
flags (`imagine.hardware.cpu_flags`) before it asks for a kernel.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from imagine.hardware import cpu_flags

CSRC = Path(__file__).with_name("csrc")
STALE_LOCK_SECONDS = 600  # a build takes seconds; a lock this old was left by a build that was killed
AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})  # /proc/cpuinfo's names


class Kernel:
    """One C++ source built into ops under `torch.ops.imagine`. `load()` builds it at the first call
    (printing a line, as the build takes seconds) and returns whether its ops are there; after a
    failed build it warns once and returns False from then on."""

    def __init__(self, name: str, source: str, cflags: tuple[str, ...], what: str, fallback: str, env: str,
                 after_load: Callable[[], None] | None = None):
        self.name, self.source, self.cflags = name, CSRC / source, tuple(cflags)
        self.what, self.fallback, self.env, self.after_load = what, fallback, env, after_load
        self.loaded = False
        self.failed = False
        self._lock = threading.Lock()

    def build(self) -> None:
        from torch.utils.cpp_extension import load

        print(f"imagine: loading {self.what} (compiled once per machine and torch version, about 10 s)",
              file=sys.stderr)
        remove_stale_lock(self.name)
        # -fopenmp: at::parallel_for is inline OpenMP; without it the ops would run on one thread.
        load(name=self.name, sources=[str(self.source)], extra_cflags=["-O3", *self.cflags, "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False)
        if self.after_load is not None:
            self.after_load()

    def load(self) -> bool:
        if self.loaded:  # no lock on the per-call path
            return True
        if self.failed:
            return False
        with self._lock:
            if not (self.loaded or self.failed):
                try:
                    self.build()
                    self.loaded = True
                except Exception as e:  # no compiler, no headers: the fallback serves, and no retry
                    self.failed = True
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    warnings.warn(f"imagine: {self.what} could not be built ({type(e).__name__}: {last}); "
                                  f"using {self.fallback}. Set {self.env}=0 to skip trying.",
                                  RuntimeWarning, stacklevel=3)
        return self.loaded


def remove_stale_lock(name: str, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """torch's extension builder waits, with no end, for the lock file of a build in progress; a build that was
    killed leaves it behind, and every later process would then wait forever. A lock older than `max_age`
    seconds is that: it is removed (with a warning). Returns whether one was."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError, AttributeError, TypeError):
        return False  # no lock (the usual case), or a torch whose builder this does not know
    if age <= max_age:
        return False
    warnings.warn(f"imagine: removing {lock}, left {age / 60:.0f} minutes ago by a build of {name} that did not "
                  "finish (a killed process)", RuntimeWarning, stacklevel=3)
    lock.unlink(missing_ok=True)
    return True


def has_cpu_flags(flags: frozenset[str]) -> bool:
    """Linux (the builds use gcc's flags and /proc/cpuinfo) and a CPU with all of `flags`."""
    return sys.platform.startswith("linux") and flags <= cpu_flags()
