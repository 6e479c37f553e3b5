"""Broker URLs: :func:`parse_url` and :class:`BrokerURL` (re-exported by :mod:`edge.mqtt`).

Apart from the client so that reading settings does not import asyncio: ``edgeferry
gateway run`` decides from its settings whether to load OpenSSL before asyncio and
uvloop import it (edge/_nossl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from edge._tls import TLSOptions
from edge.errors import ConfigError

__all__ = ["BrokerURL", "parse_url"]


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where a broker is: parsed from ``mqtt://[user[:password]@]host[:port]``;
    ``tls_options`` say how to check it and who we are (for ``mqtts://``)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    tls_options: TLSOptions | None = None
    password_file: str | None = None  # read at every connect; its first line beats ``password``

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for error messages and logs)."""
    head, at, rest = url.rpartition("@")
    scheme, sep, userinfo = head.rpartition("//")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{rest}"


def parse_url(url: str) -> BrokerURL:
    """Parse a broker URL, raising :class:`ConfigError` with one clear line if it is bad."""
    shown = _redact(url) if isinstance(url, str) else url
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"broker URL {shown!r} is not of the form mqtt://HOST:PORT")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ConfigError(f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {shown!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {shown!r} must not have a path or query")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"broker URL {shown!r} has an invalid port") from None
    tls = parts.scheme == "mqtts"
    if port is None:
        port = 8883 if tls else 1883
    if not 0 < port < 65536:
        raise ConfigError(f"broker URL {shown!r} has an invalid port")
    return BrokerURL(
        parts.hostname,
        port,
        tls,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )
