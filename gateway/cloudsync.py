"""Cloud-side downlink sync, run inside ingest: offers each node its pending commands and
full desired state whenever its gateway says hello, and again while they stay pending.

It has its own clean-session connection to the cloud broker (``<ingest id>-sync``) and
its own connection to the cloud database (:class:`gateway.cloudstate.CloudState`), used
from one thread. It subscribes to ``ef/+/down/hello`` and ``ef/+/down/state`` and
announces itself on ``ef/_sync/hello`` after each connection, so that gateways that are
online say hello again (after an ingest restart, or a cloud broker that lost everything).

Nothing here depends on the cloud broker keeping anything for an offline site: the
answer to a hello comes from the database (docs/commands.md, docs/shadow.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.errors import ConnectionLost
from edge.mqtt import BrokerURL, Message, MQTTClient
from gateway.cloudstate import CloudState
from gateway.settings import UrlRing
from gateway.topics import SYNC_HELLO, cmd_topic, desired_topic, down_topic

__all__ = ["CloudSync", "REOFFER"]

log = logging.getLogger("edgeferry.cloudsync")

REOFFER = 5.0
"""Seconds after which a command still queued is offered again to an online node."""

_DOWN = re.compile(r"^ef/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/down/(hello|state|status)$")


class CloudSync:
    """``await CloudSync(cloud_url, state_path, client_id).run(stop)``."""

    def __init__(self, cloud: str | tuple[str, ...], state_path: str, client_id: str, *, keepalive: float = 10.0,
                 backoff_max: float = 5.0, reoffer: float = REOFFER, tls: Any = None,
                 password_file: str | None = None) -> None:
        self.tls = tls
        self.password_file = password_file
        self.cloud = cloud if isinstance(cloud, str) else cloud[0]
        self._clouds = UrlRing((cloud,) if isinstance(cloud, str) else cloud)  # tried in turn
        self.state_path = state_path
        self.client_id = client_id
        self.keepalive = keepalive
        self.backoff_max = backoff_max
        self.reoffer = reoffer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cloudsync")
        self._state: CloudState | None = None
        self._client: MQTTClient | None = None
        self._online: set[str] = set()
        self._versions: dict[str, dict[str, int]] = {}  # node -> thing -> desired version it has
        self._hellos: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._statuses: list[tuple[str, str, bytes]] = []
        self._statuses_wake = asyncio.Event()
        self.counters = {"hellos": 0, "offered": 0, "desired_sent": 0, "bad": 0, "statuses_fast": 0}

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        self._state = await self._db(CloudState.open, self.state_path)
        try:
            backoff = Backoff(0.2, self.backoff_max)

            def make() -> MQTTClient:
                self._client = MQTTClient(self._clouds.next(), self.client_id, clean_session=True,
                                          keepalive=self.keepalive, on_message=self._on_message,
                                          tls=self.tls, password_file=self.password_file)
                return self._client

            while not stop.is_set():
                client = await connect_retrying(make, backoff, stop, "cloud broker (sync)", log)
                if client is None:
                    break
                try:
                    await client.subscribe([("ef/+/down/hello", 1), ("ef/+/down/state", 1),
                                            ("ef/+/down/status", 0)])
                    await client.publish(SYNC_HELLO, b"{}", 1)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._answer(client), name="sync-answer")
                        tg.create_task(self._reoffer(client), name="sync-reoffer")
                        tg.create_task(self._apply_statuses(), name="sync-statuses")
                        tg.create_task(self._until(client, stop), name="sync-stop")
                except* ConnectionLost as eg:
                    if not stop.is_set():
                        log.warning("cloud broker (sync): %s", eg.exceptions[0])
                if stop.is_set():
                    if client.connected:
                        await client.close()
                    break
                client.abort()
                await sleep_unless(stop, backoff.next())
        finally:
            if self._client is not None:
                self._client.abort()  # when cancelled (another task failed): no socket left open
            state, self._state = self._state, None
            if state is not None:
                await self._db(state.close)
            self._pool.shutdown(wait=True)

    async def _until(self, client: MQTTClient, stop: asyncio.Event) -> None:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        closed: asyncio.Future[Any] = client.closed
        try:
            await asyncio.wait([waiter, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if client.closed.done():
            client.closed.result()  # raises ConnectionLost
        raise ConnectionLost("stopping")

    def _on_message(self, m: Message) -> None:
        client = self._client
        if m.qos and client is not None:
            client.ack(m.pid)  # hellos are answered from the database; a lost one is resent
        match = _DOWN.match(m.topic)
        if match is None:
            return
        node, what = match.group(1), match.group(2)
        if what == "status":
            # the fast path of a command status (the events lane brings it again)
            self._statuses.append((node, "evt/cmd/", m.payload))
            self._statuses_wake.set()
            return
        if what == "state":
            if m.payload == b"online":
                self._online.add(node)
            else:
                self._online.discard(node)
                self._versions.pop(node, None)
            return
        try:
            hello = json.loads(m.payload)
            if not isinstance(hello, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.counters["bad"] += 1
            log.warning("ignored a malformed hello from %s: %s", node, e)
            return
        self._online.add(node)
        self._hellos.put_nowait((node, hello))

    async def _apply_statuses(self) -> None:
        assert self._state is not None
        while True:
            await self._statuses_wake.wait()
            self._statuses_wake.clear()
            batch, self._statuses = self._statuses, []
            if not batch:
                continue
            try:
                self.counters["statuses_fast"] += await self._db(self._state.apply_records, batch)
            except OSError:
                log.exception("could not apply %d statuses (the events lane brings them again)", len(batch))

    async def _answer(self, client: MQTTClient) -> None:
        while True:
            node, hello = await self._hellos.get()
            self.counters["hellos"] += 1
            try:
                await self._answer_one(client, node, hello)
            except (OSError, ValueError, sqlite3.Error):
                # ingest keeps writing records; the gateway says hello again (no synced)
                log.exception("could not answer the hello of %s", node)

    async def _answer_one(self, client: MQTTClient, node: str, hello: dict[str, Any]) -> None:
        have = hello.get("cmds")
        have_set = {str(x) for x in have} if isinstance(have, list) else set()
        versions = hello.get("shadow")
        versions = versions if isinstance(versions, dict) else {}
        assert self._state is not None
        offers = await self._db(self._state.offers_for, node, have_set)
        desired = await self._db(self._state.desired_for, node)
        for o in offers:
            await self._send_offer(client, node, o)
        sent = {}
        for thing, version, doc in desired:
            sent[thing] = version
            if versions.get(thing) == version:
                continue
            body = json.dumps({"thing": thing, "version": version, "desired": doc}).encode()
            await client.publish(desired_topic(node, thing), body, 1)
            self.counters["desired_sent"] += 1
        self._versions[node] = dict(sent)
        synced = {"commands": [o["id"] for o in offers], "things": sent, "hello": hello.get("n")}
        await client.publish(down_topic(node, "synced"), json.dumps(synced).encode(), 1)
        log.info("answered hello of %s: %d commands, %d desired documents", node, len(offers),
                 sum(1 for t, v in sent.items() if versions.get(t) != v))

    async def _send_offer(self, client: MQTTClient, node: str, o: dict[str, Any]) -> None:
        body = {k: o[k] for k in ("id", "target", "name", "args", "ttl_ms")}
        await client.publish(cmd_topic(node, o["id"]), json.dumps(body).encode(), 1)
        self.counters["offered"] += 1

    async def _reoffer(self, client: MQTTClient) -> None:
        """Offer again, to nodes that are online, what is still queued after ``reoffer`` s
        (an offer lost on the way, a command sent while the CLI could not publish), and
        desired documents newer than what the node was sent."""
        assert self._state is not None
        while True:
            await asyncio.sleep(self.reoffer / 2)
            for node in list(self._online):
                try:
                    offers = await self._db(self._state.offers_for, node, set(), None, None,
                                            time.time() - self.reoffer)
                except (OSError, ValueError, sqlite3.Error):
                    log.exception("could not read the commands of %s", node)
                    continue
                for o in offers:
                    await self._send_offer(client, node, o)
                await self._push_desired(client, node)

    async def _push_desired(self, client: MQTTClient, node: str) -> None:
        assert self._state is not None
        known = self._versions.get(node)
        if known is None:
            return  # not synced yet: its hello answer brings everything
        try:
            versions = await self._db(self._state.desired_versions, node)
        except (OSError, ValueError, sqlite3.Error):
            log.exception("could not read the desired state of %s", node)
            return
        for thing, version in versions.items():
            if known.get(thing, 0) >= version:
                continue
            got = await self._db(self._state.desired_doc, node, thing)
            if got is None:
                continue
            body = json.dumps({"thing": thing, "version": got[0], "desired": got[1]}).encode()
            await client.publish(desired_topic(node, thing), body, 1)
            known[thing] = got[0]
            self.counters["desired_sent"] += 1


async def publish_once(cloud: str | BrokerURL, client_id: str, messages: list[tuple[str, bytes]],
                       limit: float = 5.0) -> None:
    """Connect, publish QoS 1 messages, wait for their acknowledgements, disconnect (CLI)."""
    client = MQTTClient(cloud, client_id, clean_session=True, connect_timeout=limit)
    await client.connect()
    try:
        async with asyncio.timeout(limit):
            for topic, payload in messages:
                await client.publish(topic, payload, 1)
    finally:
        await client.close()
