"""Exceptions raised by :mod:`firmware_sim`.

::

    edge.errors.EdgeferryError            the root of every edgeferry exception (edge/errors.py)
    └── SimError
        ├── ProfileError (ValueError)     a profile file, flag or fault spec is not valid
        ├── ManifestError (ValueError)    a manifest file cannot be read or is not a manifest
        └── ResourceLimitError (OSError)  the process cannot open enough files for the fleet
"""

from __future__ import annotations

from edge.errors import EdgeferryError


class SimError(EdgeferryError):
    """Root of every exception raised by the simulator."""


class ProfileError(SimError, ValueError):
    """A profile (YAML file, flag, ``--fault`` spec) is not valid."""


class ManifestError(SimError, ValueError):
    """A manifest file is missing, unreadable or not a simulator manifest."""


class ResourceLimitError(SimError, OSError):
    """The open-file limit is too low for one connection per device."""
