"""A long-lived run that takes work items as they arrive (continuous batching).

Items go into one scheduler run whose source is a queue: every item in flight shares
the batched rounds (one request per step per server), a new item joins a batch at that
batch's next step, and each caller awaits its own item's output. Cancelling a caller's
wait marks its item cancelled, and the scheduler drops the sequence before its next
round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..exceptions import DualSampleError
from ..io.record import GenerationOutput
from .scheduler import Scheduler
from .sequence import WorkItem

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["Serving", "ServingStoppedError"]


class ServingStoppedError(DualSampleError):
    """The serving run has stopped (a bug ended it): no item can be taken."""


class Serving:
    """Items submitted one at a time, sampled together; use it as an async context
    manager (made by :meth:`Coordinator.serving`).

    Attributes:
        in_flight: items submitted and not yet finished.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        make: Callable[[Callable[[GenerationOutput], Any], Callable[[], Awaitable[Any]]], Scheduler],
    ):
        self.coordinator = coordinator
        self._make = make
        # Items with the futures their callers await, in the order submitted.
        self._queue: asyncio.Queue[tuple[WorkItem, asyncio.Future[GenerationOutput]] | None] = asyncio.Queue()
        # Futures by the index the scheduler gives their item (its place in _items()).
        self._waiting: dict[int, asyncio.Future[GenerationOutput]] = {}
        self._pending: set[asyncio.Future[GenerationOutput]] = set()
        self._task: asyncio.Task[None] | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._failure: BaseException | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def __aenter__(self) -> Serving:
        await self.coordinator.start()
        coord = self.coordinator
        if coord.stats.tokens == 0:
            coord.stats.started = time.monotonic()
        # Paused: rounds wait at the scheduler's gate until resumed.
        scheduler = self._make(coord.stats.count_finished, self._resumed.wait)
        self._task = asyncio.create_task(self._dispatch(scheduler))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking items, drop those in flight, and wait for the run to end."""
        if self._task is None:
            return
        self._resumed.set()
        for fut in self._pending:
            fut.cancel()
        self._queue.put_nowait(None)
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def pause(self) -> None:
        """Hold every round until :meth:`resume` (requests already sent finish)."""
        self._resumed.clear()

    def resume(self) -> None:
        """Let rounds go on after :meth:`pause`."""
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    async def generate(self, item: WorkItem) -> GenerationOutput:
        """Sample `item` among the others in flight; its output when its sequence ends
        (finish reason ``"error"`` with ``item.failure`` set when it failed). Cancelling
        the call drops the sequence at its next round."""
        return await self.submit(item)

    def submit(self, item: WorkItem) -> asyncio.Future[GenerationOutput]:
        """Queue `item` at once (no task to wait for); the future of its output, as
        :meth:`generate` returns it. Cancelling the future drops the sequence at its
        next round."""
        if self._task is None or self._task.done():
            raise ServingStoppedError(f"the serving run is not running: {self._failure!r}")
        fut: asyncio.Future[GenerationOutput] = asyncio.get_running_loop().create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._settled(item))
        self._queue.put_nowait((item, fut))
        return fut

    def _settled(self, item: WorkItem) -> Callable[[asyncio.Future[GenerationOutput]], None]:
        def settled(fut: asyncio.Future[GenerationOutput]) -> None:
            self._pending.discard(fut)
            if fut.cancelled():
                item.cancelled = True

        return settled

    async def _items(self) -> AsyncIterator[WorkItem]:
        """The items as submitted; the scheduler numbers them in this order, so each
        future is filed under its item's number as the item is handed over."""
        index = 0
        while True:
            got = await self._queue.get()
            if got is None:
                return
            item, fut = got
            self._waiting[index] = fut
            index += 1
            yield item

    async def _dispatch(self, scheduler: Scheduler) -> None:
        try:
            async for index, out in scheduler.run(self._items()):
                fut = self._waiting.pop(index, None)
                if fut is not None and not fut.done():
                    fut.set_result(out)
        except Exception as err:  # a bug: every caller learns of it
            self._failure = err
            for fut in self._pending:
                if not fut.done():
                    fut.set_exception(err)
