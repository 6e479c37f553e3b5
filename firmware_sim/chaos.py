"""A TCP chaos proxy: put it between a client and a broker, then break the link.

:class:`ChaosProxy` forwards bytes both ways between whoever connects to its listen port
and one target. Its *mode* can be switched at any time:

``up()`` / ``pass_()``
    forward bytes both ways (and stop any flapping or delay).
``cut()``
    close both sides of every current connection (FIN, or RST with ``reset=True``), and
    while cut, accept and immediately close new connections. ``cut()`` returns once
    every current connection is closed.
``blackhole()``
    a dead 4G link: every socket (current and new) stays open, but nothing crosses in
    either direction (bytes are read and discarded; no FIN, no RST). A connection that
    lost bytes, or whose peer closed, can no longer carry a consistent byte stream: when
    the link comes back it is reset (RST to both sides), as a carrier that lost its NAT
    state would do. A connection that carried nothing while blackholed simply resumes.
``delay(seconds)``
    forward, with each chunk delayed by ``seconds`` in each direction (order kept).
``flap(up=(a, b), down=(c, d), mode="cut")``
    alternate up and down periods, each drawn uniformly from its range with the
    proxy's seeded random generator, until another mode is set.

Counters: ``connections_accepted``, ``connections_rejected`` (closed at once while
cut), ``bytes_up`` (client to target, forwarded), ``bytes_down`` (target to client,
forwarded), ``bytes_dropped`` (discarded by a blackhole), ``cuts`` (times the link went
down in cut mode). ``flap_durations`` lists every ``("up"|"down", seconds)`` drawn, and
``transitions`` every ``(monotonic time, description)`` of a state change.

:class:`~firmware_sim.chaos_thread.ThreadedChaosProxy` (firmware_sim/chaos_thread.py)
runs a proxy on its own event loop in a daemon thread for synchronous tests; its methods
block until the change has taken effect.

Only the standard library is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "ChaosProxy",
    "parse_flap_spec",
    "run_chaos_cli",
]

PASS = "pass"
CUT = "cut"
BLACKHOLE = "blackhole"
_DOWN_MODES = (CUT, BLACKHOLE)

_CHUNK = 65536
_QUEUE_CHUNKS = 64  # per direction: bounds memory, and gives the sender back-pressure
_EOF = None

Range = tuple[float, float]


class _Reset(Exception):
    """A link must be torn down with a reset (peer reset, or target unreachable)."""


class _Link:
    """One proxied connection: the client side, and the target side once connected."""

    __slots__ = ("cr", "cw", "ur", "uw", "task", "damaged", "reset")

    def __init__(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 task: asyncio.Task[Any]) -> None:
        self.cr = cr
        self.cw = cw
        self.ur: asyncio.StreamReader | None = None
        self.uw: asyncio.StreamWriter | None = None
        self.task = task
        self.damaged = False  # bytes or a close were swallowed by a blackhole
        self.reset = False  # close with RST rather than FIN

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.cw, self.uw) if w is not None]

    def abort(self) -> None:
        for w in self.writers():
            if self.reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            w.transport.abort()

    async def wait_closed(self) -> None:
        for w in self.writers():
            with contextlib.suppress(Exception):
                await w.wait_closed()


class ChaosProxy:
    """An asyncio TCP proxy whose link can be cut, blackholed, delayed or flapped.

    Use it as an async context manager; ``port`` is the bound listen port once entered::

        async with ChaosProxy("127.0.0.1", broker_port, seed=1) as p:
            client = connect(port=p.port)
            await p.cut()
            await p.up()

    The mode methods are coroutines; each returns once the change has taken effect.
    ``on_change`` is called (on the proxy's loop) with a one-line description of every
    state change: ``"link up"``, ``"link down (cut)"``, ``"link down (blackhole)"``,
    ``"link up (delay 0.2 s)"``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        seed: int | None = None,
        on_change: Callable[[str], None] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        self.listen_port = int(listen_port)
        self.on_change = on_change
        self.connect_timeout = connect_timeout
        self._rng = random.Random(seed)
        self._mode = PASS
        self._delay = 0.0
        self._open = asyncio.Event()  # set while the mode is not blackhole
        self._open.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._flap_task: asyncio.Task[None] | None = None
        self._entered = False
        self._closing = False
        self.connections_accepted = 0
        self.connections_rejected = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self.cuts = 0
        self.flap_durations: list[tuple[str, float]] = []
        self.transitions: list[tuple[float, str]] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ChaosProxy:
        if self._entered:
            raise RuntimeError("a ChaosProxy runs once; make a new one")
        self._entered = True
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.listen_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        await self._stop_flap()
        assert self._server is not None
        self._server.close()
        await self._close_links(list(self._links), reset=False)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def mode(self) -> str:
        """``"pass"``, ``"cut"`` or ``"blackhole"`` (a delay is a kind of pass)."""
        return self._mode

    @property
    def delay_s(self) -> float:
        return self._delay

    @property
    def flapping(self) -> bool:
        return self._flap_task is not None and not self._flap_task.done()

    @property
    def active_connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------------ modes

    async def up(self) -> None:
        """Forward bytes both ways, without delay; stop flapping."""
        await self._stop_flap()
        await self._apply(PASS, 0.0)

    pass_ = up

    async def cut(self, *, reset: bool = False) -> None:
        """Close every current connection (RST if ``reset``), refuse new ones until up."""
        await self._stop_flap()
        await self._apply(CUT, 0.0, reset=reset)

    async def blackhole(self) -> None:
        """Keep every socket open but let nothing through, in either direction."""
        await self._stop_flap()
        await self._apply(BLACKHOLE, 0.0)

    async def delay(self, seconds: float) -> None:
        """Forward, delaying each chunk by ``seconds`` in each direction (order kept)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        await self._stop_flap()
        await self._apply(PASS, float(seconds))

    async def flap(self, up: Range = (1.0, 3.0), down: Range = (1.0, 3.0),
                   mode: str = CUT) -> None:
        """Alternate up and down (``mode``: cut or blackhole) periods drawn uniformly
        from ``up`` and ``down`` seconds, starting with an up period, until another
        mode is set. Durations come from the proxy's seeded generator."""
        if mode not in _DOWN_MODES:
            raise ValueError(f"flap mode must be cut or blackhole, not {mode!r}")
        for name, (lo, hi) in (("up", up), ("down", down)):
            if lo < 0 or hi < lo:
                raise ValueError(f"flap {name} range must be 0 <= min <= max, got {lo}-{hi}")
        await self._stop_flap()
        up_r: Range = (float(up[0]), float(up[1]))
        down_r: Range = (float(down[0]), float(down[1]))
        self._flap_task = asyncio.create_task(self._flap(up_r, down_r, mode), name="chaos-flap")

    async def _flap(self, up: Range, down: Range, mode: str) -> None:
        while True:
            d = self._rng.uniform(*up)
            self.flap_durations.append(("up", d))
            await self._apply(PASS, 0.0, announce=True)
            await asyncio.sleep(d)
            d = self._rng.uniform(*down)
            self.flap_durations.append(("down", d))
            await self._apply(mode, 0.0, announce=True)
            await asyncio.sleep(d)

    async def _stop_flap(self) -> None:
        task, self._flap_task = self._flap_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _apply(self, mode: str, delay: float, *, reset: bool = False,
                     announce: bool = False) -> None:
        old_mode, old_delay = self._mode, self._delay
        self._mode, self._delay = mode, delay
        if mode == BLACKHOLE:
            self._open.clear()
        else:
            self._open.set()
        if mode == CUT:
            if old_mode != CUT:
                self.cuts += 1
            await self._close_links(list(self._links), reset=reset)
        elif old_mode == BLACKHOLE and mode != BLACKHOLE:
            await self._close_links([lk for lk in self._links if lk.damaged], reset=True)
        if announce or (mode, delay) != (old_mode, old_delay):
            self._announce(mode, delay)

    def _announce(self, mode: str, delay: float) -> None:
        if mode in _DOWN_MODES:
            text = f"link down ({mode})"
        elif delay:
            text = f"link up (delay {delay:g} s)"
        else:
            text = "link up"
        self.transitions.append((time.monotonic(), text))
        if self.on_change is not None:
            self.on_change(text)

    async def _close_links(self, links: list[_Link], *, reset: bool) -> None:
        me = asyncio.current_task()
        tasks = []
        for link in links:
            link.reset = link.reset or reset
            link.abort()
            if link.task is not me:
                link.task.cancel()
                tasks.append(link.task)
        if tasks:
            await asyncio.wait(tasks)
        for link in links:
            await link.wait_closed()

    # ------------------------------------------------------------------ forwarding

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self._mode == CUT or self._closing:
            self.connections_rejected += 1
            cw.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        link = _Link(cr, cw, task)
        self._links.add(link)
        try:
            try:
                await self._run(link)
            except* (_Reset, OSError):
                link.reset = True
            finally:
                self._links.discard(link)
                link.abort()
                await link.wait_closed()
        except asyncio.CancelledError:
            # Only the proxy cancels a link (cut, reset, shutdown), and asyncio logs an
            # error for a connection callback that ends cancelled: end normally.
            pass

    async def _run(self, link: _Link) -> None:
        up_q: asyncio.Queue[Any] = asyncio.Queue(_QUEUE_CHUNKS)
        down_q: asyncio.Queue[Any] = asyncio.Queue(_QUEUE_CHUNKS)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read(link, link.cr, up_q), name="chaos-read-up")
            while self._mode == BLACKHOLE:  # nothing reaches the target over a dead link
                await self._open.wait()
            try:
                ur, uw = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    self.connect_timeout)
            except (OSError, TimeoutError) as e:
                if self._mode == BLACKHOLE:
                    link.damaged = True  # reset when the link comes back
                    await asyncio.get_running_loop().create_future()
                raise _Reset from e
            link.ur, link.uw = ur, uw
            tg.create_task(self._write(link, up_q, uw, True), name="chaos-write-up")
            tg.create_task(self._read(link, ur, down_q), name="chaos-read-down")
            tg.create_task(self._write(link, down_q, link.cw, False), name="chaos-write-down")

    async def _read(self, link: _Link, src: asyncio.StreamReader, q: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await src.read(_CHUNK)
            except OSError:
                if self._mode == BLACKHOLE:
                    link.damaged = True
                    return
                raise
            if self._mode == BLACKHOLE:
                link.damaged = True
                if not data:
                    return  # a close does not cross a dead link either
                self.bytes_dropped += len(data)
                continue
            if not data:
                await q.put(_EOF)
                return
            await q.put((loop.time() + self._delay, data))

    async def _write(self, link: _Link, q: asyncio.Queue[Any], dst: asyncio.StreamWriter,
                     upward: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await q.get()
            if item is _EOF:
                if self._mode == BLACKHOLE:
                    link.damaged = True
                elif dst.can_write_eof():
                    dst.write_eof()
                return
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._mode == BLACKHOLE:
                link.damaged = True
                self.bytes_dropped += len(data)
                continue
            dst.write(data)
            if upward:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            await dst.drain()


# ---------------------------------------------------------------------- CLI helpers


def _parse_range(text: str) -> Range:
    lo, sep, hi = text.partition("-")
    a = float(lo)
    b = float(hi) if sep else a
    if a < 0 or b < a:
        raise ValueError(f"{text!r}: need 0 <= MIN <= MAX")
    return (a, b)


def parse_flap_spec(spec: str) -> tuple[Range, Range]:
    """``"UP_MIN-UP_MAX:DOWN_MIN-DOWN_MAX"`` (seconds; ``"2:1"`` means fixed periods)
    to ``((up_min, up_max), (down_min, down_max))``; ValueError if malformed."""
    up, sep, down = spec.partition(":")
    if not sep:
        raise ValueError(f"flap spec {spec!r} must look like UP_MIN-UP_MAX:DOWN_MIN-DOWN_MAX")
    try:
        return _parse_range(up), _parse_range(down)
    except ValueError as e:
        raise ValueError(f"flap spec {spec!r} is not valid: {e}") from None


async def run_chaos_cli(
    listen_port: int,
    target: str,
    schedule: tuple[Range, Range] | str | None = None,
    *,
    mode: str = CUT,
    seed: int | None = None,
    listen_host: str = "127.0.0.1",
    out: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a chaos proxy for the ``edgeferry chaos`` command until cancelled.

    ``run_chaos_cli(listen_port, "HOST:PORT", schedule=None, *, mode="cut", seed=None,
    listen_host="127.0.0.1", out=None, stop=None)``

    - ``listen_port``: port to listen on (0 picks a free one; the first line says which).
    - ``target``: ``"HOST:PORT"`` to forward to.
    - ``schedule``: ``None`` keeps the link up; otherwise flap with
      ``((up_min, up_max), (down_min, down_max))`` seconds, or the same as the string
      ``"UP_MIN-UP_MAX:DOWN_MIN-DOWN_MAX"``.
    - ``mode``: how the link goes down while flapping, ``"cut"`` or ``"blackhole"``.
    - ``seed``: seed of the flap schedule (same seed, same durations).
    - ``out``: where lines go (default: print to stdout, flushed).
    - ``stop``: return when this event is set (else run until the task is cancelled).

    Prints ``chaos proxy listening on HOST:PORT -> TARGET``, then one line per state
    change: ``link up``, ``link down (cut)``, ``link down (blackhole)``. Raises
    ValueError for a malformed target, schedule or mode, and OSError if it cannot listen.
    """
    emit = out if out is not None else (lambda line: print(line, flush=True, file=sys.stdout))
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {target!r} must be HOST:PORT")
    if mode not in _DOWN_MODES:
        raise ValueError(f"mode must be cut or blackhole, not {mode!r}")
    if isinstance(schedule, str):
        schedule = parse_flap_spec(schedule)
    async with ChaosProxy(host.strip("[]"), int(port), listen_host, listen_port, seed=seed,
                          on_change=emit) as proxy:
        emit(f"chaos proxy listening on {listen_host}:{proxy.port} -> {host}:{port}")
        if schedule is not None:
            up, down = schedule
            await proxy.flap(up=(up[0], up[1]), down=(down[0], down[1]), mode=mode)
        if stop is None:
            await asyncio.get_running_loop().create_future()  # until cancelled
        else:
            await stop.wait()
