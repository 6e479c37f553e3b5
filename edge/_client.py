"""The interface of one MQTT connection, as the SDK uses it.

:class:`edge.mqtt.MQTTClient` (a real connection) and :class:`edge.testing.MemoryClient`
(the in-memory broker's) both implement :class:`Client`; code that takes either is
annotated with it, so mypy checks that the two stay swappable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from edge.mqtt import Message

__all__ = ["Client", "ClientFactory"]


class Client(Protocol):
    """One MQTT 3.1.1 connection (a reconnect makes a new client).

    ``on_message`` is called synchronously for every PUBLISH received, in order; a QoS 1
    message is acknowledged later with :meth:`ack` or :meth:`ack_many` (``msg.pid``).
    """

    client_id: str
    session_present: bool
    on_message: Callable[[Message], None]

    @property
    def connected(self) -> bool: ...

    @property
    def closed(self) -> asyncio.Future[None]:
        """Completes (with :class:`edge.errors.ConnectionLost`) when the connection ends."""
        ...

    async def connect(self) -> bool:
        """Connect; return whether the broker had a session for this client id."""
        ...

    async def close(self) -> None:
        """Disconnect cleanly (the will is discarded)."""
        ...

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        ...

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]: ...

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None: ...

    async def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None] | None: ...

    async def drain(self) -> None: ...

    def ack(self, pid: int) -> None: ...

    def ack_many(self, pids: list[int]) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ClientFactory(Protocol):
    """What a service accepts as its broker besides a URL: something that makes clients
    (:class:`edge.testing.MemoryBroker`)."""

    def client(self, client_id: str, **kwargs: Any) -> Client:
        """A client with :class:`edge.mqtt.MQTTClient`'s keyword arguments
        (``clean_session``, ``keepalive``, ``will``, ``max_inflight``, ``on_message``)."""
        ...
