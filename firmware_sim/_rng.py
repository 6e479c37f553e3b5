"""Counter-based random numbers: every draw is a pure function of its key.

A device's values must not depend on how the event loop interleaved its timers, so
nothing here keeps state: ``uniform(seed, device, stream, k, purpose)`` is the same
number in every run with the same seed. SplitMix64 over the key's (integer) tuple hash,
which Python computes identically in every process (only ``str`` hashing is salted).
"""

from __future__ import annotations

import math

_M64 = (1 << 64) - 1
_INV = 1.0 / (1 << 64)


def mix(x: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit integer from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniform(*key: int) -> float:
    """A float in [0, 1) determined by the integer key."""
    return mix(hash(key) & _M64) * _INV


def between(lo: float, hi: float, *key: int) -> float:
    return lo + (hi - lo) * uniform(*key)


def gauss(*key: int) -> float:
    """A standard normal draw (Box-Muller on two keyed uniforms)."""
    u1 = uniform(*key, 1) or 1e-18
    u2 = uniform(*key, 2)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def name_key(name: str) -> int:
    """A stable integer for a name (``hash(str)`` is salted per process; this is not)."""
    n = 0
    for b in name.encode():
        n = mix(n ^ b)
    return n
