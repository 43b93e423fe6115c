"""Our C++ kernels (`imagine/models/csrc/*.cpp`): compiled on first use, with a fallback.

torch.utils.cpp_extension builds each source once per machine and torch version (it caches the
build under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), with the system's C++ compiler and
ninja (a dependency of ours, from PyPI); the ops register themselves under `torch.ops.imagine`. Where
a build fails (no compiler, no headers), one warning says so and the caller's torch-only path serves
from then on: the build is not retried in that process. torch's builder takes a lock file in the build
directory and waits, with no end, while it exists; a build that was killed leaves it behind. We wait
for it ourselves (`wait_for_lock`, and the same bounded wait inside torch's builder): a lock that no
process holds open is removed at once, and after LOCK_WAIT_SECONDS the fallback serves.

The sources use AVX-512 intrinsics, so the build flags name the instruction sets, never
-march=native: a cached build stays valid on any CPU that has them, and each caller checks the CPU's
flags (`imagine.hardware.cpu_flags`) before it asks for a kernel.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from imagine.hardware import cpu_flags

CSRC = Path(__file__).with_name("csrc")
STALE_LOCK_SECONDS = 180  # a build takes seconds; a lock this old was left by a build that was killed
LOCK_WAIT_SECONDS = 600  # the longest we wait for another process's build before using the fallback
LOCK_POLL_SECONDS = 0.5
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

        lock = _lock_path(self.name)
        if lock is None or not (lock.parent / f"{self.name}.so").is_file():  # (a build's output loads at once)
            print(f"imagine: compiling {self.what} (once per machine and torch version, about 10 s)",
                  file=sys.stderr)
        wait_for_lock(self.name, self.what)  # bounded, where torch's own wait for a killed build's lock is not
        with _bounded_baton(self.what):
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


def _lock_path(name: str) -> Path | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False)) / "lock"
    except (ImportError, OSError, AttributeError, TypeError):
        return None  # a torch whose builder this does not know


def lock_holders(lock: Path) -> bool | None:
    """Whether a process has `lock` open (torch's builder keeps the file it creates open until the build ends, and
    a killed process's files are closed): True or False from /proc/<pid>/fd of the processes of the lock's owner,
    None where those cannot be read."""
    try:
        target, owner = os.path.realpath(lock), lock.stat().st_uid
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    if not pids:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != owner:
                continue  # only the lock's owner can have created it
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            return None  # cannot tell
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def remove_stale_lock(name: str, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """torch's extension builder waits, with no end, for the lock file of a build in progress; a build that was
    killed (SIGTERM, SIGKILL, a container stop) leaves it behind, and every later process would then wait forever.
    The lock is stale when no process has it open (`lock_holders`), or, where that cannot be told, when it is older
    than `max_age` seconds: it is then removed (with a warning). Returns whether one was."""
    lock = _lock_path(name)
    return lock is not None and _remove_if_stale(lock, max_age)


def _remove_if_stale(lock: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False  # no lock: the usual case
    held = lock_holders(lock)
    if held or (held is None and age <= max_age):
        return False
    why = "no process has it open" if held is False else f"it is {age / 60:.0f} minutes old"
    warnings.warn(f"imagine: removing {lock}, left by a build that did not finish ({why}: a killed process)",
                  RuntimeWarning, stacklevel=4)
    lock.unlink(missing_ok=True)
    return True


def wait_for_lock(name: str, what: str = "", timeout: float | None = None) -> None:
    """Before torch's builder runs: wait while another process builds `name` (its lock file exists and is held),
    removing the lock as soon as it is stale (`remove_stale_lock`), with one message while waiting. Raises
    TimeoutError after `timeout` seconds (default LOCK_WAIT_SECONDS): the caller's fallback then serves, where
    torch's own wait would never end."""
    lock = _lock_path(name)
    if lock is not None:
        _wait_while_locked(lock, what or name, timeout)


def _wait_while_locked(lock: Path, what: str, timeout: float | None = None) -> None:
    timeout = LOCK_WAIT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    told = False
    while lock.exists():
        if _remove_if_stale(lock):
            return
        if not told:
            print(f"imagine: waiting for another process's build of {what} to finish (lock file {lock})",
                  file=sys.stderr)
            told = True
        if time.monotonic() >= deadline:
            raise TimeoutError(f"another process has been building {what} for over {timeout:.0f} s (lock file {lock})")
        time.sleep(LOCK_POLL_SECONDS)


_BUILD_LOCK = threading.Lock()  # one of our builds at a time: the bounded baton below is swapped in around each


@contextlib.contextmanager
def _bounded_baton(what: str):
    """torch's builder with its lock's wait bounded: our check before it leaves a moment in which another process
    can take the lock (and be killed), and torch's FileBaton.wait() would then spin forever."""
    try:
        from torch.utils import cpp_extension
        from torch.utils.file_baton import FileBaton
    except ImportError:
        yield
        return

    class BoundedBaton(FileBaton):
        def wait(self):
            _wait_while_locked(Path(self.lock_file_path), what)

    with _BUILD_LOCK:
        original = getattr(cpp_extension, "FileBaton", None)
        if original is not FileBaton:  # a torch whose builder this does not know
            yield
            return
        cpp_extension.FileBaton = BoundedBaton
        try:
            yield
        finally:
            cpp_extension.FileBaton = original


def has_cpu_flags(flags: frozenset[str]) -> bool:
    """Linux (the builds use gcc's flags and /proc/cpuinfo) and a CPU with all of `flags`."""
    return sys.platform.startswith("linux") and flags <= cpu_flags()
