"""Exceptions raised by :mod:`gateway`.

::

    GatewayError
    ├── SettingsError (ValueError)   a flag, YAML key or EDGEFERRY_* variable is not valid
    ├── FrameError (ValueError)      a frame on the wire cannot be decoded
    ├── SinkError (OSError)          ingest cannot write to its sink
    └── StoreError (OSError)         the SQLite store cannot be used
        └── StoreCorrupt             the file is not a usable store (it is moved aside)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every exception raised by the gateway package."""


class SettingsError(GatewayError, ValueError):
    """A setting (flag, YAML key, environment variable) is not valid."""


class FrameError(GatewayError, ValueError):
    """A frame cannot be decoded: wrong magic, unknown version, truncated or corrupt."""


class SinkError(GatewayError, OSError):
    """Ingest cannot write to its sink."""


class StoreError(GatewayError, OSError):
    """The store cannot be opened or written."""


class StoreCorrupt(StoreError):
    """The store file is not a usable SQLite store."""
