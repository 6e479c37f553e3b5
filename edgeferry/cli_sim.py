"""``edgeferry sim``: run a simulated sensor fleet, and check what reached the sink."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

Opt = typer.Option

err = Console(stderr=True, soft_wrap=True)

sim_app = typer.Typer(
    help="A simulated sensor fleet that behaves like real firmware, with faults on demand.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _with_credentials(broker: str, username: str | None, password_file: Path | None) -> str:
    """The broker URL with the user name and the password file's first line in it (the
    URL is redacted wherever edgeferry prints it)."""
    if username is None and password_file is None:
        return broker
    from urllib.parse import quote

    from edge._tls import read_secret
    from edge.errors import ConfigError
    from edge.mqtt import parse_url

    url = parse_url(broker)
    if username is None:
        raise ConfigError("--password-file needs --username")
    password = read_secret(str(password_file), error=ConfigError) if password_file is not None else None
    scheme = "mqtts" if url.tls else "mqtt"
    auth = quote(username, safe="") + (":" + quote(password, safe="") if password is not None else "")
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{scheme}://{auth}@{host}:{url.port}"


@sim_app.command("run")
def sim_run(
    broker: Annotated[str, Opt("--broker", help="broker URL, mqtt://HOST:PORT")],
    devices: Annotated[int | None, Opt("--devices", help="number of devices [10]")] = None,
    interval: Annotated[
        float | None, Opt("--interval", help="seconds between readings [1]")
    ] = None,
    duration: Annotated[
        float | None, Opt("--duration", help="seconds to run (default: until Ctrl-C)")
    ] = None,
    seed: Annotated[
        int | None, Opt("--seed", help="random seed: same seed, same values and faults [0]")
    ] = None,
    profile: Annotated[
        Path | None, Opt("--profile", help="profile YAML (see docs/simulator.md)")
    ] = None,
    manifest: Annotated[
        Path | None, Opt("--manifest", help="write what each device sent to FILE (JSON)")
    ] = None,
    fault: Annotated[
        list[str] | None,
        Opt("--fault", help="add a fault, e.g. die:devices=0.1,at=5..10 (repeatable)"),
    ] = None,
    sensors: Annotated[
        str | None, Opt("--sensors", help="comma-separated streams, e.g. temperature,door")
    ] = None,
    outbox: Annotated[
        int | None, Opt("--outbox", help="messages a device keeps while offline [100]")
    ] = None,
    chaos: Annotated[
        str | None,
        Opt("--chaos", help="site-wide outages through a chaos proxy: UP:DOWN s, e.g. 5-10:2-4"),
    ] = None,
    chaos_mode: Annotated[
        str | None, Opt("--chaos-mode", help="how the chaos link goes down: cut or blackhole")
    ] = None,
    run_id: Annotated[
        str | None, Opt("--run-id", help="name of this run in payloads (simrun) and manifest")
    ] = None,
    drain_timeout: Annotated[
        float, Opt("--drain-timeout", help="seconds to empty the outboxes at the end")
    ] = 10.0,
    progress: Annotated[
        bool, Opt("--progress/--no-progress", help="show the live progress line")
    ] = True,
    stats_every: Annotated[
        float | None, Opt("--stats-every", help="print a JSON 'stats' line on stderr every S s")
    ] = None,
    procs: Annotated[
        str, Opt("--procs", help="split the devices over N processes, one manifest; auto: one "
                 "per 2,500 devices, at most one per CPU")
    ] = "auto",
    connect_rate: Annotated[
        float | None, Opt("--connect-rate", help="at most R new connections a second at start "
                          "[1000]; the ramp also slows down by itself when it falls behind")
    ] = None,
    log_level: Annotated[str, Opt("--log-level", help="debug, info, warning, error")] = "warning",
    username: Annotated[
        str | None,
        Opt("--username", envvar="EDGEFERRY_USERNAME",
            help="user name on the broker (every device; edgeferry provision --device-class)"),
    ] = None,
    password_file: Annotated[
        Path | None,
        Opt("--password-file", envvar="EDGEFERRY_PASSWORD_FILE",
            help="file whose first line is the password (mode 600)"),
    ] = None,
    ca_file: Annotated[
        Path | None, Opt("--ca-file", envvar="EDGEFERRY_CA_FILE",
                         help="CAs trusted for the broker (mqtts://; default: the system store)"),
    ] = None,
    cert_file: Annotated[
        Path | None, Opt("--cert-file", envvar="EDGEFERRY_CERT_FILE",
                         help="client certificate (PEM), every device"),
    ] = None,
    key_file: Annotated[
        Path | None, Opt("--key-file", envvar="EDGEFERRY_KEY_FILE", help="client key (PEM, mode 600)"),
    ] = None,
    tls_server_name: Annotated[
        str | None, Opt("--tls-server-name", envvar="EDGEFERRY_TLS_SERVER_NAME",
                        help="name to check the broker's certificate against (and SNI)"),
    ] = None,
    alpn: Annotated[
        list[str] | None, Opt("--alpn", envvar="EDGEFERRY_ALPN", help="ALPN protocol (repeatable)"),
    ] = None,
) -> None:
    """Run a fleet of simulated devices, each on its own MQTT connection.

    Example: edgeferry sim run --broker mqtt://127.0.0.1:1883 --devices 100 --interval 1
    --duration 60 --seed 7 --fault drop:devices=0.1,at=10..20 --manifest run.json
    """
    import logging

    from edge.errors import ConfigError
    from firmware_sim.errors import SimError
    from firmware_sim.profile import load_profile, parse_fault_flag

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from dataclasses import replace

    from edge.config import tls_from_settings
    from edge.mqtt import BrokerURL, parse_url

    url: str | BrokerURL
    try:
        url = broker = _with_credentials(broker, username, password_file)
        tls = tls_from_settings({"ca_file": ca_file and str(ca_file),
                                 "cert_file": cert_file and str(cert_file),
                                 "key_file": key_file and str(key_file),
                                 "tls_server_name": tls_server_name, "alpn": alpn}, broker)
        if tls is not None:
            url = replace(parse_url(broker), tls_options=tls)
    except ConfigError as e:
        _fail(str(e), 2)
        return
    try:
        faults = dict(parse_fault_flag(f) for f in fault or [])
        chaos_spec = None
        if chaos is not None or chaos_mode is not None:
            chaos_spec = {"flap": chaos, "mode": chaos_mode or "cut"}
        prof = load_profile(
            profile,
            devices=devices,
            interval=interval,
            duration=duration,
            seed=seed,
            sensors=sensors,
            outbox=outbox,
            faults=faults,
            chaos=chaos_spec,
            connect_rate=connect_rate,
        )
    except SimError as e:
        _fail(str(e), 2)
        return
    try:
        nprocs = None if procs.strip().lower() == "auto" else int(procs)
    except ValueError:
        _fail(f"--procs {procs}: expected a number or auto", 2)
        return
    if nprocs is not None and nprocs < 1:
        _fail(f"--procs {procs}: expected at least 1", 2)
        return
    from firmware_sim.runner import run_fleet

    try:
        code = run_fleet(
            url,
            prof,
            manifest_path=manifest,
            run_id=run_id,
            drain_timeout=drain_timeout,
            progress=progress,
            stats_every=stats_every,
            procs=nprocs,
        )
    except (SimError, ConfigError) as e:
        _fail(str(e), 2 if isinstance(e, ConfigError) else 1)
        return
    raise typer.Exit(code)


@sim_app.command("plan")
def sim_plan(
    devices: Annotated[int | None, Opt("--devices", help="number of devices [10]")] = None,
    seed: Annotated[int | None, Opt("--seed", help="random seed [0]")] = None,
    profile: Annotated[Path | None, Opt("--profile", help="profile YAML")] = None,
    fault: Annotated[
        list[str] | None, Opt("--fault", help="add a fault, as for sim run (repeatable)")
    ] = None,
) -> None:
    """Print the fault schedule a seed gives, as JSON, without running anything: which
    device suffers which fault when (seconds from the start).

    Example: edgeferry sim plan --devices 50 --seed 7 --fault drop:devices=0.1,at=10..20
    """
    import json

    from firmware_sim.errors import SimError
    from firmware_sim.faults import plan_faults
    from firmware_sim.profile import load_profile, parse_fault_flag

    try:
        faults = dict(parse_fault_flag(f) for f in fault or [])
        prof = load_profile(profile, devices=devices, seed=seed, faults=faults)
    except SimError as e:
        _fail(str(e), 2)
        return
    plan = sorted(plan_faults(prof).items())
    body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(d.to_json())}" for name, d in plan)
    print(f'{{"seed": {prof.seed}, "devices": {prof.devices}, "plan": {{\n{body}\n}}}}')


@sim_app.command("verify")
def sim_verify(
    manifest: Annotated[Path, Opt("--manifest", help="the manifest written by sim run")],
    sink: Annotated[str, Opt("--sink", help="what ingest wrote: jsonl:PATH or sqlite:PATH")],
    as_json: Annotated[bool, Opt("--json", help="print JSON instead of a table")] = False,
    all_devices: Annotated[
        bool, Opt("--all", help="list every device (default: those with findings, up to 50)")
    ] = False,
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
        report = compare(m, _iter_sink(kind, path))
    except (OSError, ValueError, sqlite3.Error) as e:
        _fail(f"cannot read sink {sink}: {e}", 2)
        return
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report, all_devices)
    raise typer.Exit(0 if report.ok else 1)


def _iter_sink(kind: str, path: str) -> Iterator[dict[str, Any]]:
    """The rows of an ingest sink (format: gateway/sinks.py), one at a time: a sink of a
    long run does not fit in memory. A half-written last JSONL line is skipped."""
    if kind == "jsonl":
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield orjson.loads(line)
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = db.execute("SELECT topic, payload, encoding FROM records")
        for topic, payload, encoding in cur:
            yield {"topic": topic, "payload": payload, "encoding": encoding}
    finally:
        db.close()


def _print_report(report: object, all_devices: bool) -> None:
    from rich.table import Table

    from firmware_sim.verify import Report

    assert isinstance(report, Report)
    out = Console()
    t = Table(
        "device",
        "sent",
        "delivered",
        "dropped (device)",
        "lost",
        "duplicated",
        "garbage",
        title=f"run {report.run}",
        title_justify="left",
    )
    findings = [d for d in report.devices if d.lost or d.duplicated or d.dropped or d.garbage]
    shown = report.devices if all_devices else findings[:50]
    for d in shown:
        lost = f"[red]{d.lost}[/red]" if d.lost else "0"
        t.add_row(
            d.device,
            str(d.sent),
            str(d.delivered),
            str(d.dropped),
            lost,
            str(d.duplicated),
            str(d.garbage),
        )
    tot = report.total
    t.add_row(
        "[bold]total[/bold]",
        str(tot.sent),
        str(tot.delivered),
        str(tot.dropped),
        f"[red]{tot.lost}[/red]" if tot.lost else "0",
        str(tot.duplicated),
        str(tot.garbage),
        end_section=True,
    )
    out.print(t)
    hidden = len(report.devices) - len(shown)
    if hidden:
        out.print(f"({hidden} more devices not listed; --all lists every device)")
    out.print(
        f"devices sent {tot.duplicates_sent} duplicates and {tot.garbage_sent} garbage payloads "
        f"on purpose; {tot.dropped_delivered} messages counted as dropped arrived anyway; "
        f"{report.foreign} other rows (state, events, other runs) ignored"
    )
    for d in report.devices:
        for stream, ranges in d.lost_ranges.items():
            shown_r = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges[:5])
            more = f" (+{len(ranges) - 5} more ranges)" if len(ranges) > 5 else ""
            out.print(f"[red]lost[/red] {d.device} {stream}: seq {shown_r}{more}", highlight=False)
    if report.ok:
        out.print(
            f"[green]OK[/green]: nothing lost beyond what the devices counted "
            f"({tot.delivered} of {tot.sent} delivered)"
        )
    else:
        out.print(f"[red]LOSS[/red]: {tot.lost} messages lost that no device counted")


def register(app: typer.Typer) -> None:
    """Add the ``sim`` group to the edgeferry command."""
    app.add_typer(sim_app, name="sim")
