"""edge._sdnotify against notify sockets the tests create (path and abstract)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge._sdnotify import Notifier

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    yield str(path), s
    s.close()


def _recv(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def test_absent_socket_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("up") is False
    assert n.watchdog() is False
    assert n.watchdog_interval is None
    asyncio.run(asyncio.wait_for(n.run_watchdog(), 1))  # returns at once without a watchdog


def test_ready_status_stopping(notify_socket: tuple[str, socket.socket]) -> None:
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("store open, local broker connected")
    assert _recv(s) == ["READY=1", "STATUS=store open, local broker connected"]
    assert n.status("cloud link down\nretrying")
    assert _recv(s) == ["STATUS=cloud link down retrying"]  # a newline cannot split an assignment
    assert n.stopping()
    assert _recv(s) == ["STOPPING=1"]
    n.close()


def test_abstract_namespace() -> None:
    name = f"edgeferry-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(s) == ["READY=1"]
        n.close()
    finally:
        s.close()


def test_watchdog_pings_from_the_loop_at_half_the_interval(notify_socket: tuple[str, socket.socket]) -> None:
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == pytest.approx(0.1)

    async def main() -> int:
        task = asyncio.create_task(n.run_watchdog())
        loop = asyncio.get_running_loop()
        pings = 0
        while pings < 3:
            data = await loop.run_in_executor(None, s.recv, 4096)
            assert data == b"WATCHDOG=1"
            pings += 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pings

    assert asyncio.run(main()) == 3
    n.close()


def test_watchdog_for_another_pid_is_ignored(notify_socket: tuple[str, socket.socket]) -> None:
    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False
    assert n.watchdog() is False
    assert sum("systemd notification failed" in r.getMessage() for r in caplog.records) == 1
    n.close()
