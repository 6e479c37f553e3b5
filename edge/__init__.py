"""edge: the service SDK and runtime for edgeferry devices, and the MQTT client it runs on.

``import edge`` stays light (no pydantic, no asyncio): the gateway's resident memory
matters. The client (:class:`MQTTClient` and the names of :mod:`edge.mqtt`),
:class:`Service` and the event helpers load on first use, so that ``edgeferry gateway
run`` reads its settings before asyncio is imported (see edge/_nossl.py).
"""

from typing import TYPE_CHECKING, Any

from edge.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    EdgeError,
    EdgeferryError,
    EnvelopeError,
    HandlerSignatureError,
    MQTTError,
    ProtocolError,
    Reject,
    ServiceError,
    SubscriptionRefused,
    TopicNotAllowed,
)

if TYPE_CHECKING:
    from edge.events import Event
    from edge.mqtt import BrokerURL, Message, MQTTClient, Will, parse_url
    from edge.service import Service, current_event

__all__ = [
    "BrokerURL",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "EdgeError",
    "EdgeferryError",
    "EnvelopeError",
    "Event",
    "HandlerSignatureError",
    "Message",
    "MQTTClient",
    "MQTTError",
    "ProtocolError",
    "Reject",
    "Service",
    "ServiceError",
    "SubscriptionRefused",
    "TopicNotAllowed",
    "Will",
    "current_event",
    "parse_url",
]

_LAZY = {"Service": "edge.service", "current_event": "edge.service", "Event": "edge.events",
         "BrokerURL": "edge.mqtt", "Message": "edge.mqtt", "MQTTClient": "edge.mqtt",
         "Will": "edge.mqtt", "parse_url": "edge.mqtt"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
