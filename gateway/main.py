"""Process entry points: ``edgeferry gateway run`` and ``edgeferry ingest run``.

These are reached without importing typer, rich or pydantic (see edgeferry/__main__.py):
the gateway's resident memory on a Pi is part of what edgeferry promises.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
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


def run_gateway(argv: list[str]) -> int:
    from gateway.settings import gateway_settings

    try:
        settings = gateway_settings(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)

    async def main() -> int:
        from gateway.health import serve_metrics, serve_status
        from gateway.uplink import Gateway

        gw = Gateway(settings)
        _on_signals(gw.stop)
        try:
            async with gw:
                servers = []
                st = await serve_status(settings.store, gw.status)
                if st is not None:
                    servers.append(st)
                if settings.metrics_port:
                    servers.append(await serve_metrics(settings.metrics_host, settings.metrics_port, gw.status))
                logging.getLogger("edgeferry.gateway").info(
                    "gateway running: node %s, uplink %s", settings.node_id, ", ".join(settings.uplink))
                print("gateway ready", file=sys.stderr, flush=True)
                await gw.wait()
                for srv in servers:
                    srv.close()
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_async(main)


def run_ingest(argv: list[str]) -> int:
    from gateway.settings import ingest_settings

    try:
        settings = ingest_settings(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)

    async def main() -> int:
        from gateway.ingest import Ingest

        ing = Ingest(settings)
        _on_signals(ing.stop)
        try:
            async with ing:
                print("ingest ready", file=sys.stderr, flush=True)
                await ing.wait()
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_async(main)
