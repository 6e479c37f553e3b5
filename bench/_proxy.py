"""A minimal TCP proxy for the cloud link, in its own thread: ``cut()`` drops every
connection and refuses new ones (accept, then reset), ``up()`` lets them through again.

The bench uses ``firmware_sim.chaos.ThreadedChaosProxy`` when it exists; this is the
fallback with the same small API (start, stop, cut, up, port).
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["BenchProxy", "make_proxy"]


class _Side(asyncio.Protocol):
    def __init__(self, proxy: BenchProxy, accepted: bool = False) -> None:
        self.proxy = proxy
        self.accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy._conns.add(self)
        if self.accepted:
            self.proxy._link(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._conns.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class BenchProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = listen_port
        self._up = True
        self._conns: set[_Side] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BenchProxy:
        ready = threading.Event()

        def main() -> None:
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover
                loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                loop.create_server(self._accept, "127.0.0.1", self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            for c in list(self._conns):
                c.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=main, name="bench-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def _accept(self) -> _Side:
        return _Side(self, accepted=True)

    def _link(self, client: _Side) -> None:
        if not self._up:
            client.abort()
            return
        assert client.transport is not None
        client.transport.pause_reading()

        async def connect() -> None:
            assert self._loop is not None
            try:
                _, upstream = await self._loop.create_connection(lambda: _Side(self), *self.target)
            except OSError:
                client.abort()
                return
            if not self._up or client.transport is None or client.transport.is_closing():
                upstream.abort()
                client.abort()
                return
            upstream.peer, client.peer = client, upstream
            for data in client.early:
                upstream.transport.write(data)  # type: ignore[union-attr]
            client.early.clear()
            client.transport.resume_reading()

        self._loop.create_task(connect())

    def _call(self, fn) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()
        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until :meth:`up`."""
        def do() -> None:
            self._up = False
            for c in list(self._conns):
                c.abort()
        self._call(do)

    def up(self) -> None:
        def do() -> None:
            self._up = True
        self._call(do)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None


def make_proxy(target_host: str, target_port: int):
    """The shared chaos proxy when it is there, else this one. Returns (proxy, which)."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "firmware_sim/chaos.py"],
                             cwd=repo, capture_output=True).returncode == 0
    try:
        if not tracked:  # only a committed proxy: a file being written may be half done
            raise ImportError
        from firmware_sim.chaos import ThreadedChaosProxy  # type: ignore[import-not-found]
    except ImportError:
        return BenchProxy(target_host, target_port), "bench._proxy.BenchProxy"
    return ThreadedChaosProxy(target_host, target_port), "firmware_sim.chaos.ThreadedChaosProxy"
