"""The serving run (continuous batching) on the reference servers: items join while
others are in flight, each caller gets its own item's output whatever the order they
finish in, and a paused run holds its rounds at the scheduler's gate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dualsample_rs import DualVLLMCoordinator
from dualsample_rs.engine.sequence import WorkItem
from dualsample_rs.engine.serving import ServingStoppedError
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


def test_a_bug_in_finishing_fails_its_own_items_and_the_run_goes_on(urls: tuple[str, str]) -> None:
    """A bug in finishing a sequence (here, raising once per item) fails that item alone,
    with the error on its output, instead of leaving its caller waiting or ending the run
    for everyone."""

    async def go() -> None:
        async with DualVLLMCoordinator(pair_config(urls, seed=3, stop_token_ids=())) as coord:
            finish = coord._finish
            broken_keys = {0, 1}

            async def sometimes(seq: Any) -> None:
                if seq.item.key in broken_keys:
                    raise RuntimeError("finish broke")
                await finish(seq)

            coord._finish = sometimes  # type: ignore[method-assign]
            async with coord.serving() as serving:
                calls = [serving.generate(_item(i, p, 2)) for i, p in enumerate(PROMPTS)]
                outs = await asyncio.wait_for(asyncio.gather(*calls), 30)
                assert [o.finish_reason for o in outs] == ["error", "error", "length"]
                assert "finish broke" in (outs[0].error or "")
                later = await asyncio.wait_for(serving.generate(_item(9, PROMPTS[0], 2)), 30)
                assert later.finish_reason == "length" and len(later.token_ids) == 2

    asyncio.run(go())


def test_a_stopped_run_refuses_new_items_with_its_reason(urls: tuple[str, str]) -> None:
    """A run a bug has ended (here, the scheduler itself) fails what waits on it and
    refuses later items with ServingStoppedError (the gateway's 503)."""

    async def go() -> None:
        async with DualVLLMCoordinator(pair_config(urls, seed=3, stop_token_ids=())) as coord:
            async with coord.serving() as serving:
                assert serving._task is not None
                serving._task.cancel()  # as if the run had ended
                await asyncio.gather(serving._task, return_exceptions=True)
                with pytest.raises(ServingStoppedError):
                    await serving.generate(_item(9, PROMPTS[0], 2))

    asyncio.run(go())
