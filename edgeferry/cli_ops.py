"""``edgeferry demo``, ``edgeferry status`` and ``edgeferry top``: the whole thing at
once, and the operator's view of a running site (edgeferry/siteview.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from edge.mqtt import BrokerURL

err = Console(stderr=True)

_LOCAL = typer.Option("mqtt://127.0.0.1:1883", "--local", envvar="EDGEFERRY_LOCAL",
                      help="the site's local broker (devices' and services' retained state/<id>)")
_LOCAL_PASSWORD_FILE = typer.Option(None, "--local-password-file", envvar="EDGEFERRY_LOCAL_PASSWORD_FILE",
                                     help="the local broker's password (first line, mode 600); the user "
                                     "name goes in --local (mqtt://USER@HOST:PORT)")
_STORE = typer.Option(Path("edgeferry-store.db"), "--store", envvar="EDGEFERRY_STORE",
                      help="the gateway's store (its status socket is <store>.sock)")
_SINK = typer.Option(None, "--sink", help="the cloud's sink (sqlite:PATH or jsonl:PATH): commands as the "
                     "cloud sees them")


def demo(
    devices: int = typer.Option(50, "--devices", help="simulated devices"),
    duration: float = typer.Option(90.0, "--duration", help="seconds the devices publish"),
    outage_at: float = typer.Option(30.0, "--outage-at", help="second at which the cloud link is cut"),
    outage_for: float = typer.Option(20.0, "--outage-for", help="seconds the cloud link stays cut"),
    data: Path | None = typer.Option(None, "--data", help="keep the brokers, store, sink, manifest and "
                                     "logs here (default: a temporary directory, removed at the end)"),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="print a line every few seconds "
                                      "instead of the live dashboard"),
    report: Path | None = typer.Option(None, "--report", help="write the run as one HTML page with charts"),
    per_device: bool = typer.Option(False, "--per-device", help="print the verification per device"),
    seed: int = typer.Option(7, "--seed", help="the fleet's random seed"),
) -> None:
    """A site and its cloud on this machine, live, through an outage: devices, services,
    the gateway, a cut link, commands from the cloud, and proof at the end (exit 1 if
    anything was lost, duplicated or not applied).

    Example: edgeferry demo --devices 50 --duration 90 --outage-at 30 --outage-for 20
    --data demo-data --report demo-data/report.html
    """
    from edgeferry.demo import run_demo
    from edgeferry.demomodel import DemoOptions

    opts = DemoOptions(devices=devices, duration=duration, outage_at=outage_at, outage_for=outage_for,
                       data=data, dashboard=not no_dashboard, report=report, per_device=per_device, seed=seed)
    raise typer.Exit(run_demo(opts))


def _local_url(local: str, password_file: str | None) -> str | BrokerURL:
    """``--local`` with ``--local-password-file``; a bad file is one line and exit 2."""
    from edge.errors import ConfigError
    from gateway.settings import local_broker_url

    try:
        return local_broker_url(local, password_file)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def status(
    local: str = _LOCAL,
    local_password_file: str | None = _LOCAL_PASSWORD_FILE,
    store: Path = _STORE,
    sink: str | None = _SINK,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """A running site at a glance: the cloud link and time in it, backlog per lane with the
    time to drain it, drops by reason, services and devices online, commands held.

    Example: edgeferry status --local mqtt://127.0.0.1:1883 --store /var/lib/edgeferry/store.db
    """
    from edgeferry.dashboard import print_status

    snap = asyncio.run(_one_look(_local_url(local, local_password_file), store, sink))
    if as_json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        print_status(snap)
    if not snap["gateway"]:
        err.print(f"[yellow]warning:[/yellow] no gateway answers on {store}.sock", highlight=False)
        raise typer.Exit(1)


async def _one_look(local: str | BrokerURL, store: Path, sink: str | None) -> dict[str, object]:
    """Two snapshots a second apart (rates need two), after the retained states arrived."""
    import contextlib

    from edgeferry.siteview import SiteWatcher

    w = SiteWatcher(local, store, sink=sink)
    task = asyncio.create_task(w.run())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await w.connected.wait()
        w.snapshot()
        await asyncio.sleep(1.0)
        if w.node is None and w.history and w.history[-1].get("node"):
            w.node = str(w.history[-1]["node"])
        return w.snapshot()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        w.close()


def top(
    local: str = _LOCAL,
    local_password_file: str | None = _LOCAL_PASSWORD_FILE,
    store: Path = _STORE,
    sink: str | None = _SINK,
    refresh: float = typer.Option(1.0, "--refresh", help="seconds between refreshes"),
) -> None:
    """The live dashboard of a running site (the demo's view); q or Ctrl-C quits.

    Example: edgeferry top --local mqtt://127.0.0.1:1883 --store /var/lib/edgeferry/store.db
    """
    from edgeferry.dashboard import run_top
    from edgeferry.siteview import SiteWatcher
    from gateway.health import query_status

    st = query_status(store)
    node = st.get("node_id") if st else None
    url = _local_url(local, local_password_file)
    asyncio.run(run_top(SiteWatcher(url, store, sink=sink, node=node), refresh))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("status")(status)
    app.command("top")(top)
