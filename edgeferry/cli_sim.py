"""``edgeferry sim``: run a simulated sensor fleet, and check what reached the sink."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)

sim_app = typer.Typer(
    help="A simulated sensor fleet that behaves like real firmware, with faults on demand.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@sim_app.command("run")
def sim_run(
    broker: str = typer.Option(..., "--broker", help="broker URL, mqtt://HOST:PORT"),
    devices: int = typer.Option(None, "--devices", help="number of devices [profile, or 10]"),
    interval: float = typer.Option(None, "--interval", help="seconds between readings [profile, or 1]"),
    duration: float = typer.Option(None, "--duration", help="seconds to run [profile, or until Ctrl-C]"),
    seed: int = typer.Option(None, "--seed", help="random seed: same seed, same values and faults [0]"),
    profile: Path = typer.Option(None, "--profile", help="profile YAML (see docs/simulator.md)"),
    manifest: Path = typer.Option(None, "--manifest", help="write what each device sent to FILE (JSON)"),
    fault: list[str] = typer.Option(None, "--fault", help="add a fault, e.g. die:devices=0.1,at=5..10 (repeatable)"),
    sensors: str = typer.Option(None, "--sensors", help="comma-separated streams, e.g. temperature,door"),
    outbox: int = typer.Option(None, "--outbox", help="messages a device keeps while offline [100]"),
    chaos: str = typer.Option(None, "--chaos", help="site-wide outages through a chaos proxy: UP:DOWN seconds, e.g. 5-10:2-4"),
    chaos_mode: str = typer.Option(None, "--chaos-mode", help="how the chaos link goes down: cut or blackhole"),
    run_id: str = typer.Option(None, "--run-id", help="name of this run in payloads (simrun) and the manifest"),
    drain_timeout: float = typer.Option(10.0, "--drain-timeout", help="seconds to empty the outboxes at the end"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the live progress line"),
    stats_every: float = typer.Option(None, "--stats-every", help="print a JSON 'stats' line on stderr every SECONDS"),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Run a fleet of simulated devices, each on its own MQTT connection.

    Example: edgeferry sim run --broker mqtt://127.0.0.1:1883 --devices 100 --interval 1
    --duration 60 --seed 7 --fault drop:devices=0.1,at=10..20 --manifest run.json
    """
    import logging

    from edge.errors import ConfigError
    from firmware_sim.errors import SimError
    from firmware_sim.profile import load_profile, parse_fault_flag

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        faults = dict(parse_fault_flag(f) for f in fault or [])
        chaos_spec = None
        if chaos is not None or chaos_mode is not None:
            chaos_spec = {"flap": chaos, "mode": chaos_mode or "cut"}
        prof = load_profile(profile, devices=devices, interval=interval, duration=duration, seed=seed,
                            sensors=sensors, outbox=outbox, faults=faults, chaos=chaos_spec)
    except SimError as e:
        _fail(str(e), 2)
        return
    from firmware_sim.runner import run_fleet

    try:
        code = run_fleet(broker, prof, manifest_path=manifest, run_id=run_id,
                         drain_timeout=drain_timeout, progress=progress, stats_every=stats_every)
    except (SimError, ConfigError) as e:
        _fail(str(e), 2 if isinstance(e, ConfigError) else 1)
        return
    raise typer.Exit(code)


@sim_app.command("verify")
def sim_verify(
    manifest: Path = typer.Option(..., "--manifest", help="the manifest written by sim run"),
    sink: str = typer.Option(..., "--sink", help="what ingest wrote: jsonl:PATH or sqlite:PATH"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    all_devices: bool = typer.Option(False, "--all", help="list every device (default: those with findings, up to 50)"),
) -> None:
    """Compare what devices sent (manifest) with what ingest stored (sink): per device and
    in total, sent / delivered / dropped by the device / lost / duplicated. Exits 1 if
    anything was lost that the device did not count itself.

    Example: edgeferry sim verify --manifest run.json --sink jsonl:events.jsonl
    """
    import json

    from firmware_sim.errors import SimError
    from firmware_sim.manifest import read_manifest
    from firmware_sim.verify import compare
    from gateway.errors import GatewayError
    from gateway.sinks import read_sink

    try:
        m = read_manifest(manifest)
    except SimError as e:
        _fail(str(e), 2)
        return
    kind, _, path = sink.partition(":")
    if kind not in ("jsonl", "sqlite") or not path:
        _fail(f"--sink {sink!r}: expected jsonl:PATH or sqlite:PATH", 2)
    if not Path(path).exists():
        _fail(f"sink {path} does not exist", 2)
    try:
        rows = read_sink(sink)
    except (GatewayError, OSError, ValueError) as e:
        _fail(f"cannot read sink {sink}: {e}", 2)
        return
    except Exception as e:  # sqlite3.DatabaseError and friends: one line, not a traceback
        _fail(f"cannot read sink {sink}: {e}", 2)
        return
    report = compare(m, rows)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report, all_devices)
    raise typer.Exit(0 if report.ok else 1)


def _print_report(report: object, all_devices: bool) -> None:
    from rich.table import Table

    from firmware_sim.verify import Report

    assert isinstance(report, Report)
    out = Console()
    t = Table("device", "sent", "delivered", "dropped (device)", "lost", "duplicated", "garbage",
              title=f"run {report.run}", title_justify="left")
    findings = [d for d in report.devices if d.lost or d.duplicated or d.dropped or d.garbage]
    shown = report.devices if all_devices else findings[:50]
    for d in shown:
        lost = f"[red]{d.lost}[/red]" if d.lost else "0"
        t.add_row(d.device, str(d.sent), str(d.delivered), str(d.dropped), lost, str(d.duplicated),
                  str(d.garbage))
    tot = report.total
    t.add_row("[bold]total[/bold]", str(tot.sent), str(tot.delivered), str(tot.dropped),
              f"[red]{tot.lost}[/red]" if tot.lost else "0", str(tot.duplicated), str(tot.garbage),
              end_section=True)
    out.print(t)
    hidden = len(report.devices) - len(shown)
    if hidden:
        out.print(f"({hidden} more devices not listed; --all lists every device)")
    out.print(f"devices sent {tot.duplicates_sent} duplicates and {tot.garbage_sent} garbage payloads "
              f"on purpose; {tot.dropped_delivered} messages counted as dropped arrived anyway; "
              f"{report.foreign} other rows (state, events, other runs) ignored")
    for d in report.devices:
        for stream, ranges in d.lost_ranges.items():
            shown_r = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges[:5])
            more = f" (+{len(ranges) - 5} more ranges)" if len(ranges) > 5 else ""
            out.print(f"[red]lost[/red] {d.device} {stream}: seq {shown_r}{more}", highlight=False)
    if report.ok:
        out.print(f"[green]OK[/green]: nothing lost beyond what the devices counted "
                  f"({tot.delivered} of {tot.sent} delivered)")
    else:
        out.print(f"[red]LOSS[/red]: {tot.lost} messages lost that no device counted")


def register(app: typer.Typer) -> None:
    """Add the ``sim`` group to the edgeferry command."""
    app.add_typer(sim_app, name="sim")
