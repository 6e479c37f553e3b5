"""What the configured services consume and publish: a table, AsyncAPI 3, a graph.

The catalog imports each service (``MODULE:ATTR``) without connecting it and reads its
handlers (topic pattern, payload model) and declared publications. Every service also
publishes ``state/<name>`` (retained online/offline), ``state/<name>/heartbeat`` and
``dlq/<name>``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import read_yaml
from edge.errors import ServiceError

__all__ = ["Catalog", "build_catalog", "services_from_config"]

BUILTINS = ("edge.services.aggregator:service", "edge.services.rules:service")


@dataclass
class Channel:
    pattern: str  # dt/{device}/temperature
    filter: str  # dt/+/temperature
    model: str | None  # model name, or None for untyped
    schema: dict[str, Any] | None
    description: str = ""


@dataclass
class ServiceEntry:
    name: str
    spec: str
    description: str
    consumes: list[tuple[str, Channel]] = field(default_factory=list)  # (handler, channel)
    publishes: list[Channel] = field(default_factory=list)


@dataclass
class Catalog:
    services: list[ServiceEntry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "services": [
                {
                    "name": s.name,
                    "spec": s.spec,
                    "description": s.description,
                    "consumes": [
                        {
                            "handler": h,
                            "topic": c.pattern,
                            "filter": c.filter,
                            "model": c.model,
                            "schema": c.schema,
                        }
                        for h, c in s.consumes
                    ],
                    "publishes": [
                        {
                            "topic": c.pattern,
                            "model": c.model,
                            "schema": c.schema,
                            "description": c.description,
                        }
                        for c in s.publishes
                    ],
                }
                for s in self.services
            ]
        }


def services_from_config(path: str | None) -> list[str]:
    """The ``services:`` list of the YAML file (MODULE:ATTR strings)."""
    if not path:
        return []
    data = read_yaml(path, error=ServiceError)
    specs = data.get("services", []) if isinstance(data, dict) else []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ServiceError(f"{path}: 'services' must be a list of MODULE:ATTR strings")
    return specs


def _schema(model: Any) -> tuple[str | None, dict[str, Any] | None]:
    if model is None:
        return None, None
    from pydantic import TypeAdapter

    if model is bytes:
        return "bytes", None
    name = getattr(model, "__name__", None) or str(model)
    return name, TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")


def _filter(pattern: str) -> str:
    return re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "+", pattern)


def build_catalog(specs: list[str]) -> Catalog:
    from edge._launch import load_target

    out = []
    for spec in specs:
        svc = load_target(spec)
        entry = ServiceEntry(svc.name, spec, svc.description)
        seen: set[str] = set()
        for r in svc.routes:
            model = None if r.wants_bytes else r.payload_type
            from typing import Any as _Any

            name, schema = _schema(None if model is _Any else model)
            if r.wants_bytes:
                name = "bytes"
            entry.consumes.append(
                (r.name, Channel(r.pattern, r.filter, name, schema, r.description))
            )
            for pattern, pmodel in r.publishes:
                if pattern not in seen:
                    seen.add(pattern)
                    n, s = _schema(pmodel)
                    entry.publishes.append(Channel(pattern, _filter(pattern), n, s))
        for pattern, pmodel, desc in svc.publishes_declared:
            if pattern not in seen:
                seen.add(pattern)
                n, s = _schema(pmodel)
                entry.publishes.append(Channel(pattern, _filter(pattern), n, s, desc))
        for pattern, desc in (
            (f"state/{svc.name}", "retained online/offline (last will)"),
            (f"state/{svc.name}/heartbeat", "retained heartbeat event with counters"),
            (f"dlq/{svc.name}", "dead letters with the reason"),
        ):
            entry.publishes.append(Channel(pattern, pattern, None, None, desc))
        out.append(entry)
    return Catalog(out)


# ------------------------------------------------------------------------- AsyncAPI 3


def _channel_id(pattern: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", pattern).strip("_") or "root"


def asyncapi(
    cat: Catalog, *, title: str = "edgeferry services", version: str = "0.1.0"
) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: one channel per topic pattern, one operation per handler
    (receive) and per publication (send), payload schemas under components."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}

    def message_for(ch: Channel) -> str:
        mid = ch.model or "Untyped"
        if mid not in messages:
            payload: dict[str, Any] = {}
            if ch.schema is not None:
                sch = dict(ch.schema)
                schemas.update(sch.pop("$defs", {}))
                payload = sch
            messages[mid] = {
                "name": mid,
                "contentType": "application/cloudevents+json",
                "summary": "CloudEvents 1.0 structured-mode JSON; 'data' follows the payload "
                "schema (raw JSON without the envelope is accepted too)",
                "payload": payload,
            }
        return mid

    def channel_for(ch: Channel) -> str:
        cid = _channel_id(ch.pattern)
        c = channels.setdefault(cid, {"address": ch.pattern, "messages": {}})
        params = re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", ch.pattern)
        if params:
            c["parameters"] = {p: {"description": f"topic level {p}"} for p in params}
        if ch.description and "description" not in c:
            c["description"] = ch.description
        mid = message_for(ch)
        c["messages"][mid] = {"$ref": f"#/components/messages/{mid}"}
        return cid

    for s in cat.services:
        for handler, ch in s.consumes:
            cid = channel_for(ch)
            mid = ch.model or "Untyped"
            operations[f"{s.name}.receive.{_channel_id(ch.pattern)}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"{s.name}: handler {handler}",
                "messages": [{"$ref": f"#/channels/{cid}/messages/{mid}"}],
            }
        for ch in s.publishes:
            cid = channel_for(ch)
            mid = ch.model or "Untyped"
            operations[f"{s.name}.send.{_channel_id(ch.pattern)}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"{s.name} publishes {ch.pattern}",
                "messages": [{"$ref": f"#/channels/{cid}/messages/{mid}"}],
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Generated by `edgeferry catalog`; "
            "events are described in docs/events.md.",
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "local": {
                "host": "127.0.0.1:1883",
                "protocol": "mqtt",
                "protocolVersion": "3.1.1",
                "description": "the node's local Mosquitto",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


# ------------------------------------------------------------------------- graph


def mermaid(cat: Catalog) -> str:
    """The service/topic graph as a Mermaid flowchart."""
    lines = ["flowchart LR"]
    topics: dict[str, str] = {}

    def tnode(pattern: str) -> str:
        if pattern not in topics:
            topics[pattern] = f"t{len(topics)}"
            lines.append(f'  {topics[pattern]}(["{pattern}"])')
        return topics[pattern]

    for s in cat.services:
        sid = "s_" + _channel_id(s.name)
        lines.append(f'  {sid}[["{s.name}"]]')
        for _, ch in s.consumes:
            lines.append(f"  {tnode(ch.pattern)} --> {sid}")
        for ch in s.publishes:
            lines.append(f"  {sid} --> {tnode(ch.pattern)}")
    return "\n".join(lines) + "\n"


def dot(cat: Catalog) -> str:
    """The same graph in Graphviz DOT."""
    lines = ["digraph edgeferry {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for s in cat.services:
        lines.append(f'  "svc:{s.name}" [label="{s.name}", shape=box, style=bold];')
        for _, ch in s.consumes:
            lines.append(f'  "{ch.pattern}" [shape=ellipse];')
            lines.append(f'  "{ch.pattern}" -> "svc:{s.name}";')
        for ch in s.publishes:
            lines.append(f'  "{ch.pattern}" [shape=ellipse];')
            lines.append(f'  "svc:{s.name}" -> "{ch.pattern}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_diagram(cat: Catalog, path: Path) -> list[Path]:
    """Write Mermaid text (``.mmd``/``.md``/anything else) or, for ``.svg``/``.png``, the
    Mermaid text beside it and the image rendered by graphviz. Returns the files written;
    raises ServiceError when an image was asked for and graphviz is missing."""
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        path.write_text(mermaid(cat), encoding="utf-8")
        return [path]
    mmd = path.with_suffix(".mmd")
    mmd.write_text(mermaid(cat), encoding="utf-8")
    exe = shutil.which("dot")
    if exe is None:
        raise ServiceError(
            f"writing {path.name} needs graphviz ('dot' not found); wrote Mermaid to {mmd}"
        )
    proc = subprocess.run(
        [exe, f"-T{suffix[1:]}", "-o", str(path)],
        input=dot(cat).encode(),
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ServiceError(f"graphviz failed: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return [mmd, path]
