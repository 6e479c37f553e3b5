"""The fleet profile: what devices there are and which faults to inject, from YAML or flags.

See docs/simulator.md for the format and deploy/sim/profile-example.yaml for an example.
Flags override the file; ``--fault KIND:key=value,...`` adds or replaces one fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from edge.config import read_yaml
from firmware_sim.errors import ProfileError
from firmware_sim.sensors import STREAMS

__all__ = ["Profile", "load_profile", "parse_fault_flag", "FAULT_KINDS"]


def _range(v: Any) -> tuple[float, float]:
    """``5``, ``[2, 8]`` or ``"2..8"`` -> (lo, hi)."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v), float(v)
    if isinstance(v, str):
        a, sep, b = v.partition("..")
        try:
            return (float(a), float(b)) if sep else (float(v), float(v))
        except ValueError:
            raise ValueError(f"{v!r} is not a number or a range like 2..8") from None
    if isinstance(v, list | tuple) and len(v) == 2:
        lo, hi = float(v[0]), float(v[1])
        if hi < lo:
            raise ValueError(f"range {list(v)} has its upper end below its lower end")
        return lo, hi
    raise ValueError(f"{v!r} is not a number or a range [lo, hi]")


Range = Annotated[tuple[float, float], BeforeValidator(_range)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Selected(_Strict):
    devices: float = Field(1.0, ge=0, le=1, description="fraction of the fleet affected")
    only: list[str] | None = Field(None, description="exactly these devices (overrides devices)")


class DropFault(_Selected):
    """The device's network drops (no DISCONNECT: the broker fires the will)."""

    at: Range = (5.0, 10.0)
    down: Range = (1.0, 3.0)
    count: int = Field(1, ge=1, le=10000)


class FlapFault(_Selected):
    """The device's link flaps: up for ``up`` seconds, down for ``down``, for ``duration``."""

    at: Range = (2.0, 5.0)
    duration: float = Field(10.0, gt=0)
    up: Range = (0.5, 2.0)
    down: Range = (0.5, 2.0)


class DieFault(_Selected):
    """The device loses power: no DISCONNECT, its RAM outbox is gone; it boots again after
    ``down`` seconds (never, when ``down`` is null)."""

    at: Range = (5.0, 10.0)
    down: Range | None = None


class ProbabilityFault(_Selected):
    probability: float = Field(0.01, ge=0, le=1)


class NewerFirmwareFault(_Selected):
    """Payloads as a newer firmware writes them: renamed and extra fields in ``data``."""

    firmware: str = "2.0.0"
    rename: dict[str, str] = Field(default_factory=lambda: {"value": "reading", "unit": "units"})
    extra: dict[str, Any] = Field(default_factory=lambda: {"schema": 2, "rssi": -67})


class ClockSkewFault(_Selected):
    seconds: Range = (-300.0, 300.0)
    drift_ppm: float = 0.0


class StormFault(_Selected):
    """A message storm: the firmware reports every sensor ``rate`` times a second."""

    at: Range = (5.0, 10.0)
    duration: float = Field(2.0, gt=0)
    rate: float = Field(50.0, gt=0, le=10000)


class Faults(_Strict):
    drop: DropFault | None = None
    flap: FlapFault | None = None
    die: DieFault | None = None
    garbage: ProbabilityFault | None = None
    newer_firmware: NewerFirmwareFault | None = None
    duplicate: ProbabilityFault | None = None
    clock_skew: ClockSkewFault | None = None
    storm: StormFault | None = None


FAULT_KINDS = tuple(Faults.model_fields)


class SensorSpec(_Strict):
    name: Literal["temperature", "humidity", "pressure", "vibration", "door", "battery"]
    every: int = Field(1, ge=1, description="report at every n-th tick")


class Reconnect(_Strict):
    initial: float = Field(0.5, gt=0)
    cap: float = Field(15.0, gt=0)


class Chaos(_Strict):
    """A chaos proxy between the whole fleet and the broker (a site-wide outage)."""

    mode: Literal["cut", "blackhole"] = "cut"
    flap: str | None = Field(None, description="UP_MIN-UP_MAX:DOWN_MIN-DOWN_MAX, e.g. 2-5:1-3")

    @field_validator("flap")
    @classmethod
    def _flap(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                up, down = v.split(":")
                for part in (up, down):
                    lo, hi = (float(x) for x in part.split("-"))
                    if not 0 < lo <= hi:
                        raise ValueError
            except ValueError:
                raise ValueError(
                    f"{v!r} must look like 2-5:1-3 (seconds up : seconds down)"
                ) from None
        return v

    def schedule(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        if not self.flap:
            return None
        up, down = self.flap.split(":")
        u = tuple(float(x) for x in up.split("-"))
        d = tuple(float(x) for x in down.split("-"))
        return (u[0], u[1]), (d[0], d[1])


class Profile(_Strict):
    """Everything about a simulated fleet except the broker URL."""

    devices: int = Field(10, ge=1, le=100000)
    interval: float = Field(1.0, gt=0, description="seconds between a device's reporting ticks")
    jitter: float = Field(0.1, ge=0, le=0.45, description="tick jitter, as a fraction of interval")
    duration: float | None = Field(None, gt=0, description="seconds to run (None: until stopped)")
    seed: int = 0
    site: str = Field("sim", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    prefix: str = Field("dev", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    sensors: list[SensorSpec] = Field(
        default_factory=lambda: [SensorSpec.model_validate({"name": s}) for s in STREAMS]
    )
    firmware: str = "1.4.2"
    outbox: int = Field(100, ge=1, description="messages a device keeps while offline")
    window: int = Field(8, ge=1, le=65535, description="QoS 1 publishes in flight per device")
    keepalive: int = Field(15, ge=1, le=65535)
    clean_session: bool = True
    reconnect: Reconnect = Field(default_factory=lambda: Reconnect.model_validate({}))
    reboot_time: float = Field(1.0, ge=0)
    connect_rate: float = Field(1000.0, gt=0, description="new connections per second at start")
    faults: Faults = Field(default_factory=lambda: Faults.model_validate({}))
    chaos: Chaos | None = None

    @field_validator("sensors", mode="before")
    @classmethod
    def _sensors(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list):
            v = [{"name": s} if isinstance(s, str) else s for s in v]
            if not v:
                raise ValueError("at least one sensor is needed")
        return v

    def device_names(self) -> list[str]:
        width = max(4, len(str(self.devices - 1)))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(self.devices)]

    def target_rate(self) -> float:
        """Telemetry messages per second the fleet aims at without faults (door excluded:
        it reports changes only)."""
        per_tick = sum(1.0 / s.every for s in self.sensors if s.name != "door")
        return self.devices * per_tick / self.interval


def _one_line(e: ValidationError, origin: str) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "profile"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{origin}: {where}: {msg}{more}"


def load_profile(path: str | Path | None = None, **overrides: Any) -> Profile:
    """The profile from a YAML file (optional), with non-None ``overrides`` on top.
    ``faults`` in overrides is merged kind by kind into the file's faults."""
    data: dict[str, Any] = {}
    origin = "profile"
    if path is not None:
        origin = str(path)
        loaded = read_yaml(path, "profile", ProfileError)
        if not isinstance(loaded, dict):
            raise ProfileError(f"profile {path} must be a mapping")
        data = loaded.get("sim", loaded) if isinstance(loaded.get("sim"), dict) else loaded
    extra_faults = overrides.pop("faults", None) or {}
    for k, v in overrides.items():
        if v is not None:
            data[k] = v
    if extra_faults:
        faults = dict(data.get("faults") or {})
        faults.update(extra_faults)
        data["faults"] = faults
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(_one_line(e, origin)) from None


def parse_fault_flag(spec: str) -> tuple[str, dict[str, Any]]:
    """``die:devices=0.1,at=5..10,down=2..4`` -> ("die", {...}). Lists (``only``) use
    ``+``: ``only=dev-0001+dev-0003``. A kind alone enables it with its defaults."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().replace("-", "_")
    if kind not in FAULT_KINDS:
        raise ProfileError(
            f"--fault {spec!r}: unknown kind {kind!r} (one of {', '.join(FAULT_KINDS)})"
        )
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ProfileError(f"--fault {spec!r}: {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if key == "only":
            params[key] = [v for v in value.split("+") if v]
        elif key in ("rename", "extra"):
            pairs = [p.partition(":") for p in value.split("+") if p]
            params[key] = {a: b for a, _, b in pairs}
        elif value.lower() in ("null", "none", "never"):
            params[key] = None
        else:
            params[key] = value
    return kind, params
