"""The operator view without processes: what the watcher makes of retained states,
heartbeats, alerts and statuses, the rates and time to drain it computes from two
gateway status documents, and the report's charts (edgeferry/siteview.py,
edgeferry/dashboard.py, edgeferry/report.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from rich.console import Console

from edge.mqtt import Message
from edgeferry import siteview
from edgeferry.dashboard import render, sparkline
from edgeferry.report import svg_chart
from edgeferry.siteview import SiteWatcher


def _msg(topic: str, payload: Any) -> Message:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Message(topic, body, 0, True, False, 0)


def _status(received: int, uplinked: int, cloud: str = "up", records: int = 0, offline_for: float = 0.0) -> dict:
    return {"node_id": "pi-1", "link": {"cloud": cloud, "local": "up"}, "cloud_state": cloud,
            "offline_for_s": offline_for, "offline_since": None,
            "counters": {"received": received, "uplinked_records": uplinked},
            "lanes": {"telemetry": {"records": records, "bytes": records * 300, "oldest_age_s": 4.0,
                                    "policy": "drop_oldest"}},
            "drops": {"oldest:telemetry": 3}, "rejected": {"too_large": 1}, "downlink": None}


@pytest.mark.timeout(10)
def test_states_heartbeats_alerts_and_rates(monkeypatch, tmp_path):
    docs = iter([_status(0, 0), _status(1000, 0, "down", 800, 12.5), _status(1500, 1300, "up", 400)])
    monkeypatch.setattr(siteview, "gateway_status", lambda store: next(docs))
    now = [50.0]
    monkeypatch.setattr(siteview.time, "time", lambda: now[0])
    w = SiteWatcher(None, tmp_path / "store.db")
    w._on_message(_msg("state/dev-0001", {"state": "online", "firmware": "1.4.2"}))
    w._on_message(_msg("state/dev-0002", b"offline"))
    w._on_message(_msg("state/dev-0002", {"state": "offline", "firmware": "1.4.2"}))
    w._on_message(_msg("state/rules", b"online"))
    w._on_message(_msg("state/rules/heartbeat", {"data": {"handled": 42}}))
    w._on_message(_msg("evt/alert/dev-0001", {"data": {"rule": "hot", "device": "dev-0001", "state": "firing"}}))
    w._on_message(_msg("evt/alert/dev-0001", {"data": {"rule": "hot", "device": "dev-0001", "state": "cleared"}}))
    w._on_message(_msg("evt/cmd/dev-0001", {"data": {"id": "c1", "status": "succeeded", "by": "dev-0001"}}))
    w._on_message(_msg("evt/alert/x", b"not json"))  # ignored, not fatal

    now[0] = 100.0
    w.snapshot()
    now[0] = 102.0
    down = w.snapshot()
    assert down["rates"] == {"local": 500.0, "uplink": 0.0}
    assert down["link"]["state"] == "down" and down["link"]["for_s"] == 12.5
    assert down["lanes"]["telemetry"]["drain_s"] is None  # nothing moves while down
    now[0] = 103.0
    up = w.snapshot()
    assert up["rates"] == {"local": 500.0, "uplink": 1300.0}
    assert up["lanes"]["telemetry"]["drain_s"] == round(400 / 1300, 1)
    assert up["devices"]["online"] == 1 and up["devices"]["known"] == 2 and up["devices"]["offline"] == ["dev-0002"]
    assert [s["name"] for s in up["services"]] == ["rules"] and up["services"][0]["handled"] == 42
    assert up["alerts"]["raised"] == 1 and up["alerts"]["firing"] == 0
    assert up["commands"] == [{"id": "c1", "target": "dev-0001", "name": None, "state": "succeeded"}]
    assert up["drops"] == {"oldest:telemetry": 3, "rejected:too_large": 1}

    for height in (60, 24):  # the wide and the small-terminal layout
        console = Console(width=130 if height > 40 else 80, record=True)
        console.print(render(up, list(w.history), height=height))
        text = console.export_text()
        assert "CLOUD LINK UP" in text and "telemetry" in text and "rejected:too_large" in text


def test_time_in_state_comes_from_the_gateway_in_one_look(monkeypatch, tmp_path):
    doc = _status(10, 10)
    doc["online_for_s"] = 42.0
    monkeypatch.setattr(siteview, "gateway_status", lambda store: doc)
    assert SiteWatcher(None, tmp_path / "store.db").snapshot()["link"]["for_s"] == 42.0


def test_sparkline_and_charts():
    assert sparkline([0, 1, 8]) == " ▁█"
    pts = [(float(t), 5000.0 if t == 12 else 10.0) for t in range(20)]
    svg = svg_chart([("a", "#000", pts)], 19, [(8, 12, "outage")], clip=True)
    assert "peak 5,000" in svg and "outage" in svg  # the burst is cut, the steady rate readable
    points = re.findall(r'class="series" data-name="a" points="([^"]+)"', svg)
    assert points and len(points[0].split()) == 20
