"""The service SDK: a typed, event-driven service in a few lines, delivered at least once.

::

    from pydantic import BaseModel
    from edge import Service

    class Reading(BaseModel):
        value: float

    svc = Service("doubler")

    @svc.on("dt/{device}/temperature")
    async def double(device: str, reading: Reading) -> None:
        await svc.publish(f"evt/doubled/{device}", {"value": reading.value * 2})

    if __name__ == "__main__":
        svc.run()

Here: declaring and the lifecycle. How a message goes through (routing, per-key order,
retries, dead letters, dedup, acknowledgements): edge/_receive.py; connections:
edge/_link.py; what a handler publishes: edge/_publish.py; commands and desired state:
edge/_commands.py; a process: edge/_runner.py.

Size: the whole public surface of a service is this one class (declaring handlers,
timers, hooks, commands; publishing; running); the work behind it is in those modules.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from edge._acl import allowed_publishes, check_publish
from edge._client import Client, ClientFactory
from edge._commands import Commands
from edge._dedup import DedupTable
from edge._lifecycle import Lifespan, first_error
from edge._link import Link
from edge._publish import event_payload, raw_payload
from edge._receive import Receiver, current_context
from edge._routing import Route, make_route
from edge.errors import ConfigError, ServiceError
from edge.events import Event, encode, envelope
from edge.mqtt import BrokerURL

__all__ = ["Service", "current_event"]

log = logging.getLogger("edge.service")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def current_event() -> Event | None:
    """The event the running handler was called for (None outside a handler)."""
    ctx = current_context()
    return None if ctx is None else ctx.event


class Service:
    """An event-driven service: handlers registered with :meth:`on`, run with
    :meth:`run` (blocking, signals handled) or ``async with svc:`` (embedding, tests).

    ``broker`` is an ``mqtt://`` URL or an :class:`edge.testing.MemoryBroker`.
    ``state_dir`` holds the on-disk dedup table (``<state_dir>/<name>.dedup``);
    without it the table lives in memory only. ``config`` is an optional pydantic model
    for the service's own settings (YAML section named after the service).
    """

    def __init__(
        self,
        name: str,
        *,
        broker: str | BrokerURL | ClientFactory | None = None,
        description: str = "",
        version: str = "0.1.0",
        node_id: str | None = None,
        config: type[Any] | None = None,
        concurrency: int = 16,
        retries: int = 3,
        retry_initial: float = 0.1,
        retry_cap: float = 5.0,
        max_payload_bytes: int = 256 * 1024,
        state_dir: str | None = None,
        dedup: bool = True,
        dedup_ttl: float = 86400.0,
        dedup_max: int = 10_000,
        heartbeat: float = 30.0,
        drain_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        keepalive: float = 30.0,
        client_id: str | None = None,
        max_inflight: int = 64,
        max_pending: int = 1000,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"service name {name!r}: letters, digits, _ . - only (at most 64)")
        if concurrency < 1 or retries < 0:
            raise ConfigError("concurrency must be >= 1 and retries >= 0")
        self.name = name
        self.broker = broker
        self.description = description
        self.version = version
        self.node_id = node_id or _hostname()
        self.config_model = config
        self.config: Any = config() if config is not None else None
        self.concurrency = concurrency
        self.retries = retries
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.max_payload_bytes = max_payload_bytes
        self.state_dir = state_dir
        self.dedup = dedup
        self.dedup_ttl = dedup_ttl
        self.dedup_max = dedup_max
        self.heartbeat = heartbeat
        self.drain_timeout = drain_timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.client_id = client_id
        self.max_inflight = max_inflight
        self.max_pending = max(1, max_pending)
        # refuse publishes outside the declared topics (edge/_acl.py); None: when the
        # broker needs a user name
        self.strict_topics: bool | None = None
        self.routes: list[Route] = []
        self.publishes_declared: list[tuple[str, Any, str]] = []
        self._on_start: list[Callable[[], Awaitable[Any]]] = []
        self._on_stop: list[Callable[[], Awaitable[Any]]] = []
        self._every: list[tuple[float, Callable[[], Awaitable[Any]]]] = []
        self._entered = False
        self._commands = Commands(self)
        # called with the number of ids after each dedup commit, before their messages
        # are acknowledged (tests crash the process at that instant)
        self.after_commit: Callable[[int], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "handled", "failed", "retried", "duplicates", "reconnects"), 0
        )
        self.dead_lettered: dict[str, int] = {}
        self._link: Link | None = None
        self._allowed: list[str] | None = None
        self._rx: Receiver | None = None
        self._bg: list[asyncio.Task[None]] = []
        self._started = 0.0
        self._dedup: DedupTable | None = None
        self._stop_requested = asyncio.Event()
        self._lifespan: Lifespan | None = None
        self._progress: asyncio.Event | None = None  # set whenever a message is finished

    def __repr__(self) -> str:
        return f"Service({self.name!r}, {len(self.routes)} handlers)"

    # ------------------------------------------------------------------ declaring

    @property
    def source(self) -> str:
        return f"/{self.node_id}/services/{self.name}"

    def on(
        self,
        pattern: str,
        *,
        key: str | Callable[[str, dict[str, str]], str] | None = None,
        publishes: list[tuple[str, Any]] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register an async handler for a topic pattern such as ``dt/{device}/temperature``.

        ``key`` orders handling: messages with the same key run one at a time, in order
        (default: the ``device`` placeholder, else the first placeholder, else the
        topic). ``publishes`` lists ``(topic pattern, model)`` this handler publishes,
        for ``edgeferry catalog``.
        """

        def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            route = make_route(pattern, fn, key=key, publishes=publishes)
            for r in self.routes:
                if r.filter == route.filter:
                    raise ServiceError(f"{self.name}: {pattern!r} overlaps {r.pattern!r} exactly")
            self.routes.append(route)
            return fn

        return deco

    def command(self, name: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register an async handler for the command ``name`` (``cmd/<service>/<name>``).
        Its parameters are the command's arguments (plain types, or one pydantic model);
        its return value is the reply; an exception is the failure. Run at most once per
        command id, never after its time to live (docs/commands.md)."""
        return self._commands.command(name)

    def on_desired(self, thing: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register ``async def fn(doc: dict)`` for each newer desired document of ``thing``."""
        return self._commands.on_desired(thing)

    def desired(self, thing: str) -> dict[str, Any] | None:
        """The newest desired document of ``thing`` seen so far (docs/shadow.md); call it
        before the service starts to subscribe."""
        return self._commands.desired(thing)

    async def report(self, thing: str, doc: dict[str, Any]) -> None:
        """Publish ``thing``'s whole reported document (``shadow/<thing>/reported``)."""
        await self._commands.report(thing, doc)

    def publishes(self, pattern: str, model: Any = None, description: str = "") -> None:
        """Declare a topic this service publishes (for ``edgeferry catalog``)."""
        self.publishes_declared.append((pattern, model, description))

    def on_start(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Run ``fn`` once connected and subscribed, before the service counts as ready."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Run ``fn`` after in-flight handlers drained, before going offline."""
        self._on_stop.append(fn)
        return fn

    def every(
        self, seconds: float
    ) -> Callable[[Callable[[], Awaitable[Any]]], Callable[[], Awaitable[Any]]]:
        """Run an async function every ``seconds`` while the service runs (errors are
        logged, the timer keeps going)."""
        if seconds <= 0:
            raise ConfigError("every(): the interval must be positive")

        def deco(fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            self._every.append((seconds, fn))
            return fn

        return deco

    def load_config(self, values: dict[str, Any] | None) -> Any:
        """Validate the service's own settings (its YAML section) into ``svc.config``."""
        if self.config_model is None:
            if values:
                raise ConfigError(f"service {self.name!r} takes no settings of its own")
            return None
        from pydantic import ValidationError

        try:
            self.config = self.config_model.model_validate(values or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{self.name}: {where}: {first['msg']}") from None
        return self.config

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        topic: str,
        data: Any = None,
        *,
        type: str | None = None,
        subject: str | None = None,
        retain: bool = False,
        qos: int = 1,
        raw: bool = False,
    ) -> str | None:
        """Publish a pydantic model, dict or any JSON value as a CloudEvent and wait for
        the broker's acknowledgement; return the event id. Inside a handler the event
        carries the trigger's ``correlationid`` and a derived, re-run-stable id.
        ``raw=True`` publishes bytes (or JSON) as they are, without an envelope."""
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise ServiceError(f"cannot publish to {topic!r}: not a topic name")
        if raw:
            await self._send(topic, raw_payload(data), qos, retain)
            return None
        payload, eid = event_payload(
            self, self.name, self.source, topic, data, type=type, subject=subject
        )
        await self._send(topic, payload, qos, retain)
        return eid

    async def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._link is None:
            raise ServiceError(f"service {self.name!r} is not running")
        if self._allowed is not None:
            check_publish(self, topic, self._allowed)
        await self._link.send(topic, payload, qos, retain)

    @property
    def _client(self) -> Client | None:
        """The current session client (one per connection), or None."""
        return self._link.client if self._link is not None else None

    # ------------------------------------------------------------------ running

    def running(self, broker: str | BrokerURL | ClientFactory | None = None) -> Service:
        """``async with svc.running(broker):`` — set the broker and enter."""
        if broker is not None:
            self.broker = broker
        return self

    def _enter(self) -> None:
        if self._entered:
            raise ServiceError(
                f"service {self.name!r} is already running; it cannot be entered twice"
            )
        if not self.routes and not self._every:
            raise ServiceError(f"service {self.name!r} has no handlers")
        self._entered = True
        self._reset()

    async def serve(self, *, ready: asyncio.Event | None = None) -> None:
        """Run until :meth:`stop` (SIGTERM/SIGINT under :meth:`run`), then drain and return.

        ``ready`` is set once the service is connected, subscribed and its ``on_start``
        hooks ran. If one of the service's tasks fails, the others are cancelled and its
        exception comes out of here as itself."""
        self._enter()
        await self._serve(ready)

    async def __aenter__(self) -> Service:
        """Serve in a task while the ``async with`` block runs (embedding, tests). A task
        of the service that fails cancels the block and comes out of it as itself."""
        self._enter()
        lifespan = self._lifespan = Lifespan(self._serve, self.name)
        try:
            await lifespan.__aenter__()
        except BaseException:
            self._entered = False
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Drain (as on SIGTERM) and stop."""
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is None:
            return
        self.stop()
        await lifespan.__aexit__(et, exc, tb)

    async def _serve(self, ready: asyncio.Event | None) -> None:
        error = None
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    await self._start(tg)
                    if ready is not None:
                        ready.set()
                    await self._stop_requested.wait()
                    await self._stop()
            except BaseExceptionGroup as eg:
                error = first_error(eg)
            if error is not None:
                raise error  # as itself, with its own context (see first_error)
        finally:
            link = self._link
            if link is not None and not link.closing:  # a failure or a cancellation
                await link.close(offline=True)
            if self._dedup is not None:
                self._dedup.close()
            self._commands.close()
            self._entered = False

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        self._started = time.monotonic()
        self._allowed = allowed_publishes(self)
        path = None
        if self.dedup and self.state_dir:
            import os

            path = os.path.join(self.state_dir, f"{self.name}.dedup")
        self._dedup = (
            DedupTable(path, ttl=self.dedup_ttl, max_entries=self.dedup_max) if self.dedup else None
        )
        rx = self._rx = Receiver(
            owner=self,
            name=self.name,
            source=self.source,
            routes=self.routes,
            concurrency=self.concurrency,
            retries=self.retries,
            retry_initial=self.retry_initial,
            retry_cap=self.retry_cap,
            max_payload_bytes=self.max_payload_bytes,
            max_pending=self.max_pending,
            dedup=self._dedup,
            counters=self.counters,
            dead_lettered=self.dead_lettered,
            send=self._send,
            tg=tg,
            progress=self._progress,
            after_commit=self.after_commit,
        )
        self._link = Link(
            name=self.name,
            broker=self.broker,
            client_id=self.client_id or f"svc-{self.name}",
            keepalive=self.keepalive,
            max_inflight=self.max_inflight,
            connect_timeout=self.connect_timeout,
            filters=[r.filter for r in self.routes],
            on_message=rx.on_message,
            on_new_client=rx.on_new_client,
            on_online=self._poke,
            counters=self.counters,
        )
        await self._link.open(self.connect_timeout)
        for fn in self._on_start:
            await fn()
        self._bg = [tg.create_task(self._link.supervise(), name=f"{self.name}:link")]
        if self.heartbeat > 0:
            self._bg.append(tg.create_task(self._heartbeat_loop(), name=f"{self.name}:heartbeat"))
        for i, (every, fn) in enumerate(self._every):
            self._bg.append(
                tg.create_task(self._every_loop(every, fn), name=f"{self.name}:every{i}")
            )
        loop_kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info(
            "service %s ready on %s (%d handlers, %s loop)",
            self.name,
            self._link.label,
            len(self.routes),
            loop_kind,
        )

    async def _stop(self) -> None:
        """Drain the handlers, acknowledge, run the on_stop hooks, go offline."""
        rx, link = self._rx, self._link
        assert rx is not None and link is not None
        await rx.drain(self.drain_timeout)
        rx.flush()
        for fn in self._on_stop:
            try:
                await fn()
            except Exception:
                log.exception("service %s: on_stop hook failed", self.name)
        for t in self._bg:
            t.cancel()
        await link.close(offline=True)
        log.info("service %s stopped: %s", self.name, self.stats())

    def stop(self) -> None:
        """Ask :meth:`serve` (or the ``async with`` block's service) to drain and return
        (safe from a signal handler)."""
        self._stop_requested.set()

    def run(
        self,
        broker: str | BrokerURL | ClientFactory | None = None,
        *,
        argv: list[str] | None = None,
    ) -> None:
        """Run until SIGTERM or SIGINT (uvloop when installed). Settings come from
        ``argv`` (default: the command line), ``EDGEFERRY_*`` and ``--config FILE``."""
        import sys

        from edge._runner import run_service

        code = run_service(self, list(sys.argv[1:] if argv is None else argv), broker=broker)
        if code:
            raise SystemExit(code)

    def _poke(self) -> None:
        if self._progress is not None:
            self._progress.set()

    @property
    def online(self) -> bool:
        """Connected, subscribed and announced ``online``."""
        link, client = self._link, self._client
        return link is not None and link.connected.is_set() and bool(client and client.connected)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if self._dedup is not None:
                self._dedup.expire()
            body = envelope(
                source=self.source,
                type="io.edgeferry.heartbeat",
                data=self.stats(),
                subject=self.name,
            )
            await self._send(f"state/{self.name}/heartbeat", encode(body), 1, True)

    async def _every_loop(self, seconds: float, fn: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "service %s: timer %s failed", self.name, getattr(fn, "__qualname__", fn)
                )

    async def wait_until(
        self,
        predicate: Callable[[Service], object],
        timeout: float = 10.0,  # noqa: ASYNC109 - a test helper; the timeout is part of the call
    ) -> None:
        """Wait until ``predicate(svc)`` is true, re-checking each time a message arrives
        or is finished (handled, answered as a duplicate or dead-lettered) and each time the
        service comes online — for tests and
        embedding, e.g. ``await svc.wait_until(lambda s: s.counters["handled"] >= 3)``.
        Raises TimeoutError."""
        if self._progress is None:
            self._progress = asyncio.Event()
            if self._rx is not None:
                self._rx.progress = self._progress
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._progress.clear()
                await self._progress.wait()

    def stats(self) -> dict[str, Any]:
        """The counters the heartbeat publishes."""
        out: dict[str, Any] = dict(self.counters)
        out["dead_lettered"] = dict(self.dead_lettered)
        out["in_flight"] = self._rx.pending if self._rx is not None else 0
        out["uptime_s"] = round(time.monotonic() - self._started, 3) if self._started else 0.0
        return out


def _hostname() -> str:
    import socket

    h = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", h)[:64]
