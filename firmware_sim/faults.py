"""The fault plan: which device suffers which fault when, fixed by the seed.

:func:`plan_faults` turns a profile into one :class:`DeviceFaults` per device before the
fleet starts, so the same seed always gives the same schedule (it is written to the
manifest). Timed faults are ``(at, kind, arg)`` with ``at`` in seconds from the fleet's
start: ``drop`` (arg: seconds down), ``die`` (arg: seconds until it boots again, or
None) and ``storm`` (arg: (duration, rate)). Per-message faults (garbage, duplicate) are
drawn per reading from the seed, so they too repeat exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from firmware_sim._rng import between, mix, name_key, uniform
from firmware_sim.profile import NewerFirmwareFault, Profile

__all__ = ["DeviceFaults", "plan_faults", "garbage_payload"]

_P_FAULT = 101


@dataclass(slots=True)
class DeviceFaults:
    timed: list[tuple[float, str, Any]] = field(default_factory=list)
    garbage: float = 0.0
    duplicate: float = 0.0
    skew: float = 0.0
    drift_ppm: float = 0.0
    newer: NewerFirmwareFault | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.timed:
            out["timed"] = [[round(at, 3), kind, _round(arg)] for at, kind, arg in self.timed]
        for name in ("garbage", "duplicate", "skew", "drift_ppm"):
            value = getattr(self, name)
            if value:
                out[name] = round(value, 6)
        if self.newer is not None:
            out["newer_firmware"] = self.newer.firmware
        return out


def _round(arg: Any) -> Any:
    if isinstance(arg, float):
        return round(arg, 3)
    if isinstance(arg, tuple):
        return [_round(a) for a in arg]
    return arg


NO_FAULTS = DeviceFaults()


def _selected(spec: Any, names: list[str], seed: int, kind: str) -> list[int]:
    if spec.only is not None:
        wanted = set(spec.only)
        return [i for i, n in enumerate(names) if n in wanted]
    n = round(spec.devices * len(names))
    if spec.devices > 0 and n == 0:
        n = 1
    rng = random.Random(mix(seed * 1_000_003 + name_key(kind)))
    return sorted(rng.sample(range(len(names)), n))


def plan_faults(profile: Profile) -> dict[str, DeviceFaults]:
    """The fault plan of every device that has at least one fault."""
    names = profile.device_names()
    seed = profile.seed
    f = profile.faults
    plan: dict[str, DeviceFaults] = {}

    def get(i: int) -> DeviceFaults:
        d = plan.get(names[i])
        if d is None:
            d = plan[names[i]] = DeviceFaults()
        return d

    def draw(rng: tuple[float, float], i: int, kind: int, n: int) -> float:
        return between(rng[0], rng[1], seed, i, _P_FAULT, kind, n)

    if f.drop:
        for i in _selected(f.drop, names, seed, "drop"):
            for n in range(f.drop.count):
                get(i).timed.append(
                    (draw(f.drop.at, i, 1, 2 * n), "drop", draw(f.drop.down, i, 2, 2 * n))
                )
    if f.flap:
        for i in _selected(f.flap, names, seed, "flap"):
            t = draw(f.flap.at, i, 3, 0)
            end = t + f.flap.duration
            n = 0
            while t < end:
                down = draw(f.flap.down, i, 4, n)
                get(i).timed.append((t, "drop", down))
                t += down + draw(f.flap.up, i, 5, n)
                n += 1
    if f.die:
        for i in _selected(f.die, names, seed, "die"):
            back = draw(f.die.down, i, 7, 0) if f.die.down is not None else None
            get(i).timed.append((draw(f.die.at, i, 6, 0), "die", back))
    if f.storm:
        for i in _selected(f.storm, names, seed, "storm"):
            get(i).timed.append(
                (draw(f.storm.at, i, 8, 0), "storm", (f.storm.duration, f.storm.rate))
            )
    if f.garbage:
        for i in _selected(f.garbage, names, seed, "garbage"):
            get(i).garbage = f.garbage.probability
    if f.duplicate:
        for i in _selected(f.duplicate, names, seed, "duplicate"):
            get(i).duplicate = f.duplicate.probability
    if f.clock_skew:
        for i in _selected(f.clock_skew, names, seed, "clock_skew"):
            d = get(i)
            d.skew = draw(f.clock_skew.seconds, i, 9, 0)
            d.drift_ppm = f.clock_skew.drift_ppm
    if f.newer_firmware:
        for i in _selected(f.newer_firmware, names, seed, "newer_firmware"):
            get(i).newer = f.newer_firmware
    for d in plan.values():
        d.timed.sort(key=lambda x: x[0])
    return plan


def garbage_payload(good: bytes, *key: int) -> bytes:
    """A broken payload of one of four kinds: cut short, not UTF-8, not JSON, or JSON of
    the wrong shape."""
    kind = int(uniform(*key, 1) * 4)
    if kind == 0:
        return good[: max(1, len(good) // 2)]
    if kind == 1:
        return b"\xff\xfe" + good[2:40] + b"\xc3\x28"
    if kind == 2:
        return b"ERR sensor timeout 0x" + f"{int(uniform(*key, 2) * 65535):04X}".encode()
    return b'[null, "NaN", {"seq": "x"}]'
