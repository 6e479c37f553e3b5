"""Fixtures for tests against real processes (see tests/harness.py).

- ``broker_factory``: ``make("edge" | "cloud" | path, extra=(), name=None) -> Broker``,
  started from edgeferry/data/mosquitto/<conf>.conf (the same files as deploy/mosquitto/)
  on a free port; ``edge_broker`` and ``cloud_broker`` are one of each.
- ``chaos``: ``make_proxy(broker | (host, port) | port, seed=None) -> ThreadedChaosProxy``.
- ``proc_factory``: ``make(argv, name=None, env=None) -> Proc`` (started), logs in tmp_path.

Everything is stopped at teardown; when a test fails, the tail of every broker and
process log (and what each chaos proxy did) is printed with the test's report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.chaos_thread import ThreadedChaosProxy
from tests.harness import CLOUD_CONF, EDGE_CONF, Broker, Proc

_CONFS = {"edge": EDGE_CONF, "cloud": CLOUD_CONF}
_TAIL_LINES = 60


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # read by fixtures at teardown
    return report


_COUNTED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the lines in which fault tests say what they counted (``[label] sent=...``)."""
    if report.when == "call":
        for line in report.capstdout.splitlines():
            if line.startswith("[") and ("sent=" in line or "noticed" in line or "]" in line[:60]):
                _COUNTED.append(f"{line}    ({report.nodeid.split('::')[-1]})")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _COUNTED:
        terminalreporter.section("what the fault tests counted")
        for line in _COUNTED:
            terminalreporter.write_line(line)


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


def _print_tail(title: str, text: str) -> None:
    lines = text.splitlines()[-_TAIL_LINES:]
    print(f"\n----- {title} (last {len(lines)} lines) -----")
    print("\n".join(lines))


@pytest.fixture
def broker_factory(request: pytest.FixtureRequest,
                   tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    brokers: list[Broker] = []

    def make(conf: str | Path = "edge", *, extra: tuple[str, ...] | list[str] = (),
             name: str | None = None, start: bool = True) -> Broker:
        path = _CONFS.get(str(conf), Path(conf))
        label = name or f"{Path(path).stem}{len(brokers) + 1}"
        broker = Broker(path, tmp_path / f"broker-{label}", extra=extra, name=label)
        brokers.append(broker)
        return broker.start() if start else broker

    yield make
    failed = _failed(request)
    for broker in reversed(brokers):
        try:
            broker.stop(timeout=5)
        finally:
            if failed:
                _print_tail(f"mosquitto {broker.name} {broker.url}", broker.log_text())


@pytest.fixture
def edge_broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory("edge")


@pytest.fixture
def cloud_broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory("cloud")


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Iterator[Callable[..., ThreadedChaosProxy]]:
    proxies: list[ThreadedChaosProxy] = []

    def make_proxy(target: Broker | tuple[str, int] | int, seed: int | None = None,
                   ) -> ThreadedChaosProxy:
        if isinstance(target, int):
            host, port = "127.0.0.1", target
        elif isinstance(target, tuple):
            host, port = target
        else:
            host, port = target.host, target.port
        proxy = ThreadedChaosProxy(host, port, seed=seed)
        proxies.append(proxy)
        return proxy.start()

    yield make_proxy
    failed = _failed(request)
    for proxy in reversed(proxies):
        try:
            if failed and proxy._proxy is not None:
                p = proxy.proxy
                print(f"\n----- chaos proxy :{p.port} -> {p.target_host}:{p.target_port}: "
                      f"accepted={p.connections_accepted} up={p.bytes_up}B "
                      f"down={p.bytes_down}B dropped={p.bytes_dropped}B cuts={p.cuts} -----")
                t0 = p.transitions[0][0] if p.transitions else 0.0
                for at, what in p.transitions[-_TAIL_LINES:]:
                    print(f"  +{at - t0:8.3f}s {what}")
        finally:
            proxy.stop()


@pytest.fixture
def proc_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []
    logdir = tmp_path / "logs"

    def make(args: list[str], name: str | None = None,
             env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> Proc:
        label = name or Path(str(args[0])).name
        taken = {p.name for p in procs}
        if label in taken:
            n = 2
            while f"{label}-{n}" in taken:
                n += 1
            label = f"{label}-{n}"
        proc = Proc(args, label, logdir, env=env, cwd=cwd)
        procs.append(proc)
        return proc.start()

    yield make
    failed = _failed(request)
    for proc in reversed(procs):
        try:
            if proc.running:
                proc.terminate(timeout=5)
        finally:
            if failed:
                _print_tail(f"process {proc.name} (rc={proc.returncode}) {proc.log_path}",
                            proc.log_text())
