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

How a message goes through (docs/services.md has the long version):

1. The broker delivers it on the service's persistent QoS 1 session; it is routed to the
   first handler whose pattern matches, and queued behind earlier messages of its *key*
   (the ``device`` placeholder by default). Keys run concurrently, up to ``concurrency``.
2. It is decoded (CloudEvents envelope or raw JSON), checked against the dedup table,
   validated against the handler's payload model, and the handler runs; a handler that
   raises runs again after a backoff, up to ``retries`` more times.
3. Bad input and handlers that keep failing go to ``dlq/<service>`` with the reason.
4. Its id is marked in the dedup table, the marks of one loop turn are committed, and
   only then is the message acknowledged to the broker.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from edge._commands import Commands
from edge._dedup import DedupTable
from edge._dlq import DeadLetterLog, dead_letter, one_line
from edge._link import Link
from edge._routing import Route, make_route
from edge.backoff import Backoff
from edge.errors import ConfigError, EnvelopeError, Reject, ServiceError
from edge.events import Event, decode, derived_id, encode, envelope, new_id
from edge.mqtt import Message

__all__ = ["Service", "current_event"]

log = logging.getLogger("edge.service")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Context:
    """What a running handler knows: the trigger, for correlation and derived ids."""

    __slots__ = ("service", "event", "key", "n", "correlationid")

    def __init__(self, service: Service, event: Event, key: str) -> None:
        self.service = service
        self.event = event
        self.key = key
        self.n = 0
        self.correlationid = event.correlationid or event.id or new_id()


_current: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "edge_handler", default=None
)


def current_event() -> Event | None:
    """The event the running handler was called for (None outside a handler)."""
    ctx = _current.get()
    return None if ctx is None else ctx.event


class _Work:
    __slots__ = ("msg", "route", "params", "key", "acks", "event_id")

    def __init__(
        self, msg: Message, route: Route | None, params: dict[str, str], key: str, client: Any
    ) -> None:
        self.msg = msg
        self.route = route
        self.params = params
        self.key = key
        self.acks: list[tuple[Any, int]] = [(client, msg.pid)] if msg.qos else []
        self.event_id: str | None = None


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
        broker: Any = None,
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
        self.routes: list[Route] = []
        self.publishes_declared: list[tuple[str, Any, str]] = []
        self._on_start: list[Callable[[], Awaitable[Any]]] = []
        self._on_stop: list[Callable[[], Awaitable[Any]]] = []
        self._every: list[tuple[float, Callable[[], Awaitable[Any]]]] = []
        self._entered = False
        self._commands = Commands(self)
        self._reset()

    def _reset(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "handled", "failed", "retried", "duplicates", "reconnects"), 0
        )
        self.dead_lettered: dict[str, int] = {}
        self._lanes: dict[str, deque[_Work]] = {}
        self._pending = 0  # received, not finished yet (bounded by max_pending)
        self._paused: Any = None  # the client whose reading is paused
        self._inflight: dict[str, _Work] = {}
        self._acks: list[tuple[Any, int]] = []
        self._flush_scheduled = False
        self._link: Link | None = None
        self._stopping = False
        self._started = 0.0
        self._dedup: DedupTable | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._bg: list[asyncio.Task[Any]] = []
        self._lane_tasks: set[asyncio.Task[Any]] = set()
        self._dlq_log = DeadLetterLog(self.name)
        self._progress: asyncio.Event | None = None  # set whenever a message is finished
        # failpoint for tests: EDGEFERRY_FAILPOINT=service_crash_after_commit:N kills the
        # process (SIGKILL) right after the Nth dedup commit, before acknowledging
        import os

        fp = os.environ.get("EDGEFERRY_FAILPOINT", "")
        self._crash_after = (
            int(fp.split(":")[1]) if fp.startswith("service_crash_after_commit:") else None
        )

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
            payload = data if isinstance(data, bytes) else encode(_jsonable(data))
            await self._send(topic, payload, qos, retain)
            return None
        ctx = _current.get()
        if ctx is not None and ctx.service is self:
            eid = derived_id(ctx.event.id, self.name, ctx.n)
            ctx.n += 1
            corr: str | None = ctx.correlationid
            if subject is None:
                subject = ctx.event.subject if ctx.event.subject is not None else ctx.key
        else:
            eid = new_id()
            corr = None
        body = envelope(
            source=self.source,
            type=type or _event_type(data, topic),
            data=_jsonable(data),
            id=eid,
            subject=subject,
            correlationid=corr,
        )
        await self._send(topic, encode(body), qos, retain)
        return eid

    async def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._link is None:
            raise ServiceError(f"service {self.name!r} is not running")
        await self._link.send(topic, payload, qos, retain)

    @property
    def _client(self) -> Any:
        """The current MQTT client (one per connection), or None."""
        return self._link.client if self._link is not None else None

    # ------------------------------------------------------------------ running

    def running(self, broker: Any = None) -> Service:
        """``async with svc.running(broker):`` — set the broker and enter."""
        if broker is not None:
            self.broker = broker
        return self

    async def __aenter__(self) -> Service:
        if self._entered:
            raise ServiceError(
                f"service {self.name!r} is already running; it cannot be entered twice"
            )
        if not self.routes and not self._every:
            raise ServiceError(f"service {self.name!r} has no handlers")
        self._entered = True
        self._reset()
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            self._entered = False
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._stop()
        finally:
            self._entered = False

    async def _start(self) -> None:
        self._started = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sem = asyncio.Semaphore(self.concurrency)
        path = None
        if self.dedup and self.state_dir:
            import os

            path = os.path.join(self.state_dir, f"{self.name}.dedup")
        self._dedup = (
            DedupTable(path, ttl=self.dedup_ttl, max_entries=self.dedup_max) if self.dedup else None
        )
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._link = Link(
            name=self.name,
            broker=self.broker,
            client_id=self.client_id or f"svc-{self.name}",
            keepalive=self.keepalive,
            max_inflight=self.max_inflight,
            connect_timeout=self.connect_timeout,
            filters=[r.filter for r in self.routes],
            on_message=self._on_message,
            on_new_client=self._on_new_client,
            on_online=self._poke,
            counters=self.counters,
        )
        await self._link.open(self.connect_timeout)
        for fn in self._on_start:
            await fn()
        tg = self._tg
        self._bg.append(tg.create_task(self._link.supervise(), name=f"{self.name}:link"))
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

    def _on_new_client(self, client: Any) -> None:
        # a paused older connection is gone; but the new one may already be paused: a
        # persistent session's backlog can arrive with the CONNACK, before we get here
        if self._paused is not client:
            self._paused = None

    def _poke(self) -> None:
        if self._progress is not None:
            self._progress.set()

    @property
    def online(self) -> bool:
        """Connected, subscribed and announced ``online``."""
        return self._link is not None and self._link.connected.is_set() and self._client.connected

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
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._progress.clear()
                await self._progress.wait()

    def stats(self) -> dict[str, Any]:
        """The counters the heartbeat publishes."""
        out: dict[str, Any] = dict(self.counters)
        out["dead_lettered"] = dict(self.dead_lettered)
        out["in_flight"] = self._pending
        out["uptime_s"] = round(time.monotonic() - self._started, 3) if self._started else 0.0
        return out

    async def _stop(self) -> None:
        self._stopping = True
        if self._tg is None:
            return
        try:
            async with asyncio.timeout(self.drain_timeout):
                while self._lanes:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            log.warning(
                "service %s: %d handler(s) still running after %.1f s; cancelling them "
                "(their messages stay unacknowledged and come back)",
                self.name,
                len(self._lanes),
                self.drain_timeout,
            )
            for t in list(self._lane_tasks):
                t.cancel()
        self._flush()
        for fn in self._on_stop:
            try:
                await fn()
            except Exception:
                log.exception("service %s: on_stop hook failed", self.name)
        await self._teardown()
        log.info("service %s stopped: %s", self.name, self.stats())

    async def _teardown(self) -> None:
        self._stopping = True
        if self._link is not None:
            await self._link.close(offline=True)
        for t in self._bg:
            t.cancel()
        for t in list(self._lane_tasks):
            t.cancel()
        tg, self._tg = self._tg, None
        if tg is not None:
            await tg.__aexit__(None, None, None)
        self._bg.clear()
        if self._dedup is not None:
            self._dedup.close()
        self._commands.close()

    def stop(self) -> None:
        """Ask :meth:`serve` to drain and return (safe from a signal handler)."""
        ev = getattr(self, "_stop_requested", None)
        if ev is not None:
            ev.set()

    async def serve(self) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT under :meth:`run`)."""
        self._stop_requested = asyncio.Event()
        async with self:
            await self._stop_requested.wait()

    def run(self, broker: Any = None, *, argv: list[str] | None = None) -> None:
        """Run until SIGTERM or SIGINT (uvloop when installed). Settings come from
        ``argv`` (default: the command line), ``EDGEFERRY_*`` and ``--config FILE``."""
        import sys

        from edge._runner import run_service

        code = run_service(self, list(sys.argv[1:] if argv is None else argv), broker=broker)
        if code:
            raise SystemExit(code)

    # ------------------------------------------------------------------ receiving

    def _on_message(self, client: Any, msg: Message) -> None:
        self.counters["received"] += 1
        if self._progress is not None:
            self._progress.set()
        if self._stopping:
            return  # left unacknowledged: the broker sends it again next session
        topic = msg.topic
        route = None
        params: dict[str, str] = {}
        for r in self.routes:
            p = r.match(topic)
            if p is not None:
                route, params = r, p
                break
        key = route.key(topic, params) if route is not None else topic
        work = _Work(msg, route, params, key, client)
        self._pending += 1
        if self._pending >= self.max_pending and self._paused is None:
            # enough in hand: let TCP hold the rest at the broker (memory stays flat)
            self._paused = client
            client.pause_reading()
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(work)
            return
        lane = self._lanes[key] = deque((work,))
        self._idle.clear()
        assert self._tg is not None
        t = self._tg.create_task(self._run_lane(key, lane), name=f"{self.name}:lane")
        self._lane_tasks.add(t)
        t.add_done_callback(self._lane_tasks.discard)

    async def _run_lane(self, key: str, lane: deque[_Work]) -> None:
        sem = self._sem
        try:
            while lane and not self._stopping:
                work = lane[0]
                async with sem:
                    try:
                        await self._process(work)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # a bug of ours: never lose the message silently
                        log.exception("service %s: internal error on %s", self.name, work.msg.topic)
                        await self._dead(work, "handler_error", f"internal error: {e!r}", 0)
                lane.popleft()
                self._pending -= 1
                if self._paused is not None and self._pending <= self.max_pending // 2:
                    self._paused.resume_reading()
                    self._paused = None
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]
                self._pending -= len(lane)  # abandoned at stop: the broker sends them again
            if not self._lanes:
                self._idle.set()

    async def _process(self, work: _Work) -> None:
        msg = work.msg
        route = work.route
        payload = msg.payload
        if len(payload) > self.max_payload_bytes:
            return await self._dead(
                work, "oversize", f"{len(payload)} bytes > {self.max_payload_bytes}", 0
            )
        if route is None:
            return await self._dead(
                work, "no_route", f"no handler of {self.name} matches the topic", 0
            )
        if route.wants_bytes:
            event = Event(data=None, raw=True)
            value: Any = payload
        else:
            try:
                event = decode(payload)
            except EnvelopeError as e:
                return await self._dead(work, e.reason, str(e), 0)
            eid = event.id
            if eid is not None and self._dedup is not None:
                if eid in self._dedup:
                    self.counters["duplicates"] += 1
                    return self._ack_later(work)
                first = self._inflight.get(eid)
                if first is not None:  # the same event on another key, still running
                    self.counters["duplicates"] += 1
                    first.acks.extend(work.acks)
                    return
                work.event_id = eid
            try:
                value = route.validate(event.data)
            except Exception as e:  # pydantic ValidationError
                return await self._dead(work, "schema", one_line(e), 0, event)
        kwargs: dict[str, Any] = {}
        try:
            for name, conv in route.converters.items():
                kwargs[name] = conv(work.params[name])
        except ValueError as e:
            return await self._dead(work, "schema", f"topic level: {e}", 0, event)
        if route.payload_param is not None:
            kwargs[route.payload_param] = value
        if route.event_param is not None:
            kwargs[route.event_param] = event
        if route.topic_param is not None:
            kwargs[route.topic_param] = msg.topic
        await self._call(work, route, kwargs, event)

    async def _call(self, work: _Work, route: Route, kwargs: dict[str, Any], event: Event) -> None:
        ctx = _Context(self, event, work.key)
        token = _current.set(ctx)
        eid = work.event_id
        if eid is not None:
            self._inflight[eid] = work
        attempts = 0
        backoff: Backoff | None = None
        try:
            while True:
                attempts += 1
                try:
                    await route.handler(**kwargs)
                    break
                except Reject as e:
                    return await self._dead(
                        work, e.reason, str(e) or "rejected by the handler", attempts, event
                    )
                except Exception as e:
                    self.counters["failed"] += 1
                    if attempts > self.retries:
                        log.warning(
                            "service %s: handler %s failed %d time(s) on %s: %r; dead-lettered",
                            self.name,
                            route.name,
                            attempts,
                            work.msg.topic,
                            e,
                        )
                        return await self._dead(work, "handler_error", one_line(e), attempts, event)
                    if backoff is None:
                        backoff = Backoff(
                            self.retry_initial, max(self.retry_cap, self.retry_initial)
                        )
                    delay = backoff.next()
                    log.info(
                        "service %s: handler %s failed on %s (%r); retry %d of %d in %.2f s",
                        self.name,
                        route.name,
                        work.msg.topic,
                        e,
                        attempts,
                        self.retries,
                        delay,
                    )
                    self.counters["retried"] += 1
                    ctx.n = 0  # a retry publishes the same ids as the failed attempt
                    await asyncio.sleep(delay)
        finally:
            _current.reset(token)
            if eid is not None:
                self._inflight.pop(eid, None)
        self.counters["handled"] += 1
        self._ack_later(work)

    async def _dead(
        self, work: _Work, reason: str, error: str, attempts: int, event: Event | None = None
    ) -> None:
        msg = work.msg
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1
        self._dlq_log(reason, msg.topic, error)
        body = dead_letter(
            service=self.name,
            source=self.source,
            reason=reason,
            error=error,
            msg=msg,
            subject=work.key if work.route is not None else None,
            attempts=attempts,
            event=event,
        )
        await self._send(f"dlq/{self.name}", body, 1, False)
        self._ack_later(work)

    def _ack_later(self, work: _Work) -> None:
        if self._progress is not None:
            self._progress.set()
        if work.event_id is not None and self._dedup is not None:
            self._dedup.add(work.event_id)
        if work.acks:
            self._acks.extend(work.acks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit the dedup marks of this loop turn, then acknowledge their messages."""
        self._flush_scheduled = False
        if self._dedup is not None:
            marks = len(self._dedup._pending)
            try:
                self._dedup.commit()
            except Exception:
                log.exception(
                    "service %s: dedup commit failed; messages stay unacknowledged", self.name
                )
                self._acks.clear()
                return
            if self._crash_after is not None and marks:
                self._crash_after -= 1
                if self._crash_after <= 0:
                    import os
                    import signal

                    log.warning(
                        "failpoint service_crash_after_commit: killing myself before acknowledging"
                    )
                    os.kill(os.getpid(), signal.SIGKILL)
        acks, self._acks = self._acks, []
        if not acks:
            return
        # acks for a connection that is gone are void: the broker sends those messages
        # again on the next session, and the dedup table answers them
        by_client: dict[Any, list[int]] = {}
        for c, pid in acks:
            by_client.setdefault(c, []).append(pid)
        for c, pids in by_client.items():
            if c.connected:
                c.ack_many(pids)


def _event_type(data: Any, topic: str) -> str:
    t = getattr(type(data), "event_type", None)
    if isinstance(t, str):
        return t
    name = type(data).__name__
    if hasattr(data, "model_dump"):
        return "io.edgeferry." + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    parts = topic.split("/")
    if len(parts) >= 2 and parts[0] == "evt":
        return "io.edgeferry." + parts[1]
    return "io.edgeferry.event"


def _jsonable(data: Any) -> Any:
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json")
    return data


def _hostname() -> str:
    import socket

    h = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", h)[:64]
