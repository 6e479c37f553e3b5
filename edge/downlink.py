"""The downlink's wire format and clocks, shared by the gateway, the SDK and the simulator.

No I/O here beyond reading the kernel's boot id: a command envelope in and out, the
time to live of a held command, the delta between desired and reported state.
docs/commands.md and docs/shadow.md describe the protocol.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from edge.errors import CommandError

__all__ = [
    "COMMAND_TYPE",
    "STATUS_TYPE",
    "FINAL",
    "STATES",
    "Clock",
    "SystemClock",
    "Held",
    "CommandError",
    "boot_id",
    "delta",
    "parse_target_command",
    "status_data",
    "command_data",
]

COMMAND_TYPE = "io.edgeferry.command"
STATUS_TYPE = "io.edgeferry.command.status"
STATES = ("queued", "delivered", "accepted", "succeeded", "failed", "rejected", "expired")
FINAL = frozenset({"succeeded", "failed", "rejected", "expired"})
RANK = {"queued": 0, "delivered": 1, "accepted": 2, "succeeded": 3, "failed": 3, "rejected": 3,
        "expired": 3}
"""States only move forward: a lower rank never replaces a higher one."""


_BOOT: str | None = None


def boot_id() -> str:
    """The kernel's id of this boot (changes when the machine restarts)."""
    global _BOOT
    if _BOOT is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT = f.read().strip()
        except OSError:  # not Linux: a process-lifetime id (counts as a restart each run)
            import uuid

            _BOOT = "proc-" + uuid.uuid4().hex
    return _BOOT


def _wall_synced() -> bool:
    """True when the kernel says the wall clock is synchronised (adjtimex != TIME_ERROR)."""
    # ctypes here, on first use: the gateway's resident memory (docs/benchmarks.md); the
    # process's own symbols hold libc's (ctypes.util.find_library would pull in shutil,
    # tempfile, bz2 and lzma, and run ldconfig)
    import ctypes

    class Timex(ctypes.Structure):
        _fields_ = [("modes", ctypes.c_uint), ("rest", ctypes.c_long * 64)]

    try:
        tx = Timex()
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    return state >= 0 and state != 5  # 5: TIME_ERROR, the clock is not synchronised


class Clock:
    """What a holder of a command may ask about time (injectable in tests)."""

    def monotonic(self) -> float:
        raise NotImplementedError

    def wall(self) -> float:
        raise NotImplementedError

    def boot(self) -> str:
        raise NotImplementedError

    def wall_synced(self) -> bool:
        raise NotImplementedError


class SystemClock(Clock):
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def boot(self) -> str:
        return boot_id()

    def wall_synced(self) -> bool:
        return _wall_synced()


@dataclass(slots=True)
class Held:
    """The time to live of a command someone holds, saved as ``remaining_ms`` as of a
    moment recorded three ways (monotonic, wall, boot id). ``remaining_ms`` None: no TTL.
    """

    remaining_ms: int | None
    saved_mono: float
    saved_wall: float
    boot: str

    @classmethod
    def start(cls, ttl_ms: int | None, clock: Clock) -> Held:
        return cls(ttl_ms, clock.monotonic(), clock.wall(), clock.boot())

    def remaining(self, clock: Clock) -> tuple[float, str]:
        """Milliseconds left now (<= 0: expired) and, when expired, why."""
        if self.remaining_ms is None:
            return math.inf, ""
        if clock.boot() == self.boot:
            left = self.remaining_ms - (clock.monotonic() - self.saved_mono) * 1000
            return left, "" if left > 0 else "time to live ran out"
        # another boot: the monotonic clock restarted; count the downtime conservatively
        if clock.wall_synced():
            gone = clock.wall() - self.saved_wall
            if gone >= 0:
                left = self.remaining_ms - gone * 1000
                return left, "" if left > 0 else "time to live ran out (across a restart)"
        return 0.0, "the host restarted and the time it was down cannot be measured"

    def resave(self, clock: Clock) -> Held:
        """The same deadline, re-based on this boot (after :meth:`remaining` was > 0)."""
        left, _ = self.remaining(clock)
        ms = None if left == math.inf else max(0, int(left))
        return Held(ms, clock.monotonic(), clock.wall(), clock.boot())


def command_data(name: str, args: Any, ttl_ms: int | None, clock: Clock) -> dict[str, Any]:
    """``data`` of the CloudEvent the gateway publishes on ``cmd/<target>/<name>``."""
    return {"name": name, "args": args, "ttl_ms": ttl_ms, "mono": clock.monotonic(),
            "boot": clock.boot()}


@dataclass(frozen=True, slots=True)
class TargetCommand:
    id: str
    name: str
    args: Any
    held: Held


def parse_target_command(cid: str | None, data: Any, name: str, clock: Clock) -> TargetCommand:
    """A command as a target receives it; its TTL counted from the gateway's publish when
    both share a boot (one monotonic clock), else from now."""
    if not isinstance(cid, str) or not cid:
        raise CommandError("a command needs a string id")
    if not isinstance(data, dict):
        raise CommandError("a command's data must be an object")
    args = data.get("args", {})
    ttl = data.get("ttl_ms")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise CommandError("ttl_ms must be a number or null")
    mono, boot = data.get("mono"), data.get("boot")
    if (ttl is not None and isinstance(mono, int | float) and not isinstance(mono, bool)
            and boot == clock.boot()):
        held = Held(int(ttl), float(mono), clock.wall(), clock.boot())
    else:
        held = Held.start(None if ttl is None else int(ttl), clock)
    return TargetCommand(cid, str(data.get("name") or name), args, held)


def status_data(cid: str, status: str, by: str, *, reply: Any = None, error: str | None = None,
                clock_wall: float | None = None) -> dict[str, Any]:
    """``data`` of a status event on ``evt/cmd/<target>``."""
    if status not in RANK:
        raise CommandError(f"unknown status {status!r}")
    out: dict[str, Any] = {"id": cid, "status": status, "by": by}
    if reply is not None:
        out["reply"] = reply
    if error is not None:
        out["error"] = error
    if clock_wall is not None:
        out["site_time"] = clock_wall
    return out


def delta(desired: Any, reported: Any) -> dict[str, Any]:
    """Keys of ``desired`` whose value differs from ``reported`` (recursively for
    objects); a key reported but not desired is not part of the delta."""
    if not isinstance(desired, dict):
        return {}
    rep = reported if isinstance(reported, dict) else {}
    out: dict[str, Any] = {}
    for k, v in desired.items():
        if k not in rep:
            out[k] = v
        elif isinstance(v, dict) and isinstance(rep[k], dict):
            sub = delta(v, rep[k])
            if sub:
                out[k] = sub
        elif v != rep[k]:
            out[k] = v
    return out
