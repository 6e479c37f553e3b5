"""What a simulated device shares with its fleet, and nothing more.

A :class:`~firmware_sim.device.Device` gets one :class:`DeviceContext`: the run's
settings (profile, run id, broker URL, client id prefix, reconnect jitter), the ramp that
admits its connection attempts (:class:`~firmware_sim.ramp.Ramp`), its clock
(the wall-clock start, for skewed and drifting device clocks), the fleet's live counters
(:class:`FleetCounters`, which the progress line and ``Fleet.stats()`` read), the fleet's
stop state, and two ways to tell the fleet something (``spawn`` a short job in its task
group, ``emptied`` when its outbox ran dry while stopping). A device never sees the
Fleet, and this module imports neither.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from edge.mqtt import BrokerURL
from firmware_sim.profile import Profile
from firmware_sim.ramp import Ramp

__all__ = ["DeviceContext", "FleetCounters"]


@dataclass(slots=True)
class FleetCounters:
    """Counters of the whole fleet, written by its devices."""

    generated: int = 0  # messages put into outboxes
    acked: int = 0  # messages the broker acknowledged
    connected: int = 0  # devices online now
    boots: int = 0  # boots after the first (reboots, power back)
    faults_fired: dict[str, int] = field(default_factory=dict)


class DeviceContext:
    """The part of a fleet its devices may read and write (see the module docstring)."""

    __slots__ = (
        "profile",
        "run_id",
        "url",
        "client_prefix",
        "rng",
        "ramp",
        "wall_start",
        "counters",
        "connection_changed",
        "stopping",
        "drain_over",
        "_spawn",
        "_emptied",
    )

    def __init__(
        self,
        *,
        profile: Profile,
        run_id: str,
        url: BrokerURL,
        client_prefix: str,
        rng: random.Random,
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        emptied: Callable[[str], None],
    ) -> None:
        self.profile = profile
        self.run_id = run_id
        self.url = url  # the broker, or the chaos proxy in front of it
        self.client_prefix = client_prefix
        self.rng = rng  # reconnect jitter only
        self.ramp = Ramp()  # connection attempts in flight (firmware_sim/ramp.py)
        self.wall_start = time.time()  # set again when the fleet starts
        self.counters = FleetCounters()
        self.connection_changed = asyncio.Event()  # set whenever a device goes on- or offline
        self.stopping = False  # no more ticks; outboxes drain
        self.drain_over = False  # outboxes given up; devices disconnect
        self._spawn = spawn
        self._emptied = emptied

    def count_fault(self, kind: str) -> None:
        self.counters.faults_fired[kind] = self.counters.faults_fired.get(kind, 0) + 1

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a short-lived device job (a reboot, an update) in the fleet's task group."""
        self._spawn(coro, name)

    def emptied(self, device: str) -> None:
        """Device ``device``'s outbox is empty (the fleet waits for that while stopping)."""
        self._emptied(device)
