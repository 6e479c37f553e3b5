"""What a service publishes: a CloudEvent built from a handler's data, with an id derived
from the trigger's inside a handler (a re-run publishes the same ids) and the trigger's
correlation id; or raw bytes / JSON without an envelope."""

from __future__ import annotations

import re
from typing import Any

from edge._receive import current_context
from edge.events import derived_id, encode, envelope, new_id

__all__ = ["event_payload", "raw_payload"]


def raw_payload(data: Any) -> bytes:
    """Bytes as they are, anything else as JSON (a pydantic model as its JSON data)."""
    return data if isinstance(data, bytes) else encode(_jsonable(data))


def event_payload(
    owner: object,
    name: str,
    source: str,
    topic: str,
    data: Any,
    *,
    type: str | None,
    subject: str | None,
) -> tuple[bytes, str]:
    """The encoded envelope of ``data`` published by service ``name`` (``owner``), and its
    id. Inside one of ``owner``'s handlers the id is derived from the trigger's and the
    number of events published so far, the correlation id is the trigger's, and the
    subject defaults to the trigger's (else the handler's key)."""
    ctx = current_context()
    if ctx is not None and ctx.owner is owner:
        eid = derived_id(ctx.event.id, name, ctx.n)
        ctx.n += 1
        corr: str | None = ctx.correlationid
        if subject is None:
            subject = ctx.event.subject if ctx.event.subject is not None else ctx.key
    else:
        eid = new_id()
        corr = None
    body = envelope(
        source=source,
        type=type or _event_type(data, topic),
        data=_jsonable(data),
        id=eid,
        subject=subject,
        correlationid=corr,
    )
    return encode(body), eid


def _event_type(data: Any, topic: str) -> str:
    t = getattr(type(data), "event_type", None)
    if isinstance(t, str):
        return t
    name = type(data).__name__
    if hasattr(data, "model_dump"):
        return "io.edgeferry." + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    parts = topic.split("/")
    if len(parts) >= 2 and parts[0] == "evt":
        return "io.edgeferry." + parts[1]
    return "io.edgeferry.event"


def _jsonable(data: Any) -> Any:
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json")
    return data
