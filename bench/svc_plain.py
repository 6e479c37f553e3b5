"""The no-op services the service benchmark runs (``bench/bench_service.py``).

This module imports no pydantic: ``plain`` takes its payload as a ``dict``, so the SDK
checks it without pydantic. ``bench/svc_typed.py`` is the same service with a pydantic
model. Each counts its messages and prints ``BENCH {...}`` once it has ``BENCH_N``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from edge import Service

__all__ = ["Counter", "plain"]


class Counter:
    """Counts handled messages; prints the rate from the first to the BENCH_N-th."""

    def __init__(self) -> None:
        self.n = 0
        self.first = 0.0
        self.cpu = 0.0
        self.target = int(os.environ.get("BENCH_N", "0") or 0)

    def tick(self) -> None:
        n = self.n = self.n + 1
        if n == 1:
            self.first = time.perf_counter()
            self.cpu = time.process_time()
        if n == self.target:
            seconds = time.perf_counter() - self.first
            cpu = time.process_time() - self.cpu  # all threads of the process
            print("BENCH " + json.dumps({"count": n, "seconds": seconds, "cpu_seconds": cpu}), flush=True)


plain = Service("benchplain", heartbeat=0, description="does nothing with a dict payload")
_count = Counter()


@plain.on("dt/{device}/temperature")
async def _nothing(device: str, data: dict[str, Any]) -> None:
    _count.tick()
