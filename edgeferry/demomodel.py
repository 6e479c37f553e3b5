"""What a demo run is: its options, what happened in it (for the dashboard, the
verification and the report), and which devices the downlink part talks to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CMD_INTERVAL", "CMD_TARGET", "SHADOW_INTERVAL", "SHADOW_TARGET", "DemoOptions", "Run", "device_name"]

CMD_TARGET, CMD_INTERVAL = 0, 2.0  # device index and interval of the command
SHADOW_TARGET, SHADOW_INTERVAL = 1, 3.0  # and of the desired state


@dataclass
class DemoOptions:
    devices: int = 50
    duration: float = 90.0
    outage_at: float = 30.0
    outage_for: float = 20.0
    data: Path | None = None
    dashboard: bool = True
    report: Path | None = None
    per_device: bool = False
    seed: int = 7

    def check(self) -> str | None:
        if not 1 <= self.devices <= 2000:
            return "--devices must be 1..2000"
        if self.outage_at <= 0 or self.outage_for <= 0:
            return "--outage-at and --outage-for must be more than 0"
        if self.outage_at + self.outage_for >= self.duration:
            return "the outage must end before --duration (outage-at + outage-for < duration)"
        return None


@dataclass
class Run:
    """What happened, for the dashboard, the verification and the report."""

    t0: float = 0.0
    events: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # wall times
    samples: list[dict[str, Any]] = field(default_factory=list)
    command: str | None = None
    desired_version: int | None = None

    def note(self, text: str) -> str:
        line = f"{time.time() - self.t0:6.1f} s  {text}" if self.t0 else f"  setup  {text}"
        self.events.append(line)
        return line


def device_name(i: int, devices: int) -> str:
    """The name the simulator gives device ``i`` of ``devices`` (firmware_sim/profile.py)."""
    width = max(4, len(str(devices - 1)))
    return f"dev-{min(i, devices - 1):0{width}d}"
