"""Settings: flags beat EDGEFERRY_* variables beat the YAML file; bad input is one clear error."""

import pytest

from edge.config import parse_duration, parse_size
from edge.errors import ConfigError
from edge.mqtt import parse_url
from gateway.settings import gateway_settings, ingest_settings

BASE = ["--cloud", "mqtt://127.0.0.1:18830", "--node-id", "pi-1"]


def test_defaults():
    s = gateway_settings(BASE, environ={})
    assert s.max_store_bytes == 256 * 1024 * 1024
    assert [ln.name for ln in s.lanes] == ["events", "telemetry"]
    assert s.uplink == ["dt/#", "evt/#"]
    assert s.gateway_client_id == "edgeferry-gw-pi-1"


def test_precedence_flag_env_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "node_id: from-yaml\ncloud: mqtt://yaml:1\ngateway:\n  max_store_bytes: 1MiB\n  window: 3\n"
        "  lanes:\n    - {name: alerts, filters: ['evt/alert/#'], when_full: block}\n"
        "    - {name: bulk, filters: ['dt/#'], when_full: drop_oldest, ttl: 1h}\n"
        "  default_lane: alerts\n"
    )
    env = {"EDGEFERRY_WINDOW": "5", "EDGEFERRY_NODE_ID": "from-env"}
    s = gateway_settings(["--config", str(cfg), "--window", "7"], environ=env)
    assert s.window == 7  # flag
    assert s.node_id == "from-env"  # env beats yaml
    assert s.cloud == "mqtt://yaml:1"  # yaml top level
    assert s.max_store_bytes == 1024 * 1024  # yaml section
    lanes = [(ln.name, ln.when_full, ln.ttl) for ln in s.lanes]
    assert lanes == [("alerts", "block", 0), ("bulk", "drop_oldest", 3600)]


def test_lane_flag_and_env_json():
    s = gateway_settings(BASE + ["--lanes", "ev:block:evt/#,cmd/+/reply", "--lanes", "t:drop_oldest:dt/#:30s",
                                 "--default-lane", "ev"], environ={})
    assert s.lanes[0].filters == ("evt/#", "cmd/+/reply") and s.lanes[1].ttl == 30
    env = {"EDGEFERRY_LANES": '[{"name": "x", "filters": ["#"], "when_full": "block"}]', "EDGEFERRY_DEFAULT_LANE": "x"}
    assert gateway_settings(BASE, environ=env).lanes[0].name == "x"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--node-id", "x"], "--cloud is required"),
        (["--cloud", "http://x", "--node-id", "x"], "scheme must be mqtt"),
        (["--cloud", "mqtt://h:99999", "--node-id", "x"], "invalid port"),
        (BASE + ["--max-store-bytes", "12XB"], "not a size"),
        (BASE + ["--uplink", "dt/#/x"], "'#' must be the whole last level"),
        (BASE + ["--uplink", "dt/\udc80"], "lone surrogate"),
        (BASE + ["--node-id", "bad id!"], "not a node id"),
        (BASE + ["--sync", "sometimes"], "not one of full, normal"),
        (BASE + ["--lanes", "x:block"], "NAME:POLICY"),
        (BASE + ["--default-lane", "nope"], "default lane"),
        (BASE + ["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        gateway_settings(argv, environ={})


def test_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        gateway_settings(BASE + ["--config", str(cfg)], environ={})
    cfg.write_text("gateway:\n  windoww: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        gateway_settings(BASE + ["--config", str(cfg)], environ={})
    with pytest.raises(ConfigError, match="cannot read config"):
        gateway_settings(BASE + ["--config", str(tmp_path / "missing.yaml")], environ={})


def test_ingest_settings():
    s = ingest_settings(["--cloud", "mqtt://h:1", "--sink", "sqlite:/tmp/x.db"], environ={})
    assert s.filter == "ef/+/up/+"
    with pytest.raises(ConfigError, match="jsonl:PATH, sqlite:PATH or postgresql:"):
        ingest_settings(["--cloud", "mqtt://h:1", "--sink", "csv:x"], environ={})


def test_sizes_durations_urls():
    assert parse_size("256MiB") == 256 * 1024**2 and parse_size("64kB") == 64000 and parse_size(5) == 5
    assert parse_duration("250ms") == 0.25 and parse_duration("2h") == 7200
    u = parse_url("mqtts://user:p%40ss@host")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("host", 8883, True, "user", "p@ss")
    for bad in ("localhost:18830", "mqtt://", "mqtt://h:1/path"):
        with pytest.raises(ConfigError):
            parse_url(bad)


@pytest.mark.parametrize("argv, match", [
    (["--keepalive", "100000s"], "--keepalive must be 1 s to 65535 s"),
    (["--local-keepalive", "0.2s"], "--local-keepalive must be 1 s to 65535 s"),
    (["--window", "70000"], "--window must be 1 to 65535"),
])
def test_values_mqtt_cannot_carry_are_refused_at_start(argv, match):
    """Before, a keepalive over 65535 s overflowed inside the reconnect loop (issue 8)."""
    with pytest.raises(ConfigError, match=match):
        gateway_settings(BASE + argv, {})
