"""The normal draws torch.randn makes on an NVIDIA GPU, made on any CPU: Philox4x32-10 and curand's Box-Muller.

torch's CUDA generator is curand's Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy
as 1, 2, 3", sec. 4): a counter-based generator whose output for a 128-bit counter under a 64-bit key (the seed) is ten
rounds of a keyed bijection, so any draw is computable without the ones before it. AUTOMATIC1111's "NV" random number
source (`randn_source`, its `rng_philox.Generator`) draws with it on the CPU, so that a seed gives the picture it gives
on an NVIDIA card, whatever the machine: element i of a draw is the counter (offset, 0, i mod 2^32, i div 2^32) under
key (seed mod 2^32, seed div 2^32), its first two words made one normal by the Box-Muller transform as curand's
`_curand_box_muller` does (its first output, s sin v), and each draw moves the offset on by one.

Known answers: Random123's vectors for Philox4x32-10, and A1111's documented first draws for seed 0
(tests/test_noise_sources.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# Philox4x32's round multipliers and Weyl key increments (Salmon et al. 2011, table 2)
PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
# curand's float32 constants for Box-Muller: 2^-32 and 2^-32 2 pi (CURAND_2POW32_INV, CURAND_2POW32_INV_2PI)
_INV_2POW32 = float(np.float32(2.3283064e-10))
_INV_2POW32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))
MAX_SEED = 2**64 - 1


def philox4x32_10(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32-R (Salmon et al. 2011, sec. 4.2) on N counters at once: counter [4, N] and key [2, N] of 32-bit
    words (any unsigned dtype holding them) -> the [4, N] uint32 output. A round takes (c0, c1, c2, c3) under
    (k0, k1) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key moves on by the Weyl
    constants between rounds."""
    c = [np.asarray(w, dtype=np.uint64) & _LOW for w in counter]
    k0, k1 = (np.asarray(w, dtype=np.uint64) & _LOW for w in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _LOW, (k1 + PHILOX_W[1]) & _LOW
        p0, p1 = c[0] * PHILOX_M[0], c[2] * PHILOX_M[1]  # (a 32 x 32-bit product fits 64 bits)
        c = [(p1 >> _SHIFT) ^ c[1] ^ k0, p1 & _LOW, (p0 >> _SHIFT) ^ c[3] ^ k1, p0 & _LOW]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two uniform 32-bit words -> one standard normal, curand's `_curand_box_muller` first output: u and v on the
    open interval's cell centres, u = (x + 1/2) 2^-32 and v = (y + 1/2) 2^-32 2 pi, then sqrt(-2 ln u) sin v; with
    curand's float32 constants, evaluated in float64 and rounded to float32 as A1111's NV source does."""
    u = x.astype(np.float64) * _INV_2POW32 + _INV_2POW32 / 2
    v = y.astype(np.float64) * _INV_2POW32_2PI + _INV_2POW32_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seed's stream of normal draws as torch.randn gives them on an NVIDIA GPU (A1111's "NV" source): each
    `randn(shape)` call is one draw, element i from counter (offset, 0, i) under the seed's key, the offset moving on
    by one a call."""

    device = torch.device("cpu")

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"a Philox seed is an int in [0, 2^64 - 1]; got {seed!r}")
        self.seed, self.offset = int(seed), 0

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(int(n) for n in shape)
        n = math.prod(shape)
        index = np.arange(n, dtype=np.uint64)
        counter = np.stack([np.full(n, self.offset, dtype=np.uint64), np.zeros(n, dtype=np.uint64),
                            index & _LOW, index >> _SHIFT])
        key = np.array([[self.seed & 0xFFFFFFFF], [self.seed >> 32]], dtype=np.uint64)
        self.offset += 1
        words = philox4x32_10(counter, key)
        return torch.from_numpy(box_muller(words[0], words[1])).reshape(shape).to(dtype)
