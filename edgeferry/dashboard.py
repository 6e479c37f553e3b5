"""The site dashboard (rich): ``edgeferry top`` and the demo's live view are this one
renderer over :class:`edgeferry.siteview.SiteWatcher` snapshots.

:func:`render` turns a snapshot (and the history before it) into one renderable;
:func:`run_top` refreshes it until ``q`` or Ctrl-C; :func:`print_status` is the one-shot
``edgeferry status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from edgeferry.siteview import SiteWatcher

__all__ = ["render", "run_top", "print_status", "sparkline", "human_bytes", "human_secs"]

_BARS = " ▁▂▃▄▅▆▇█"
_STATE_STYLE = {"pending": "yellow", "in sync": "green",
                "queued": "yellow", "delivered": "cyan", "accepted": "cyan", "succeeded": "green",
                "failed": "red", "rejected": "red", "expired": "red"}


def sparkline(values: Sequence[float], width: int = 30) -> str:
    vals = list(values)[-width:]
    if not vals:
        return ""
    top = max(vals) or 1.0
    return "".join(_BARS[max(1 if v > 0 else 0, min(8, round(v / top * 8)))] for v in vals)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{s / 3600:.1f} h"


def _link_text(snap: dict[str, Any]) -> Text:
    link = snap["link"]
    state = link["state"]
    if state == "up":
        t = Text(" CLOUD LINK UP ", style="bold black on green")
        if link.get("for_s") is not None:
            t.append(f"  for {human_secs(link['for_s'])}", style="green")
    elif state == "unknown":
        t = Text(" NO GATEWAY ANSWERS ", style="bold black on yellow")
    else:
        t = Text(" CLOUD LINK DOWN ", style="bold white on red")
        t.append(f"  offline for {human_secs(link.get('offline_for_s'))}", style="red")
        if link.get("why") and link["why"] != "down":
            t.append(f" ({link['why']})", style="red")
    return t


def _series(history: Iterable[dict[str, Any]], *path: str) -> list[float]:
    out = []
    for h in history:
        v: Any = h
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        out.append(float(v or 0))
    return out


def _backlog(history: Iterable[dict[str, Any]]) -> list[float]:
    return [float(sum(lane["records"] for lane in h.get("lanes", {}).values())) for h in history]


def _compact(snap: dict[str, Any], history: Sequence[dict[str, Any]], head: Text, events: Sequence[str],
             footer: str, lines: int) -> RenderableType:
    """The dashboard in a small terminal (80x24): one line per subject."""
    g = Table.grid(padding=(0, 1))
    g.add_column(style="bold", no_wrap=True)
    g.add_column()
    devs, rates = snap["devices"], snap["rates"]
    g.add_row("devices", Text.assemble(f"{devs['online']}/{devs['known']} online",
                                       (f", offline: {', '.join(devs['offline'][:3])}" if devs.get("offline")
                                        else "", "red")))
    local, up = sparkline(_series(history, "rates", "local"), 14), sparkline(_series(history, "rates", "uplink"), 14)
    g.add_row("msg/s", Text.assemble(f"local {rates['local']:,.0f} ", (local, "cyan"),
                                     f"  uplink {rates['uplink']:,.0f} ", (up, "green")))
    lanes = " · ".join(f"{n} {v['records']:,} ({human_bytes(v['bytes'])}, oldest {human_secs(v.get('oldest_age_s'))}"
                       + (f", drain ~{human_secs(v['drain_s'])}" if v.get("drain_s") else "") + ")"
                       for n, v in snap["lanes"].items())
    g.add_row("backlog", Text(lanes or "(no gateway)", style="magenta"))
    svc = " · ".join(f"{s['name']} {'online' if s['online'] else 'OFFLINE'}"
                     + (f" ({s['heartbeat_age_s']:.0f} s)" if s.get("heartbeat_age_s") is not None else "")
                     for s in snap.get("services") or [])
    g.add_row("services", svc or "none seen")
    al = snap["alerts"]
    last = al["recent"][-1] if al["recent"] else None
    g.add_row("alerts", f"raised {al['raised']}, firing {al['firing']}"
              + (f"; last: {last['rule']} {last['device']} {last['state']}" if last else ""))
    cmds = Text()
    for c in (snap.get("commands") or [])[:3]:
        cmds.append(f"{c.get('name') or '?'} → {c.get('target')} ")
        cmds.append(str(c.get("state")), style=_STATE_STYLE.get(str(c.get("state")), "white"))
        cmds.append("  ")
    for sh in (snap.get("shadows") or [])[:2]:
        cmds.append(f"desired v{sh['desired_version']} → {sh['thing']} ")
        cmds.append(sh["state"], style=_STATE_STYLE.get(sh["state"], "white"))
        cmds.append("  ")
    g.add_row("commands", cmds if cmds.plain else Text("none", style="dim"))
    drops = snap.get("drops") or {}
    g.add_row("drops", ", ".join(f"{k} {v:,}" for k, v in drops.items()) or "none")
    parts: list[RenderableType] = [head, g]
    room = max(0, lines - 16)
    if events and room:
        parts.append(Text("what happened", style="bold"))
        parts.append(Text.from_markup("\n".join(events[-room:])))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def render(snap: dict[str, Any], history: Sequence[dict[str, Any]] = (), title: str = "edgeferry top",
           events: Sequence[str] = (), footer: str = "q or Ctrl-C quits", width: int = 120,
           height: int = 60) -> RenderableType:
    """The whole dashboard for one snapshot: panels side by side from ``width`` 110 on,
    one line per subject in a terminal of fewer than 40 lines."""
    head = Text.assemble((f"{title}", "bold"), "  node ", (str(snap.get("node") or "?"), "bold cyan"), "  ")
    head.append_text(_link_text(snap))
    if "elapsed_s" in snap:
        head.append(f"   t = {snap['elapsed_s']:.0f} s", style="dim")
    if height < 40:
        return _compact(snap, history, head, events, footer, height)

    # traffic: rates with sparklines, devices, services
    traffic = Table.grid(padding=(0, 2))
    traffic.add_column(style="bold", no_wrap=True)
    traffic.add_column(justify="right")
    traffic.add_column()
    devs = snap["devices"]
    traffic.add_row("devices online", f"{devs['online']}/{devs['known']}",
                    Text(sparkline(_series(history, "devices", "online")), style="blue"))
    traffic.add_row("local msg/s", f"{snap['rates']['local']:,.0f}",
                    Text(sparkline(_series(history, "rates", "local")), style="cyan"))
    traffic.add_row("uplink msg/s", f"{snap['rates']['uplink']:,.0f}",
                    Text(sparkline(_series(history, "rates", "uplink")), style="green"))
    traffic.add_row("backlog", f"{sum(x['records'] for x in snap['lanes'].values()):,}",
                    Text(sparkline(_backlog(history)), style="magenta"))
    svc = snap.get("services") or []
    svc_text = Text()
    for s in svc:
        style = "green" if s["online"] else "red"
        hb = s.get("heartbeat_age_s")
        svc_text.append(f"\n  {s['name']} ", style=f"bold {style}")
        svc_text.append(("online" if s["online"] else "offline") +
                        (f", heartbeat {hb:.0f} s ago" if hb is not None else ""), style=style)
    if devs.get("offline"):
        names = ", ".join(devs["offline"][:4]) + (" ..." if len(devs["offline"]) > 4 else "")
        traffic.add_row("offline", str(len(devs["offline"])), Text(names, style="red"))
    svc_text.rstrip()
    site = Group(traffic, Text.assemble(("services ", "bold"), svc_text if svc else Text("none seen", style="dim")))

    lanes = Table("lane", "records", "bytes", "oldest", "drain", title="backlog (gateway store)",
                  title_justify="left", expand=False, header_style="bold")
    for name, lane in snap["lanes"].items():
        drain = lane.get("drain_s")
        lanes.add_row(name, f"{lane['records']:,}", human_bytes(lane["bytes"]),
                      human_secs(lane.get("oldest_age_s")),
                      "-" if drain is None else ("empty" if lane["records"] == 0 else f"~{human_secs(drain)}"))
    if not snap["lanes"]:
        lanes.add_row("(no gateway)", "", "", "", "")

    cmds = Table("command", "target", "state", title="commands", title_justify="left", header_style="bold")
    for c in (snap.get("commands") or [])[:6]:
        state = str(c.get("state"))
        cmds.add_row(f"{c.get('name') or '?'} {str(c.get('id'))[-6:]}", str(c.get("target")),
                     Text(state, style=_STATE_STYLE.get(state, "white")))
    for sh in snap.get("shadows") or []:
        cmds.add_row(f"desired v{sh['desired_version']} {json.dumps(sh['desired'])}"[:40], str(sh["thing"]),
                     Text(sh["state"], style=_STATE_STYLE.get(sh["state"], "white")))
    pending = snap.get("pending_commands") or []
    if not snap.get("commands") and not snap.get("shadows"):
        cmds.add_row(Text("none", style="dim"), "", "")
    cmds_caption = f"{len(pending)} held at the site" if pending else ""

    alerts = Text()
    al = snap["alerts"]
    alerts.append(f"raised {al['raised']}, firing {al['firing']}\n", style="bold")
    for a in reversed(list(al["recent"])[-4:]):
        style = "red" if a["state"] == "firing" else "green"
        alerts.append(f"{a['rule']} {a['device']} {a['state']} ({a.get('condition') or ''})\n", style=style)

    drops = snap.get("drops") or {}
    drop_text = Text(", ".join(f"{k} {v:,}" for k, v in drops.items()) if drops else "none",
                     style="yellow" if drops else "green")

    cmd_panel = Group(cmds, Text(cmds_caption, style="dim")) if cmds_caption else cmds
    panels = [Panel(site, title="site", border_style="blue", expand=False),
              Panel(lanes, border_style="magenta", expand=False),
              Panel(cmd_panel, border_style="cyan", expand=False),
              Panel(alerts, title="alerts (rules service)", border_style="red", expand=False)]
    parts: list[RenderableType] = [head]
    if width >= 110:
        for a, b in (panels[:2], panels[2:]):
            row = Table.grid(padding=(0, 2))
            row.add_row(a, b)
            parts.append(row)
    else:
        parts += panels
    parts.append(Text.assemble(("drops by reason: ", "bold"), drop_text))
    if events:
        parts.append(Panel(Text.from_markup("\n".join(events[-7:])), title="what happened", border_style="white"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def print_status(snap: dict[str, Any], console: Console | None = None) -> None:
    """``edgeferry status``: the dashboard once, without the live parts' history."""
    out = console or Console()
    out.print(render(snap, title="edgeferry status", footer="", width=out.width))
    if snap.get("pending_commands"):
        t = Table("id", "target", "name", "state", title="commands held at the site", title_justify="left")
        for c in snap["pending_commands"]:
            t.add_row(c["id"], c["target"], c["name"], c["state"])
        out.print(t)


async def run_top(watcher: SiteWatcher, refresh: float = 1.0, console: Console | None = None) -> None:
    """Refresh the dashboard every ``refresh`` seconds until q, Ctrl-C or SIGTERM."""
    from rich.live import Live

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    restore = _keys(loop, stop)
    watch = asyncio.create_task(watcher.run(), name="site-watcher")
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await watcher.connected.wait()  # the retained states first
        watcher.snapshot()
        out = console or Console()
        with Live(console=out, auto_refresh=False, screen=False) as live:
            while not stop.is_set():
                snap = watcher.snapshot()
                live.update(render(snap, list(watcher.history), width=out.width, height=out.height), refresh=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(refresh):
                        await stop.wait()
    finally:
        restore()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        watcher.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _keys(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Any:
    """Read single keys from a terminal (q quits); returns the function that restores it."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        return lambda: None
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def on_key() -> None:
        try:
            ch = os.read(fd, 32)
        except OSError:
            return
        if b"q" in ch.lower() or b"\x03" in ch:
            stop.set()

    loop.add_reader(fd, on_key)

    def restore() -> None:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return restore
