"""Commands and desired state in the service SDK: ``@svc.command``, ``@svc.on_desired``,
``svc.desired`` and ``svc.report`` (docs/commands.md, docs/shadow.md).

A service's commands arrive on ``cmd/<service>/<name>`` through one route of the
service, so that they get its session, ordering and acknowledgement. What this module
adds, per command id:

* at most once: the id is written to the command log (``<state_dir>/<service>.cmds``)
  before the handler runs, and marked done after its status was published. A
  redelivery of a done id is acknowledged and nothing else; of a started id without an
  outcome (the process died while running it) is answered ``failed`` ("interrupted")
  and not run again;
* never late: the time to live is checked before running (on the gateway's monotonic
  clock when both run on the same host);
* statuses ``accepted``, then ``succeeded`` (the handler's return value is the reply),
  ``failed`` (it raised), ``rejected`` (unknown name, bad arguments) or ``expired``, on
  ``evt/cmd/<service>``.
"""

from __future__ import annotations

import inspect
import logging
import os
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from edge._dedup import DedupTable
from edge._routing import _validator
from edge.downlink import STATUS_TYPE, CommandError, SystemClock, parse_target_command, status_data
from edge.errors import ServiceError
from edge.events import Event

__all__ = ["Commands"]

log = logging.getLogger("edge.service")

Handler = Callable[..., Awaitable[Any]]


class _Command:
    """One registered command: how to turn ``args`` into the handler's parameters."""

    def __init__(self, name: str, fn: Handler) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise ServiceError(f"command {name!r}: the handler must be 'async def'")
        self.name = name
        self.fn = fn
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters.values())
        self.model: Any = None
        self.params: list[tuple[str, Callable[[Any], Any], bool]] = []
        if len(params) == 1 and _is_model(hints.get(params[0].name)):
            self.model = (params[0].name, hints[params[0].name])
            return
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ServiceError(f"command {name!r}: *args/**kwargs are not supported")
            self.params.append((p.name, _validator(hints.get(p.name, Any)), p.default is p.empty))

    def bind(self, args: Any) -> dict[str, Any]:
        """Validated keyword arguments (ValueError/pydantic ValidationError if not)."""
        if not isinstance(args, dict):
            raise ValueError("args must be a JSON object")
        if self.model is not None:
            pname, model = self.model
            return {pname: model.model_validate(args)}
        names = {n for n, _, _ in self.params}
        unknown = set(args) - names
        if unknown:
            raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        out = {}
        for pname, check, required in self.params:
            if pname in args:
                try:
                    out[pname] = check(args[pname])
                except Exception as e:
                    raise ValueError(f"argument {pname!r}: {_one_line(e)}") from None
            elif required:
                raise ValueError(f"missing argument {pname!r}")
        return out


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and any(c.__name__ == "BaseModel" for c in t.__mro__)


def _one_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _jsonable(x: Any) -> Any:
    dump = getattr(x, "model_dump", None)
    return dump(mode="json") if callable(dump) else x


class Commands:
    """The command and shadow side of one :class:`edge.Service` (``svc._commands``)."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.commands: dict[str, _Command] = {}
        self.clock = SystemClock()
        self._log: DedupTable | None = None
        self._desired: dict[str, tuple[int, dict[str, Any]]] = {}
        self._desired_handlers: dict[str, list[Handler]] = {}
        self._routed = False
        self._shadow_routed: set[str] = set()
        self.counters = {"commands_run": 0, "commands_interrupted": 0, "commands_expired": 0,
                         "commands_rejected": 0, "commands_duplicate": 0, "desired_stale": 0}

    # ------------------------------------------------------------ declaring

    def command(self, name: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            if name in self.commands:
                raise ServiceError(f"{self.svc.name}: command {name!r} registered twice")
            self.commands[name] = _Command(name, fn)
            if not self._routed:
                self._routed = True

                async def on_command(name: str, event: Event) -> None:
                    await self._run(name, event)

                self.svc.on(f"cmd/{self.svc.name}/{{name}}", key=lambda t, p: "cmd")(on_command)
            return fn

        return deco

    def on_desired(self, thing: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self._desired_handlers.setdefault(thing, []).append(fn)
            self._route_shadow(thing)
            return fn

        return deco

    def _route_shadow(self, thing: str) -> None:
        """Subscribe to this thing's desired document (one route per thing)."""
        if thing in self._shadow_routed:
            return
        self._shadow_routed.add(thing)

        async def on_desired_doc(body: dict[str, Any]) -> None:
            await self._desired_in(thing, body)

        self.svc.on(f"shadow/{thing}/desired")(on_desired_doc)

    # ------------------------------------------------------------ running a command

    def _open_log(self) -> DedupTable:
        if self._log is None:
            sd = self.svc.state_dir
            path = os.path.join(sd, f"{self.svc.name}.cmds") if sd else None
            self._log = DedupTable(path, ttl=31 * 86400.0, max_entries=max(self.svc.dedup_max, 10_000))
        return self._log

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _status(self, cid: str, status: str, reply: Any = None, error: str | None = None) -> None:
        data = status_data(cid, status, self.svc.name, reply=reply, error=error,
                           clock_wall=self.clock.wall())
        await self.svc.publish(f"evt/cmd/{self.svc.name}", data, type=STATUS_TYPE, subject=cid)

    async def _run(self, name: str, event: Event) -> None:
        journal = self._open_log()
        try:
            cmd = parse_target_command(event.id, event.data, name, self.clock)
        except CommandError as e:
            self.counters["commands_rejected"] += 1
            log.warning("service %s: bad command on %s: %s", self.svc.name, name, e)
            if event.id:
                await self._status(event.id, "rejected", error=str(e))
            return
        cid = cmd.id
        if "d:" + cid in journal:
            self.counters["commands_duplicate"] += 1
            return  # done before: its status is already on its way
        if "s:" + cid in journal:
            self.counters["commands_interrupted"] += 1
            log.warning("service %s: command %s was interrupted while running; not run again",
                        self.svc.name, cid)
            await self._status(cid, "failed", error="interrupted: the target stopped while running it; "
                               "not run again (at most once)")
            return self._done(cid)
        left, why = cmd.held.remaining(self.clock)
        if left <= 0:
            self.counters["commands_expired"] += 1
            await self._status(cid, "expired", error=why)
            return self._done(cid)
        spec = self.commands.get(name)
        if spec is None:
            self.counters["commands_rejected"] += 1
            known = ", ".join(sorted(self.commands)) or "none"
            await self._status(cid, "rejected", error=f"unknown command {name!r} (known: {known})")
            return self._done(cid)
        try:
            kwargs = spec.bind(cmd.args)
        except Exception as e:  # ValueError, pydantic ValidationError
            self.counters["commands_rejected"] += 1
            await self._status(cid, "rejected", error=f"bad arguments: {_one_line(e)}")
            return self._done(cid)
        await self._status(cid, "accepted")
        journal.add("s:" + cid)
        journal.commit()  # right before running: a crash from here on means "interrupted"
        self.counters["commands_run"] += 1
        try:
            result = await spec.fn(**kwargs)
        except Exception as e:
            log.info("service %s: command %s (%s) failed: %r", self.svc.name, cid, name, e)
            await self._status(cid, "failed", error=_one_line(e))
        else:
            await self._status(cid, "succeeded", reply=_jsonable(result))
        self._done(cid)

    def _done(self, cid: str) -> None:
        journal = self._open_log()
        journal.add("d:" + cid)
        journal.commit()

    # ------------------------------------------------------------ shadow

    def desired(self, thing: str) -> dict[str, Any] | None:
        """The newest desired document seen for ``thing`` (None before the first)."""
        self._route_shadow(thing)
        held = self._desired.get(thing)
        return None if held is None else held[1]

    async def _desired_in(self, thing: str, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("version"), int):
            return
        version, doc = body["version"], body.get("desired")
        if not isinstance(doc, dict):
            return
        held = self._desired.get(thing)
        if held is not None and version <= held[0]:
            if version < held[0]:
                self.counters["desired_stale"] += 1
            return  # never an older version after a newer one
        self._desired[thing] = (version, doc)
        for fn in self._desired_handlers.get(thing, ()):
            await fn(doc)

    async def report(self, thing: str, doc: dict[str, Any]) -> None:
        if not isinstance(doc, dict):
            raise ServiceError("a reported document must be a JSON object")
        await self.svc.publish(f"shadow/{thing}/reported", doc, raw=True)
