"""A service's connections to its broker, kept up for as long as the service runs.

A :class:`Link` owns two MQTT clients (one client is one connection; a reconnect makes a
new one). The *session* client holds the persistent QoS 1 session, the subscriptions, the
will and the retained ``online`` state: it receives. The *publisher* client, a clean
session beside it (client id ``<id>-pub``), carries everything the service publishes.
Handlers publish while the session client may have stopped reading (``max_pending``
messages in hand): on one connection their PUBACKs would queue behind the deliveries it
is not reading, and a backlog larger than ``max_pending`` would never move again.

Each client has one :class:`~edge.backoff.Backoff` for the life of the link (capped
exponential, full jitter; see edge/backoff.py): after a drop it waits ``next()`` before
connecting again, failed connects wait longer each time, and only a connection that
stayed up ``stable`` seconds (10 s) starts the next outage from the short delays again.
Two services started with one client id therefore do not knock each other off at
round-trip speed. The session client is made current *before* subscribing (a persistent
session's messages may arrive before the SUBACK). A subscription the broker refuses
(SUBACK 0x80, e.g. denied by its ACL) raises :class:`SubscriptionRefused`: the service
stops, and ``edgeferry service run`` exits with status 1 and one line naming the filter.
:meth:`Link.send` publishes through drops: it waits for the next publisher connection and
sends again (the same bytes, so the same event id). A password file (``--password-file``,
:attr:`BrokerURL.password_file`) is read again at every connect, like the TLS files, so a
rotated password is used at the next reconnect without a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from edge._client import Client, ClientFactory
from edge._url import _redact
from edge.backoff import Backoff
from edge.errors import ConnectError, ConnectionLost, ServiceError, SubscriptionRefused
from edge.mqtt import BrokerURL, Message, MQTTClient, Will

__all__ = ["Link"]

log = logging.getLogger("edge.service")

BACKOFF_INITIAL = 0.2  # seconds: the first delay's ceiling
BACKOFF_CAP = 5.0  # seconds: the largest delay (stable after 2 * cap = 10 s)


class Link:
    def __init__(
        self,
        *,
        name: str,
        broker: str | BrokerURL | ClientFactory | None,
        client_id: str,
        keepalive: float,
        max_inflight: int,
        connect_timeout: float,
        filters: list[str],
        on_message: Callable[[Client, Message], None],
        on_new_client: Callable[[Client], None],
        on_online: Callable[[], None],
        counters: dict[str, int],
    ) -> None:
        if broker is None:
            raise ServiceError(f"service {name!r} has no broker (pass broker= or --broker)")
        self.name = name
        self.broker = broker
        self.client_id = client_id
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.filters = filters
        self.on_message = on_message
        self.on_new_client = on_new_client
        self.on_online = on_online
        self.counters = counters
        self.client: Client | None = None  # the session client (receives)
        self.pub: Client | None = None  # the publisher client
        self.connected = asyncio.Event()  # the session is subscribed and online
        self.pub_ready = asyncio.Event()
        self.closing = False
        self.state_topic = f"state/{name}"
        # one backoff per client for the life of the link: kept across drops and failures
        self.backoff = {p: Backoff(BACKOFF_INITIAL, BACKOFF_CAP) for p in (False, True)}

    @property
    def label(self) -> str:
        b = self.broker
        if isinstance(b, str):
            return _redact(b)  # never a password in a log line
        return str(b) if isinstance(b, BrokerURL) else type(b).__name__

    def _make_client(self, publisher: bool) -> Client:
        kw: dict[str, Any] = dict(
            clean_session=publisher,
            keepalive=self.keepalive,
            max_inflight=self.max_inflight,
        )
        if not publisher:
            kw["will"] = Will(self.state_topic, b"offline", 1, True)
        client_id = f"{self.client_id}-pub" if publisher else self.client_id
        b = self.broker
        if isinstance(b, str | BrokerURL):
            connect_timeout = min(self.connect_timeout, 10.0)
            client: Client = MQTTClient(b, client_id, connect_timeout=connect_timeout, **kw)
        else:  # an edge.testing.MemoryBroker, or anything with the same client() factory
            client = b.client(client_id, **kw)
        if not publisher:
            client.on_message = functools.partial(self.on_message, client)
        return client

    async def _connect(self, publisher: bool, deadline: float | None) -> Client:
        backoff = self.backoff[publisher]
        while True:
            client = self._make_client(publisher)
            try:
                await client.connect()
                backoff.connected()
                return client
            except ConnectError as e:
                if self.closing or (deadline is not None and time.monotonic() >= deadline):
                    raise
                delay = backoff.next()
                log.warning(
                    "service %s: cannot connect (%s); retrying in %.1f s", self.name, e, delay
                )
                await asyncio.sleep(delay)

    async def open(self, give_up_after: float | None) -> None:
        """Connect both clients (retrying with backoff for ``give_up_after`` seconds, None:
        forever), subscribe, and publish ``online``."""
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        await self._open_publisher(deadline)
        await self._open_session(deadline)

    async def _open_session(self, deadline: float | None) -> None:
        client = await self._connect(False, deadline)
        self.client = client
        self.on_new_client(client)
        granted = await client.subscribe([(f, 1) for f in self.filters])
        refused = [f for f, code in zip(self.filters, granted, strict=False) if code == 0x80]
        if refused:
            raise SubscriptionRefused(refused, f"service {self.name!r}: the broker")
        await client.publish(self.state_topic, b"online", 1, True)
        self.connected.set()
        self.on_online()

    async def _open_publisher(self, deadline: float | None) -> None:
        self.pub = await self._connect(True, deadline)
        self.pub_ready.set()

    async def supervise(self) -> None:
        """Reconnect either client whenever its connection drops, until :meth:`close`."""
        await asyncio.gather(
            self._keep_up("", self.backoff[False], lambda: self.client,
                          self._session_dropped, self._open_session),
            self._keep_up("publisher ", self.backoff[True], lambda: self.pub,
                          self.pub_ready.clear, self._open_publisher),
        )

    def _session_dropped(self) -> None:
        self.connected.clear()
        self.counters["reconnects"] += 1

    async def _keep_up(
        self,
        label: str,
        backoff: Backoff,
        current: Callable[[], Client | None],
        dropped: Callable[[], None],
        reopen: Callable[[float | None], Awaitable[None]],
    ) -> None:
        while not self.closing:
            client = current()
            assert client is not None  # opened before supervising
            try:
                await asyncio.shield(client.closed)
            except ConnectionLost as e:
                if self.closing:
                    return
                dropped()
                # never at once: the drop may be another client taking over our client id
                delay = backoff.next()
                log.warning(
                    "service %s: %s%s; reconnecting in %.1f s", self.name, label, e, delay
                )
                await asyncio.sleep(delay)
            if self.closing:
                return
            try:
                await reopen(None)
            except SubscriptionRefused:
                raise  # the service cannot run without it: it stops
            except (ConnectionLost, ConnectError) as e:
                # the client it made is closed: the next turn counts the drop and waits
                log.warning("service %s: %sreconnect failed: %s", self.name, label, e)

    async def send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish on the publisher connection and wait for the acknowledgement; through a
        drop, publish again on the next connection."""
        while True:
            pub = self.pub
            if pub is None or not pub.connected:
                if self.closing:
                    raise ServiceError(f"service {self.name!r} is not running")
                self.pub_ready.clear()  # set again once a new publisher is connected
                await self.pub_ready.wait()
                continue
            try:
                await pub.publish(topic, payload, qos, retain)
                return
            except ConnectionLost:
                if self.closing:
                    raise
                continue

    async def close(self, *, offline: bool = True) -> None:
        """Publish ``offline`` (a clean stop; the will covers the rest) and disconnect."""
        self.closing = True
        self.pub_ready.set()  # senders waiting for a connection see the close
        pub, self.pub = self.pub, None
        if pub is not None:
            await pub.close()
        client = self.client
        if client is None:
            return
        if offline and client.connected:
            try:
                async with asyncio.timeout(2.0):
                    await client.publish(self.state_topic, b"offline", 1, True)
            except (TimeoutError, ConnectionLost):
                pass
        await client.close()
