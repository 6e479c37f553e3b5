"""The no-op service with a pydantic payload model (see ``bench/svc_plain.py``)."""

from __future__ import annotations

from pydantic import BaseModel

from bench.svc_plain import Counter
from edge import Service

__all__ = ["Reading", "typed"]


class Reading(BaseModel):
    value: float
    unit: str = "C"


typed = Service("benchtyped", heartbeat=0, description="does nothing with a validated model")
_count = Counter()


@typed.on("dt/{device}/temperature")
async def _nothing(device: str, reading: Reading) -> None:
    _count.tick()
