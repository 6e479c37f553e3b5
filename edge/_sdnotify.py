"""systemd's service notification protocol (sd_notify), without libsystemd.

A unit with ``Type=notify`` starts the process with ``$NOTIFY_SOCKET``: the path of a
Unix datagram socket (``@name`` for the abstract namespace). The process sends
newline-separated ``KEY=VALUE`` assignments in one datagram each time:

- ``READY=1`` once it serves (systemd holds back units ordered after it until then),
- ``STATUS=...`` a free-form line shown by ``systemctl status``,
- ``WATCHDOG=1`` keep-alive pings: with ``WatchdogSec=`` set, systemd passes
  ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and kills the service (SIGABRT, then the
  ``Restart=`` policy) when no ping came within that time. The pings are sent from the
  event loop at half that interval, so a wedged loop is what stops them,
- ``STOPPING=1`` when shutting down.

Without ``$NOTIFY_SOCKET`` (not under systemd, or not ``Type=notify``) every call is a
no-op. A send that fails (systemd gone, socket full) is logged once and otherwise
ignored: notification must never take the service down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("edgeferry.sdnotify")


class Notifier:
    """One process's channel to systemd. ``environ`` defaults to ``os.environ``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval = _watchdog_interval(env) if self._address is not None else None

    @property
    def enabled(self) -> bool:
        """True when systemd listens (``$NOTIFY_SOCKET`` is set and usable)."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not sent."""
        if self._address is None:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification failed (further failures not logged): %s", e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *(() if status is None else (f"STATUS={status}",)))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *(() if status is None else (f"STATUS={status}",)))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog at half its interval from this event loop, until cancelled.
        Returns at once when systemd set no watchdog for this process."""
        if self.watchdog_interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte, no terminator
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET %r is not supported (only Unix socket paths and @abstract)", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when there is no watchdog for us."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. the one that exec'd us)
    return usec / 2 / 1_000_000
