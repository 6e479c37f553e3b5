"""Believable sensor signals, a pure function of (seed, device, tick).

One :class:`Sensors` per device holds the physical state the streams are read from. The
device calls :meth:`Sensors.advance` once per reporting tick, then :meth:`Sensors.read`
for each stream due at that tick, always in the same order; every random draw is keyed
by (seed, device, tick), so the same seed gives the same values whatever the timing.

Streams and their ``data`` (besides ``seq``, ``boot`` and ``fw``, added by the device):

=============  ==============================================================
temperature    ``value`` °C (``unit: "C"``): a daily cycle (coolest near 05:00,
               warmest near 15:00), a per-device offset, and a mean-reverting
               random walk
humidity       ``value`` %RH: anti-correlated with temperature, plus noise
pressure       ``value`` hPa: a slow drift around a per-device base
vibration      ``rms`` and ``peak`` mm/s, ``burst``: quiet most of the time, with
               bursts of a few ticks (a pump starting, a truck passing)
door           ``open`` and ``changes``: published only when the contact changes
battery        ``percent`` and ``voltage``: drains with time and with every
               message sent, so a shorter reporting interval empties it sooner
=============  ==============================================================
"""

from __future__ import annotations

import math

from firmware_sim._rng import between, gauss, uniform

__all__ = ["STREAMS", "Sensors"]

STREAMS = ("temperature", "humidity", "pressure", "vibration", "door", "battery")
_DAY = 86400.0
# purposes: part of every random key, so different signals never share a draw
_P_TEMP, _P_HUM, _P_PRES, _P_VIB, _P_BURST, _P_DOOR, _P_INIT = range(1, 8)
_IDLE_DRAIN_PCT_PER_S = 0.00002  # about 58 days from full when idle
_MSG_DRAIN_PCT = 0.00025  # per message: radio time dominates


class Sensors:
    """The physical state of one device's sensors."""

    __slots__ = (
        "seed",
        "dev",
        "k",
        "t",
        "day0",
        "temp_bias",
        "walk",
        "temp",
        "pres_base",
        "pres",
        "burst_left",
        "burst_level",
        "door_open",
        "door_changes",
        "door_new",
        "battery",
        "_pres",
        "_vib",
        "_door",
    )

    def __init__(
        self,
        seed: int,
        dev: int,
        start_of_day: float | None = None,
        streams: tuple[str, ...] | list[str] = STREAMS,
    ) -> None:
        self.seed = seed
        self.dev = dev
        # a device advances only the state its streams read (every signal has its own
        # draws, so a stream's values are the same whichever others are on)
        self._pres = "pressure" in streams
        self._vib = "vibration" in streams
        self._door = "door" in streams
        self.k = -1
        self.t = 0.0
        # the site's local time of day at t = 0 (same for every device of a seed)
        self.day0 = (
            start_of_day if start_of_day is not None else between(0, _DAY, seed, -1, _P_INIT)
        )
        self.temp_bias = gauss(seed, dev, 0, _P_INIT) * 1.5
        self.walk = 0.0
        self.temp = 20.0
        self.pres_base = 1013.25 + gauss(seed, dev, 1, _P_INIT) * 4
        self.pres = self.pres_base
        self.burst_left = 0
        self.burst_level = 0.0
        self.door_open = False
        self.door_changes = 0
        self.door_new = False
        self.battery = between(70, 100, seed, dev, 2, _P_INIT)

    def advance(self, k: int, t: float, dt: float) -> None:
        """Move the physical state to tick ``k`` at ``t`` seconds (``dt`` since the last)."""
        seed, dev = self.seed, self.dev
        self.k, self.t = k, t
        day = (self.day0 + t) % _DAY
        # coolest about 05:00, warmest about 15:00 (amplitude 5 °C around 18 °C)
        cycle = 18.0 + 5.0 * math.sin(2 * math.pi * (day - 9 * 3600) / _DAY)
        self.walk = self.walk * 0.98 + gauss(seed, dev, k, _P_TEMP) * 0.08
        self.temp = cycle + self.temp_bias + self.walk
        if self._pres:
            self.pres += (self.pres_base - self.pres) * 0.01 + gauss(seed, dev, k, _P_PRES) * 0.03
        if not self._vib:
            pass
        elif self.burst_left:
            self.burst_left -= 1
        elif uniform(seed, dev, k, _P_BURST) < 0.03:
            self.burst_left = 2 + int(uniform(seed, dev, k, _P_BURST, 1) * 8)
            self.burst_level = between(3.0, 12.0, seed, dev, k, _P_BURST, 2)
        if self._door:
            p = 0.25 if self.door_open else 0.04
            self.door_new = uniform(seed, dev, k, _P_DOOR) < p
            if self.door_new:
                self.door_open = not self.door_open
                self.door_changes += 1
        self.battery = max(0.0, self.battery - _IDLE_DRAIN_PCT_PER_S * dt)

    def sent(self, n: int) -> None:
        """Account the radio cost of ``n`` messages."""
        self.battery = max(0.0, self.battery - _MSG_DRAIN_PCT * n)

    def read(self, stream: str) -> dict[str, object] | None:
        """The reading of ``stream`` at the current tick (None: nothing to report)."""
        k, seed, dev = self.k, self.seed, self.dev
        if stream == "temperature":
            return {"value": round(self.temp, 2), "unit": "C"}
        if stream == "humidity":
            h = 55.0 - 2.2 * (self.temp - 18.0) + gauss(seed, dev, k, _P_HUM) * 1.2
            return {"value": round(min(100.0, max(5.0, h)), 1), "unit": "%RH"}
        if stream == "pressure":
            return {"value": round(self.pres, 2), "unit": "hPa"}
        if stream == "vibration":
            base = 0.25 + abs(gauss(seed, dev, k, _P_VIB)) * 0.05
            rms = base + (
                self.burst_level * (0.7 + 0.3 * uniform(seed, dev, k, _P_VIB, 3))
                if self.burst_left
                else 0.0
            )
            return {
                "rms": round(rms, 3),
                "peak": round(rms * 1.41 + base, 3),
                "burst": bool(self.burst_left),
                "unit": "mm/s",
            }
        if stream == "door":
            if not self.door_new:
                return None
            return {"open": self.door_open, "changes": self.door_changes}
        if stream == "battery":
            pct = self.battery
            return {"percent": round(pct, 2), "voltage": round(3.0 + 1.2 * pct / 100, 3)}
        raise ValueError(f"unknown stream {stream!r}")
