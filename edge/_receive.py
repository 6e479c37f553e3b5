"""The receive path of a service: from a delivered message to its acknowledgement.

1. :meth:`Receiver.on_message` routes a message to the first handler whose pattern
   matches and queues it behind earlier messages of its *key* (a lane per key; keys run
   concurrently, up to ``concurrency`` handlers at once). With ``max_pending`` messages in
   hand it pauses reading the connection; it resumes at half.
2. A lane decodes each message (CloudEvents envelope or raw JSON), answers ids the dedup
   table knows, validates the payload against the handler's model and calls the handler,
   retrying a handler that raises after a backoff, up to ``retries`` more times.
3. Bad input and handlers that keep failing go to ``dlq/<service>`` with the reason.
4. A finished message's id is marked in the dedup table; the marks of one loop turn are
   committed, and only then are their messages acknowledged (:meth:`Receiver.flush`).

A :class:`Receiver` lives for one run of a :class:`edge.Service`, which owns the task
group its lanes run in.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from edge._client import Client
from edge._dedup import DedupTable
from edge._dlq import DeadLetterLog, dead_letter, one_line
from edge._routing import Route
from edge.backoff import Backoff
from edge.errors import EnvelopeError, Reject
from edge.events import Event, decode, new_id
from edge.mqtt import Message

__all__ = ["HandlerContext", "Receiver", "current_context"]

log = logging.getLogger("edge.service")


class HandlerContext:
    """What a running handler knows: the trigger, for correlation and derived ids."""

    __slots__ = ("owner", "event", "key", "n", "correlationid")

    def __init__(self, owner: object, event: Event, key: str) -> None:
        self.owner = owner  # the Service whose handler runs
        self.event = event
        self.key = key
        self.n = 0  # events published so far (numbers the derived ids)
        self.correlationid = event.correlationid or event.id or new_id()


_current: contextvars.ContextVar[HandlerContext | None] = contextvars.ContextVar(
    "edge_handler", default=None
)


def current_context() -> HandlerContext | None:
    """The context of the handler running in this task (None outside a handler)."""
    return _current.get()


class _Work:
    __slots__ = ("msg", "route", "params", "key", "acks", "event_id")

    def __init__(
        self,
        msg: Message,
        route: Route | None,
        params: dict[str, str],
        key: str,
        client: Client,
    ) -> None:
        self.msg = msg
        self.route = route
        self.params = params
        self.key = key
        self.acks: list[tuple[Client, int]] = [(client, msg.pid)] if msg.qos else []
        self.event_id: str | None = None


Send = Callable[[str, bytes, int, bool], Awaitable[None]]


class Receiver:
    """Lanes, per-key order, retries, dead letters, dedup and acknowledgements for one run
    of a service. ``send`` publishes (dead letters); ``tg`` is the service's task group,
    where lanes run; ``after_commit`` (tests) is called with the number of ids of
    each dedup commit, before their messages are acknowledged."""

    def __init__(
        self,
        *,
        owner: object,
        name: str,
        source: str,
        routes: list[Route],
        concurrency: int,
        retries: int,
        retry_initial: float,
        retry_cap: float,
        max_payload_bytes: int,
        max_pending: int,
        dedup: DedupTable | None,
        counters: dict[str, int],
        dead_lettered: dict[str, int],
        send: Send,
        tg: asyncio.TaskGroup,
        progress: asyncio.Event | None = None,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.owner = owner
        self.name = name
        self.source = source
        self.routes = routes
        self.retries = retries
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.max_payload_bytes = max_payload_bytes
        self.max_pending = max(1, max_pending)
        self.dedup = dedup
        self.counters = counters
        self.dead_lettered = dead_lettered
        self.progress = progress  # set whenever a message arrives or is finished
        self.after_commit = after_commit
        self._send = send
        self._tg = tg
        self._sem = asyncio.Semaphore(concurrency)
        self._lanes: dict[str, deque[_Work]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # no lane is running
        self._idle.set()
        self.pending = 0  # received, not finished yet (bounded by max_pending)
        self._paused: Client | None = None  # the client whose reading is paused
        self._inflight: dict[str, _Work] = {}
        self._acks: list[tuple[Client, int]] = []
        self._flush_scheduled = False
        self.stopping = False
        self._dlq_log = DeadLetterLog(name)

    # ------------------------------------------------------------------ in

    def on_new_client(self, client: Client) -> None:
        # a paused older connection is gone; but the new one may already be paused: a
        # persistent session's backlog can arrive with the CONNACK, before we get here
        if self._paused is not client:
            self._paused = None

    def on_message(self, client: Client, msg: Message) -> None:
        self.counters["received"] += 1
        if self.progress is not None:
            self.progress.set()
        if self.stopping:
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
        self.pending += 1
        if self.pending >= self.max_pending and self._paused is None:
            # enough in hand: let TCP hold the rest at the broker (memory stays flat)
            self._paused = client
            client.pause_reading()
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(work)
            return
        lane = self._lanes[key] = deque((work,))
        self._idle.clear()
        t = self._tg.create_task(self._run_lane(key, lane), name=f"{self.name}:lane")
        self._lane_tasks.add(t)
        t.add_done_callback(self._lane_tasks.discard)

    # ------------------------------------------------------------------ stopping

    @property
    def running_lanes(self) -> int:
        return len(self._lanes)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the drain bound is the setting
        """Take no new messages; wait up to ``timeout`` seconds for the running lanes, then
        cancel what is left (those messages stay unacknowledged and come back). True when
        everything finished in time."""
        self.stopping = True
        try:
            async with asyncio.timeout(timeout):
                while self._lanes:
                    self._idle.clear()
                    await self._idle.wait()
            return True
        except TimeoutError:
            log.warning(
                "service %s: %d handler(s) still running after %.1f s; cancelling them "
                "(their messages stay unacknowledged and come back)",
                self.name,
                len(self._lanes),
                timeout,
            )
            self.cancel()
            return False

    def cancel(self) -> None:
        self.stopping = True
        for t in list(self._lane_tasks):
            t.cancel()

    # ------------------------------------------------------------------ handling

    async def _run_lane(self, key: str, lane: deque[_Work]) -> None:
        sem = self._sem
        try:
            while lane and not self.stopping:
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
                self.pending -= 1
                if self._paused is not None and self.pending <= self.max_pending // 2:
                    self._paused.resume_reading()
                    self._paused = None
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]
                self.pending -= len(lane)  # abandoned at stop: the broker sends them again
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
            if eid is not None and self.dedup is not None:
                if eid in self.dedup:
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
        ctx = HandlerContext(self.owner, event, work.key)
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

    # ------------------------------------------------------------------ out

    def _ack_later(self, work: _Work) -> None:
        if self.progress is not None:
            self.progress.set()
        if work.event_id is not None and self.dedup is not None:
            self.dedup.add(work.event_id)
        if work.acks:
            self._acks.extend(work.acks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Commit the dedup marks of this loop turn, then acknowledge their messages."""
        self._flush_scheduled = False
        if self.dedup is not None:
            marks = len(self.dedup._pending)
            try:
                self.dedup.commit()
            except Exception:
                log.exception(
                    "service %s: dedup commit failed; messages stay unacknowledged", self.name
                )
                self._acks.clear()
                return
            if marks and self.after_commit is not None:
                self.after_commit(marks)
        acks, self._acks = self._acks, []
        if not acks:
            return
        # acks for a connection that is gone are void: the broker sends those messages
        # again on the next session, and the dedup table answers them
        by_client: dict[Client, list[int]] = {}
        for c, pid in acks:
            by_client.setdefault(c, []).append(pid)
        for c, pids in by_client.items():
            if c.connected:
                c.ack_many(pids)
