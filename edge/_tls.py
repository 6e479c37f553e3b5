"""TLS and credentials for connections to a broker (docs/clouds.md).

:class:`TLSOptions` says where the files are; :meth:`TLSOptions.context` reads them and
builds an :class:`ssl.SSLContext`. :class:`edge.mqtt.MQTTClient` calls it at every
connect, so a certificate, key or CA file rotated on disk is used at the next reconnect
without a restart. A password comes from a file (``--password-file``), read at every
connect too, never from the command line.

Verification is never turned off: the broker's certificate must chain to ``ca_file``
(else the system store) and be valid for the host name (or ``server_name``). A failed
handshake becomes one line naming its kind (:func:`explain`), which the gateway shows
as the link's state.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    import ssl

__all__ = ["TLSOptions", "explain", "read_secret"]


def _check_private(path: str, what: str, error: type[Exception]) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{what} {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}): "
                    f"run chmod 600 {path}")


def read_secret(path: str, what: str = "password file", error: type[Exception] = ConnectError) -> str:
    """The first line of a file that only its owner may read (a password, a token)."""
    _check_private(path, what, error)
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    return line.rstrip("\r\n")


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """Where the TLS files are and how to check the broker. Every field is optional:
    ``TLSOptions()`` trusts the system store and checks the URL's host name."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    alpn: tuple[str, ...] = ()

    def context(self, error: type[Exception] = ConnectError) -> ssl.SSLContext:
        """Read the files now and build a client context (verification on, TLS 1.2+).
        A missing or bad file raises ``error`` with one line."""
        import ssl  # only when TLS is used: it costs memory

        try:
            ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file \
                else ssl.create_default_context()
        except (OSError, ssl.SSLError) as e:
            raise error(f"cannot load CA file {self.ca_file}: {_short(e)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.key_file:
            _check_private(self.key_file, "key file", error)
        if self.cert_file:  # a PEM holding both certificate and key needs no key_file
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                raise error(f"cannot load client certificate {self.cert_file} / key "
                            f"{self.key_file or self.cert_file}: {_short(e)}") from None
        elif self.key_file:
            raise error("--key-file needs --cert-file")
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        return ctx

    def validate(self) -> None:
        """Check the files at start-up: ConfigError with one line when they are unusable."""
        self.context(ConfigError)


def _short(e: BaseException) -> str:
    s = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
    return str(s)


# The kind of a failed connection, from the text of its error, and the line to show.
_KINDS: list[tuple[str, tuple[str, ...], str]] = [
    ("tls_expired", ("certificate has expired",),
     "TLS: the broker's certificate has expired (or this clock is wrong)"),
    ("tls_not_yet_valid", ("certificate is not yet valid",),
     "TLS: the broker's certificate is not yet valid (is this clock set?)"),
    ("tls_hostname", ("hostname mismatch", "ip address mismatch"),
     "TLS: the broker's certificate is not valid for this server name (hostname mismatch; "
     "see --tls-server-name)"),
    ("tls_unknown_ca", ("unable to get local issuer certificate", "self-signed certificate",
                        "self signed certificate", "unable to get issuer certificate",
                        "unable to verify the first certificate"),
     "TLS: the broker's certificate is not signed by a trusted CA (unknown CA; see --ca-file)"),
    ("tls_cert_refused", ("alert unknown ca", "alert bad certificate", "alert certificate expired",
                          "alert certificate revoked", "alert certificate unknown",
                          "certificate required", "alert unsupported certificate",
                          "alert access denied", "alert handshake failure"),
     "TLS: the broker refused our client certificate"),
    ("files", ("cannot load", "key file", "cannot read", "needs --cert-file"), ""),
    ("tls_error", ("[ssl", "ssl:", "tls"), ""),
    ("refused", ("refused the connection",), ""),
    ("timeout", ("no connack", "timed out"), ""),
]


def explain(error: BaseException | str) -> tuple[str, str]:
    """``(kind, line)`` for a failed connection: kinds ``tls_expired``,
    ``tls_not_yet_valid``, ``tls_hostname``, ``tls_unknown_ca``, ``tls_cert_refused``,
    ``files``, ``tls_error``, ``refused``, ``timeout`` or ``unreachable``. The line
    names the kind and keeps the library's own words after it (no credentials are ever
    in them: URLs are printed without their password)."""
    text = str(error)
    low = text.lower()
    for kind, needles, line in _KINDS:
        if any(n in low for n in needles):
            if kind == "tls_cert_refused":
                alert = next((n for n in needles if n in low), "")
                line = f"{line} ({alert.removeprefix('alert ')})"
            return kind, f"{line}: {text}" if line else text
    return "unreachable", text
