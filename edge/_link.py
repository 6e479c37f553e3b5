"""A service's connection to its broker, kept up for as long as the service runs.

One :class:`Link` owns the current MQTT client (one client is one connection; a
reconnect makes a new one): it connects with capped, jittered backoff, makes the new
client current *before* subscribing (a persistent session's messages may arrive before
the SUBACK), subscribes, publishes the retained ``online`` state, and on a drop starts
over at once. :meth:`Link.send` publishes through drops: it waits for the next
connection and sends again (the same bytes, so the same event id).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from edge.backoff import Backoff
from edge.errors import ConnectError, ConnectionLost, ServiceError
from edge.mqtt import BrokerURL, Message, MQTTClient, Will

__all__ = ["Link"]

log = logging.getLogger("edge.service")


class Link:
    def __init__(
        self,
        *,
        name: str,
        broker: Any,
        client_id: str,
        keepalive: float,
        max_inflight: int,
        connect_timeout: float,
        filters: list[str],
        on_message: Callable[[Any, Message], None],
        on_new_client: Callable[[Any], None],
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
        self.client: Any = None
        self.connected = asyncio.Event()
        self.closing = False
        self.state_topic = f"state/{name}"

    @property
    def label(self) -> str:
        b = self.broker
        return str(b) if isinstance(b, str | BrokerURL) else type(b).__name__

    def _make_client(self) -> Any:
        kw: dict[str, Any] = dict(
            clean_session=False,
            keepalive=self.keepalive,
            will=Will(self.state_topic, b"offline", 1, True),
            max_inflight=self.max_inflight,
        )
        b = self.broker
        if isinstance(b, str | BrokerURL):
            connect_timeout = min(self.connect_timeout, 10.0)
            client: Any = MQTTClient(b, self.client_id, connect_timeout=connect_timeout, **kw)
        else:  # an edge.testing.MemoryBroker, or anything with the same client() factory
            client = b.client(self.client_id, **kw)
        client.on_message = functools.partial(self.on_message, client)
        return client

    async def open(self, give_up_after: float | None) -> None:
        """Connect (retrying with backoff for ``give_up_after`` seconds, None: forever),
        subscribe, and publish ``online``."""
        backoff = Backoff(0.2, 5.0)
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            client = self._make_client()
            try:
                await client.connect()
                break
            except ConnectError as e:
                if self.closing or (deadline is not None and time.monotonic() >= deadline):
                    raise
                delay = backoff.next()
                log.warning(
                    "service %s: cannot connect (%s); retrying in %.1f s", self.name, e, delay
                )
                await asyncio.sleep(delay)
        self.client = client
        self.on_new_client(client)
        await client.subscribe([(f, 1) for f in self.filters])
        await client.publish(self.state_topic, b"online", 1, True)
        self.connected.set()
        self.on_online()

    async def supervise(self) -> None:
        """Reconnect whenever the connection drops, until :meth:`close`."""
        while not self.closing:
            try:
                await asyncio.shield(self.client.closed)
            except ConnectionLost as e:
                if self.closing:
                    return
                self.connected.clear()
                self.counters["reconnects"] += 1
                log.warning("service %s: %s; reconnecting", self.name, e)
            try:
                await self.open(None)
            except (ConnectionLost, ConnectError) as e:
                log.warning("service %s: reconnect failed: %s", self.name, e)
                await asyncio.sleep(Backoff(0.2, 5.0).next())

    async def send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the acknowledgement; through a drop, publish again on the
        next connection."""
        while True:
            client = self.client
            if client is None or not client.connected:
                if self.closing:
                    raise ServiceError(f"service {self.name!r} is not running")
                await self.connected.wait()
                continue
            try:
                await client.publish(topic, payload, qos, retain)
                return
            except ConnectionLost:
                if self.closing:
                    raise
                continue

    async def close(self, *, offline: bool = True) -> None:
        """Publish ``offline`` (a clean stop; the will covers the rest) and disconnect."""
        self.closing = True
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
