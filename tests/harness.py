"""Test helpers for real processes (re-exported from :mod:`edgeferry.procs`, which the
demo and the benchmarks share): Mosquitto brokers from the repo's configs, CLI
processes with line-by-line waiting, free ports, and the last-resort :func:`wait_until`."""

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

__all__ = [
    "CLOUD_CONF",
    "EDGE_CONF",
    "MOSQUITTO",
    "REPO",
    "Broker",
    "Proc",
    "free_port",
    "python_argv",
    "wait_until",
]
