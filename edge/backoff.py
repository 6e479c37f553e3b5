"""Capped, jittered exponential backoff for reconnect loops."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """``next()`` returns the delay before the next attempt: uniformly random between half
    and all of ``min(cap, initial * 2**attempt)`` ("equal jitter"), so a fleet that lost
    its link at the same moment does not reconnect in lockstep. ``reset()`` after success."""

    def __init__(self, initial: float = 0.2, cap: float = 5.0, rng: random.Random | None = None):
        if initial <= 0 or cap < initial:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0
