"""What the built-in services share: the telemetry sample shape and durations in YAML."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, StrictFloat, StrictInt
from typing_extensions import TypeAliasType

from edge.config import parse_duration
from edge.errors import Reject

__all__ = ["Duration", "Sample", "sample_value"]


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
