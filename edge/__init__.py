"""edge: the service SDK and runtime for edgeferry devices, and the MQTT client it runs on."""

from edge.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    EdgeError,
    MQTTError,
    ProtocolError,
)
from edge.mqtt import BrokerURL, Message, MQTTClient, Will, parse_url

__all__ = [
    "BrokerURL",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "EdgeError",
    "Message",
    "MQTTClient",
    "MQTTError",
    "ProtocolError",
    "Will",
    "parse_url",
]
