"""What the built-in services share: the telemetry sample shape and durations in YAML."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictFloat, StrictInt
from typing_extensions import TypeAliasType

from edge.config import parse_duration

__all__ = ["Duration", "Measurement", "Sample", "sample_value"]


def _duration(v: Any) -> float:
    try:
        return parse_duration(v)
    except ValueError as e:
        raise ValueError(str(e)) from None


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds; YAML may say ``30s``, ``250ms``, ``5m`` or a number."""


class Measurement(BaseModel):
    """A telemetry sample as an object: ``{"value": 21.5, "unit": "C"}`` (other keys are
    kept and ignored)."""

    model_config = ConfigDict(extra="allow")
    value: StrictFloat | StrictInt


Sample = TypeAliasType("Sample", StrictFloat | StrictInt | Measurement)
"""A telemetry sample: a bare number, or an object with a numeric ``value``."""


def sample_value(s: float | int | Measurement) -> float:
    return float(s.value if isinstance(s, Measurement) else s)
