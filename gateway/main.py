"""Process entry points: ``edgeferry gateway run`` and ``edgeferry ingest run``.

These are reached without importing typer, rich or pydantic (see edgeferry/__main__.py):
the gateway's resident memory on a Pi is part of what edgeferry promises.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from edge.errors import ConfigError

__all__ = ["run_gateway", "run_ingest", "run_async"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a coroutine on uvloop when available, else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Linux
        return asyncio.run(main())
    return uvloop.run(main())


def _on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _serve(name: str, settings: Any, make: Callable[[Any], Any],
           started: Callable[[Any], Awaitable[list[asyncio.Server]]] | None = None) -> int:
    """Run one long-lived component (an async context manager with wait() and stop())
    until SIGTERM/SIGINT; print '<name> ready' once it runs; OSError -> one line, exit 1."""
    _setup_logging(settings.log_level)

    async def main() -> int:
        component = make(settings)
        _on_signals(component.stop)
        try:
            async with component:
                servers = await started(component) if started is not None else []
                print(f"{name} ready", file=sys.stderr, flush=True)
                await component.wait()
                for srv in servers:
                    srv.close()
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_async(main)


def _parse(parse: Callable[[list[str]], Any], argv: list[str]) -> Any:
    try:
        return parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_gateway(argv: list[str]) -> int:
    from gateway.settings import gateway_settings

    settings = _parse(gateway_settings, argv)
    if settings is None:
        return 2

    def make(s: Any) -> Any:
        from gateway.uplink import Gateway

        return Gateway(s)

    async def started(gw: Any) -> list[asyncio.Server]:
        from gateway.health import serve_metrics, serve_status

        servers = []
        st = await serve_status(settings.store, gw.status)
        if st is not None:
            servers.append(st)
        if settings.metrics_port:
            servers.append(await serve_metrics(settings.metrics_host, settings.metrics_port, gw.status))
        logging.getLogger("edgeferry.gateway").info(
            "gateway running: node %s, uplink %s", settings.node_id, ", ".join(settings.uplink))
        return servers

    return _serve("gateway", settings, make, started)


def run_ingest(argv: list[str]) -> int:
    from gateway.settings import ingest_settings

    settings = _parse(ingest_settings, argv)
    if settings is None:
        return 2

    def make(s: Any) -> Any:
        from gateway.ingest import Ingest

        return Ingest(s)

    return _serve("ingest", settings, make)
