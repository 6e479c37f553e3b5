"""A stand-in for :mod:`ssl` in a process that has no TLS to do.

``import ssl`` loads OpenSSL (libssl, libcrypto and the ``_ssl`` module): about 4.5 MB
of resident memory in a gateway whose whole budget is 30 MB (docs/benchmarks.md). asyncio
and uvloop import it whether or not a connection will ever use it; uvloop refuses to load
without it and binds a few of its names at import.

:func:`without_ssl` puts this module in ``sys.modules["ssl"]`` before asyncio and uvloop
are imported, in a process whose settings name no ``mqtts://`` broker (``edgeferry
gateway run``, see gateway/main.py). It offers the names they read at import; anything
that tries to use TLS through it (a context, a memory BIO, any other name) gets
:class:`TLSUnavailable`, one line that says why, instead of a connection that half works.
A process that needs TLS never installs it and loads the real module as before.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from edge.errors import ConfigError

__all__ = ["TLSUnavailable", "is_stub", "without_ssl"]

STUB = True  # how is_stub() tells this module from the real ssl

_WHY = ("TLS is not available in this process: it was started without an mqtts:// broker URL, "
        "so OpenSSL was not loaded (edge/_nossl.py)")


class TLSUnavailable(ConfigError):
    """Something asked for TLS in a process started without it."""


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TLSUnavailable(_WHY)


class _Refused:
    """A class that refuses to be made (``SSLContext``, ``MemoryBIO``)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        _refuse()


class SSLContext(_Refused):
    pass


class MemoryBIO(_Refused):
    pass


class SSLObject(_Refused):
    pass


class SSLSocket(_Refused):
    pass


create_default_context = _refuse


# The exception classes, shaped like the real ones; nothing here ever raises them.
class SSLError(OSError):
    pass


class SSLWantReadError(SSLError):
    pass


class SSLWantWriteError(SSLError):
    pass


class SSLSyscallError(SSLError):
    pass


class SSLZeroReturnError(SSLError):
    pass


class SSLEOFError(SSLError):
    pass


class SSLCertVerificationError(SSLError, ValueError):
    pass


CertificateError = SSLCertVerificationError

# the values of OpenSSL's SSL_ERROR_* (uvloop copies them into C ints at import)
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_SYSCALL = 5


class _NoSuchName(TLSUnavailable, AttributeError):
    """Any other name of ssl: still TLSUnavailable, and an AttributeError, so that a
    ``hasattr(ssl, ...)`` probe answers False instead of raising."""


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's own probes (__path__, __file__ ...)
        raise AttributeError(name)
    raise _NoSuchName(f"ssl.{name}: {_WHY}")


def is_stub(module: Any) -> bool:
    """True for this stand-in (in ``sys.modules["ssl"]``)."""
    return getattr(module, "STUB", False) is True and getattr(module, "__name__", "") == __name__


def without_ssl() -> bool:
    """Put the stand-in in ``sys.modules["ssl"]`` unless :mod:`ssl` (or asyncio, which
    imports it) is already loaded; True when it is in place."""
    current = sys.modules.get("ssl")
    if current is not None:
        return is_stub(current)
    if "asyncio" in sys.modules or "uvloop" in sys.modules:
        return False  # they bound the real module already, or None: leave them as they are
    sys.modules["ssl"] = sys.modules[__name__]
    return True
