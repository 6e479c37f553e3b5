"""Dead letters: the ``io.edgeferry.deadletter`` event a service publishes to
``dlq/<service>`` for a message it could not handle (format in docs/events.md), and the
short error text it carries."""

from __future__ import annotations

import base64
import logging
from typing import Any

from edge.events import Event, derived_id, encode, envelope
from edge.mqtt import Message

__all__ = ["DeadLetterLog", "dead_letter", "one_line"]

PAYLOAD_MAX = 64 * 1024  # bytes of the original payload kept in a dead letter

log = logging.getLogger("edge.service")


def one_line(e: BaseException) -> str:
    """An exception as one readable line (pydantic errors without their help URLs)."""
    errors = getattr(e, "errors", None)
    if callable(errors) and hasattr(e, "title"):  # pydantic ValidationError
        try:
            items = errors(include_url=False)
            parts = [
                f"{'.'.join(str(x) for x in err['loc']) or 'data'}: {err['msg']}"
                for err in items[:5]
            ]
            more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
            return f"{len(items)} validation error(s) for {e.title}: " + "; ".join(parts) + more
        except Exception:  # noqa: S110 - fall back to the plain text
            pass
    s = str(e).strip().replace("\n", "; ")
    return f"{type(e).__name__}: {s}" if s else type(e).__name__


def dead_letter(
    *,
    service: str,
    source: str,
    reason: str,
    error: str,
    msg: Message,
    subject: str | None,
    attempts: int,
    event: Event | None,
) -> bytes:
    """The dead-letter event for ``msg``. Its id is derived from the message's event id
    (when it had one), so dead-lettering the same event twice gives one id."""
    eid = event.id if event is not None else None
    data: dict[str, Any] = {
        "service": service,
        "reason": reason,
        "error": error[:2000],
        "topic": msg.topic,
        "attempts": attempts,
        "payload": base64.b64encode(msg.payload[:PAYLOAD_MAX]).decode(),
        "payload_encoding": "base64",
        "payload_bytes": len(msg.payload),
    }
    if eid is not None:
        data["event_id"] = eid
    body = envelope(
        source=source,
        type="io.edgeferry.deadletter",
        data=data,
        id=derived_id(eid, service + "/dlq", 0),
        subject=subject,
        correlationid=(event.correlationid or eid) if event is not None else None,
    )
    return encode(body)


class DeadLetterLog:
    """Logs dead letters without flooding the log (an SD card on a Pi): the first ten
    of each reason, then every thousandth."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.seen: dict[str, int] = {}

    def __call__(self, reason: str, topic: str, error: str) -> None:
        n = self.seen[reason] = self.seen.get(reason, 0) + 1
        if n <= 10 or n % 1000 == 0:
            log.warning(
                "service %s: dead-letter #%d (%s) from %s: %s",
                self.service,
                n,
                reason,
                topic,
                error,
            )
