"""Rules: threshold and rate-of-change alerts from YAML, without alert storms.

Consumes ``dt/{device}/{stream}`` (a bare number or an object whose ``field``, ``value``
by default, holds the number; booleans count as 0 and 1) and publishes to
``evt/alert/<device>`` an ``io.edgeferry.alert`` event (``state: firing``) when a rule is
breached, and an ``io.edgeferry.alert.cleared`` event (``state: cleared``) when it is
clear again.

- **threshold**: ``above: 30`` fires when value > 30, ``below: 5`` when value < 5;
- **rate of change**: ``rate_above: 0.5`` fires when the value rises faster than 0.5 per
  second between two samples, ``rate_below: -0.5`` when it falls faster;
- **hysteresis**: a firing rule clears only once the value (or rate) is back inside the
  limit by this margin (``above: 30, hysteresis: 1`` clears at <= 29), so a sensor hovering
  around 30 does not flap;
- **min_interval**: after an alert fired, the same rule and device fires again only once
  this long has passed (by event time), even if it cleared in between.

Time is the envelope's ``time`` (arrival time for raw payloads). State is kept in memory:
after a restart a rule that was firing is considered clear.

Example config (``edgeferry service run edge.services.rules:service --config FILE``)::

    rules:
      rules:
        - name: too-hot
          stream: temperature
          above: 30
          hysteresis: 1
          min_interval: 5m
        - name: heating-fast
          stream: temperature
          rate_above: 0.5
          min_interval: 1m
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from edge.events import Event
from edge.service import Service
from edge.services._common import Duration, Sample, lifecycle_commands, sample_value

__all__ = ["Alert", "Rule", "RulesConfig", "service"]


class Rule(BaseModel):
    """One rule; at least one of above, below, rate_above, rate_below."""

    name: str = Field(min_length=1)
    stream: str = Field(description="telemetry stream, e.g. temperature ('+' for every stream)")
    devices: list[str] = Field(default_factory=list, description="only these devices (empty: all)")
    field: str = Field("value", description="the field of an object sample that holds the number")
    above: float | None = None
    below: float | None = None
    rate_above: float | None = Field(None, description="units per second")
    rate_below: float | None = Field(None, description="units per second (negative: falling)")
    hysteresis: float = Field(0.0, ge=0)
    min_interval: Duration = Field(60.0, ge=0, description="between two alerts of one device")
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        if (
            self.above is None
            and self.below is None
            and self.rate_above is None
            and self.rate_below is None
        ):
            raise ValueError(f"rule {self.name!r} needs above, below, rate_above or rate_below")
        return self


class RulesConfig(BaseModel):
    """The ``rules:`` section of the YAML file."""

    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> RulesConfig:
        names = [r.name for r in self.rules]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(sorted(dupes))}")
        return self


class Alert(BaseModel):
    """A rule fired or cleared for one device."""

    event_type: ClassVar[str] = "io.edgeferry.alert"
    rule: str
    device: str
    stream: str
    state: Literal["firing", "cleared"]
    severity: str
    value: float
    rate: float | None = Field(None, description="units per second, when the rule looks at it")
    condition: str = Field(description="what was breached, e.g. 'value > 30'")
    at: float = Field(description="event time, Unix seconds")


@dataclass(slots=True)
class _State:
    firing: bool = False
    last_fired: float | None = None
    condition: str = ""


service = Service(
    "rules",
    config=RulesConfig,
    description="Threshold and rate-of-change alerts with hysteresis and a minimum interval.",
)
service.publishes("evt/alert/{device}", Alert, "alerts firing and clearing")
lifecycle_commands(service)

_state: dict[tuple[str, str], _State] = {}
_prev: dict[tuple[str, str, str], tuple[float, float]] = {}


def _alert(
    r: Rule,
    state: Literal["firing", "cleared"],
    condition: str,
    device: str,
    stream: str,
    v: float,
    rate: float | None,
    ts: float,
) -> Alert:
    """An alert of rule ``r`` on this sample (the rate only when the rule looks at it)."""
    looks_at_rate = r.rate_above is not None or r.rate_below is not None
    return Alert(
        rule=r.name,
        device=device,
        stream=stream,
        state=state,
        severity=r.severity,
        value=v,
        rate=rate if looks_at_rate else None,
        condition=condition,
        at=ts,
    )


def _breach(r: Rule, v: float, rate: float | None) -> str | None:
    if r.above is not None and v > r.above:
        return f"value > {r.above:g}"
    if r.below is not None and v < r.below:
        return f"value < {r.below:g}"
    if rate is not None:
        if r.rate_above is not None and rate > r.rate_above:
            return f"rate > {r.rate_above:g}/s"
        if r.rate_below is not None and rate < r.rate_below:
            return f"rate < {r.rate_below:g}/s"
    return None


def _clear(r: Rule, v: float, rate: float | None) -> bool:
    h = r.hysteresis
    if r.above is not None and v > r.above - h:
        return False
    if r.below is not None and v < r.below + h:
        return False
    if r.rate_above is not None or r.rate_below is not None:
        if rate is None:
            return False  # no rate yet: stay as we are
        if r.rate_above is not None and rate > r.rate_above - h:
            return False
        if r.rate_below is not None and rate < r.rate_below + h:
            return False
    return True


@service.on("dt/{device}/{stream}", publishes=[("evt/alert/{device}", Alert)])
async def evaluate(device: str, stream: str, value: Sample, event: Event) -> None:
    """Evaluate every rule for this stream and device; publish what fires or clears."""
    ts = event.timestamp or time.time()
    rules = [
        r
        for r in service.config.rules
        if r.stream in ("+", stream) and (not r.devices or device in r.devices)
    ]
    # every number first (a bad field rejects the message before anything is published),
    # and each field's rate against its previous sample, once for all rules
    readings: dict[str, tuple[float, float | None] | None] = {}
    for r in rules:
        if r.field not in readings:
            v = sample_value(value, r.field)
            prev = _prev.get((device, stream, r.field))
            if v is None:
                readings[r.field] = None
            else:
                rate = (v - prev[1]) / (ts - prev[0]) if prev is not None and ts > prev[0] else None
                readings[r.field] = (v, rate)
    for fld, reading in readings.items():
        prev = _prev.get((device, stream, fld))
        if reading is not None and (prev is None or ts >= prev[0]):
            _prev[(device, stream, fld)] = (ts, reading[0])
    for r in rules:
        reading = readings[r.field]
        if reading is None:  # this sample does not carry the rule's field
            continue
        v, rate = reading
        st = _state.setdefault((r.name, device), _State())
        if not st.firing:
            cond = _breach(r, v, rate)
            if cond is None:
                continue
            if st.last_fired is not None and ts - st.last_fired < r.min_interval:
                service.counters["suppressed"] = service.counters.get("suppressed", 0) + 1
                continue
            await service.publish(
                f"evt/alert/{device}",
                _alert(r, "firing", cond, device, stream, v, rate, ts),
                subject=device,
            )
            st.firing, st.last_fired, st.condition = True, ts, cond
        elif _clear(r, v, rate):
            await service.publish(
                f"evt/alert/{device}",
                _alert(r, "cleared", st.condition, device, stream, v, rate, ts),
                type="io.edgeferry.alert.cleared",
                subject=device,
            )
            st.firing = False


@service.on_start
async def _reset() -> None:
    _state.clear()
    _prev.clear()
    service.counters["suppressed"] = 0
