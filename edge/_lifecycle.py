"""Lifecycles that cannot swallow an error.

A long-lived component (a service, a fleet) lives in one coroutine that opens
``async with asyncio.TaskGroup() as tg:`` and runs its loops there as named tasks; nobody
enters or leaves a TaskGroup by hand. :func:`first_error` turns the group's
ExceptionGroup back into the exception of the task that failed first, so that it comes
out of ``run()`` (and of ``asyncio.run``) as itself, with its own traceback.

:class:`Lifespan` lets the same coroutine back an ``async with`` block (embedding,
tests), the way a TaskGroup treats its body: entering waits until the coroutine says it
is ready (or raises what made it fail); a failure while the block runs cancels the block
and comes out of it as itself; leaving waits for the coroutine to finish (its owner asks
it to stop first); a block cancelled from outside stops the coroutine at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Lifespan", "first_error"]


def first_error(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf of an exception group (a TaskGroup's, possibly nested). Raise it
    *after* the ``except`` block, so that its own context and cause are kept::

        error = None
        try:
            async with asyncio.TaskGroup() as tg:
                ...
        except BaseExceptionGroup as eg:
            error = first_error(eg)
        if error is not None:
            raise error
    """
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Lifespan:
    """Run ``main(ready)`` as a task for the duration of an ``async with`` block."""

    def __init__(self, main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], name: str):
        self._main = main
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._host: asyncio.Task[Any] | None = None
        self._leaving = False
        self._cancelled_host = False

    async def __aenter__(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self._name}: a Lifespan is entered once")
        self._host = asyncio.current_task()
        ready = asyncio.Event()
        task = self._task = asyncio.create_task(self._main(ready), name=self._name)
        waiter = asyncio.create_task(ready.wait(), name=f"{self._name}:ready")
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait((task,))
            if not task.cancelled():
                task.exception()  # retrieved: the cancellation is what the caller sees
            raise
        finally:
            waiter.cancel()
        if task.done():
            task.result()  # raises what made it fail
            raise RuntimeError(f"{self._name} returned before it was ready")
        task.add_done_callback(self._main_done)

    def _main_done(self, task: asyncio.Task[None]) -> None:
        if self._leaving or task.cancelled() or task.exception() is None:
            return
        host = self._host
        if host is not None and not host.done():
            self._cancelled_host = True
            host.cancel()  # like a TaskGroup: a failed child ends the body

    async def __aexit__(self, et: type[BaseException] | None, *_: object) -> None:
        self._leaving = True
        task = self._task
        if task is None:
            return
        if et is not None and issubclass(et, asyncio.CancelledError) and not self._cancelled_host:
            task.cancel()  # cancelled from outside: stop now, do not drain
        try:
            await task
        except asyncio.CancelledError:
            if self._cancelled_host or et is None or not issubclass(et, asyncio.CancelledError):
                raise
            # the outer cancellation propagates as it came in
        except BaseException as e:
            if self._cancelled_host and self._host is not None:
                self._host.uncancel()
                # raised here, its context is the cancellation of the block: not printed
                e.__suppress_context__ = True
            raise
