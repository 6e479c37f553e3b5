"""Gateway and ingest settings: declared once, read from flags, EDGEFERRY_* and YAML."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from edge._codec import check_filter as _codec_check_filter
from edge._tls import TLSOptions, read_secret
from edge._url import BrokerURL, parse_url
from edge.config import TLS_OPTIONS, Option, load_settings, parse_duration, tls_from_settings
from edge.errors import ConfigError
from gateway.profiles import PROFILES, CloudProfile, profile
from gateway.store import LaneSpec
from gateway.topics import uplink_topic

__all__ = ["GatewaySettings", "IngestSettings", "gateway_settings", "ingest_settings", "DEFAULT_LANES"]

_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

DEFAULT_LANES = (
    LaneSpec("events", ("evt/#",), "block"),
    LaneSpec("telemetry", ("dt/#",), "drop_oldest"),
)


def check_filter(f: str) -> str:
    """Validate an MQTT topic filter as the client will (ConfigError, a ValueError)."""
    _codec_check_filter(f)
    return f


def _urls(v: Any) -> list[str]:
    """``--cloud`` given once or more (a comma-separated list in the environment)."""
    urls = [v] if isinstance(v, str) and "," not in v else v
    out = [str(u).strip() for u in (urls if isinstance(urls, list) else str(urls).split(",")) if str(u).strip()]
    for u in out:
        parse_url(u)
    if not out:
        raise ValueError("no URL given")
    return out


class UrlRing:
    """The cloud brokers of ``--cloud`` (repeatable: a cluster's nodes), tried in turn:
    ``next()`` gives the first URL, then the following one at each call (a connect that
    failed or a connection that ended moves on to the next node)."""

    def __init__(self, urls: tuple[str, ...] | list[str]) -> None:
        self.urls = tuple(urls)
        self._i = -1

    def next(self) -> str:
        self._i = (self._i + 1) % len(self.urls)
        return self.urls[self._i]


def _node_id(v: Any) -> str:
    s = str(v)
    if not _NODE.match(s):
        raise ValueError(f"{s!r} is not a node id (letters, digits, _ . -, at most 64)")
    return s


def _filters(v: Any) -> list[str]:
    from edge.config import _parse_list

    out = [check_filter(f) for f in _parse_list(v)]
    if not out:
        raise ValueError("at least one filter is needed")
    return out


def _lane_specs(v: Any) -> list[LaneSpec]:
    """Lanes from YAML (a list of mappings), JSON (EDGEFERRY_LANES) or repeated
    ``--lane NAME:POLICY:FILTER[,FILTER...][:TTL]`` flags."""
    import json

    if isinstance(v, str):
        v = json.loads(v) if v.strip().startswith("[") else [v]
    specs = []
    for item in v:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) not in (3, 4):
                raise ValueError(f"lane {item!r} is not NAME:POLICY:FILTER[,FILTER...][:TTL]")
            ttl = parse_duration(parts[3]) if len(parts) == 4 else 0.0
            item = {"name": parts[0], "when_full": parts[1], "filters": parts[2].split(","), "ttl": ttl}
        if not isinstance(item, dict):
            raise ValueError(f"lane {item!r} must be a mapping with name, filters, when_full, ttl")
        unknown = set(item) - {"name", "filters", "when_full", "ttl"}
        if unknown:
            raise ValueError(f"lane {item.get('name')!r}: unknown key(s) {', '.join(sorted(unknown))}")
        filters = item.get("filters") or []
        if isinstance(filters, str):
            filters = [filters]
        specs.append(LaneSpec(
            str(item.get("name", "")),
            tuple(check_filter(str(f)) for f in filters),
            str(item.get("when_full", "drop_oldest")),
            parse_duration(item.get("ttl", 0) or 0),
        ))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("lane names must be unique")
    if not specs:
        raise ValueError("at least one lane is needed")
    return specs


GATEWAY_OPTIONS = [
    Option("local", "url", "mqtt://127.0.0.1:1883", "local broker URL", metavar="URL"),
    Option("local_password_file", "str", None, "file whose first line is the local broker's password "
           "(mode 600; the user name goes in --local), read again at each reconnect", metavar="FILE"),
    Option("cloud", "list", None, "cloud broker URL (repeatable: the nodes of a clustered broker, "
           "tried in turn)", required=True, metavar="URL", parse=_urls),
    Option("store", "str", "edgeferry-store.db", "path of the SQLite store", metavar="PATH"),
    Option("node_id", "str", None, "this node's id (letters, digits, _ . -)", required=True,
           metavar="ID", parse=_node_id),
    Option("uplink", "list", ["dt/#", "evt/#"], "topic filter to carry to the cloud (repeatable)",
           metavar="FILTER", parse=_filters),
    Option("lanes", "list", [], "lane NAME:POLICY:FILTER[,FILTER...][:TTL], POLICY drop_oldest|block, "
           "in priority order (repeatable; in YAML a list of mappings with name, filters, "
           "when_full, ttl; default: events:block:evt/# then telemetry:drop_oldest:dt/#)",
           metavar="SPEC", parse=_lane_specs),
    Option("default_lane", "str", "events", "lane for messages no lane filter matches", metavar="NAME"),
    Option("max_store_bytes", "size", 256 * 1024 * 1024, "store bound in record bytes", metavar="SIZE"),
    Option("max_message_bytes", "size", 256 * 1024, "larger messages are rejected and counted",
           metavar="SIZE"),
    Option("sync", "str", "full", "SQLite synchronous: full (survives power loss) or normal",
           choices=("full", "normal")),
    Option("commit_interval", "duration", 0.2, "how long a message may wait for its group commit "
           "(a batch of 2,000 messages or 512 KiB commits at once)", metavar="DURATION"),
    Option("frame_max_records", "int", 1000, "records per frame at most", metavar="N"),
    Option("frame_max_bytes", "size", 256 * 1024, "frame size at most", metavar="SIZE"),
    Option("frame_linger", "duration", 0.02, "how long a partial frame may wait for more records",
           metavar="DURATION"),
    Option("confirm", "str", "ingest", "when a record may leave the store: after ingest reported it "
           "written (ingest; survives a cloud broker crash) or after the cloud broker's PUBACK (broker)",
           choices=("ingest", "broker")),
    Option("window", "int", 16, "frames in flight to the cloud broker", metavar="N"),
    Option("resend_after", "duration", 15.0, "confirm ingest: send a frame again when ingest has not "
           "confirmed it for this long (at most --window frames, oldest first, once per this "
           "interval; 0: only when ingest asks)", metavar="DURATION"),
    Option("compress", "str", "none", "frame compression", choices=("none", "zstd")),
    Option("keepalive", "duration", 10.0, "cloud link keepalive: a silent link is noticed within it",
           metavar="DURATION"),
    Option("local_keepalive", "duration", 30.0, "local broker keepalive", metavar="DURATION"),
    Option("backoff_max", "duration", 5.0, "cap of the reconnect backoff", metavar="DURATION"),
    Option("client_id", "str", "", "client id on both brokers (default edgeferry-gw-NODE)",
           metavar="ID"),
    Option("metrics_port", "int", 0, "serve Prometheus metrics on this port (0: off)", metavar="PORT"),
    Option("metrics_host", "str", "127.0.0.1", "address for the metrics endpoint", metavar="HOST"),
    Option("downlink", "bool", True, "bring commands and desired state down from the cloud "
           "(docs/commands.md)", metavar="BOOL"),
    Option("redeliver", "duration", 5.0, "publish a command again to its target after this long "
           "until it says accepted", metavar="DURATION"),
    Option("log_level", "str", "info", "log level", choices=("debug", "info", "warning", "error")),
    *TLS_OPTIONS,
    Option("cloud_profile", "str", "generic", "limits of the cloud broker (docs/clouds.md); the "
           "--cloud-* settings override them", choices=tuple(PROFILES), metavar="NAME"),
    Option("cloud_max_message_bytes", "size", None, "largest message the cloud broker takes "
           "(frames are cut to fit; default: the profile's)", metavar="SIZE"),
    Option("cloud_publish_rate", "float", None, "publishes per second on the cloud connection at "
           "most (0: no limit; default: the profile's)", metavar="N"),
    Option("cloud_max_inflight", "int", None, "QoS 1 messages in flight the cloud broker takes "
           "(caps --window; default: the profile's)", metavar="N"),
]


@dataclass(frozen=True, kw_only=True)
class _Identity:
    """TLS files and the password file for the cloud broker (``--ca-file`` ...)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_server_name: str | None = None
    alpn: list[str] = field(default_factory=list)
    password_file: str | None = None

    @property
    def tls(self) -> TLSOptions | None:
        """The TLS options for the cloud URL (None for mqtt://); the files are read at
        each connect."""
        return tls_from_settings(self.__dict__, self.__dict__["cloud"], check=False)


@dataclass(frozen=True)
class GatewaySettings(_Identity):
    local: str
    cloud: str  # the first of cloud_urls
    store: str
    node_id: str
    uplink: list[str]
    lanes: list[LaneSpec]
    default_lane: str = "events"
    max_store_bytes: int = 256 * 1024 * 1024
    max_message_bytes: int = 256 * 1024
    sync: str = "full"
    commit_interval: float = 0.2
    frame_max_records: int = 1000
    frame_max_bytes: int = 256 * 1024
    frame_linger: float = 0.02
    window: int = 16
    resend_after: float = 15.0
    confirm: str = "ingest"
    compress: str = "none"
    keepalive: float = 10.0
    local_keepalive: float = 30.0
    local_password_file: str | None = None
    backoff_max: float = 5.0
    client_id: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    downlink: bool = True
    redeliver: float = 5.0
    log_level: str = "info"
    cloud_profile: str = "generic"
    cloud_max_message_bytes: int | None = None
    cloud_publish_rate: float | None = None
    cloud_max_inflight: int | None = None
    config: str | None = None
    cloud_urls: tuple[str, ...] = ()  # every --cloud, tried in turn (empty: cloud alone)

    @property
    def clouds(self) -> UrlRing:
        """A new ring of the cloud URLs (each connection loop keeps its own)."""
        return UrlRing(self.cloud_urls or (self.cloud,))
    notes: tuple[str, ...] = ()  # settings the cloud profile moved (logged at start)

    def __post_init__(self) -> None:
        self.profile.check_client_id(self.gateway_client_id + "-down")
        self.profile.check_topic(f"ef/{self.node_id}/shadow/+/desired", "downlink topic")
        for lane in self.lanes:
            self.profile.check_topic(uplink_topic(self.node_id, lane.name), "uplink topic")
            budget = self.profile.message_budget(uplink_topic(self.node_id, lane.name))
            if budget and budget < 1024:
                raise ConfigError(f"cloud profile {self.cloud_profile}: a message of "
                                  f"{self.profile.max_message_bytes} bytes leaves too little for a frame")
        names = [lane.name for lane in self.lanes]
        if self.default_lane not in names:
            raise ConfigError(f"default lane {self.default_lane!r} is not one of the lanes ({', '.join(names)})")
        if not 1 <= self.frame_max_records <= 65535:
            raise ConfigError("--frame-max-records must be between 1 and 65535")
        if not 1 <= self.window <= 65535:
            raise ConfigError("--window must be 1 to 65535 (MQTT packet ids)")
        for flag, v in (("--keepalive", self.keepalive), ("--local-keepalive", self.local_keepalive)):
            if not 1 <= v <= 65535:
                raise ConfigError(f"{flag} must be 1 s to 65535 s (MQTT's two-byte field), not {v:g} s")
        if self.max_message_bytes + 64 > self.max_store_bytes:
            raise ConfigError("--max-store-bytes must be larger than --max-message-bytes")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("--metrics-port must be a TCP port")

    @property
    def uses_tls(self) -> bool:
        """True when the local broker or any cloud broker is mqtts://: only then does the
        process load OpenSSL (gateway/main.py, edge/_nossl.py)."""
        return any(parse_url(u).tls for u in (self.local, self.cloud, *self.cloud_urls))

    @property
    def gateway_client_id(self) -> str:
        return self.client_id or f"edgeferry-gw-{self.node_id}"

    @property
    def profile(self) -> CloudProfile:
        """The cloud profile with this gateway's --cloud-* overrides."""
        return profile(self.cloud_profile, max_message_bytes=self.cloud_max_message_bytes,
                       publishes_per_s=self.cloud_publish_rate, max_inflight=self.cloud_max_inflight)


def local_broker_url(local: str, password_file: str | None) -> str | BrokerURL:
    """``--local`` with ``--local-password-file`` (the gateway's, status' and top's): the
    file is usable now (only its owner may read it) and the URL has a user name
    (ConfigError otherwise); the client reads the file again at every connect."""
    if not password_file:
        return local
    read_secret(password_file, "local password file", ConfigError)
    url = parse_url(local)
    if url.username is None:
        raise ConfigError("--local-password-file needs a user name in --local (mqtt://USER@HOST:PORT)")
    return replace(url, password_file=password_file)


def gateway_settings(argv: list[str], environ: dict[str, str] | None = None) -> GatewaySettings:
    """Parse ``edgeferry gateway run`` arguments into settings (ConfigError on bad input)."""
    values = load_settings(
        GATEWAY_OPTIONS, argv, prog="edgeferry gateway run", section="gateway",
        description="Carry local MQTT messages to the cloud broker through outages and crashes.",
        epilog="example:\n  edgeferry gateway run --local mqtt://127.0.0.1:1883 "
               "--cloud mqtt://cloud.example:1883 --store /var/lib/edgeferry/store.db "
               "--node-id pi-01 --uplink 'dt/#' --uplink 'evt/#'",
        environ=environ,
    )
    values["cloud_urls"] = tuple(values["cloud"])
    values["cloud"] = values["cloud_urls"][0]
    tls_from_settings(values, values["cloud"])  # the files are usable now (ConfigError)
    local_broker_url(values["local"], values["local_password_file"])  # checked now (ConfigError)
    prof = profile(values["cloud_profile"], max_message_bytes=values["cloud_max_message_bytes"],
                   publishes_per_s=values["cloud_publish_rate"], max_inflight=values["cloud_max_inflight"])
    notes = []
    keepalive = prof.keepalive(values["keepalive"])
    if keepalive != values["keepalive"]:
        notes.append(f"keepalive {values['keepalive']:g} s is outside what {prof.name} takes "
                     f"({prof.keepalive_min:g}-{prof.keepalive_max:g} s): using {keepalive:g} s")
        values["keepalive"] = keepalive
    if prof.max_inflight and values["window"] > prof.max_inflight:
        notes.append(f"window {values['window']} is more than the {prof.max_inflight} QoS 1 messages "
                     f"in flight {prof.name} takes: using {prof.max_inflight}")
        values["window"] = prof.max_inflight
    if any(parse_url(u).password is not None for u in values["cloud_urls"]):
        notes.append("the --cloud URL holds a password, which other processes can read (ps, "
                     "/proc): use --password-file")
    if parse_url(values["local"]).password is not None and not values["local_password_file"]:
        notes.append("the --local URL holds a password, which other processes can read (ps, "
                     "/proc): use --local-password-file")
    values["notes"] = tuple(notes)
    lanes = values.pop("lanes")
    if not lanes:
        lanes = list(DEFAULT_LANES)
    return GatewaySettings(lanes=lanes, **values)


INGEST_OPTIONS = [
    Option("cloud", "list", None, "cloud broker URL (repeatable: the nodes of a clustered broker, "
           "tried in turn)", required=True, metavar="URL", parse=_urls),
    Option("sink", "str", None, "jsonl:PATH, sqlite:PATH or postgresql://USER@HOST/DB",
           required=True, metavar="SINK"),
    Option("client_id", "str", "edgeferry-ingest", "client id (one persistent session)", metavar="ID"),
    Option("filter", "str", "ef/+/up/+", "frames to consume", metavar="FILTER"),
    Option("workers", "int", 1, "ingest processes on this host, sharing the frames (postgresql sink)",
           metavar="N"),
    Option("group", "str", "", "consume as one of a shared subscription group ($share/GROUP/FILTER), "
           "with other workers anywhere (postgresql sink); --workers > 1 uses the client id",
           metavar="GROUP"),
    Option("keepalive", "duration", 10.0, "keepalive", metavar="DURATION"),
    Option("backoff_max", "duration", 5.0, "cap of the reconnect backoff", metavar="DURATION"),
    Option("fsync", "bool", False, "fsync the sink before acknowledging each batch", metavar="BOOL"),
    Option("downlink", "bool", True, "answer gateways' hellos with their pending commands and desired "
           "state, and apply statuses and reports (docs/commands.md)", metavar="BOOL"),
    Option("metrics_port", "int", 0, "serve Prometheus metrics on this port (0: off)", metavar="PORT"),
    Option("metrics_host", "str", "127.0.0.1", "address for the metrics endpoint", metavar="HOST"),
    Option("log_level", "str", "info", "log level", choices=("debug", "info", "warning", "error")),
    *TLS_OPTIONS,
    Option("cloud_profile", "str", "generic", "limits of the cloud broker (docs/clouds.md): "
           "keepalive range, client id, shared subscriptions", choices=tuple(PROFILES), metavar="NAME"),
]


@dataclass(frozen=True)
class IngestSettings(_Identity):
    cloud: str  # the first of cloud_urls
    sink: str
    client_id: str = "edgeferry-ingest"
    filter: str = "ef/+/up/+"
    workers: int = 1
    group: str = ""
    keepalive: float = 10.0
    backoff_max: float = 5.0
    fsync: bool = False
    downlink: bool = True
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    cloud_profile: str = "generic"
    config: str | None = None
    cloud_urls: tuple[str, ...] = ()  # every --cloud, tried in turn (empty: cloud alone)

    @property
    def clouds(self) -> UrlRing:
        """A new ring of the cloud URLs (each connection loop keeps its own)."""
        return UrlRing(self.cloud_urls or (self.cloud,))

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("--metrics-port must be a TCP port")
        prof = profile(self.cloud_profile)
        prof.check_client_id(self.client_id + "-sync")
        if (self.filter.startswith("$share/") or self.group or self.workers > 1) and not prof.shared_subscriptions:
            raise ConfigError(f"cloud profile {prof.name}: the broker has no shared subscriptions "
                              f"(--filter {self.filter!r}, --group, --workers): run one ingest per "
                              "queue instead (e.g. one per lane: --filter 'ef/+/up/telemetry')")
        kind, _, path = self.sink.partition(":")
        if not 1 <= self.workers <= 64:
            raise ConfigError("--workers must be 1 to 64")
        if self.group and ("/" in self.group or "+" in self.group or "#" in self.group):
            raise ConfigError(f"--group {self.group!r}: one topic level, without + or #")
        if self.sink.startswith(("postgresql://", "postgres://")):
            pass
        elif kind not in ("jsonl", "sqlite") or not path:
            raise ConfigError(f"--sink {self.sink!r}: expected jsonl:PATH, sqlite:PATH or "
                              "postgresql://USER@HOST/DB")
        elif self.workers > 1 or self.group:
            raise ConfigError("--workers and --group need a postgresql:// sink: a JSONL or SQLite "
                              "sink keeps continuity in one process")
        check_filter(self.filter)
        if not 1 <= self.keepalive <= 65535:
            raise ConfigError(f"--keepalive must be 1 s to 65535 s (MQTT's two-byte field), not {self.keepalive:g} s")


def ingest_settings(argv: list[str], environ: dict[str, str] | None = None) -> IngestSettings:
    values = load_settings(
        INGEST_OPTIONS, argv, prog="edgeferry ingest run", section="ingest",
        description="Decode gateway frames from the cloud broker, drop duplicates, write a sink.",
        epilog="example:\n  edgeferry ingest run --cloud mqtt://127.0.0.1:1883 --sink jsonl:events.jsonl",
        environ=environ,
    )
    values["cloud_urls"] = tuple(values["cloud"])
    values["cloud"] = values["cloud_urls"][0]
    tls_from_settings(values, values["cloud"])
    values["keepalive"] = profile(values["cloud_profile"]).keepalive(values["keepalive"])
    return IngestSettings(**values)
