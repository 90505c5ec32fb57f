"""A prompt's ids are asked of a model once: n samples of a prompt, or a prompt repeated
across a dataset, cost one /tokenize request per server, and a failure is not remembered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dualsample_rs.backends import replicas
from dualsample_rs.backends.replicas import ReplicaSet
from dualsample_rs.exceptions import APIConnectionError, APIError


class CountingTokenizer:
    """The parts of a backend `ReplicaSet.tokenize` uses; fails its first `fail` calls."""

    dialect = "vllm-completions"
    max_scored_ids = None
    model = "m"

    def __init__(self, fail: int = 0) -> None:
        self.base_url = "http://counting"
        self.calls: list[Any] = []
        self.fail = fail

    async def tokenize(self, prompt: Any = None, *, messages: Any = None, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((prompt, messages, add_special_tokens))
        await asyncio.sleep(0.01)
        if len(self.calls) <= self.fail:
            raise APIConnectionError("down")
        return [len(prompt or "") + (100 if messages else 0), int(add_special_tokens)]


async def test_one_request_per_distinct_prompt() -> None:
    backend = CountingTokenizer()
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    together = await asyncio.gather(*(rs.tokenize("abc") for _ in range(8)))
    later = [await rs.tokenize("abc") for _ in range(3)]
    assert together + later == [[3, 1]] * 11
    assert await rs.tokenize("abc", add_special_tokens=False) == [3, 0]
    assert await rs.tokenize(messages=[{"role": "user", "content": "abc"}]) == [100, 1]
    assert len(backend.calls) == 3
    # The caller owns its list: changing it changes nothing remembered.
    later[0].append(7)
    assert await rs.tokenize("abc") == [3, 1]


async def test_a_failure_is_not_remembered() -> None:
    backend = CountingTokenizer(fail=1)
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    with pytest.raises(APIConnectionError):
        await rs.tokenize("abc")
    assert await rs.tokenize("abc") == [3, 1]
    assert len(backend.calls) == 2


async def test_a_cancelled_caller_leaves_the_others_their_answer() -> None:
    """A waiter cancelled: the others share the one request. The caller whose request it
    is cancelled: its request goes with it (it asks in place, with no task), and one of
    the waiters asks again for all of them."""
    backend = CountingTokenizer()
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    asker, waiter, other = (asyncio.ensure_future(rs.tokenize("abc")) for _ in range(3))
    await asyncio.sleep(0)
    waiter.cancel()
    assert await asyncio.gather(asker, other) == [[3, 1]] * 2
    assert len(backend.calls) == 1

    asker, *waiters = (asyncio.ensure_future(rs.tokenize("xyz")) for _ in range(3))
    await asyncio.sleep(0)
    asker.cancel()
    assert await asyncio.gather(*waiters) == [[3, 1]] * 2
    assert asker.cancelled()
    assert len(backend.calls) == 3  # one more for "xyz" from its cancelled asker, one by a waiter


async def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas, "TOKENIZE_CACHE", 2)
    backend = CountingTokenizer()
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    for prompt in ["a", "bb", "bb", "ccc", "a"]:  # "bb" again is remembered; "a" was pushed out by "ccc"
        await rs.tokenize(prompt)
    assert [c[0] for c in backend.calls] == ["a", "bb", "ccc", "a"]


def test_a_server_refusing_a_share_of_requests_fails_no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 30% of requests answered 503 (seeded, asked one after another), 300 prompts
    tokenised with the run's three retries lose some; with the text requests' own
    retries, none."""
    from dualsample_rs.backends.http import Connection, ConnectionOptions
    from dualsample_rs.backends.vllm_completions import VLLMCompletionsBackend
    from dualsample_rs.server import running_server

    async def failures(url: str) -> int:
        conn = Connection.open(url, options=ConnectionOptions(max_retries=3))
        rs = ReplicaSet([VLLMCompletionsBackend.on(conn)])
        lost = 0
        try:
            for i in range(300):
                try:
                    await rs.tokenize(f"prompt {i}")
                except APIError:
                    lost += 1
                try:
                    await rs.detokenize([65 + i % 26])
                except APIError:
                    lost += 1
        finally:
            await rs.aclose()
            await conn.close()
        return lost

    options = {"error_503_rate": 0.3, "retry_after": 0.001, "fault_seed": 11}
    with running_server("base", **options) as url:
        monkeypatch.setattr(replicas, "TEXT_RETRIES", 3)
        assert asyncio.run(failures(url)) > 0
    with running_server("base", **options) as url:
        monkeypatch.undo()
        assert asyncio.run(failures(url)) == 0
