"""``edgeferry demo --report FILE.html``: the run as one self-contained page.

Charts are inline SVG drawn here from the demo's samples (one a second): messages per
second at the site and to the cloud, the gateway's backlog per lane, the cloud link and
the devices online, and the commands' states over time; the outage is shaded on each.
No script, no font, no network: the file opens anywhere, also offline.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeferry.demomodel import Run

__all__ = ["write_report", "svg_chart"]

W, H = 880, 230
ML, MR, MT, MB = 64, 16, 34, 34  # margins
LANE_COLORS = ["#d9480f", "#5f3dc4", "#0b7285", "#e67700"]
STATE_COLORS = {"pending": "#fab005", "in sync": "#2f9e44",
                "queued": "#fab005", "delivered": "#15aabf", "accepted": "#4dabf7", "succeeded": "#2f9e44",
                "failed": "#e03131", "rejected": "#e03131", "expired": "#868e96"}

Point = tuple[float, float]


def _nice(v: float) -> float:
    """A round number at or above v for the top of an axis."""
    if v <= 0:
        return 1.0
    p = 10 ** len(str(int(v))) / 10
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * p >= v:
            return m * p
    return 10 * p


def _fmt(v: float) -> str:
    return f"{v / 1000:g}k" if v >= 10000 else f"{v:g}"


def svg_chart(series: Sequence[tuple[str, str, Sequence[Point]]], x_max: float,
              bands: Sequence[tuple[float, float, str]] = (), area: bool = False, stacked: bool = False,
              y_label: str = "", height: int = H, clip: bool = False) -> str:
    """An SVG line (or stacked area) chart of ``(name, colour, [(x, y), ...])`` series over
    0..x_max seconds, with shaded ``(x0, x1, label)`` bands (the outage). ``clip``: a short
    burst far above the rest (the drain after an outage) is cut at the top of a scale that
    keeps the steady rates readable, and labelled with its value."""
    pw, ph = W - ML - MR, height - MT - MB
    if stacked:
        acc: dict[float, float] = {}
        stacked_series = []
        for name, color, pts in series:
            new = []
            for x, y in pts:
                base = acc.get(x, 0.0)
                acc[x] = base + y
                new.append((x, base, base + y))
            stacked_series.append((name, color, new))
        y_top = _nice(max(acc.values(), default=0.0))
    else:
        ys = sorted(y for _, _, pts in series for _, y in pts)
        y_top = _nice(ys[-1] if ys else 0.0)
        if clip and ys:
            typical = _nice(ys[int(len(ys) * 0.9)] * 2)
            if typical * 2 < ys[-1]:
                y_top = typical
    x_max = max(x_max, 1.0)

    def sx(x: float) -> float:
        return ML + x / x_max * pw

    def sy(y: float) -> float:
        return MT + ph - y / y_top * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" class="chart" role="img">']
    for x0, x1, label in bands:
        out.append(f'<rect class="band" x="{sx(x0):.1f}" y="{MT}" width="{max(1.0, sx(x1) - sx(x0)):.1f}" '
                   f'height="{ph}" fill="#ffe3e3"/>')
        out.append(f'<text x="{(sx(x0) + sx(x1)) / 2:.1f}" y="{MT + 14}" text-anchor="middle" '
                   f'class="bandlabel">{html.escape(label)}</text>')
    n = next((k for k in (4, 5, 3, 2) if (y_top / k).is_integer()), 4)  # whole-number ticks
    for i in range(n + 1):
        y = y_top * i / n
        out.append(f'<line x1="{ML}" x2="{W - MR}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        out.append(f'<text x="{ML - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">{_fmt(y)}</text>')
    step = next((t for t in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600) if t >= x_max / 8), 7200)
    x = 0.0
    while x <= x_max + 1e-9:
        out.append(f'<text x="{sx(x):.1f}" y="{height - MB + 16}" text-anchor="middle" class="tick">{x:g} s</text>')
        x += step
    out.append(f'<line x1="{ML}" x2="{W - MR}" y1="{MT + ph}" y2="{MT + ph}" class="axis"/>')
    if y_label:
        out.append(f'<text x="14" y="{MT + ph / 2:.1f}" transform="rotate(-90 14 {MT + ph / 2:.1f})" '
                   f'text-anchor="middle" class="tick">{html.escape(y_label)}</text>')
    if stacked:
        for name, color, spts in stacked_series:
            if not spts:
                continue
            top = " ".join(f"{sx(x):.1f},{sy(y1):.1f}" for x, _, y1 in spts)
            bottom = " ".join(f"{sx(x):.1f},{sy(y0):.1f}" for x, y0, _ in reversed(spts))
            out.append(f'<polygon class="series" data-name="{html.escape(name)}" points="{top} {bottom}" '
                       f'fill="{color}" fill-opacity="0.55" stroke="{color}" stroke-width="1.5"/>')
    else:
        for name, color, pts in series:
            if not pts:
                continue
            line = " ".join(f"{sx(x):.1f},{sy(min(y, y_top)):.1f}" for x, y in pts)
            peak_x, peak = max(pts, key=lambda p: p[1])
            if peak > y_top:
                out.append(f'<text x="{sx(peak_x) + 6:.1f}" y="{MT + 28}" class="peak" fill="{color}">'
                           f'peak {peak:,.0f} ↑</text>')
            if area:
                out.append(f'<polygon points="{sx(pts[0][0]):.1f},{sy(0):.1f} {line} {sx(pts[-1][0]):.1f},'
                           f'{sy(0):.1f}" fill="{color}" fill-opacity="0.15"/>')
            out.append(f'<polyline class="series" data-name="{html.escape(name)}" points="{line}" fill="none" '
                       f'stroke="{color}" stroke-width="2" stroke-linejoin="round"/>')
    lx = ML + 8
    for name, color, _ in series:
        out.append(f'<rect x="{lx}" y="6" width="12" height="12" fill="{color}" rx="2"/>')
        out.append(f'<text x="{lx + 16}" y="16" class="legend">{html.escape(name)}</text>')
        lx += 24 + 7 * len(name)
    out.append("</svg>")
    return "\n".join(out)


def _runs(points: Sequence[tuple[float, Any]]) -> list[tuple[Any, float, float]]:
    """``[(t, state), ...]`` as runs ``(state, t_start, t_end)`` of one state."""
    out: list[tuple[Any, float, float]] = []
    for (t, st), (t_next, _) in zip(points, points[1:], strict=False):
        if out and out[-1][0] == st:
            out[-1] = (st, out[-1][1], t_next)
        else:
            out.append((st, t, t_next))
    return out


def _pipeline(summary: dict[str, Any]) -> str:
    """What ran: the site, the chaos link that was cut, the cloud."""
    boxes = [(f"{summary['devices']} devices", "6 sensors each", "#1c7ed6"),
             ("local broker", "Mosquitto", "#495057"),
             ("gateway", "SQLite store", "#5f3dc4"),
             ("chaos link", f"cut {summary['outage_at']:g}–{summary['outage_at'] + summary['outage_for']:g} s",
              "#e03131"),
             ("cloud broker", "Mosquitto", "#495057"),
             ("ingest", "SQLite sink", "#2f9e44")]
    bw, gap, y = 118, 28, 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} 130" class="diagram" role="img">',
           '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#868e96"/></marker></defs>']
    for i, (name, sub, color) in enumerate(boxes):
        x = 12 + i * (bw + gap)
        dash = ' stroke-dasharray="6 4"' if name == "chaos link" else ""
        out.append(f'<rect x="{x}" y="{y}" width="{bw}" height="54" rx="8" fill="#fff" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + bw / 2}" y="{y + 23}" text-anchor="middle" class="boxname" fill="{color}">'
                   f'{html.escape(name)}</text>')
        out.append(f'<text x="{x + bw / 2}" y="{y + 41}" text-anchor="middle" class="tick">{html.escape(sub)}</text>')
        if i:
            out.append(f'<line x1="{x - gap + 2}" y1="{y + 27}" x2="{x - 3}" y2="{y + 27}" stroke="#868e96" '
                       f'stroke-width="2" marker-end="url(#arr)"/>')
    x_svc = 12 + (bw + gap)
    out.append(f'<text x="{x_svc + bw / 2}" y="{y + 82}" text-anchor="middle" class="tick">aggregator, rules '
               f'(services)</text>')
    out.append(f'<line x1="{x_svc + bw / 2}" y1="{y + 56}" x2="{x_svc + bw / 2}" y2="{y + 70}" stroke="#868e96" '
               f'stroke-width="2"/>')
    x_cmd = 12 + 3 * (bw + gap)
    out.append(f'<text x="{x_cmd + bw / 2}" y="{y + 82}" text-anchor="middle" class="tick">commands and desired '
               f'state ← cloud</text>')
    out.append("</svg>")
    return "\n".join(out)


def _strip(samples: Sequence[dict[str, Any]], t0: float, x_max: float) -> str:
    """The cloud link as a strip: green up, red down."""
    pw = W - ML - MR
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} 44" class="chart strip" role="img">',
           f'<text x="{ML - 6}" y="22" text-anchor="end" class="tick">cloud link</text>']
    for state, x0, x1 in _runs([(s["t"], s["link"]) for s in samples]):
        color = "#2f9e44" if state == "up" else "#e03131" if state == "down" else "#adb5bd"
        out.append(f'<rect class="series" x="{ML + (x0 - t0) / x_max * pw:.1f}" y="8" '
                   f'width="{max(0.5, (x1 - x0) / x_max * pw):.1f}" height="20" fill="{color}">'
                   f'<title>{html.escape(str(state))}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


def _commands(samples: Sequence[dict[str, Any]], t0: float, x_max: float, names: dict[str, str]) -> str:
    """One row per command: its state over time, coloured."""
    ids: list[str] = []
    for s in samples:
        for cid in s["commands"]:
            if cid not in ids:
                ids.append(cid)
    pw = W - ML - MR
    height = 30 + 30 * max(1, len(ids))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" class="chart" role="img">']
    for row, cid in enumerate(ids):
        y = 8 + row * 30
        label = html.escape(names.get(cid, cid[-6:]))
        kind = "desired" if cid.startswith("desired:") else "command"
        out.append(f'<text x="{ML - 6}" y="{y + 15}" text-anchor="end" class="tick">{kind}</text>')
        for st, x0, x1 in _runs([(s["t"], s["commands"].get(cid)) for s in samples]):
            if st is None:
                continue
            out.append(f'<rect class="series" x="{ML + (x0 - t0) / x_max * pw:.1f}" y="{y}" '
                       f'width="{max(0.5, (x1 - x0) / x_max * pw):.1f}" height="20" '
                       f'fill="{STATE_COLORS.get(st, "#adb5bd")}"><title>{html.escape(st)}</title></rect>')
            out.append(f'<text x="{ML + (x0 - t0) / x_max * pw + 4:.1f}" y="{y + 14}" class="inbar">'
                       f'{html.escape(st)}</text>')
        out.append(f'<text x="{W - MR}" y="{y + 14}" text-anchor="end" class="inbar">{label}</text>')
    lx = ML
    for st in ("queued", "delivered", "accepted", "succeeded", "failed"):
        yy = height - 14
        out.append(f'<rect x="{lx}" y="{yy - 10}" width="12" height="12" fill="{STATE_COLORS[st]}" rx="2"/>')
        out.append(f'<text x="{lx + 16}" y="{yy}" class="legend">{st}</text>')
        lx += 100
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f6f8;color:#212529}
main{max-width:940px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:17px;margin:0 0 8px}
.sub{color:#6c757d;margin:0 0 18px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:18px}
.card{flex:1 1 0;background:#fff;border-radius:10px;padding:12px 14px;box-shadow:0 1px 3px #0001}
.card b{display:block;font-size:24px} .card span{color:#6c757d;font-size:13px}
.good b{color:#2f9e44} .bad b{color:#e03131}
section{background:#fff;border-radius:10px;padding:14px 16px;margin-bottom:16px;box-shadow:0 1px 3px #0001}
svg.chart,svg.diagram{width:100%;height:auto;display:block}
.grid{stroke:#e9ecef} .axis{stroke:#adb5bd} .tick{font-size:11px;fill:#6c757d}
.legend{font-size:12px;fill:#343a40} .boxname{font-size:14px;font-weight:700} .peak{font-size:12px;font-weight:600}
.inbar{font-size:12px;fill:#fff;font-weight:600} .bandlabel{font-size:11px;fill:#c92a2a;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:14px}
td,th{padding:5px 8px;border-bottom:1px solid #e9ecef;text-align:left}
.ok{color:#2f9e44;font-weight:600} .fail{color:#e03131;font-weight:600}
ol{font-family:ui-monospace,monospace;font-size:13px;padding-left:20px;color:#495057}
"""


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


def write_report(path: Path, run: Run, summary: dict[str, Any]) -> Path:
    """Write the page; returns its absolute path."""
    samples = run.samples
    t0 = run.t0
    x_max = max((s["t"] - t0 for s in samples), default=1.0)
    start, end = run.marks.get("outage_start"), run.marks.get("outage_end")
    bands = [(start - t0, end - t0, "outage")] if start and end else []

    def pts(key: str) -> list[Point]:
        return [(s["t"] - t0, float(s[key])) for s in samples]

    rates = svg_chart([("at the site (local broker)", "#1c7ed6", pts("local")),
                       ("to the cloud (confirmed)", "#2f9e44", pts("uplink"))], x_max, bands, area=True,
                      y_label="messages / s", clip=True)
    lanes = sorted({n for s in samples for n in s["lanes"]})
    backlog = svg_chart([(f"{n} lane", LANE_COLORS[i % len(LANE_COLORS)],
                          [(s["t"] - t0, float(s["lanes"].get(n, [0, 0])[0])) for s in samples])
                         for i, n in enumerate(lanes)], x_max, bands, stacked=True, y_label="records")
    devices = svg_chart([("devices online", "#5f3dc4", pts("devices")),
                         ("alerts raised (rules)", "#e8590c", pts("alerts"))], x_max, bands,
                        y_label="count", height=180)
    cmd = summary.get("command") or {}
    names = {cmd.get("id", ""): f"set_interval → {summary.get('command_target')}",
             f"desired:{summary.get('shadow_target')}": f"interval → {summary.get('shadow_target')}"}
    commands = _commands(samples, t0, x_max, names)
    lost, dups = summary["lost"], summary["duplicated"]
    cards = [("sent", f"{summary['sent']:,}", ""), ("delivered", f"{summary['delivered']:,}", "good"),
             ("lost", f"{lost:,}", "bad" if lost else "good"), ("duplicated", f"{dups:,}", "bad" if dups else "good")]
    drained = run.marks.get("drained")
    if drained and end:
        cards.append(("drained after the outage", f"{drained - end:.1f} s", ""))
    cards.append(("command", str(cmd.get("state", "-")), "good" if cmd.get("state") == "succeeded" else "bad"))
    card_html = "".join(f'<div class="card {cls}"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>'
                        for k, v, cls in cards)
    checks = "".join(f'<tr><td class="{"ok" if ok else "fail"}">{"OK" if ok else "FAIL"}</td>'
                     f'<td>{html.escape(label)}</td><td>{"" if ok else html.escape(detail)}</td></tr>'
                     for label, ok, detail in summary["checks"])
    events = "".join(f"<li>{html.escape(_plain(e))}</li>" for e in run.events)
    shadow = summary.get("shadow") or {}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeferry demo report</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><main>
<h1>edgeferry demo</h1>
<p class="sub">{summary['devices']} simulated devices for {summary['duration']:g} s; the cloud link was cut at
{summary['outage_at']:g} s for {summary['outage_for']:g} s. Run {html.escape(time.strftime('%Y-%m-%d %H:%M:%S',
time.localtime(t0)))}.</p>
<div class="cards">{card_html}</div>
<section><h2>What ran on this machine</h2>{_pipeline(summary)}</section>
<section><h2>Messages per second</h2>{rates}</section>
<section><h2>Backlog in the gateway's store</h2>{backlog}{_strip(samples, t0, x_max)}</section>
<section><h2>Devices and alerts</h2>{devices}</section>
<section><h2>Commands sent from the cloud during the outage</h2>{commands}
<table><tr><th>command</th><th>target</th><th>state</th><th>reply</th></tr>
<tr><td>set_interval {html.escape(json.dumps(cmd.get('args')))}</td><td>{html.escape(str(cmd.get('target')))}</td>
<td>{html.escape(str(cmd.get('state')))}</td><td>{html.escape(json.dumps(cmd.get('reply')))}</td></tr>
<tr><td>desired v{shadow.get('desired_version')} {html.escape(json.dumps(shadow.get('desired')))}</td>
<td>{html.escape(str(summary.get('shadow_target')))}</td><td>reported v{shadow.get('reported_version')}</td>
<td>{html.escape(json.dumps(shadow.get('reported')))}</td></tr></table></section>
<section><h2>Verification</h2><table>{checks}</table></section>
<section><h2>What happened</h2><ol>{events}</ol></section>
</main></body></html>
"""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
