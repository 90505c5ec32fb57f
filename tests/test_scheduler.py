"""The scheduler alone, with stand-in prepare, step and finish: how batches form."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from dualsample_rs.engine import scheduler
from dualsample_rs.engine.scheduler import Scheduler
from dualsample_rs.engine.sequence import WorkItem
from dualsample_rs.exceptions import InvalidInputError
from dualsample_rs.io.record import GenerationOutput


@dataclass
class _Seq:
    """What the scheduler reads of a sequence."""

    index: int
    item: WorkItem
    out: GenerationOutput
    done: bool = False


class _Run:
    """A scheduler whose sequences end after `length` steps, recording each step's size."""

    def __init__(self, length: int, delays: dict[int, float], fail: frozenset[int] = frozenset(), batch: int = 64):
        self.length, self.delays, self.fail = length, delays, fail
        self.steps: list[int] = []
        self.counts: dict[int, int] = {}
        self.scheduler = Scheduler(self.prepare, self.step, self.finish, workers=1, batch=batch,
                                   on_output=lambda out: None)  # fmt: skip

    async def prepare(self, index: int, item: WorkItem) -> Any:
        await asyncio.sleep(self.delays.get(index, 0.0))
        if index in self.fail:
            raise InvalidInputError(f"item {index} is bad")
        self.counts[index] = 0
        return _Seq(index, item, GenerationOutput([1, 2], [1, 2], item.id))

    async def step(self, batch: list[Any]) -> None:
        self.steps.append(len(batch))
        await asyncio.sleep(0.001)
        for seq in batch:
            self.counts[seq.index] += 1
            if self.counts[seq.index] >= self.length:
                seq.done = True

    async def finish(self, seq: Any) -> None:
        return None


def _items(count: int) -> list[WorkItem]:
    return [WorkItem(i, [1, 2], [1, 2]) for i in range(count)]


async def _collect(run: _Run, items: list[WorkItem]) -> list[int]:
    return sorted([index async for index, _ in run.scheduler.run(items)])


def test_a_batch_started_from_empty_waits_for_the_items_being_prepared() -> None:
    # Item i is ready after 2i ms: a first step taken as soon as item 0 is ready would
    # hold it alone, and the others would join one or two per step, staggered.
    run = _Run(length=4, delays={i: 0.002 * i for i in range(16)})
    assert asyncio.run(_collect(run, _items(16))) == list(range(16))
    assert run.steps == [16, 16, 16, 16]


def test_a_failed_preparation_does_not_hold_the_batch() -> None:
    run = _Run(length=3, delays={0: 0.0, 1: 0.02, 2: 0.01}, fail=frozenset({1}))
    assert asyncio.run(_collect(run, _items(3))) == [0, 1, 2]  # item 1 as a failed output
    assert run.steps == [2, 2, 2]


def test_an_item_that_arrives_alone_is_not_held_for_later_ones() -> None:
    """Serving: nothing else is being prepared, so the first item's steps start at once."""
    run = _Run(length=3, delays={})
    gate = asyncio.Event()

    async def arriving() -> AsyncIterator[WorkItem]:
        yield WorkItem(0, [1, 2], [1, 2])
        await gate.wait()  # the next item comes only after the first has finished
        yield WorkItem(1, [1, 2], [1, 2])

    async def go() -> list[int]:
        done = []
        async for index, _ in run.scheduler.run(arriving()):
            done.append(index)
            gate.set()
        return done

    assert asyncio.run(asyncio.wait_for(go(), timeout=10)) == [0, 1]
    assert run.steps == [1, 1, 1, 1, 1, 1]


def test_a_batch_filled_from_what_is_ready_does_not_wait_for_the_rest() -> None:
    """Four items are ready at once and four more only later: a batch of four starts
    with the first four, without waiting for the others' preparation (one of eight
    waits for them all)."""
    prepared_at_first_step: dict[int, int] = {}

    def first_step(batch: int) -> int:
        run = _Run(length=2, delays={i: 0.0 if i < 4 else 0.05 for i in range(8)}, batch=batch)
        step = run.step

        async def noting(rows: list[Any]) -> None:
            prepared_at_first_step.setdefault(batch, len(run.counts))
            await step(rows)

        run.scheduler.step = noting
        assert asyncio.run(_collect(run, _items(8))) == list(range(8))
        assert run.steps[0] == min(batch, 8)
        return prepared_at_first_step[batch]

    assert first_step(4) == 4
    assert first_step(8) == 8


def test_an_item_stuck_in_preparation_holds_the_batch_for_fill_wait_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "FILL_WAIT", 0.05)
    run = _Run(length=2, delays={0: 0.0, 1: 0.0, 2: 1.0})

    assert asyncio.run(_collect(run, _items(3))) == [0, 1, 2]
    # Items 0 and 1 ran without item 2, which ran on its own once prepared (waiting for
    # it would have given [3, 3]).
    assert run.steps == [2, 2, 1, 1]


def test_a_burst_of_items_arriving_one_by_one_starts_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving: sixteen items arrive 10 ms apart (a framework's burst of requests, each
    parsed in turn); with ARRIVAL_GAP at 50 ms the first step holds them all, where a step
    taken on the first arrival would stagger them over the first steps."""
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP", 0.05)
    run = _Run(length=3, delays={})

    async def arriving() -> AsyncIterator[WorkItem]:
        for i in range(16):
            yield WorkItem(i, [1, 2], [1, 2])
            await asyncio.sleep(0.01)

    async def go() -> list[int]:
        return sorted([index async for index, _ in run.scheduler.run(arriving())])

    assert asyncio.run(asyncio.wait_for(go(), timeout=10)) == list(range(16))
    assert run.steps == [16, 16, 16]


def test_a_lone_arrival_waits_arrival_gap_not_fill_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP", 0.05)
    monkeypatch.setattr(scheduler, "FILL_WAIT", 5.0)
    run = _Run(length=1, delays={})
    step = run.step
    started: list[float] = []

    async def timed(rows: list[Any]) -> None:
        started.append(asyncio.get_running_loop().time())
        await step(rows)

    run.scheduler.step = timed
    gate = asyncio.Event()

    async def arriving() -> AsyncIterator[WorkItem]:
        yield WorkItem(0, [1, 2], [1, 2])
        await gate.wait()

    async def go() -> float:
        t0 = asyncio.get_running_loop().time()
        async for _ in run.scheduler.run(arriving()):
            gate.set()
        return started[0] - t0

    waited = asyncio.run(asyncio.wait_for(go(), timeout=10))
    assert 0.05 <= waited < 2.0  # held for the gap, not for FILL_WAIT
    assert run.steps == [1]
