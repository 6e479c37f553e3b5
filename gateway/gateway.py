"""The gateway: the stages of the path of a message, wired around one shared state.

    local broker -> intake -> committer -> SQLite store -> uplink -> cloud broker
                 (gateway/intake.py) (gateway/committer.py)  (gateway/uplink.py)

Each stage is a class with an ``async def run()``; they share a :class:`~gateway.state.State`
(the pending batch, how far each lane got, counters) and nothing else. :meth:`Gateway.run`
opens the store, starts every stage as a named task in one ``asyncio.TaskGroup`` and
lives inside it: the first task that fails ends the gateway with that task's exception.

The downlink stage (cloud commands and desired state -> its own store,
``<store>.downlink`` -> ``cmd/...`` and ``shadow/...`` on the local broker) runs beside
these as one more task in :meth:`Gateway.run` (gateway/downlink.py). It shares only the
stop event: it has its own connections to both brokers (a clean session on the cloud)
and its own store, and its statuses and reports reach the cloud through the intake and
the events lane like any other event (docs/commands.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edge._codec import PARSE_PATH
from edge._lifecycle import first_error
from gateway.committer import Committer
from gateway.downlink import Downlink
from gateway.gaps import Ledger
from gateway.intake import Intake
from gateway.settings import GatewaySettings
from gateway.state import Hooks, State
from gateway.uplink import Uplink

__all__ = ["Gateway"]

log = logging.getLogger("edgeferry.gateway")

# edge._codec.PARSE_PATH, as the startup line says it
_PARSE_PATHS = {"c": "C accelerator (edge/_cparse.c)",
                "python": "pure Python (edge._cparse not built, or EDGEFERRY_PURE_PYTHON=1)"}


class Gateway:
    """``await Gateway(settings).run()`` until :meth:`stop` (SIGTERM) or a task fails.

    ``hooks`` are failpoints for tests (see :class:`~gateway.state.Hooks`).
    """

    def __init__(self, settings: GatewaySettings, hooks: Hooks | None = None) -> None:
        self.s = settings
        self.state = State(settings)
        self.intake = Intake(self.state)
        hooks = hooks or Hooks()
        self.committer = Committer(self.state, self.intake, hooks)
        self.uplink = Uplink(self.state)
        # commands and desired state: its own connections and store (docs/commands.md)
        self.downlink = Downlink(settings, after_receive=hooks.downlink_after_receive,
                                 fast_status=hooks.downlink_fast_status) if settings.downlink else None
        self._ran = False

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Open the store and run every stage; ``await ready()`` once they are started.
        Returns after :meth:`stop` and a drain; raises the first task's failure as itself."""
        if self._ran:
            raise RuntimeError("a Gateway runs only once")
        self._ran = True
        st = self.state
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        try:
            await loop.run_in_executor(st.writer, st.store.open)
            st.opened()
            # how many records left before this start is not known; up to which seq is
            st.ledger = Ledger({lane: st.store.removed_upto.get(lane, 0) for lane in st.lane_order})
            log.info("gateway %s: store %s epoch %d, backlog %d records (%d bytes), next seq %d; "
                     "MQTT parse: %s", self.s.node_id, st.store.path, st.store.epoch,
                     sum(ln.count for ln in st.store.lanes.values()), st.store.total_bytes,
                     st.store.next_seq, _PARSE_PATHS[PARSE_PATH])
            for note in self.s.notes:
                log.warning("cloud profile: %s", note)
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self.intake.run(), name="intake"),
                        tg.create_task(self.committer.run(), name="committer"),
                        tg.create_task(self.uplink.run(), name="uplink"),
                        tg.create_task(self.committer.housekeeping(), name="housekeeping"),
                    ]
                    if self.downlink is not None:
                        tasks.append(tg.create_task(self.downlink.run(st.stop), name="downlink"))
                    if ready is not None:
                        await ready()
                    await st.stop.wait()
                    await self._shutdown()
                    for task in tasks:
                        task.cancel()
            except BaseExceptionGroup as eg:  # noqa: F821 - builtin in 3.11
                error = first_error(eg)
            if error is not None:
                raise error  # the failed task's own exception and traceback
        finally:
            await loop.run_in_executor(st.writer, st.store.close)
            st.writer.shutdown(wait=True)
            st.reader.shutdown(wait=True)

    @property
    def ready(self) -> asyncio.Event:
        """Set once the store is open and the local broker connected (systemd READY=1)."""
        return self.state.ready

    def stop(self) -> None:
        """Drain and end :meth:`run` (safe to call from a signal handler, at any time)."""
        self.state.request_stop()

    def status(self) -> dict[str, Any]:
        st = self.state.status()
        st["downlink"] = self.downlink.status() if self.downlink is not None else None
        st["mqtt_parse"] = PARSE_PATH
        return st

    async def _shutdown(self) -> None:
        # take no new messages, finish the commit in flight and acknowledge it, then
        # leave the local broker: what was not committed stays with the broker
        st = self.state
        st.closing = True
        st.discard_pending()
        await st.idle.wait()
        await self.intake.close()
        # remove what the cloud acknowledged, so a restart does not resend it
        await self.committer.flush_deletes()
