"""The gateway and ingest under systemd's notify protocol (deploy/systemd/): READY=1 only
once the gateway's local broker (ingest's cloud broker) is connected, STATUS= lines,
WATCHDOG=1 from the event loop, STOPPING=1 on SIGTERM. The notify socket is the test's."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeferry.procs import Broker, Proc

pytestmark = pytest.mark.timeout(90)

EDGEFERRY = str(Path(sys.executable).parent / "edgeferry")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield s, path
    s.close()


def _drain(s: socket.socket) -> list[list[str]]:
    """Every datagram received so far, without waiting."""
    s.setblocking(False)
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


def _until(s: socket.socket, wanted: str, timeout: float = 30) -> list[list[str]]:
    """Datagrams until one holds ``wanted``."""
    s.settimeout(timeout)
    got: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while not got or wanted not in got[-1]:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        got.append(s.recv(4096).decode().split("\n"))
    return got


def test_gateway_is_ready_only_once_its_local_broker_is(
        tmp_path: Path, notify: tuple[socket.socket, str], cloud_broker: Broker,
        broker_factory: Callable[..., Broker], proc_factory: Callable[..., Proc]) -> None:
    sock, path = notify
    local = broker_factory("edge", start=False)  # not running yet: its port is chosen
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    gw = proc_factory([EDGEFERRY, "gateway", "run", "--local", local.url, "--cloud",
                       cloud_broker.url, "--store", str(tmp_path / "store.db"), "--node-id", "pi-sd"],
                      name="gateway", env=env)
    gw.wait_for_line(r"local broker: .*retrying", 30)  # the store is open, the broker is not there
    before = _drain(sock)
    assert not any("READY=1" in d for d in before), before
    assert ["STATUS=gateway: starting"] in before
    assert ["WATCHDOG=1"] in _until(sock, "WATCHDOG=1")  # the loop pings while it waits

    local.start()
    ready = _until(sock, "READY=1")[-1]
    status = next(line for line in ready if line.startswith("STATUS="))
    assert status.startswith("STATUS=local up, cloud ")
    assert "backlog 0 records" in status
    gw.signal(signal.SIGTERM)
    assert _until(sock, "STOPPING=1")[-1][0] == "STOPPING=1"
    assert gw.wait(30) == 0


def test_ingest_is_ready_once_connected(tmp_path: Path, notify: tuple[socket.socket, str], cloud_broker: Broker,
                                        proc_factory: Callable[..., Proc]) -> None:
    sock, path = notify
    env = {**os.environ, "NOTIFY_SOCKET": path}
    ingest = proc_factory([EDGEFERRY, "ingest", "run", "--cloud", cloud_broker.url, "--sink",
                           f"jsonl:{tmp_path / 'sink.jsonl'}"], name="ingest", env=env)
    ready = _until(sock, "READY=1")[-1]
    assert any(line.startswith("STATUS=cloud connected; written 0") for line in ready), ready
    ingest.signal(signal.SIGTERM)
    assert _until(sock, "STOPPING=1")[-1][0] == "STOPPING=1"
    assert ingest.wait(30) == 0
