"""What a simulated device does with commands and desired state: the same contract as a
service built with the SDK (docs/commands.md, docs/shadow.md).

* ``cmd/<device>/<name>``: the gateway's CloudEvent (``data`` = ``{name, args, ttl_ms,
  mono, boot}``), or the older forms (an envelope whose ``data`` holds the arguments,
  or plain ``{"id": ..., ...arguments}``). Statuses go out on ``evt/cmd/<device>``:
  ``succeeded`` (with the reply), ``accepted`` then ``succeeded`` for ``ota``,
  ``rejected`` (unknown name, bad arguments, no id), ``failed`` (busy), ``expired``.
  A command id seen before (the last 256, kept in "flash" across reboots) is not
  applied again: its first final status is published again.
* ``shadow/<device>/desired`` (retained): a newer version's ``interval`` is applied as
  ``set_interval`` would, and the device reports ``{"interval": ...}`` on
  ``shadow/<device>/reported``. The version held lives in RAM: after a reboot the
  retained document is applied again.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from edge.downlink import STATUS_TYPE, CommandError, SystemClock, parse_target_command, status_data
from edge.events import new_id
from edge.mqtt import Message
from firmware_sim.outbox import Entry

Device = Any  # firmware_sim.device.Device (not imported: device imports this module)

__all__ = ["on_message", "ota_done"]

log = logging.getLogger("edgeferry.sim")

SEEN_COMMANDS = 256  # command ids remembered (in "flash": they survive reboots)
_CLOCK = SystemClock()


def on_message(dev: Device, msg: Message) -> None:
    if msg.topic.startswith("shadow/"):
        _desired(dev, msg)
    else:
        _command(dev, msg)


def _status(dev: Device, cid: str, status: str, reply: Any = None, error: str | None = None) -> None:
    data = status_data(cid, status, dev.name, reply=reply, error=error, clock_wall=dev._now())
    data["boot"], data["firmware"] = dev.boot, dev.firmware
    dev._event(f"evt/cmd/{dev.name}", STATUS_TYPE, data, cid or new_id())


def _command(dev: Device, msg: Message) -> None:
    name = msg.topic.rsplit("/", 1)[-1]
    try:
        body = orjson.loads(msg.payload)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        dev.counters["commands_rejected"] += 1
        log.warning("%s: command %s is not a JSON object", dev.name, name)
        return
    cid = body.get("id")
    data = body.get("data") if "specversion" in body else None
    if isinstance(data, dict) and "args" in data:  # the gateway's form
        try:
            cmd = parse_target_command(cid, data, name, _CLOCK)
        except CommandError as e:
            dev.counters["commands_rejected"] += 1
            _status(dev, cid if isinstance(cid, str) else "", "rejected", error=str(e))
            return
        args, held = cmd.args, cmd.held
    else:
        args = data if "specversion" in body else body
        held = None
    if not isinstance(args, dict):
        args = {}
    if not isinstance(cid, str) or not cid:
        dev.counters["commands_rejected"] += 1
        _status(dev, "", "rejected", error="a command needs a string id")
        return
    if cid in dev.seen:
        dev.counters["commands_duplicate"] += 1
        first, reply, error = dev.seen[cid]
        _status(dev, cid, first, reply, error)
        return
    if held is not None:
        left, why = held.remaining(_CLOCK)
        if left <= 0:
            _remember(dev, cid, ("expired", None, why))
            _status(dev, cid, "expired", error=why)
            return
    status, reply, error = _apply(dev, name, cid, args)
    _remember(dev, cid, (status, reply, error))
    if status in ("succeeded", "accepted"):
        dev.counters["commands_applied"] += 1
    else:
        dev.counters["commands_rejected"] += 1
    _status(dev, cid, status, reply, error)


def _remember(dev: Device, cid: str, outcome: tuple[str, Any, str | None]) -> None:
    dev.seen[cid] = outcome
    while len(dev.seen) > SEEN_COMMANDS:
        dev.seen.popitem(last=False)


def ota_done(dev: Device, cid: str, version: str) -> None:
    """The update finished: its final status (before the reboot into ``version``)."""
    _remember(dev, cid, ("succeeded", {"firmware": version}, None))
    _status(dev, cid, "succeeded", {"firmware": version})


def _set_interval(dev: Device, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        return "interval must be in (0, 86400] seconds"
    dev.interval = float(value)
    if not dev.storm_until and dev.alive:
        dev._rebase(dev.interval)
    return None


def _apply(dev: Device, name: str, cid: str, args: dict[str, Any]) -> tuple[str, Any, str | None]:
    if name == "set_interval":
        bad = _set_interval(dev, args.get("interval", args.get("seconds")))
        if bad:
            return "rejected", None, f"set_interval: {bad}"
        return "succeeded", {"interval": dev.interval}, None
    if name == "reboot":
        if dev._busy:
            return "failed", None, "busy (reboot or update in progress)"
        dev._busy = True
        dev.ctx.spawn(dev._reboot(None, cid), f"{dev.name}-reboot")
        return "succeeded", {}, None
    if name == "ota":
        version = args.get("version")
        duration = args.get("duration", 2.0)
        if not isinstance(version, str) or not version:
            return "rejected", None, "ota needs args.version"
        if isinstance(duration, bool) or not isinstance(duration, int | float) or not 0 <= duration <= 3600:
            return "rejected", None, "ota args.duration must be 0..3600 seconds"
        if dev._busy:
            return "failed", None, "busy (reboot or update in progress)"
        dev._busy = True
        dev.ctx.spawn(dev._ota(version, float(duration), cid), f"{dev.name}-ota")
        return "accepted", {"version": version}, None
    return "rejected", None, f"unknown command {name!r} (set_interval, reboot, ota)"


def _desired(dev: Device, msg: Message) -> None:
    try:
        body = orjson.loads(msg.payload)
    except orjson.JSONDecodeError:
        return
    if not isinstance(body, dict) or not isinstance(body.get("version"), int):
        return
    doc = body.get("desired")
    if not isinstance(doc, dict) or body["version"] <= dev.desired_version:
        return  # never an older version after a newer one
    dev.desired_version = body["version"]
    if "interval" in doc and dev.interval != doc["interval"]:
        bad = _set_interval(dev, doc["interval"])
        if bad:
            log.warning("%s: desired %s", dev.name, bad)
    dev.counters["desired_applied"] += 1
    report = orjson.dumps({"interval": dev.interval})
    dev.outbox.put(Entry(f"shadow/{dev.name}/reported", report, None, 0))
    dev.wake.set()
