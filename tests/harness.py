"""Test helpers for real processes (re-exported from :mod:`edgeferry.procs`, which the
demo and the benchmarks share): Mosquitto brokers from the repo's configs, CLI
processes with line-by-line waiting, free ports, and the last-resort :func:`wait_until`.

:data:`DEVICE_PORT` is the port a *deployed* device's broker listens on, read from
deploy/mosquitto/edge.conf: deploy tests compare rendered settings against it; no test
connects to it (test brokers get free ports)."""

import re

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

__all__ = [
    "CLOUD_CONF",
    "DEVICE_PORT",
    "EDGE_CONF",
    "MOSQUITTO",
    "REPO",
    "Broker",
    "Proc",
    "free_port",
    "python_argv",
    "wait_until",
]
