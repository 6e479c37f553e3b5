"""What the built-in services share: the telemetry sample shape, durations in YAML, and
the commands every built-in service answers (docs/commands.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, StrictFloat, StrictInt
from typing_extensions import TypeAliasType

from edge.config import parse_duration
from edge.errors import Reject

__all__ = ["Duration", "Sample", "sample_value", "lifecycle_commands"]


def _duration(v: Any) -> float:
    try:
        return parse_duration(v)
    except ValueError as e:
        raise ValueError(str(e)) from None


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds; YAML may say ``30s``, ``250ms``, ``5m`` or a number."""


Sample = TypeAliasType("Sample", StrictFloat | StrictInt | dict[str, Any])
"""A telemetry sample: a bare number, or an object whose field (``value`` unless
configured per stream) holds the number, e.g. ``{"value": 21.5, "unit": "C"}``."""


def sample_value(s: float | int | dict[str, Any], field: str = "value") -> float | None:
    """The number in a sample; None when an object does not have ``field`` (a stream
    without that reading: skipped, not an error). A field that is there but is not a
    number dead-letters the message (reason ``schema``)."""
    if not isinstance(s, dict):
        return float(s)
    if field not in s:
        return None
    v = s[field]
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    raise Reject(f"field {field!r} is {v!r}, not a number", reason="schema")


def lifecycle_commands(service: Any, set_interval: Callable[[float], Awaitable[dict[str, Any]]] | None = None,
                       ) -> None:
    """Give a built-in service the commands of the downlink contract: ``reboot`` (reply,
    then stop; the supervisor starts it again), and ``set_interval`` plus a desired
    ``interval`` (reported back on ``shadow/<service>/reported``) when ``set_interval`` is
    given. ``ota`` is not one of them: a service is updated by its deployment, so the SDK
    answers it ``rejected`` (unknown command)."""

    @service.command("reboot")
    async def reboot() -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.2, service.stop)
        return {"restarting": True}

    if set_interval is None:
        return

    async def apply(interval: float) -> dict[str, Any]:
        if isinstance(interval, bool) or not 0 < float(interval) <= 86400:
            raise ValueError("interval must be in (0, 86400] seconds")
        out = await set_interval(float(interval))
        await service.report(service.name, {"interval": float(interval)})
        return out

    @service.command("set_interval")
    async def set_interval_cmd(interval: float) -> dict[str, Any]:
        return await apply(interval)

    @service.on_desired(service.name)
    async def desired(doc: dict[str, Any]) -> None:
        if "interval" in doc:
            await apply(doc["interval"])
