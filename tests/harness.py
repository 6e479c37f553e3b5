"""Test helpers for real processes (re-exported from :mod:`edgeferry.procs`, which the
demo and the benchmarks share): Mosquitto brokers from the repo's configs, CLI
processes with line-by-line waiting, free ports, and the last-resort :func:`wait_until`.

:data:`DEVICE_PORT` is the port a *deployed* device's broker listens on, read from
deploy/mosquitto/edge.conf: deploy tests compare rendered settings against it; no test
connects to it (test brokers get free ports).

:func:`openssl_in` names the OpenSSL libraries a process has mapped (tests/test_nossl.py)."""

import re
from pathlib import Path

from edgeferry.procs import (
    CLOUD_CONF,
    EDGE_CONF,
    MOSQUITTO,
    REPO,
    Broker,
    Proc,
    free_port,
    python_argv,
    wait_until,
)

DEVICE_PORT = int(re.search(r"^listener (\d+)", EDGE_CONF.read_text(), re.M).group(1))  # type: ignore[union-attr]

OPENSSL = ("libssl", "libcrypto", "_ssl.", "_hashlib.")


def openssl_in(pid: int) -> list[str]:
    """The OpenSSL libraries (and Python's modules over them) process ``pid`` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        names = {Path(line.split()[5]).name for line in f if len(line.split()) > 5}
    return sorted(n for n in names if n.startswith(OPENSSL))


__all__ = [
    "CLOUD_CONF",
    "DEVICE_PORT",
    "EDGE_CONF",
    "MOSQUITTO",
    "REPO",
    "Broker",
    "Proc",
    "free_port",
    "openssl_in",
    "python_argv",
    "wait_until",
]
