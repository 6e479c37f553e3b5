"""The manifest: what each device really sent, written by ``edgeferry sim run --manifest``.

One JSON document (see docs/simulator.md)::

    {"format": "edgeferry-sim-manifest", "version": 1, "run": "...", "seed": 7, ...,
     "totals": {"sent": ..., "acked": ..., "dropped": ..., ...},
     "devices": {"dev-0000": {"streams": {"temperature": {"first": 1, "last": 60,
                 "sent": 60, "acked": 58, "dropped": [[12, 13]]}, ...},
                 "dropped": {"outbox_full": 2}, "boots": 1, ...}, ...}}

Telemetry is numbered per device and stream (``data.seq``, from 1, never reused, also
across reboots), so ``sent`` is ``last`` and every number in ``first..last`` was sent
once (plus ``duplicates_sent`` deliberate copies). ``dropped`` lists the numbers the
device's own outbox gave up (full while offline, power loss, reboot, shutdown).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edge._url import _redact
from firmware_sim.errors import ManifestError
from firmware_sim.profile import Profile

__all__ = ["FORMAT", "build_manifest", "read_manifest", "write_manifest"]

FORMAT = "edgeferry-sim-manifest"
VERSION = 1


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def build_manifest(
    records: dict[str, dict[str, Any]],
    *,
    run: str,
    profile: Profile,
    broker: str,
    wall_start: float,
    duration_s: float | None,
    complete: bool,
    faults_fired: dict[str, int],
) -> dict[str, Any]:
    """The manifest of a run from its devices' records (name -> ``Device.record()``), with
    totals summed over them. ``duration_s`` is None while the run goes on; ``complete``
    says whether the fleet has stopped."""
    devices = dict(records)
    totals: dict[str, Any] = {
        "sent": 0,
        "acked": 0,
        "dropped": 0,
        "garbage_sent": 0,
        "duplicates_sent": 0,
        "events_sent": 0,
        "boots": 0,
        "abnormal_disconnects": 0,
        "dropped_by_reason": {},
    }
    for rec in devices.values():
        for s in rec["streams"].values():
            totals["sent"] += s["sent"]
        totals["acked"] += rec["acked"]
        for reason, n in rec["dropped"].items():
            totals["dropped"] += n
            totals["dropped_by_reason"][reason] = totals["dropped_by_reason"].get(reason, 0) + n
        for key in ("garbage_sent", "duplicates_sent", "events_sent", "abnormal_disconnects"):
            totals[key] += rec[key]
        totals["boots"] += rec["boots"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": run,
        "seed": profile.seed,
        "broker": _redact(broker),  # never the password
        "started": _iso(wall_start),
        "duration_s": round(duration_s, 3) if duration_s is not None else None,
        "complete": complete,
        "profile": profile.model_dump(mode="json"),
        "faults_fired": dict(faults_fired),
        "totals": totals,
        "devices": devices,
    }


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a manifest)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise ManifestError(f"cannot write manifest {path}: {e.strerror}") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {path} is not JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an edgeferry simulator manifest")
    if data.get("version") != VERSION:
        raise ManifestError(
            f"manifest {path} has version {data.get('version')!r}; this "
            f"edgeferry reads version {VERSION}"
        )
    if not isinstance(data.get("devices"), dict):
        raise ManifestError(f"manifest {path} has no devices")
    return data
