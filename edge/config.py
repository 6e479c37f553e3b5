"""Settings from flags, ``EDGEFERRY_*`` environment variables and one YAML file.

Each long-running command declares its settings once, as a list of :class:`Option`.
The same list builds the command-line parser (``--max-store-bytes``), names the
environment variable (``EDGEFERRY_MAX_STORE_BYTES``) and the YAML key
(``max_store_bytes``, at the top level of the file or in the command's section, e.g.
``gateway:``). Precedence: flag, then environment, then the command's YAML section,
then the YAML top level, then the default.

This module is deliberately light (argparse, no pydantic): it runs in the gateway,
whose resident memory is a product feature on a Raspberry Pi.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from edge._tls import TLSOptions, read_secret
from edge._url import BrokerURL, parse_url
from edge.errors import ConfigError

__all__ = ["Option", "TLS_FILE_OPTIONS", "TLS_OPTIONS", "load_settings", "parse_duration", "parse_size", "read_yaml",
           "tls_from_settings"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
          "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DUR_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_size(value: object) -> int:
    """``256MiB``, ``64kB``, ``1000`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size (e.g. 256MiB, 64kB, 1000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_duration(value: object) -> float:
    """``30s``, ``250ms``, ``24h``, ``2.5`` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (e.g. 250ms, 30s, 24h)")
    return float(m.group(1)) * _DUR_UNITS[m.group(2)]


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def _parse_list(value: object) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    s = str(value).strip()
    if s.startswith("["):
        return [str(v) for v in json.loads(s)]
    return [v.strip() for v in s.split(",") if v.strip()]


def _parse_url(value: object) -> str:
    parse_url(str(value))
    return str(value)


_KINDS: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "size": parse_size,
    "duration": parse_duration,
    "bool": _parse_bool,
    "list": _parse_list,
    "url": _parse_url,
    "raw": lambda v: v,
}


@dataclass(frozen=True)
class Option:
    """One setting. ``kind`` is one of str, int, float, size, duration, bool, list, url,
    raw; a ``list`` flag may be repeated. ``parse`` overrides the kind's converter."""

    name: str
    kind: str
    default: Any
    help: str
    required: bool = False
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "EDGEFERRY_" + self.name.upper()

    def convert(self, value: Any, origin: str) -> Any:
        try:
            out = (self.parse or _KINDS[self.kind])(value)
        except (ValueError, TypeError, ConfigError, json.JSONDecodeError) as e:
            raise ConfigError(f"{origin}: {e}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{origin}: {value!r} is not one of {', '.join(self.choices)}")
        return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, exit 2
        raise ConfigError(f"{self.prog}: {message}")


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's help formatter at the width it would pick itself (COLUMNS, else the
    terminal, else 80), found without ``shutil.get_terminal_size``: shutil imports bz2 and
    lzma, 0.8 MB of the gateway's resident memory for a help text it never prints."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return argparse.RawDescriptionHelpFormatter(prog, width=(columns or 80) - 2)


def build_parser(prog: str, description: str, options: Sequence[Option], epilog: str = "") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description, epilog=epilog, formatter_class=_formatter)
    p.add_argument("--config", metavar="FILE", help="YAML settings file (env: EDGEFERRY_CONFIG)")
    for opt in options:
        extra = f" (env: {opt.env}; yaml: {opt.name}"
        extra += f"; default: {opt.default})" if opt.default not in (None, [], "") else ")"
        kwargs: dict[str, Any] = {"dest": opt.name, "default": None, "help": opt.help + extra,
                                  "metavar": opt.metavar or opt.name.upper()}
        if opt.kind == "list":
            kwargs["action"] = "append"
        p.add_argument(opt.flag, **kwargs)
    return p


def load_settings(
    options: Sequence[Option],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    section: str,
    epilog: str = "",
    environ: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Resolve every option; raise :class:`ConfigError` with one line on bad input."""
    env = os.environ if environ is None else environ
    args = build_parser(prog, description, options, epilog).parse_args(list(argv))
    file_values: dict[str, Any] = {}
    section_keys: set[str] = set()
    config = args.config or env.get("EDGEFERRY_CONFIG")
    if config:
        file_values, section_keys = _read_yaml(config, section)
    known = {o.name for o in options}
    out: dict[str, Any] = {}
    for opt in options:
        cli = getattr(args, opt.name)
        if cli is not None:
            out[opt.name] = opt.convert(cli, opt.flag)
        elif opt.env in env:
            out[opt.name] = opt.convert(env[opt.env], opt.env)
        elif opt.name in file_values:
            out[opt.name] = opt.convert(file_values[opt.name], f"{config}: {opt.name}")
        elif opt.required:
            raise ConfigError(f"{prog}: {opt.flag} is required (or {opt.env}, or '{opt.name}' in --config)")
        else:
            out[opt.name] = opt.default
    unknown = section_keys - known
    if unknown:
        raise ConfigError(f"{config}: unknown key(s) in '{section}': {', '.join(sorted(unknown))}")
    out["config"] = config
    return out


_SHARED_SECTIONS = {"gateway", "ingest", "service", "services", "sim"}


def read_yaml(path: Any, what: str = "config", error: type[Exception] = ConfigError) -> Any:
    """A YAML file's content ({} when empty). An unreadable file or invalid YAML raises
    ``error`` with one line: ``cannot read <what> <path>: ...`` or ``<what> <path> is not
    valid YAML: ...``. PyYAML is imported only here, when a file is given."""
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise error(f"reading {path} needs PyYAML") from None
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _read_yaml(path: str, section: str) -> tuple[dict[str, Any], set[str]]:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of settings")
    merged = {k: v for k, v in data.items() if k not in _SHARED_SECTIONS}
    sect = data.get(section) or {}
    if not isinstance(sect, dict):
        raise ConfigError(f"config {path}: '{section}' must be a mapping")
    merged.update(sect)
    return merged, set(sect)


TLS_FILE_OPTIONS = [
    Option("ca_file", "str", None, "CA certificates to trust for the broker (PEM; default: the "
           "system store; with mqtts://)", metavar="FILE"),
    Option("cert_file", "str", None, "client certificate (PEM), read again at each reconnect",
           metavar="FILE"),
    Option("key_file", "str", None, "client private key (PEM, mode 600), read again at each "
           "reconnect", metavar="FILE"),
    Option("tls_server_name", "str", None, "name to send (SNI) and check the broker's "
           "certificate against, instead of the URL's host", metavar="NAME"),
    Option("alpn", "list", [], "ALPN protocol to offer (repeatable; AWS IoT Core on port 443: "
           "x-amzn-mqtt-ca)", metavar="PROTO"),
]
"""How to check the broker and who we are, for mqtts://."""

TLS_OPTIONS = [
    *TLS_FILE_OPTIONS,
    Option("password_file", "str", None, "file whose first line is the broker password (mode "
           "600; the user name goes in the URL), read again at each reconnect", metavar="FILE"),
]
"""The settings of every command that connects to a broker."""


def tls_from_settings(values: dict[str, Any], url: str | BrokerURL, error: type[Exception] = ConfigError,
                      check: bool = True) -> TLSOptions | None:
    """TLSOptions from resolved settings (``ca_file``, ``cert_file``, ``key_file``,
    ``tls_server_name``, ``alpn``), checked now unless ``check`` is false; None for a plaintext ``mqtt://`` URL.
    TLS files with a plaintext URL are refused, as is a password file that others may
    read: a setting that would be silently ignored is a mistake."""
    tls_set = [k for k in ("ca_file", "cert_file", "key_file", "tls_server_name")
               if values.get(k)] + (["alpn"] if values.get("alpn") else [])
    if check and values.get("password_file"):
        read_secret(values["password_file"], error=error)
    u = url if isinstance(url, BrokerURL) else parse_url(url)
    if not u.tls:
        if tls_set:
            raise error(f"--{tls_set[0].replace('_', '-')} needs an mqtts:// broker URL (got {u})")
        return None
    opts = TLSOptions(values.get("ca_file"), values.get("cert_file"), values.get("key_file"),
                      values.get("tls_server_name"), tuple(values.get("alpn") or ()))
    if check:
        opts.context(error)
    return opts
