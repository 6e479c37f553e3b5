"""A :class:`~firmware_sim.chaos.ChaosProxy` on its own event loop in a daemon thread, for
synchronous tests, the demo and benchmarks (firmware_sim/chaos.py describes the modes
and counters)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from firmware_sim.chaos import CUT, ChaosProxy, Range

__all__ = ["ThreadedChaosProxy"]


class ThreadedChaosProxy:
    """A :class:`ChaosProxy` on its own event loop in a daemon thread, for sync code.

    Every method blocks until the change has taken effect (``cut()`` returns once all
    current connections are closed). Counters are read straight from the proxy.
    """

    def __init__(self, target_host: str, target_port: int, seed: int | None = None, *,
                 listen_host: str = "127.0.0.1", listen_port: int = 0,
                 on_change: Callable[[str], None] | None = None, timeout: float = 30.0) -> None:
        self._args = (target_host, int(target_port), listen_host, int(listen_port))
        self._seed = seed
        self._on_change = on_change
        self.timeout = timeout
        self._proxy: ChaosProxy | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadedChaosProxy:
        if self._thread is not None:
            raise RuntimeError("a ThreadedChaosProxy starts once; make a new one")
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name=f"chaos-proxy->{self._args[1]}", daemon=True)
        self._thread.start()
        if not self._started.wait(self.timeout):
            raise TimeoutError("the chaos proxy did not start")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        host, port, lhost, lport = self._args
        try:
            async with ChaosProxy(host, port, lhost, lport, seed=self._seed,
                                  on_change=self._on_change) as proxy:
                self._loop = asyncio.get_running_loop()
                self._stop_event = asyncio.Event()
                self._proxy = proxy
                self._started.set()
                await self._stop_event.wait()
        except BaseException as e:  # handed to start()
            self._error = e
            self._started.set()

    def stop(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(self.timeout)
        if thread.is_alive():
            raise TimeoutError("the chaos proxy thread did not stop")

    def __enter__(self) -> ThreadedChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        proxy, loop = self._proxy, self._loop
        if proxy is None or loop is None or not self._thread or not self._thread.is_alive():
            raise RuntimeError("the chaos proxy is not running")
        coro = getattr(proxy, name)(*args, **kwargs)
        asyncio.run_coroutine_threadsafe(coro, loop).result(self.timeout)

    def up(self) -> None:
        self._call("up")

    pass_ = up

    def cut(self, *, reset: bool = False) -> None:
        self._call("cut", reset=reset)

    def blackhole(self) -> None:
        self._call("blackhole")

    def delay(self, seconds: float) -> None:
        self._call("delay", seconds)

    def flap(self, up: Range = (1.0, 3.0), down: Range = (1.0, 3.0), mode: str = CUT) -> None:
        self._call("flap", up, down, mode)

    @property
    def proxy(self) -> ChaosProxy:
        if self._proxy is None:
            raise RuntimeError("the chaos proxy is not started")
        return self._proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def mode(self) -> str:
        return self.proxy.mode

    @property
    def connections_accepted(self) -> int:
        return self.proxy.connections_accepted

    @property
    def connections_rejected(self) -> int:
        return self.proxy.connections_rejected

    @property
    def bytes_up(self) -> int:
        return self.proxy.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.proxy.bytes_down

    @property
    def bytes_dropped(self) -> int:
        return self.proxy.bytes_dropped

    @property
    def cuts(self) -> int:
        return self.proxy.cuts

    @property
    def flap_durations(self) -> list[tuple[str, float]]:
        return list(self.proxy.flap_durations)

    @property
    def transitions(self) -> list[tuple[float, str]]:
        return list(self.proxy.transitions)
