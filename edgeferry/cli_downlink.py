"""``edgeferry cmd ...`` and ``edgeferry shadow ...``: commands and desired state for sites
that may be offline (docs/commands.md, docs/shadow.md)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

cmd_app = typer.Typer(help="Commands to devices and services at a site (docs/commands.md).",
                      no_args_is_help=True)
shadow_app = typer.Typer(help="Desired and reported state per thing (docs/shadow.md).", no_args_is_help=True)
err = Console(stderr=True)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_SINK = typer.Option(None, "--sink", help="the sink ingest writes: sqlite:PATH or jsonl:PATH "
                     "(env: EDGEFERRY_SINK; yaml: ingest.sink)")
_CLOUD = typer.Option(None, "--cloud", help="cloud broker URL, to reach an online site at once "
                      "(env: EDGEFERRY_CLOUD; yaml: ingest.cloud)")
_CONFIG = typer.Option(None, "--config", help="YAML settings file (env: EDGEFERRY_CONFIG)")
_NODE = typer.Option(..., "--node", help="the site's node id")


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _setting(name: str, flag: str | None, config: str | None, required: bool = True) -> str | None:
    """flag > EDGEFERRY_<NAME> > the YAML file's ingest section (or top level)."""
    if flag:
        return flag
    env = os.environ.get(f"EDGEFERRY_{name.upper()}")
    if env:
        return env
    path = config or os.environ.get("EDGEFERRY_CONFIG")
    if path:
        from edge.config import read_yaml
        from edge.errors import ConfigError

        try:
            data = read_yaml(path)
        except ConfigError as e:
            _fail(str(e), 2)
        if isinstance(data, dict):
            ingest = data.get("ingest")
            sect: dict[str, Any] = ingest if isinstance(ingest, dict) else {}
            value = sect.get(name, data.get(name))
            if value:
                return str(value)
    if required:
        _fail(f"--{name} is required (or EDGEFERRY_{name.upper()}, or '{name}' in --config)", 2)
    return None


def _state(sink: str | None, config: str | None) -> Any:
    from gateway.cloudstate import CloudState
    from gateway.errors import SinkError

    spec = _setting("sink", sink, config)
    assert spec is not None
    try:
        return CloudState.for_sink(spec)
    except SinkError as e:
        _fail(str(e))


def _name(what: str, value: str) -> str:
    if not _NAME.match(value):
        _fail(f"{what} {value!r}: letters, digits, _ . - only (at most 64)", 2)
    return value


def _json(what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        _fail(f"{what} is not JSON: {e}", 2)


def _publish(cloud: str | None, messages: list[tuple[str, bytes]], what: str,
             config: str | None = None) -> None:
    """Publish to the cloud broker for a site that is online; stored either way. TLS and
    the password file are ingest's (EDGEFERRY_CA_FILE ... or the YAML's ingest section)."""
    if not cloud:
        err.print(f"{what} stored; no --cloud: ingest offers it when the site says hello", highlight=False)
        return
    from dataclasses import replace

    from edge.config import tls_from_settings
    from edge.errors import ConfigError, ConnectError, ConnectionLost
    from edge.mqtt import BrokerURL, parse_url
    from gateway.cloudsync import publish_once

    try:
        ident: dict[str, Any] = {k: _setting(k, None, config, required=False) for k in
                 ("ca_file", "cert_file", "key_file", "tls_server_name", "alpn", "password_file")}
        if ident["alpn"]:
            ident["alpn"] = [a.strip() for a in str(ident["alpn"]).strip("[]").split(",") if a.strip()]
        tls = tls_from_settings(ident, cloud)
        url: str | BrokerURL = cloud
        if tls is not None or ident["password_file"]:
            from edge._tls import read_secret

            u = parse_url(cloud)
            pw = read_secret(ident["password_file"], error=ConfigError) if ident["password_file"] else None
            url = replace(u, tls_options=tls, password=pw or u.password)
        asyncio.run(publish_once(url, f"edgeferry-cli-{os.getpid()}", messages))
    except (ConnectError, ConnectionLost, ConfigError, TimeoutError, OSError) as e:
        err.print(f"[yellow]warning:[/yellow] {what} stored but not published ({e}); ingest offers it "
                  "when the site says hello", highlight=False)


def _ago(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@cmd_app.command("send")
def cmd_send(
    node: str = _NODE,
    target: str = typer.Option(..., "--target", help="device or service that runs it"),
    name: str = typer.Option(..., "--name", help="command name, e.g. set_interval"),
    args: str = typer.Option("{}", "--args", help="arguments as a JSON object"),
    ttl: str = typer.Option("24h", "--ttl", help="time to live: never run after this (e.g. 90s, 2h; at most 30d)"),
    cloud: str | None = _CLOUD,
    sink: str | None = _SINK,
    config: str | None = _CONFIG,
) -> None:
    """Queue a command for a site (offline or not) and print its id.

    Example: edgeferry cmd send --cloud mqtt://cloud:1883 --sink sqlite:cloud.db --node pi-01
    --target dev-0001 --name set_interval --args '{"interval": 5}' --ttl 2h
    """
    from edge.config import parse_duration
    from gateway.cloudstate import MAX_TTL
    from gateway.topics import cmd_topic

    _name("--node", node)
    _name("--target", target)
    _name("--name", name)
    body = _json("--args", args)
    if not isinstance(body, dict):
        _fail("--args must be a JSON object", 2)
    try:
        seconds = parse_duration(ttl)
    except ValueError as e:
        _fail(f"--ttl: {e}", 2)
    if not 0 < seconds <= MAX_TTL:
        _fail("--ttl must be more than 0 and at most 30d", 2)
    cloud_url = _setting("cloud", cloud, config, required=False)
    state = _state(sink, config)
    try:
        cid = state.add_command(node, target, name, body, seconds)
        offer = state.offer(cid) if cloud_url else None
    finally:
        state.close()
    print(cid)
    if offer is not None:
        wire = {k: offer[k] for k in ("id", "target", "name", "args", "ttl_ms")}
        _publish(cloud_url, [(cmd_topic(node, cid), json.dumps(wire).encode())], "command", config)


@cmd_app.command("status")
def cmd_status(
    cid: str = typer.Argument(..., help="the command id that cmd send printed"),
    sink: str | None = _SINK,
    config: str | None = _CONFIG,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """A command's state, reply or error, and times.

    Example: edgeferry cmd status --sink sqlite:cloud.db 01JDX8Q5V7AZ3M2K9W4R6T1Y0B
    """
    state = _state(sink, config)
    try:
        state.expire_due()
        row = state.command(cid)
    finally:
        state.close()
    if row is None:
        _fail(f"no command {cid!r}")
        return
    if as_json:
        print(json.dumps(row, indent=2, sort_keys=True))
        return
    out = Console()
    out.print(f"[bold]{row['id']}[/bold] {row['name']} -> {row['node']}/{row['target']}: "
              f"[bold]{row['state']}[/bold]", highlight=False)
    out.print(f"args {json.dumps(row['args'])}  ttl {row['ttl_ms'] / 1000 if row['ttl_ms'] else '-'} s",
              highlight=False)
    for key in ("created", "delivered_at", "accepted_at", "finished_at"):
        if row.get(key):
            out.print(f"{key}: {_ago(row[key])}", highlight=False)
    if row.get("reply") is not None:
        out.print(f"reply: {json.dumps(row['reply'])}", highlight=False)
    if row.get("error"):
        out.print(f"error: {row['error']}", highlight=False)


@cmd_app.command("list")
def cmd_list(
    node: str = _NODE,
    sink: str | None = _SINK,
    config: str | None = _CONFIG,
    limit: int = typer.Option(50, "--limit", help="newest N commands"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """A node's commands, newest first, with their states.

    Example: edgeferry cmd list --sink sqlite:cloud.db --node pi-01
    """
    state = _state(sink, config)
    try:
        state.expire_due()
        rows = state.commands(node, limit)
    finally:
        state.close()
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    t = Table("id", "target", "name", "state", "created", "finished", "reply / error")
    for r in rows:
        detail = r["error"] or ("" if r["reply"] is None else json.dumps(r["reply"]))
        t.add_row(r["id"], r["target"], r["name"], r["state"], _ago(r["created"]), _ago(r["finished_at"]),
                  detail[:60])
    Console().print(t)


@shadow_app.command("set")
def shadow_set(
    node: str = _NODE,
    thing: str = typer.Option(..., "--thing", help="device or service name"),
    desired: str = typer.Option(..., "--desired", help="the whole desired document, a JSON object"),
    version: int | None = typer.Option(None, "--version", help="apply only if the desired version held is N"),
    cloud: str | None = _CLOUD,
    sink: str | None = _SINK,
    config: str | None = _CONFIG,
) -> None:
    """Replace a thing's desired document; print its new version (exit 3: version conflict).

    Example: edgeferry shadow set --cloud mqtt://cloud:1883 --sink sqlite:cloud.db --node pi-01
    --thing dev-0001 --desired '{"interval": 5}' --version 3
    """
    from gateway.cloudstate import VersionConflict
    from gateway.topics import desired_topic

    _name("--node", node)
    _name("--thing", thing)
    doc = _json("--desired", desired)
    cloud_url = _setting("cloud", cloud, config, required=False)
    state = _state(sink, config)
    try:
        new = state.set_desired(node, thing, doc, version)
    except VersionConflict as e:
        _fail(str(e), 3)
        return
    except ValueError as e:
        _fail(str(e), 2)
        return
    finally:
        state.close()
    print(new)
    body = json.dumps({"thing": thing, "version": new, "desired": doc}).encode()
    _publish(cloud_url, [(desired_topic(node, thing), body)], "desired state", config)


@shadow_app.command("get")
def shadow_get(
    node: str = _NODE,
    thing: str = typer.Option(..., "--thing", help="device or service name"),
    sink: str | None = _SINK,
    config: str | None = _CONFIG,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Desired and reported documents, their versions and the delta.

    Example: edgeferry shadow get --sink sqlite:cloud.db --node pi-01 --thing dev-0001 --json
    """
    from edge.downlink import delta

    state = _state(sink, config)
    try:
        row = state.shadow(node, thing)
    finally:
        state.close()
    if row is None:
        _fail(f"no shadow for {node}/{thing}")
        return
    out = {"node": node, "thing": thing, "desired": row["desired"], "desired_version": row["desired_version"],
           "reported": row["reported"], "reported_version": row["reported_version"],
           "delta": delta(row["desired"], row["reported"]), "desired_at": row["desired_at"],
           "reported_at": row["reported_at"], "stale_dropped": row["stale_dropped"]}
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    c = Console()
    c.print(f"[bold]{node}/{thing}[/bold]", highlight=False)
    c.print(f"desired  v{out['desired_version']}: {json.dumps(out['desired'])}", highlight=False)
    c.print(f"reported v{out['reported_version']}: {json.dumps(out['reported'])}", highlight=False)
    c.print(f"delta: {json.dumps(out['delta'])}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cmd_app, name="cmd")
    app.add_typer(shadow_app, name="shadow")
