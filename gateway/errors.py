"""Exceptions raised by :mod:`gateway`.

::

    edge.errors.EdgeferryError       the root of every edgeferry exception (edge/errors.py)
    └── GatewayError
        ├── SettingsError (ValueError)   a flag, YAML key or EDGEFERRY_* variable is not valid
        ├── FrameError (ValueError)      a frame on the wire cannot be decoded
        ├── VersionConflict (ValueError) a cloud state row changed meanwhile (cloudstate.py)
        ├── SinkError (OSError)          ingest cannot write to its sink
        └── StoreError (OSError)         the SQLite store cannot be used
            └── StoreCorrupt             the file is not a usable store (it is moved aside)
"""

from __future__ import annotations

from edge.errors import EdgeferryError


class GatewayError(EdgeferryError):
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
