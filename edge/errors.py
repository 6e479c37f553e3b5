"""Exceptions raised by :mod:`edge`, and the root of every edgeferry exception.

Each package has its own root under :class:`EdgeferryError`, and each exception also
inherits the nearest builtin, so ``except ValueError`` and ``except OSError`` work too::

    EdgeferryError                          anything edgeferry raises on purpose
    ├── EdgeError                           edge (below)
    ├── gateway.errors.GatewayError         gateway (its tree: gateway/errors.py)
    └── firmware_sim.errors.SimError        the simulator (firmware_sim/errors.py)

    EdgeError
    ├── ConfigError (ValueError)            bad URL, flag or settings value
    ├── EnvelopeError (ValueError)          a payload is not UTF-8, JSON or a valid envelope
    ├── ServiceError                        a Service was declared or used wrongly
    │   ├── HandlerSignatureError (TypeError)  a handler's parameters do not fit its topic
    │   └── TopicNotAllowed (PermissionError)  a publish outside the topics the service declares
    ├── Reject                              raised by a handler: dead-letter now, no retry
    ├── PayloadTypeError (ValueError)       a plain JSON payload of the wrong kind
    ├── CommandError (ValueError)           a command or status breaks the wire format
    └── MQTTError
        ├── ProtocolError (ValueError)      the peer sent something MQTT 3.1.1 forbids
        ├── ConnectError (ConnectionError)  TCP connect failed or CONNACK refused
        │   └── SubscriptionRefused         the broker refused a subscription (SUBACK 0x80)
        └── ConnectionLost (ConnectionError) the connection ended (EOF, reset, keepalive)
"""

from __future__ import annotations


class EdgeferryError(Exception):
    """Root of every exception edgeferry raises on purpose (edge, gateway, firmware_sim)."""


class EdgeError(EdgeferryError):
    """Root of every exception raised by the edge package."""


class ConfigError(EdgeError, ValueError):
    """A URL, flag or settings value is not valid."""


class EnvelopeError(EdgeError, ValueError):
    """A payload is not UTF-8, not JSON, or not a valid CloudEvents envelope.

    ``reason`` is the dead-letter reason: ``not_utf8``, ``invalid_json`` or ``bad_envelope``.
    """

    def __init__(self, message: str, reason: str = "bad_envelope") -> None:
        super().__init__(message)
        self.reason = reason


class ServiceError(EdgeError):
    """A Service was declared or used wrongly (e.g. entered twice, unknown module)."""


class HandlerSignatureError(ServiceError, TypeError):
    """A handler's parameters do not fit its topic pattern."""


class TopicNotAllowed(ServiceError, PermissionError):
    """A service published to a topic it does not declare, which the broker's ACL
    (written by ``edgeferry provision``) would drop without telling an MQTT 3.1.1 client."""


class Reject(EdgeError):
    """Raise in a handler to dead-letter the message at once, without retrying.

    ``reason`` is the dead-letter reason: ``rejected`` by default; ``schema`` when the
    handler found the data does not fit (see docs/events.md for the reasons).
    """

    def __init__(self, message: str = "", reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason


class MQTTError(EdgeError):
    """Something went wrong on an MQTT connection."""


class ProtocolError(MQTTError, ValueError):
    """The peer broke the MQTT 3.1.1 protocol."""


class ConnectError(MQTTError, ConnectionError):
    """The connection could not be opened, or the broker refused it."""

    def __init__(self, message: str, return_code: int | None = None) -> None:
        super().__init__(message)
        self.return_code = return_code


class SubscriptionRefused(ConnectError):
    """The broker refused one or more subscriptions (SUBACK return code 0x80): a client
    that goes on would run and receive nothing on them. ``filters`` lists the refused ones."""

    def __init__(self, filters: list[str], broker: str = "the broker") -> None:
        super().__init__(f"{broker} refused the subscription to {', '.join(map(repr, filters))}")
        self.filters = list(filters)


class ConnectionLost(MQTTError, ConnectionError):
    """The connection ended: EOF, reset, or no answer within the keepalive bound."""


class PayloadTypeError(EdgeError, ValueError):
    """A plain JSON value of the wrong kind for a handler's ``dict``/``list``/``str``
    annotation (the counterpart of pydantic's ValidationError)."""


class CommandError(EdgeError, ValueError):
    """A command or status message that does not follow the wire format."""
