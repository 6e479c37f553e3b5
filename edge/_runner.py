"""Running a service as a process: shared settings, logging, uvloop, signals.

Used by ``Service.run()`` and ``edgeferry service run MODULE:ATTR`` (edge/_launch.py,
which finds the service to run). It does not import :mod:`edge.service`: the service
imports it. The settings are declared once (:data:`OPTIONS`) and read, like the
gateway's, from flags, then ``EDGEFERRY_*`` variables, then the ``service:`` section of
the YAML file, then its top level. A service's own settings are the YAML section named
after it (``rules:``).

This path imports neither typer nor rich; pydantic only as far as the service needs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import Any

from edge.config import TLS_FILE_OPTIONS, Option, load_settings, read_yaml, tls_from_settings
from edge.errors import ConfigError, EdgeError
from edge.mqtt import BrokerURL, parse_url

__all__ = ["OPTIONS", "apply_settings", "run_service", "service_config_section"]


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "edgeferry")


def _positive_int(v: Any) -> int:
    n = int(v)
    if n < 1:
        raise ValueError(f"{v!r} must be at least 1")
    return n


OPTIONS = [
    Option("broker", "url", None, "local broker URL, mqtt://HOST:PORT", metavar="URL"),
    Option("username", "str", None, "user name for the broker"),
    Option("password", "str", None, "password for the broker (prefer --password-file: a flag or "
           "variable is visible to other processes)"),
    Option("password_file", "str", None, "file whose first line is the broker password (mode 600)",
           metavar="FILE"),
    *TLS_FILE_OPTIONS,
    Option(
        "strict_topics",
        "bool",
        None,
        "refuse (TopicNotAllowed) a publish to a topic the service does not declare; default: on "
        "when the broker needs a user name, since its ACL would drop such a publish silently",
    ),
    Option("node_id", "str", None, "this node's id (the event source prefix; default: host name)"),
    Option(
        "state_dir",
        "str",
        None,
        "directory of the dedup tables (default: $XDG_STATE_HOME/edgeferry)",
        metavar="DIR",
    ),
    Option(
        "concurrency", "int", None, "handlers running at once, over all keys", parse=_positive_int
    ),
    Option(
        "retries", "int", None, "retries of a failing handler before the message is dead-lettered"
    ),
    Option(
        "retry_initial", "duration", None, "first retry delay (doubles, capped at 5 s, jittered)"
    ),
    Option(
        "max_payload_bytes", "size", None, "larger messages are dead-lettered (reason oversize)"
    ),
    Option(
        "max_pending",
        "int",
        None,
        "messages in hand before reading pauses (the rest waits at the broker)",
        parse=_positive_int,
    ),
    Option("dedup_ttl", "duration", None, "how long handled event ids are remembered"),
    Option("dedup_max", "int", None, "at most this many ids are remembered", parse=_positive_int),
    Option(
        "heartbeat", "duration", None, "seconds between heartbeats on state/<service>/heartbeat"
    ),
    Option("drain_timeout", "duration", None, "on SIGTERM, wait this long for running handlers"),
    Option(
        "log_level",
        "str",
        None,
        "DEBUG, INFO, WARNING or ERROR (default INFO)",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
]

_ATTRS = (
    "strict_topics",
    "node_id",
    "state_dir",
    "concurrency",
    "retries",
    "retry_initial",
    "max_payload_bytes",
    "max_pending",
    "dedup_ttl",
    "dedup_max",
    "heartbeat",
    "drain_timeout",
)


def service_config_section(config_path: str | None, name: str) -> dict[str, Any] | None:
    """The YAML section named after the service, or None."""
    if not config_path:
        return None
    data = read_yaml(config_path)
    section = data.get(name) if isinstance(data, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{config_path}: '{name}' must be a mapping")
    return section


def apply_settings(svc: Any, settings: dict[str, Any], broker: Any = None) -> None:
    """Apply resolved settings to a service (code-given values stay unless overridden)."""
    for attr in _ATTRS:
        if settings.get(attr) is not None:
            setattr(svc, attr, settings[attr])
    if broker is not None:
        svc.broker = broker
    elif settings.get("broker"):
        svc.broker = settings["broker"]
    if svc.broker is None:
        svc.broker = "mqtt://127.0.0.1:1883"
    password = settings.get("password")
    password_file = settings.get("password_file")
    if password_file:
        from edge._tls import read_secret

        read_secret(password_file, error=ConfigError)  # usable now; read again at every connect
    if isinstance(svc.broker, str) and (settings.get("username") or password or password_file):
        u = parse_url(svc.broker)
        svc.broker = BrokerURL(
            u.host,
            u.port,
            u.tls,
            settings.get("username") or u.username,
            password or u.password,
            password_file=password_file,
        )
    if isinstance(svc.broker, str | BrokerURL):
        url = svc.broker if isinstance(svc.broker, BrokerURL) else parse_url(svc.broker)
        tls = tls_from_settings(settings, url)
        if tls is not None:
            svc.broker = replace(url, tls_options=tls)
    if svc.state_dir is None:
        svc.state_dir = _default_state_dir()
    svc.load_config(service_config_section(settings.get("config"), svc.name))


def _configure_logging(level: str | None) -> None:
    logging.basicConfig(
        level=getattr(logging, level or "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        asyncio.run(main)
        return
    uvloop.run(main)


async def _serve(svc: Any) -> None:
    """Serve until SIGTERM/SIGINT. Under systemd (``Type=notify``, deploy/systemd/) it
    sends READY=1 once connected and subscribed, STOPPING=1 on the signal, and WATCHDOG=1
    from this event loop; elsewhere the notifications are no-ops."""
    from edge._sdnotify import Notifier

    loop = asyncio.get_running_loop()
    notifier = Notifier()
    log = logging.getLogger("edge.service")

    def stop() -> None:
        log.info("service %s: stop requested, draining", svc.name)
        notifier.stopping(f"service {svc.name}: draining")
        svc.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    ready = asyncio.Event()

    async def announce() -> None:
        await ready.wait()
        notifier.ready(f"service {svc.name}: connected to {svc._link.label if svc._link else svc.broker}, "
                       f"{len(svc.routes)} handler(s) subscribed")

    helpers = [asyncio.create_task(announce(), name=f"{svc.name}:sd-ready"),
               asyncio.create_task(notifier.run_watchdog(), name=f"{svc.name}:sd-watchdog")]
    try:
        await svc.serve(ready=ready)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        notifier.close()


def run_service(svc: Any, argv: list[str], *, broker: Any = None, prog: str | None = None) -> int:
    """Resolve settings and run ``svc`` until SIGTERM/SIGINT; return the exit code.

    An EdgeError or OSError, at start or from a task of the running service, is one line
    on stderr and exit code 1; any other exception a task raises ends the process with
    that exception and its traceback."""
    try:
        settings = load_settings(
            OPTIONS,
            argv,
            prog=prog or f"{svc.name}",
            section="service",
            description=f"Run the {svc.name} service.",
        )
        _configure_logging(settings.get("log_level"))
        apply_settings(svc, settings, broker)
        svc.connect_timeout = float("inf")  # a daemon waits for its broker (it may boot later)
        _run(_serve(svc))
    except (EdgeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    return 0
