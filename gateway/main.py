"""Process entry points: ``edgeferry gateway run`` and ``edgeferry ingest run``.

These are reached without importing typer, rich or pydantic (see edgeferry/__main__.py):
the gateway's resident memory on a Pi is part of what edgeferry promises. asyncio is
imported only once the settings are read: a gateway whose settings name no mqtts://
broker runs without OpenSSL (edge/_nossl.py).
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

__all__ = ["run_gateway", "run_ingest", "run_async"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a coroutine on uvloop when available, else asyncio."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Linux
        return asyncio.run(main())
    return uvloop.run(main())


def _on_signals(stop: Callable[[], None]) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _serve(name: str, settings: Any, make: Callable[[Any], Any],
           started: Callable[[Any], Awaitable[list[asyncio.Server]]] | None = None,
           status_line: Callable[[dict[str, Any]], str] | None = None) -> int:
    """Run one long-lived component (``run(ready)`` and ``stop()``) until SIGTERM/SIGINT;
    print '<name> ready' once it runs; OSError -> one line, exit 1. Any other failure of
    the component propagates: its traceback and a non-zero exit status.

    Under systemd (``Type=notify``, deploy/systemd/) it sends READY=1 once the component's
    ``ready`` event is set (the gateway: store open and local broker connected; ingest:
    sink open and cloud broker connected), a STATUS= line every few seconds, WATCHDOG=1
    from this event loop and STOPPING=1 on the signal (edge/_sdnotify.py)."""
    _setup_logging(settings.log_level)
    import asyncio

    async def main() -> int:
        from edge._sdnotify import Notifier

        notifier = Notifier()
        component = make(settings)

        def stop() -> None:
            notifier.stopping(f"{name}: stopping")
            component.stop()

        _on_signals(stop)
        servers: list[asyncio.Server] = []
        helpers: list[asyncio.Task[None]] = []

        async def ready() -> None:
            if started is not None:
                servers.extend(await started(component))
            print(f"{name} ready", file=sys.stderr, flush=True)
            # started: what exists now (modules, settings, the open store) lives as long as
            # the process; frozen, the cyclic collector stops walking it on every full
            # collection (25 % of the gateway's CPU under load before, docs/benchmarks.md)
            gc.collect()
            gc.freeze()
            # and a young-generation collection every 50,000 allocations instead of 700:
            # a message's objects are gone by then, instead of surviving into older
            # generations that are walked again and again (see docs/benchmarks.md)
            gc.set_threshold(50_000, 10, 10)
            helpers.append(asyncio.create_task(notifier.run_watchdog(), name=f"{name}:sd-watchdog"))
            if notifier.enabled:
                helpers.append(asyncio.create_task(_notify_ready(notifier, name, component, status_line),
                                                   name=f"{name}:sd-status"))

        try:
            await component.run(ready)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for srv in servers:
                srv.close()
            notifier.close()
        return 0

    return run_async(main)


async def _notify_ready(notifier: Any, name: str, component: Any,
                        status_line: Callable[[dict[str, Any]], str] | None) -> None:
    """READY=1 once the component is ready, then its status line every 5 s."""
    ready = getattr(component, "ready", None)
    if ready is not None:
        notifier.status(f"{name}: starting")
        await ready.wait()

    def line() -> str:
        if status_line is None:
            return f"{name}: running"
        try:
            return status_line(component.status())
        except Exception as e:  # a status line must never take the component down
            return f"{name}: running (status unavailable: {type(e).__name__})"

    notifier.ready(line())
    import asyncio

    while True:
        await asyncio.sleep(5)
        notifier.status(line())


def _gateway_status(st: dict[str, Any]) -> str:
    lanes = st.get("lanes", {})
    records = sum(int(lane.get("records", 0)) for lane in lanes.values())
    drops = sum(int(v) for v in (st.get("drops") or {}).values())
    return (f"local {st['link']['local']}, cloud {st.get('cloud_state', st['link']['cloud'])}; "
            f"backlog {records} records, {st.get('store_bytes', 0)} bytes; drops {drops}")


def _ingest_status(st: dict[str, Any]) -> str:
    c = st.get("counters", {})
    return (f"cloud {'connected' if st.get('connected') else 'down'}; written {c.get('written', 0)}, "
            f"duplicates {c.get('duplicates', 0)}, bad frames {c.get('bad_frames', 0)}, "
            f"gaps {c.get('gaps', 0)} ({c.get('gap_records', 0)} records)")


def _parse(parse: Callable[[list[str]], Any], argv: list[str]) -> Any:
    try:
        return parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _malloc_arenas(n: int) -> None:
    """At most ``n`` glibc malloc arenas (``mallopt(M_ARENA_MAX, n)``), before any thread
    starts. glibc gives each new thread an arena of its own; the store's reader thread then
    keeps the chunks it reads for a drain in an arena of its own: about 0.5 MB of the
    gateway's peak while it drains a large backlog, on average, within the noise of the
    runs (docs/benchmarks.md, issue 15; no CPU difference measured). Skipped where there is
    no glibc mallopt (musl, others)."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, n)  # M_ARENA_MAX, from glibc's malloc.h
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def run_gateway(argv: list[str], hooks: Any = None) -> int:
    """``edgeferry gateway run``; ``hooks`` (a :class:`gateway.state.Hooks`) only from
    tests/_failpoint_gateway.py."""
    from gateway.settings import gateway_settings

    settings = _parse(gateway_settings, argv)
    if settings is None:
        return 2
    if not settings.uses_tls:
        from edge._nossl import without_ssl

        without_ssl()  # before asyncio and uvloop import ssl: 4.5 MB less (docs/benchmarks.md)
    _malloc_arenas(1)

    def make(s: Any) -> Any:
        from gateway.gateway import Gateway

        return Gateway(s, hooks)

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

    return _serve("gateway", settings, make, started, _gateway_status)


def run_ingest(argv: list[str]) -> int:
    from gateway.settings import ingest_settings

    settings = _parse(ingest_settings, argv)
    if settings is None:
        return 2
    if settings.workers > 1:
        from gateway.workers import run_workers

        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_workers(argv, settings)

    def make(s: Any) -> Any:
        from gateway.ingest import Ingest

        return Ingest(s)

    async def started(ing: Any) -> list[asyncio.Server]:
        from gateway.health import render_ingest_metrics, serve_metrics, serve_status

        servers = []
        if not settings.sink.startswith(("postgresql://", "postgres://")):
            # a database sink's workers are many: `ingest status` reads the database
            st = await serve_status(settings.sink.partition(":")[2], ing.status)
            if st is not None:
                servers.append(st)
        if settings.metrics_port:
            servers.append(await serve_metrics(settings.metrics_host, settings.metrics_port, ing.status,
                                               render_ingest_metrics))
        return servers

    return _serve("ingest", settings, make, started, _ingest_status)
