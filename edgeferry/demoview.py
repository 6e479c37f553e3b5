"""What the demo shows: the live view while it runs (the dashboard of ``edgeferry top``,
or a line every few seconds with ``--no-dashboard``) and the verification at the end."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeferry.dashboard import human_secs, render
from edgeferry.demomodel import (
    CMD_INTERVAL,
    CMD_TARGET,
    SHADOW_INTERVAL,
    SHADOW_TARGET,
    DemoOptions,
    Run,
    device_name,
)
from edgeferry.demosite import NODE, DemoSite
from edgeferry.siteview import SiteWatcher

__all__ = ["sample_loop", "finish"]

_FINAL = ("succeeded", "failed", "rejected", "expired")


def _compact(snap: dict[str, Any]) -> dict[str, Any]:
    """The part of a snapshot the report draws."""
    return {
        "t": snap["t"],
        "local": snap["rates"]["local"],
        "uplink": snap["rates"]["uplink"],
        "link": snap["link"]["state"],
        "lanes": {n: [v["records"], v["bytes"]] for n, v in snap["lanes"].items()},
        "devices": snap["devices"]["online"],
        "alerts": snap["alerts"]["raised"],
        "commands": {**{c["id"]: c["state"] for c in snap.get("commands") or []},
                     **{f"desired:{sh['thing']}": sh["state"] for sh in snap.get("shadows") or []}},
    }


async def sample_loop(watcher: SiteWatcher, run: Run, opts: DemoOptions, out: Console,
                      story: asyncio.Task[None]) -> None:
    """One snapshot a second: kept for the report, shown, and turned into notes."""
    from rich.live import Live

    # not a terminal (make demo | tee): Live would print only its last frame; lines instead
    live = Live(console=out, auto_refresh=False, transient=False) if opts.dashboard and out.is_terminal else None
    if live is not None:
        live.start()
    shown = 0
    states: dict[str, str] = {}
    peak = 0
    drained = False
    last_line = 0.0
    try:
        while not story.done():
            snap = watcher.snapshot(extra={"elapsed_s": time.time() - run.t0})
            run.samples.append(_compact(snap))
            backlog = sum(lane["records"] for lane in snap["lanes"].values())
            if "outage_start" in run.marks and not drained:
                peak = max(peak, backlog)
            if "outage_end" in run.marks and not drained and snap["link"]["state"] == "up" and _fresh(snap):
                drained = True
                run.marks["drained"] = time.time()
                run.note(f"[green]backlog drained[/green] {run.marks['drained'] - run.marks['outage_end']:.1f} s "
                         f"after the link came back ({peak:,} records at the peak)")
            for c in snap.get("commands") or []:
                if states.get(c["id"]) != c["state"]:
                    states[c["id"]] = c["state"]
                    run.note(f"command {c['name']} -> {c['target']}: [bold]{c['state']}[/bold]")
            for sh in snap.get("shadows") or []:
                key = f"desired:{sh['thing']}"
                if states.get(key) != sh["state"]:
                    states[key] = sh["state"]
                    run.note(f"desired state of {sh['thing']} v{sh['desired_version']}: [bold]{sh['state']}[/bold]"
                             + (f" (reported {json.dumps(sh['reported'])})" if sh["state"] == "in sync" else ""))
            if live is not None:
                live.update(render(snap, list(watcher.history), title="edgeferry demo", events=run.events,
                                   footer="Ctrl-C stops the demo and every process it started", width=out.width,
                                   height=out.height),
                            refresh=True)
            else:
                for line in run.events[shown:]:
                    out.print(line, highlight=False, soft_wrap=True)
                shown = len(run.events)
                if snap["t"] - last_line >= 5:
                    last_line = snap["t"]
                    link = snap["link"]
                    down = f" ({human_secs(link['offline_for_s'])})" if link["state"] != "up" else ""
                    out.print(f"{snap['elapsed_s']:6.1f} s  link {link['state']}{down} · devices "
                              f"{snap['devices']['online']}/{snap['devices']['known']} · local "
                              f"{snap['rates']['local']:,.0f}/s · uplink {snap['rates']['uplink']:,.0f}/s · "
                              f"backlog {backlog:,} · alerts {snap['alerts']['raised']}", highlight=False,
                              soft_wrap=True)
            await asyncio.sleep(max(0.05, 1.0 - (time.time() - snap["t"])))
    finally:
        if live is not None:
            live.stop()
        else:
            for line in run.events[shown:]:
                out.print(line, highlight=False)


def _fresh(snap: dict[str, Any]) -> bool:
    """Nothing older than a few seconds waits in the store: what the outage held is gone
    (records of the last moments always wait for their group commit and confirmation)."""
    return all((lane.get("oldest_age_s") or 0.0) < 3.0 for lane in snap["lanes"].values())


def _rows(path: Any) -> Iterator[dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for topic, payload, encoding in db.execute("SELECT topic, payload, encoding FROM records"):
            yield {"topic": topic, "payload": payload, "encoding": encoding}
    finally:
        db.close()


def finish(site: DemoSite, opts: DemoOptions, run: Run, out: Console) -> int:
    """Check the run, print the verification, write the report; the exit status."""
    from firmware_sim.manifest import read_manifest
    from firmware_sim.verify import compare
    from gateway.cloudstate import CloudState

    manifest = read_manifest(site.manifest)
    report = compare(manifest, _rows(site.sink_path))
    state = CloudState.for_sink(site.sink)
    try:
        cmd = state.command(run.command) if run.command else None
        shadow = state.shadow(NODE, device_name(SHADOW_TARGET, site.devices))
    finally:
        state.close()
    target = device_name(CMD_TARGET, site.devices)
    thing = device_name(SHADOW_TARGET, site.devices)
    dev = manifest["devices"].get(target, {})
    dev2 = manifest["devices"].get(thing, {})
    tot = report.total
    out.print()
    t = Table("sent", "delivered", "dropped by devices", "lost", "duplicated",
              title="devices' manifest against the cloud sink (telemetry)", title_justify="left")
    t.add_row(f"{tot.sent:,}", f"{tot.delivered:,}", f"{tot.dropped:,}",
              f"[red]{tot.lost:,}[/red]" if tot.lost else "0",
              f"[red]{tot.duplicated:,}[/red]" if tot.duplicated else "0")
    out.print(t)
    if opts.per_device:
        pd = Table("device", "sent", "delivered", "dropped", "lost", "duplicated", title="per device",
                   title_justify="left")
        for d in report.devices:
            pd.add_row(d.device, str(d.sent), str(d.delivered), str(d.dropped), str(d.lost), str(d.duplicated))
        out.print(pd)
    out.print(f"\\[demo] sent={tot.sent} delivered={tot.delivered} lost={tot.lost} duplicated={tot.duplicated}",
              highlight=False)

    outage_end = run.marks.get("outage_end", 0.0)
    checks: list[tuple[str, bool, str]] = [
        ("nothing lost", tot.lost == 0, f"{tot.lost} lost"),
        ("nothing duplicated", tot.duplicated == 0, f"{tot.duplicated} duplicated"),
    ]
    c = Table("what", "target", "state", "applied", "when", title="downlink: sent from the cloud during the outage",
              title_justify="left")
    if cmd is not None:
        applied = int(dev.get("commands_applied", 0))
        # the cloud's clock (this machine's): the gateway stored it, the device ran it
        got, done = cmd.get("delivered_at") or 0.0, cmd.get("finished_at") or 0.0
        when = f"{done - outage_end:+.1f} s after the link came back" if done else "-"
        ok = cmd["state"] == "succeeded" and applied == 1 and got >= outage_end \
            and dev.get("interval") == CMD_INTERVAL
        c.add_row(f"set_interval {json.dumps(cmd['args'])}", target, cmd["state"],
                  f"{applied}x ({int(dev.get('commands_duplicate', 0))} repeats ignored)", when)
        checks.append(("command applied once, after the outage", ok,
                       f"state {cmd['state']}, applied {applied}x, device interval {dev.get('interval')}"))
    else:
        checks.append(("command applied once, after the outage", False, "no command was sent"))
    reported = (shadow or {}).get("reported") or {}
    shadow_ok = reported.get("interval") == SHADOW_INTERVAL and dev2.get("interval") == SHADOW_INTERVAL
    rep_at = (shadow or {}).get("reported_at") or 0.0
    c.add_row(f"desired {{\"interval\": {SHADOW_INTERVAL:g}}} v{(shadow or {}).get('desired_version')}", thing,
              "reported" if shadow_ok else "not reported",
              f"reported {json.dumps(reported)}",
              f"{rep_at - outage_end:+.1f} s after the link came back" if rep_at else "-")
    checks.append(("desired state applied and reported", shadow_ok, f"reported {reported}"))
    out.print(c)
    drained = run.marks.get("drained")
    if drained:
        out.print(f"backlog drained {drained - outage_end:.1f} s after the link came back", highlight=False)
    ok = all(x[1] for x in checks)
    for label, good, detail in checks:
        out.print(("[green]OK[/green]   " if good else "[red]FAIL[/red] ") + label + ("" if good else f": {detail}"),
                  highlight=False)
    out.print(f"per device: edgeferry sim verify --manifest {site.manifest} --sink {site.sink} --all",
              highlight=False)
    timeline = {"t0": run.t0, "marks": run.marks, "events": run.events, "samples": run.samples,
                "checks": checks, "command": cmd, "shadow": shadow}
    (site.data / "run.json").write_text(json.dumps(timeline, indent=1, default=str))
    if opts.report is not None:
        from edgeferry.report import write_report

        summary = {"sent": tot.sent, "delivered": tot.delivered, "lost": tot.lost, "duplicated": tot.duplicated,
                   "dropped": tot.dropped, "checks": checks, "command": cmd, "shadow": shadow,
                   "devices": opts.devices, "duration": opts.duration, "outage_at": opts.outage_at,
                   "outage_for": opts.outage_for, "command_target": target, "shadow_target": thing}
        path = write_report(opts.report, run, summary)
        out.print(f"report: {path}", highlight=False)
    return 0 if ok else 1
