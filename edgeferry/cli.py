"""The ``edgeferry`` command: typer groups per area."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="edgeferry: event-driven services on small devices, with a store-and-forward gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
gateway_app = typer.Typer(help="The store-and-forward gateway.", no_args_is_help=True)
ingest_app = typer.Typer(help="Cloud-side ingest of gateway frames.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
app.add_typer(ingest_app, name="ingest")

_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@gateway_app.command("run", context_settings=_FORWARD, add_help_option=False)
def gateway_run(ctx: typer.Context) -> None:
    """Run the gateway (all flags: edgeferry gateway run --help).

    Example: edgeferry gateway run --local mqtt://127.0.0.1:1883 --cloud mqtt://cloud:1883
    --store /var/lib/edgeferry/store.db --node-id pi-01 --uplink 'dt/#' --uplink 'evt/#'
    """
    from gateway.main import run_gateway

    raise typer.Exit(run_gateway(list(ctx.args)))


@gateway_app.command("status")
def gateway_status(
    store: Path = typer.Option(..., "--store", help="path of the gateway's SQLite store"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Backlog per lane, drops by reason, link state; works while the gateway runs.

    Example: edgeferry gateway status --store /var/lib/edgeferry/store.db --json
    """
    from gateway.errors import StoreError
    from gateway.health import query_status
    from gateway.store import inspect

    st: dict[str, Any] | None = query_status(store)
    if st is None:
        try:
            st = inspect(store)
        except StoreError as e:
            _fail(str(e))
            return
        st["running"] = False
        st["link"] = {"cloud": "unknown (gateway not running)", "local": "unknown (gateway not running)"}
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return
    out = Console()
    out.print(f"node [bold]{st.get('node_id')}[/bold]  epoch {st.get('epoch')}  store {st.get('store')}")
    out.print(f"running: {st.get('running')}  cloud link: {st['link']['cloud']}  local link: {st['link']['local']}")
    if st.get("cloud_error"):
        out.print(f"cloud link {st.get('cloud_state')}: {st['cloud_error']}", highlight=False)
    if st.get("offline_for_s"):
        out.print(f"offline for {st['offline_for_s']:.1f} s")
    t = Table("lane", "records", "bytes", "oldest age (s)")
    for name, lane in st["lanes"].items():
        t.add_row(name, str(lane["records"]), str(lane["bytes"]), str(lane["oldest_age_s"]))
    out.print(t)
    drops = st.get("drops") or {}
    out.print("drops: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    down = st.get("downlink")
    if down:
        out.print(f"downlink: cloud {down['cloud']}, local {down['local']}, "
                  f"{down['open_commands']} commands held (docs/commands.md)")


@ingest_app.command("run", context_settings=_FORWARD, add_help_option=False)
def ingest_run(ctx: typer.Context) -> None:
    """Run cloud-side ingest (all flags: edgeferry ingest run --help).

    Example: edgeferry ingest run --cloud mqtt://127.0.0.1:1883 --sink jsonl:events.jsonl
    """
    from gateway.main import run_ingest

    raise typer.Exit(run_ingest(list(ctx.args)))


@ingest_app.command("status")
def ingest_status(
    sink: str = typer.Option(..., "--sink", envvar="EDGEFERRY_SINK",
                             help="the sink ingest writes: jsonl:PATH, sqlite:PATH or postgresql://..."),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
    limit: int = typer.Option(1000, "--limit", help="postgresql: at most this many lanes"),
    node: str = typer.Option(None, "--node", help="postgresql: only this node"),
) -> None:
    """Counters and gaps (records gateways no longer held) of a running ingest; for a
    postgresql:// sink, every node's lanes from the database (all workers): last seen,
    lag (highest seq received minus written with nothing missing), frames waiting ahead
    of a hole, gaps recorded.

    Example: edgeferry ingest status --sink jsonl:/var/lib/edgeferry/events.jsonl
    """
    from gateway.health import query_status
    from gateway.sinks import is_postgres

    if is_postgres(sink):
        _fleet_status(sink, as_json, limit, node)
        return
    st: dict[str, Any] | None = query_status(sink.partition(":")[2])
    if st is None:
        _fail(f"no ingest answers for sink {sink} (is it running?)")
        return
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return
    out = Console()
    out.print(f"sink {st.get('sink')}  connected: {st.get('connected')}")
    out.print(", ".join(f"{k}={v}" for k, v in sorted(st["counters"].items())), highlight=False)
    t = Table("node", "lane", "gaps", "records lost", "of unknown size")
    for g in st.get("gaps", []):
        t.add_row(g["node"], g["lane"], str(g["notices"]), str(g["records"]), str(g["unknown"]))
    out.print(t)


def _fleet_status(sink: str, as_json: bool, limit: int, node: str | None) -> None:
    from gateway.errors import SinkError
    from gateway.pgsink import fleet_status

    try:
        rows = fleet_status(sink, limit, node)
    except SinkError as e:
        _fail(str(e))
        return
    if as_json:
        for r in rows:
            r["last_seen"] = r["last_seen"].isoformat()
        print(json.dumps(rows, indent=2))
        return
    t = Table("node", "epoch", "lane", "last seen", "received", "written", "lag", "waiting", "gaps")
    for r in rows:
        t.add_row(r["node"], str(r["epoch"]), r["lane"], r["last_seen"].strftime("%Y-%m-%d %H:%M:%S"),
                  str(r["received"]), str(r["high"]), str(r["lag"]), str(r["waiting"]), str(r["gaps"]))
    Console().print(t)


@ingest_app.command("retention")
def ingest_retention(
    sink: str = typer.Option(..., "--sink", envvar="EDGEFERRY_SINK", help="postgresql://USER@HOST/DB"),
    keep: str = typer.Option(..., "--keep", help="how much to keep: 90d, 12w or 48h"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be dropped, drop nothing"),
) -> None:
    """Drop the daily partitions of a PostgreSQL sink older than --keep (run it daily, e.g.
    from cron or a systemd timer; docs/cloud.md).

    Example: edgeferry ingest retention --sink postgresql://postgres@127.0.0.1/fleet --keep 90d
    """
    from gateway.errors import SinkError
    from gateway.sinks import is_postgres

    if not is_postgres(sink):
        _fail(f"--sink {sink!r}: retention works on a postgresql://... sink", 2)
    try:
        from gateway.pgsink import parse_keep, retention

        dropped, deleted = retention(sink, parse_keep(keep), dry_run=dry_run)
    except ValueError as e:
        _fail(str(e), 2)
    except SinkError as e:
        _fail(str(e))
    verb = "would drop" if dry_run else "dropped"
    typer.echo(f"{verb} {len(dropped)} partitions{': ' + ', '.join(dropped) if dropped else ''}; "
               f"{deleted} rows of the default partition {'to delete' if dry_run else 'deleted'}")


@app.command("chaos")
def chaos(
    listen: int = typer.Option(..., "--listen", help="local port to listen on"),
    target: str = typer.Option(..., "--target", help="HOST:PORT to forward to"),
    flap: str = typer.Option("", "--flap", help="UP_MIN-UP_MAX:DOWN_MIN-DOWN_MAX seconds, e.g. 1-3:1-3"),
    mode: str = typer.Option("cut", "--mode", help="how the link goes down: cut or blackhole"),
    seed: int = typer.Option(0, "--seed", help="random seed for the flap schedule"),
) -> None:
    """A TCP proxy that cuts, blackholes or flaps a link, to try outages by hand.

    Example: edgeferry chaos --listen 18830 --target 127.0.0.1:1883 --flap 1-3:1-3
    """
    import asyncio

    from firmware_sim.chaos import run_chaos_cli

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--target {target!r} must be HOST:PORT", 2)
    if mode not in ("cut", "blackhole"):
        _fail("--mode must be cut or blackhole", 2)
    schedule = None
    if flap:
        try:
            up, down = flap.split(":")
            u1, u2 = map(float, up.split("-"))
            d1, d2 = map(float, down.split("-"))
            schedule = ((u1, u2), (d1, d2))
        except ValueError:
            _fail(f"--flap {flap!r} must look like 1-3:1-3", 2)
    try:
        asyncio.run(run_chaos_cli(listen, f"{host}:{port}", schedule, mode=mode, seed=seed))
    except KeyboardInterrupt:
        pass


@app.command("provision")
def provision(
    node_id: str = typer.Option(..., "--node-id", help="the node's id: the CN of its certificate"),
    ca_dir: Path = typer.Option(..., "--ca-dir", help="the fleet CA's directory (created on first use; "
                                "keep it off the devices)"),
    out: Path = typer.Option(..., "--out", help="directory for the node's files"),
    rotate: bool = typer.Option(False, "--rotate", help="renew the node's key and certificate"),
    service: list[str] = typer.Option(None, "--service", help="a service (MODULE:ATTR) that gets a broker "
                                      "user and ACL from its catalog entry (repeatable; default: the "
                                      "'services' of --config, else the built-in ones)"),
    config: str = typer.Option(None, "--config", help="YAML whose 'services' list names the services"),
    device: list[str] = typer.Option(None, "--device", help="a device that gets its own broker user, "
                                     "limited to dt/<device>/# and its state, cmd and shadow topics "
                                     "(repeatable)"),
    device_class: list[str] = typer.Option(None, "--device-class", help="a credential shared by a class "
                                           "of devices (e.g. sim): dt/+/#, state/+, cmd/+/#, shadow/+/#"),
    cloud: str = typer.Option(None, "--cloud", help="the cloud broker URL written into node.yaml"),
    days: int = typer.Option(365, "--days", help="validity of the node certificate in days"),
) -> None:
    """Create a node's identity (key, certificate signed by the fleet CA) and its local
    broker's password file and ACL.

    Example: edgeferry provision --node-id pi-01 --ca-dir ~/fleet-ca --out ./pi-01
    --device-class sim --cloud mqtts://cloud.example:8883
    """
    from edge.errors import EdgeError
    from edgeferry.catalog import services_from_config
    from edgeferry.provision import provision as run_provision

    try:
        specs = list(service or []) or services_from_config(config) or None
        result = run_provision(node_id, ca_dir, out, rotate=rotate, services=specs, devices=list(device or []),
                               device_classes=list(device_class or []), cloud=cloud, days=days)
    except EdgeError as e:
        _fail(str(e))
        return
    if result.ca_created:
        err.print(f"created the fleet CA in {ca_dir} (keep ca.key safe and off the devices)", highlight=False)
    what = "issued" if result.cert_issued else "kept"
    err.print(f"{what} the certificate of {node_id} (valid until {result.not_after:%Y-%m-%d}); "
              f"broker users: {', '.join(u.name for u in result.users)}", highlight=False)
    err.print(f"wrote {result.out} (secrets are mode 0600; never print or commit them)", highlight=False)


def _register_areas() -> None:
    """Each area adds its commands from its own module (edgeferry/cli_<area>.py)."""
    import importlib

    for name in ("edgeferry.cli_service", "edgeferry.cli_sim", "edgeferry.cli_downlink", "edgeferry.cli_ops"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(app)


_register_areas()


def _version_callback(value: bool) -> None:
    if value:
        from edgeferry import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """edgeferry: event-driven services on small devices, with a store-and-forward gateway."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
