"""Exceptions raised by :mod:`edge`.

::

    EdgeError
    ├── ConfigError (ValueError)            bad URL, flag or settings value
    └── MQTTError
        ├── ProtocolError (ValueError)      the peer sent something MQTT 3.1.1 forbids
        ├── ConnectError (ConnectionError)  TCP connect failed or CONNACK refused
        └── ConnectionLost (ConnectionError) the connection ended (EOF, reset, keepalive)
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every exception raised by the edge package."""


class ConfigError(EdgeError, ValueError):
    """A URL, flag or settings value is not valid."""


class MQTTError(EdgeError):
    """Something went wrong on an MQTT connection."""


class ProtocolError(MQTTError, ValueError):
    """The peer broke the MQTT 3.1.1 protocol."""


class ConnectError(MQTTError, ConnectionError):
    """The connection could not be opened, or the broker refused it."""

    def __init__(self, message: str, return_code: int | None = None) -> None:
        super().__init__(message)
        self.return_code = return_code


class ConnectionLost(MQTTError, ConnectionError):
    """The connection ended: EOF, reset, or no answer within the keepalive bound."""
