"""``edgeferry ingest run --workers N``: N ingest processes sharing the fleet's frames.

Each worker is ``ingest run`` with its own client id (``<client-id>-<i>``, a clean
session: see docs/decisions.md) subscribed to ``$share/<group>/<filter>``: the broker
hands each frame to one of them. Continuity and duplicates are decided by the database (gateway/pgsink.py),
so any worker may take any node's frames. A worker that dies is started again at once; its
hello (no session) makes the gateways resend what no worker confirmed;
SIGTERM/SIGINT stop every worker (each finishes its write in flight) and then the
supervisor. Workers on other hosts are just more ``ingest run --group G`` processes.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from typing import Any

__all__ = ["run_workers"]

log = logging.getLogger("edgeferry.ingest")


def run_workers(argv: list[str], settings: Any) -> int:
    n, group = settings.workers, settings.group or settings.client_id
    stop = threading.Event()
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def child(i: int) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "edgeferry", "ingest", "run", *argv, "--workers", "1",
                "--group", group, "--client-id", f"{settings.client_id}-{i}"]
        log.info("starting ingest worker %d of %d (%s-%d, group %s)", i, n, settings.client_id, i, group)
        return subprocess.Popen(args)

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(1, n + 1):
            procs[i] = child(i)
        while not stop.is_set():
            for i, p in list(procs.items()):
                code = p.poll()
                if code is not None and not stop.is_set():
                    log.warning("ingest worker %d exited with %s: starting it again", i, code)
                    stop.wait(1.0)  # not a busy loop when a worker cannot start at all
                    if not stop.is_set():
                        procs[i] = child(i)
            stop.wait(0.5)
        codes = [p.wait() for p in procs.values()]
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
