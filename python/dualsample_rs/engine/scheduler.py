"""Sequences in flight: read-ahead, batching, refill, progress and cancellation.

It knows nothing of sampling: it is given how to prepare a sequence from an item, how to
advance a batch by one step, and how to finish a sequence. Each worker owns a batch and
refills it from a bounded queue of prepared sequences as others finish, so sequences
join and leave independently; several workers overlap one another's network waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from ..exceptions import APIError, DualSampleError
from ..io.record import GenerationOutput
from .sequence import Sequence, WorkItem

log = logging.getLogger(__name__)

# Items being prepared (tokenised) ahead of the workers at any moment.
READ_AHEAD = 64
# The longest a batch started from empty waits for items being prepared (one stuck in
# retries must not hold the others for long).
FILL_WAIT = 0.5
# Serving: a batch started from empty also waits while items keep arriving, until none has
# come for this long. A framework sends its rollouts in bursts (a step's prompts at once,
# or the next request of every client whose answer just went out), which reach the server
# over tens of milliseconds; starting on the first few would stagger the batch as above.
# A request that arrives alone waits this long once.
ARRIVAL_GAP = 0.002

Finished = tuple[int, GenerationOutput] | BaseException | None


class Scheduler:
    """Runs items through `prepare`, then `step` in batches until done, then `finish`.

    Args:
        prepare: builds the sequence for ``(index, item)``; a `DualSampleError` or
            `APIError` becomes that item's failed output.
        step: advances a batch by one token, marking finished sequences ``done``.
        finish: completes a finished sequence's output (text, rescoring).
        workers, batch: concurrent batches, and sequences per batch.
        on_output: called with each output as it is yielded (statistics, progress).
        gate: awaited before each step (a serving run holds its rounds there while paused).
    """

    def __init__(
        self,
        prepare: Callable[[int, WorkItem], Awaitable[Sequence]],
        step: Callable[[list[Sequence]], Awaitable[None]],
        finish: Callable[[Sequence], Awaitable[None]],
        workers: int,
        batch: int,
        on_output: Callable[[GenerationOutput], Any],
        gate: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.prepare, self.step, self.finish = prepare, step, finish
        self.workers, self.batch, self.on_output = workers, batch, on_output
        self.gate = gate
        # Items being prepared, and the workers waiting for one of them to arrive or be done.
        self._preparing = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._serving = False  # items arrive one by one (an async iterable)

    def _prepared(self) -> None:
        self._preparing -= 1
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _next_event(self, deadline: float) -> bool:
        """Wait until an item arrives or an item being prepared is done (queued or
        failed); False if the loop's clock reached `deadline` first."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return False
        return True

    async def run(
        self, items: Iterable[WorkItem] | AsyncIterable[WorkItem]
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Yield ``(position in items, output)`` as sequences finish; cancelling the
        iteration (or an error in a task) stops every task it started.

        `items` may be an async iterable that yields items as they arrive (serving): an
        item joins a batch at that batch's next step, and the run ends when the iterable
        does and every sequence has finished. An item whose ``cancelled`` is set is
        dropped before its sequence's next step (finish reason ``"abort"``)."""
        self._serving = isinstance(items, AsyncIterable)
        ready: asyncio.Queue[Sequence | None] = asyncio.Queue(maxsize=2 * self.batch)
        # Outputs, None when a worker is done, or the exception that stopped a task.
        finished: asyncio.Queue[Finished] = asyncio.Queue()
        feeder = asyncio.create_task(self._feed(items, ready, finished))
        tasks = [asyncio.create_task(self._worker(ready, finished)) for _ in range(self.workers)]
        done_workers = 0
        try:
            while done_workers < self.workers:
                got = await finished.get()
                if got is None:
                    done_workers += 1
                    continue
                if isinstance(got, BaseException):
                    raise got
                self.on_output(got[1])
                yield got
            await feeder
        finally:
            for t in (feeder, *tasks):
                t.cancel()
            await asyncio.gather(feeder, *tasks, return_exceptions=True)

    async def _feed(
        self,
        items: Iterable[WorkItem] | AsyncIterable[WorkItem],
        ready: asyncio.Queue[Sequence | None],
        finished: asyncio.Queue[Finished],
    ) -> None:
        """Prepare items ahead of the workers: at most READ_AHEAD at once, and the queue
        is bounded too, so memory does not grow with the number of items. If reading the
        items fails, the error goes to the consumer instead of leaving workers waiting."""
        slots = asyncio.Semaphore(READ_AHEAD)
        pending: set[asyncio.Task[None]] = set()

        async def prepare(index: int, item: WorkItem) -> None:
            try:
                try:
                    seq = await self.prepare(index, item)
                except Exception as err:  # bad input, a server, or a bug: this item fails alone
                    if not isinstance(err, (APIError, DualSampleError)):
                        log.exception("preparing an item failed")
                    item.failure = err
                    out = GenerationOutput(item.prompt, item.prompt_t, item.id, finish_reason="error", error=str(err))
                    await finished.put((index, out))
                    return
                await ready.put(seq)
            finally:
                slots.release()
                self._prepared()

        async def take(index: int, item: WorkItem) -> None:
            await slots.acquire()  # a slot is held until the item is queued
            self._preparing += 1
            self._wake()
            task = asyncio.create_task(prepare(index, item))
            pending.add(task)
            task.add_done_callback(pending.discard)

        try:
            if isinstance(items, AsyncIterable):
                index = 0
                async for item in items:
                    await take(index, item)
                    index += 1
            else:
                for index, item in enumerate(items):
                    await take(index, item)
            if pending:
                await asyncio.gather(*pending)
        except Exception as err:  # handed to the consumer, which raises it
            await finished.put(err)
            return
        for _ in range(self.workers):
            await ready.put(None)

    async def _worker(self, ready: asyncio.Queue[Sequence | None], finished: asyncio.Queue[Finished]) -> None:
        active: list[Sequence] = []
        exhausted = False
        finishing: set[asyncio.Task[None]] = set()

        async def finish(seq: Sequence) -> None:
            try:
                await self.finish(seq)
            except Exception as err:  # a bug: it fails this sequence, which its caller learns
                log.exception("finishing a sequence failed")
                seq.fail(err)
            await finished.put((seq.index, seq.out))

        try:
            while True:
                # A batch started from empty (the run's start, or after every sequence
                # ended) waits for the items being prepared, FILL_WAIT at most, and while
                # serving for items still arriving (ARRIVAL_GAP): steps of a few sequences
                # while the rest are tokenized would leave the batch's sequences
                # staggered, each step of the stagger one more request per server.
                filling = not active
                loop = asyncio.get_running_loop()
                deadline = loop.time() + FILL_WAIT
                while not exhausted and len(active) < self.batch:
                    if active and ready.empty():
                        if not filling:
                            break
                        if self._preparing:
                            filling = await self._next_event(deadline)
                        elif self._serving:
                            filling = await self._next_event(min(deadline, loop.time() + ARRIVAL_GAP))
                        else:
                            break
                        continue
                    seq = await ready.get()
                    if seq is None:
                        exhausted = True
                    else:
                        active.append(seq)
                if not active:
                    break
                for seq in active:
                    if seq.item.cancelled and not seq.done:
                        seq.drop()
                live = [seq for seq in active if not seq.done]
                if live:
                    if self.gate is not None:
                        await self.gate()
                        for seq in live:  # cancelled while held
                            if seq.item.cancelled:
                                seq.drop()
                        live = [seq for seq in live if not seq.done]
                    if live:
                        await self.step(live)
                for seq in active:
                    if seq.done:
                        # Finishing is a round trip or two: do it beside the next step.
                        task = asyncio.create_task(finish(seq))
                        finishing.add(task)
                        task.add_done_callback(finishing.discard)
                active = [seq for seq in active if not seq.done]
            if finishing:
                await asyncio.gather(*finishing)
        except Exception as err:  # a bug must surface, not hang the run
            await finished.put(err)
        finally:
            await finished.put(None)
