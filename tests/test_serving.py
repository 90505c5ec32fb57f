"""The serving run (continuous batching) on the reference servers: items join while
others are in flight, each caller gets its own item's output whatever the order they
finish in, and a paused run holds its rounds at the scheduler's gate."""

from __future__ import annotations

import asyncio

import pytest
from dualsample_rs import DualSampleError, DualVLLMCoordinator
from dualsample_rs.engine.sequence import WorkItem
from support import pair_config

PROMPTS = [[72, 105, 32, 116, 104, 101, 114, 101], [84, 104, 101, 32, 99, 97, 116], [65, 32, 98, 105, 114, 100]]


def _item(key: int, prompt: list[int], max_tokens: int) -> WorkItem:
    return WorkItem(key, list(prompt), list(prompt), key, max_tokens=max_tokens, ignore_eos=True)


def test_each_caller_gets_its_own_output_whatever_order_items_finish_in(urls: tuple[str, str]) -> None:
    """Items that finish in the reverse of the order they were submitted in still reach
    their own callers: each output has its own item's prompt and length."""

    async def go() -> None:
        async with DualVLLMCoordinator(pair_config(urls, seed=3, stop_token_ids=())) as coord:
            async with coord.serving() as serving:
                lengths = [9, 5, 1]  # the first submitted finishes last
                outs = await asyncio.gather(
                    *(serving.generate(_item(i, p, n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)))
                )
                assert [len(o.token_ids) for o in outs] == lengths
                assert [o.prompt for o in outs] == PROMPTS
                assert serving.in_flight == 0

    asyncio.run(go())


def test_a_paused_run_holds_rounds_and_drops_an_item_cancelled_while_held(urls: tuple[str, str]) -> None:
    async def go() -> None:
        async with DualVLLMCoordinator(pair_config(urls, seed=3, stop_token_ids=())) as coord:
            async with coord.serving() as serving:
                serving.pause()
                kept = asyncio.ensure_future(serving.generate(_item(1, PROMPTS[0], 4)))
                late = _item(2, PROMPTS[1], 4)
                drawn: list[int] = []
                late.on_token = lambda out: drawn.append(out.token_ids[-1])
                dropped = asyncio.ensure_future(serving.generate(late))
                await asyncio.sleep(0.3)
                steps = coord.stats.steps
                assert not kept.done() and not dropped.done()
                assert steps == 0  # held at the gate: no round ran
                dropped.cancel()
                await asyncio.sleep(0.1)
                serving.resume()
                out = await asyncio.wait_for(kept, 30)
                assert len(out.token_ids) == 4
                assert dropped.cancelled()
                assert drawn == []  # dropped at the gate, before the round it was held for
                assert serving.in_flight == 0

    asyncio.run(go())


def test_a_failing_run_fails_every_caller_and_refuses_new_items(urls: tuple[str, str]) -> None:
    """A bug that stops the run (here, finishing a sequence raises) reaches every caller
    waiting on it, and later items are refused with the reason, instead of hanging."""

    async def go() -> None:
        async with DualVLLMCoordinator(pair_config(urls, seed=3, stop_token_ids=())) as coord:

            async def broken(seq: object) -> None:
                raise RuntimeError("finish broke")

            coord._finish = broken  # type: ignore[method-assign]
            async with coord.serving() as serving:
                calls = [serving.generate(_item(i, p, 2)) for i, p in enumerate(PROMPTS)]
                got = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
                assert all(isinstance(g, RuntimeError) and "finish broke" in str(g) for g in got), got
                with pytest.raises(DualSampleError, match="finish broke"):
                    await serving.generate(_item(9, PROMPTS[0], 2))

    asyncio.run(go())
