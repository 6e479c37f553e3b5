"""The gateway's downlink stage: commands and desired state from the cloud to the site.

Two connections of its own, both ``<gateway client id>-down``:

* **cloud**, clean session (the cloud broker never queues a command for us, so no
  stale time to live can wait there), last will ``offline`` retained on
  ``ef/<node>/down/state``. After subscribing to ``ef/<node>/cmd/+`` and
  ``ef/<node>/shadow/+/desired`` it says hello (what it holds) and waits for the
  cloud's ``synced``; no answer within ``hello_retry`` seconds: hello again. Received
  commands and desired documents are committed to the downlink store first and
  acknowledged after.
* **local**, persistent session, subscribed to ``evt/cmd/+`` (targets' statuses) and
  ``shadow/+/reported``. One loop delivers: each held command is checked against its
  time to live (monotonic clock), published QoS 1 on ``cmd/<target>/<name>``, and
  published again every ``redeliver`` seconds until its target says ``accepted`` or a
  final state; desired documents and deltas are published retained; statuses of its
  own (``delivered``, ``expired``) and reported documents go out on ``evt/cmd/<target>``
  and ``evt/shadow/<thing>``, where the uplink's events lane picks them up.

docs/commands.md and docs/shadow.md give the guarantees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.downlink import COMMAND_TYPE, FINAL, STATUS_TYPE, Clock, SystemClock, command_data, status_data
from edge.errors import ConnectionLost
from edge.mqtt import Message, MQTTClient, Will
from gateway.downstore import DownStore, downlink_path
from gateway.topics import SYNC_HELLO, down_topic

__all__ = ["Downlink", "REDELIVER"]

log = logging.getLogger("edgeferry.downlink")


def _encode(obj: Any = None, **event: Any) -> bytes:
    """``obj`` as JSON, or a CloudEvent made of ``event``. edge.events is imported on first
    use: it brings orjson, uuid and platform, 0.8 MB of resident memory that a gateway
    carrying no command or shadow never needs (docs/benchmarks.md)."""
    from edge.events import encode, envelope

    return encode(envelope(**event) if event else obj)


REDELIVER = 5.0
HELLO_RETRY = 5.0
UNKNOWN_GRACE = 2.0
"""Times ``redeliver`` (at least 1 s) the local connection is up before a command for a
target that never announced itself (no retained ``state/<target>``) is rejected:
targets reconnect meanwhile."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


async def _first(fut: asyncio.Future[Any], ev: asyncio.Event, within: float | None = None) -> None:
    """Wait until ``fut`` is done, ``ev`` is set, or ``within`` seconds passed."""
    waiter = asyncio.ensure_future(ev.wait())
    try:
        await asyncio.wait([fut, waiter], timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


class Downlink:
    """``await Downlink(settings).run(stop)`` (settings: a GatewaySettings)."""

    def __init__(self, settings: Any, *, clock: Clock | None = None, redeliver: float | None = None,
                 hello_retry: float = HELLO_RETRY, after_receive: Callable[[int], None] | None = None,
                 fast_status: bool = True) -> None:
        """``after_receive`` (a failpoint for tests) is called with the number of new
        commands once they are stored, before they are acknowledged and delivered;
        ``fast_status=False`` (tests) sends statuses by the events lane only."""
        self.s = settings
        self.node = settings.node_id
        self.clock = clock or SystemClock()
        self.redeliver = redeliver if redeliver is not None else getattr(settings, "redeliver", REDELIVER)
        self.hello_retry = hello_retry
        self.client_id = f"{settings.gateway_client_id}-down"
        self.store = DownStore(downlink_path(settings.store), self.clock, settings.sync)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="downlink")
        self._prefix = f"ef/{self.node}/"
        self._cloud: MQTTClient | None = None
        self._local: MQTTClient | None = None
        self._inbox: list[tuple[MQTTClient, Message, str, dict[str, Any]]] = []
        self._inbox_wake = asyncio.Event()
        self._local_in: list[tuple[MQTTClient, Message]] = []
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._rehello = asyncio.Event()
        self._hello_n = 0
        self._last_pub: dict[str, float] = {}
        self._pub_target: dict[str, str] = {}  # command id -> target, of those in _last_pub
        self._known: set[str] = set()  # targets with a retained state/<target> (birth or will)
        self._offline: set[str] = set()  # of those, the ones whose state is "offline"
        self._local_since: float | None = None
        self._republish_all = True
        self.cloud_up = False
        self.local_up = False
        self.open_commands = 0
        self._after_receive = after_receive
        self._fast = fast_status
        self.counters = {"commands_received": 0, "commands_published": 0, "commands_expired": 0,
                         "desired_received": 0, "desired_stale": 0, "reports": 0, "hellos": 0,
                         "rejected": 0, "statuses_fast": 0}

    def _db(self, fn: Any, *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        await self._db(self.store.open)
        expired = await self._db(self.store.rebase)
        if expired:
            log.warning("downlink: %d held commands expired while the gateway was not running", expired)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._cloud_loop(stop), name="downlink-cloud"),
                         tg.create_task(self._receiver(), name="downlink-receiver"),
                         tg.create_task(self._local_loop(stop), name="downlink-local")]
                await stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            try:
                await self._goodbye()
            finally:
                self._pool.shutdown(wait=True)  # the commit in flight ends first
                self.store.close()

    async def _goodbye(self) -> None:
        cloud, local = self._cloud, self._local
        if cloud is not None and cloud.connected:
            try:
                async with asyncio.timeout(2.0):
                    await cloud.publish(down_topic(self.node, "state"), b"offline", 1, retain=True)
            except (ConnectionLost, TimeoutError):
                pass
            await cloud.close()
        if local is not None and local.connected:
            await local.close()

    # ------------------------------------------------------------ cloud

    async def _cloud_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.2, self.s.backoff_max)
        will = Will(down_topic(self.node, "state"), b"offline", 1, True)
        tls = getattr(self.s, "tls", None)

        clouds = getattr(self.s, "clouds", None)

        def make() -> MQTTClient:
            url = clouds.next() if clouds is not None else self.s.cloud  # --cloud in turn
            self._cloud = MQTTClient(url, self.client_id, clean_session=True,
                                     keepalive=self.s.keepalive, will=will, on_message=self._on_cloud,
                                     tls=tls, password_file=getattr(self.s, "password_file", None))
            return self._cloud

        while not stop.is_set():
            client = await connect_retrying(make, backoff, stop, "cloud broker (downlink)", log)
            if client is None:
                return
            try:
                p = self._prefix
                await client.subscribe([(p + "cmd/+", 1), (p + "shadow/+/desired", 1),
                                        (down_topic(self.node, "synced"), 1), (SYNC_HELLO, 1)])
                await client.publish(down_topic(self.node, "state"), b"online", 1, retain=True)
                self.cloud_up = True
                while True:
                    await self._hello(client)
                    await _first(client.closed, self._synced, self.hello_retry)
                    if client.closed.done():
                        client.closed.result()
                    if not self._synced.is_set():
                        log.info("downlink: no answer to hello %d within %.0f s; saying hello again",
                                 self._hello_n, self.hello_retry)
                        continue
                    await _first(client.closed, self._rehello)
                    if client.closed.done():
                        client.closed.result()
            except ConnectionLost as e:
                log.warning("cloud link (downlink) lost: %s", e)
            except (OSError, ValueError, sqlite3.Error):
                # the downlink must not take the gateway (and its uplink) down with it
                log.exception("downlink (cloud side) failed; reconnecting")
            finally:
                self.cloud_up = False
                client.abort()
            await sleep_unless(stop, backoff.next())

    async def _hello(self, client: MQTTClient) -> None:
        self._synced.clear()
        self._rehello.clear()
        self._hello_n += 1
        body = await self._db(self.store.hello)
        body["n"] = self._hello_n
        self.counters["hellos"] += 1
        await client.publish(down_topic(self.node, "hello"), json.dumps(body).encode(), 1)

    def _on_cloud(self, m: Message) -> None:
        client = self._cloud
        if client is None:
            return
        topic = m.topic
        if topic == SYNC_HELLO or topic.endswith("/down/synced"):
            if m.qos:
                client.ack(m.pid)
            if topic == SYNC_HELLO:
                self._rehello.set()
                return
            try:
                n = json.loads(m.payload).get("hello")
            except (ValueError, AttributeError):
                return
            if n == self._hello_n:
                self._synced.set()
            return
        try:
            body = json.loads(m.payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            rest = topic[len(self._prefix):]
            if rest.startswith("cmd/"):
                kind = "cmd"
                for k in ("id", "target", "name"):
                    if not isinstance(body.get(k), str) or not _NAME.match(body[k]):
                        raise ValueError(f"{k} is missing or not a name")
                ttl = body.get("ttl_ms")
                if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
                    raise ValueError("ttl_ms must be a number or null")
            else:
                kind = "desired"
                thing = rest.split("/")[1]
                if not _NAME.match(thing) or body.get("thing", thing) != thing:
                    raise ValueError("bad thing name")
                if not isinstance(body.get("version"), int) or not isinstance(body.get("desired"), dict):
                    raise ValueError("a desired document needs an integer version and an object")
                body["thing"] = thing
        except ValueError as e:
            self.counters["rejected"] += 1
            log.warning("downlink: rejected a message on %r: %s", topic, e)
            if m.qos:
                client.ack(m.pid)
            return
        self._inbox.append((client, m, kind, body))
        self._inbox_wake.set()

    async def _receiver(self) -> None:
        """Commit what came from the cloud, then acknowledge it (kill -9 in between: the
        cloud offers it again, and the store ignores an id it has)."""
        while True:
            await self._inbox_wake.wait()
            self._inbox_wake.clear()
            batch, self._inbox = self._inbox, []
            if not batch:
                continue
            cmds = [b for _, _, k, b in batch if k == "cmd"]
            desired = [b for _, _, k, b in batch if k == "desired"]
            new, applied = await self._db(self.store.receive, cmds, desired)
            if new and self._after_receive is not None:
                self._after_receive(new)  # stored, not yet acknowledged nor delivered
            self.counters["commands_received"] += new
            self.counters["desired_received"] += applied
            self.counters["desired_stale"] += len(desired) - applied
            if new or applied:
                self._wake.set()
            for client, m, _, _ in batch:
                if m.qos and client.connected:
                    client.ack(m.pid)

    # ------------------------------------------------------------ local

    async def _local_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.2, self.s.backoff_max)

        def make() -> MQTTClient:
            self._local = MQTTClient(self.s.local, self.client_id, clean_session=False,
                                     keepalive=self.s.local_keepalive, on_message=self._on_local,
                                     password_file=getattr(self.s, "local_password_file", None))
            return self._local

        while not stop.is_set():
            client = await connect_retrying(make, backoff, stop, "local broker (downlink)", log)
            if client is None:
                return
            self._last_pub.clear()  # a new connection: publish at once what is not accepted
            self._pub_target.clear()
            self._republish_all = True  # and the retained state (the broker may have lost it)
            try:
                await client.subscribe([("evt/cmd/+", 1), ("shadow/+/reported", 1), ("state/+", 1)])
                self.local_up = True
                self._local_since = time.monotonic()
                while True:
                    if client.closed.done():
                        client.closed.result()
                    self._wake.clear()
                    due = await self._deliver(client)
                    await _first(client.closed, self._wake, due)
            except ConnectionLost as e:
                log.warning("local broker (downlink): %s", e)
            except (OSError, ValueError, sqlite3.Error):
                log.exception("downlink (local side) failed; reconnecting")
            finally:
                self.local_up = False
                self._local_since = None
                client.abort()
            await sleep_unless(stop, backoff.next())

    def _on_local(self, m: Message) -> None:
        client = self._local
        if client is None:
            return
        self._local_in.append((client, m))
        self._wake.set()

    def _parse_local(self, m: Message) -> tuple[str, Any] | None:
        try:
            body = json.loads(m.payload)
        except ValueError:
            return None
        data = body.get("data") if isinstance(body, dict) and "specversion" in body else body
        if not isinstance(data, dict):
            return None
        return m.topic, data

    async def _take_local(self) -> None:
        """Apply targets' statuses and reported documents, then acknowledge them."""
        batch, self._local_in = self._local_in, []
        changes: list[tuple[str, str | None, int | None, str | None]] = []
        for _, m in batch:
            if m.topic.startswith("state/"):
                target = m.topic[6:]
                self._known.add(target)
                if m.payload.strip() == b"offline":
                    self._offline.add(target)
                elif target in self._offline:
                    # back online: what it has not accepted goes out again at once
                    self._offline.discard(target)
                    for cid in [k for k, t in self._pub_target.items() if t == target]:
                        self._last_pub.pop(cid, None)
                continue
            parsed = self._parse_local(m)
            if parsed is None:
                self.counters["rejected"] += 1
                continue
            topic, data = parsed
            if topic.startswith("evt/cmd/"):
                await self._fast_status(m.payload)
                status, cid = data.get("status"), data.get("id")
                if data.get("by") == "gateway" or not isinstance(cid, str):
                    continue  # our own status coming back
                if status == "accepted":
                    changes.append((cid, "accepted", None, None))
                elif status in FINAL:
                    changes.append((cid, str(status), 3, None))  # the target published it
            else:
                thing = topic.split("/")[1]
                if not _NAME.match(thing):
                    self.counters["rejected"] += 1
                    continue
                if await self._db(self.store.report, thing, data) is not None:
                    self.counters["reports"] += 1
        if changes:
            await self._db(self.store.update, changes)
        for client, m in batch:
            if m.qos and client.connected:
                client.ack(m.pid)

    async def _deliver(self, client: MQTTClient) -> float | None:
        """One pass: apply what came in, then publish what is due; seconds until the next
        redelivery or deadline (None: nothing pending)."""
        if self._local_in:
            await self._take_local()
        clock = self.clock
        cmds = await self._db(self.store.open_commands)
        self.open_commands = sum(1 for c in cmds if c.state not in FINAL)
        changes: list[tuple[str, str | None, int | None, str | None]] = []
        futs: list[asyncio.Future[None]] = []
        due: float | None = None
        now = clock.monotonic()

        async def pub(topic: str, payload: bytes, retain: bool = False) -> None:
            fut = await client.publish_nowait(topic, payload, 1, retain)
            if fut is not None:
                futs.append(fut)

        for c in cmds:
            if c.state in FINAL:
                if c.sent_rank < 3:
                    await pub(f"evt/cmd/{c.target}", self._status(c.id, c.target, c.state, c.error))
                    changes.append((c.id, None, 3, None))
                continue
            left, why = c.held.remaining(clock)
            if left <= 0 and c.state != "accepted":
                self.counters["commands_expired"] += 1
                log.info("command %s for %s expired before its target took it: %s", c.id, c.target, why)
                await pub(f"evt/cmd/{c.target}", self._status(c.id, c.target, "expired", why))
                changes.append((c.id, "expired", 3, why))
                continue
            if c.sent_rank < 1:
                await pub(f"evt/cmd/{c.target}", self._status(c.id, c.target, "delivered", None))
                changes.append((c.id, None, 1, None))
            if c.state == "accepted":
                continue
            if c.target not in self._known and self._unknown_is_final():
                err = f"unknown target {c.target!r}: nothing announced state/{c.target} on the local broker"
                log.warning("command %s: %s", c.id, err)
                await pub(f"evt/cmd/{c.target}", self._status(c.id, c.target, "rejected", err))
                changes.append((c.id, "rejected", 3, err))
                continue
            last = self._last_pub.get(c.id)
            if last is not None and c.target in self._offline:
                # published once already: the broker queues it for an offline target's
                # session; copies every few seconds would only fill that queue
                if left != float("inf"):
                    due = left / 1000 if due is None else min(due, left / 1000)
                continue
            if last is None or now - last >= self.redeliver:
                ttl = None if left == float("inf") else int(left)
                await pub(f"cmd/{c.target}/{c.name}", _encode(
                    source=f"/{self.node}/gateway", type=COMMAND_TYPE, id=c.id, subject=c.target,
                    data=command_data(c.name, c.args, ttl, clock)))
                self._last_pub[c.id] = now
                self._pub_target[c.id] = c.target
                self.counters["commands_published"] += 1
                if c.state == "held":
                    changes.append((c.id, "published", None, None))
                last = now
            nxt = last + self.redeliver - now
            if left != float("inf"):
                nxt = min(nxt, left / 1000)
            due = nxt if due is None else min(due, nxt)
        things = await self._db(self.store.things, not self._republish_all)
        published, reported = [], []
        for t in things:
            if t.desired is not None and (self._republish_all or not t.desired_published or not t.report_sent):
                if self._republish_all or not t.desired_published:
                    await pub(f"shadow/{t.thing}/desired",
                              _encode({"version": t.desired_version, "desired": t.desired}), retain=True)
                await pub(f"shadow/{t.thing}/delta",
                          _encode({"version": t.desired_version, "delta": t.delta}), retain=True)
                published.append((t.thing, t.desired_version))
            if not t.report_sent and t.reported is not None:
                body = {"thing": t.thing, "epoch": self.store.epoch, "version": t.reported_version,
                        "reported": t.reported}
                await pub(f"evt/shadow/{t.thing}", _encode(
                    source=f"/{self.node}/gateway", type="io.edgeferry.shadow.reported", subject=t.thing,
                    data=body))
                reported.append((t.thing, t.reported_version))
        self._republish_all = False
        waiting = {c.id for c in cmds if c.state in ("held", "published")}
        for cid in [k for k in self._last_pub if k not in waiting]:
            del self._last_pub[cid]
            self._pub_target.pop(cid, None)
        if futs:
            await asyncio.gather(*futs)  # the local broker has them: now record it
        if changes:
            await self._db(self.store.update, changes)
        if published or reported:
            await self._db(self.store.mark_things, published, reported)
        return due if due is None else max(0.01, due)

    async def _fast_status(self, payload: bytes) -> None:
        """Send a status straight to the cloud as well (``ef/<node>/down/status``, QoS 0):
        the reply need not wait for the uplink's group commit. The events lane still
        carries every status (at least once, in order); applying one twice changes nothing."""
        cloud = self._cloud
        if cloud is None or not cloud.connected or not self.cloud_up or not self._fast:
            return
        try:
            async with asyncio.timeout(1.0):  # a congested cloud link: the events lane has it
                await cloud.publish_nowait(down_topic(self.node, "status"), payload, 0)
        except (ConnectionLost, TimeoutError):
            return
        self.counters["statuses_fast"] += 1

    def _unknown_is_final(self) -> bool:
        since = self._local_since
        grace = max(1.0, UNKNOWN_GRACE * self.redeliver)
        return since is not None and time.monotonic() - since >= grace

    def _status(self, cid: str, target: str, status: str, error: str | None) -> bytes:
        data = status_data(cid, status, "gateway", error=error, clock_wall=time.time())
        return _encode(source=f"/{self.node}/gateway", type=STATUS_TYPE, subject=target, data=data)

    def status(self) -> dict[str, Any]:
        return {"cloud": "up" if self.cloud_up else "down", "local": "up" if self.local_up else "down",
                "open_commands": self.open_commands, "counters": dict(self.counters)}
