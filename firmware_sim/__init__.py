"""firmware_sim: a simulated sensor fleet that behaves like real firmware, with faults on demand.

Each device has its own MQTT connection, last will, retained birth, believable sensor
signals, a bounded outbox, commands (``set_interval``, ``reboot``, ``ota``) and the
faults its profile gives it; the same seed gives the same values and the same faults.
The manifest records what every device really sent; :func:`compare` checks it against
what ingest stored. See docs/simulator.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FAULT_KINDS",
    "STREAMS",
    "Device",
    "DeviceFaults",
    "DeviceResult",
    "Entry",
    "Fleet",
    "ManifestError",
    "Outbox",
    "Profile",
    "ProfileError",
    "Report",
    "ResourceLimitError",
    "SeqRanges",
    "Sensors",
    "SimError",
    "build_manifest",
    "compare",
    "load_profile",
    "parse_fault_flag",
    "plan_faults",
    "raise_open_file_limit",
    "read_manifest",
    "write_manifest",
]

# Exports load lazily: `python -m firmware_sim.loadgen` and the chaos proxy stay light.
_WHERE = {
    "Device": "firmware_sim.device",
    "DeviceFaults": "firmware_sim.faults",
    "DeviceResult": "firmware_sim.verify",
    "Entry": "firmware_sim.outbox",
    "FAULT_KINDS": "firmware_sim.profile",
    "Fleet": "firmware_sim.fleet",
    "ManifestError": "firmware_sim.errors",
    "Outbox": "firmware_sim.outbox",
    "Profile": "firmware_sim.profile",
    "ProfileError": "firmware_sim.errors",
    "Report": "firmware_sim.verify",
    "ResourceLimitError": "firmware_sim.errors",
    "STREAMS": "firmware_sim.sensors",
    "Sensors": "firmware_sim.sensors",
    "SeqRanges": "firmware_sim.outbox",
    "SimError": "firmware_sim.errors",
    "build_manifest": "firmware_sim.manifest",
    "compare": "firmware_sim.verify",
    "load_profile": "firmware_sim.profile",
    "parse_fault_flag": "firmware_sim.profile",
    "plan_faults": "firmware_sim.faults",
    "raise_open_file_limit": "firmware_sim.fleet",
    "read_manifest": "firmware_sim.manifest",
    "write_manifest": "firmware_sim.manifest",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'firmware_sim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
