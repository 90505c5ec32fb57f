"""What a record costs besides its steps: the requests each server is sent per record
(counted by the reference server), the text of short outputs asked once per distinct id
list, and no per-record work for a progress bar nobody sees."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest
from dualsample_rs.backends import replicas
from dualsample_rs.backends.replicas import ReplicaSet
from dualsample_rs.backends.vllm_completions import token_list
from dualsample_rs.engine.coordinator import Coordinator
from dualsample_rs.exceptions import APIConnectionError, IncompleteReplyError
from dualsample_rs.server import request_counts
from support import pair_config, run_coordinator


class CountingDetokenizer:
    """The parts of a backend `ReplicaSet.detokenize` uses; fails its first `fail` calls."""

    dialect = "vllm-completions"
    max_scored_ids = None
    model = "m"

    def __init__(self, fail: int = 0) -> None:
        self.base_url = "http://counting"
        self.calls: list[list[int]] = []
        self.fail = fail

    async def detokenize(self, ids: list[int]) -> str:
        self.calls.append(list(ids))
        await asyncio.sleep(0.01)
        if len(self.calls) <= self.fail:
            raise APIConnectionError("down")
        return ",".join(map(str, ids))


async def test_a_short_id_list_is_detokenised_once() -> None:
    backend = CountingDetokenizer()
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    together = await asyncio.gather(*(rs.detokenize([5, 6]) for _ in range(8)))
    later = [await rs.detokenize([5, 6]) for _ in range(3)]
    assert together + later == ["5,6"] * 11
    assert await rs.detokenize([6, 5]) == "6,5"
    assert backend.calls == [[5, 6], [6, 5]]


async def test_a_long_id_list_is_asked_every_time() -> None:
    backend = CountingDetokenizer()
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    long = list(range(replicas.DETOKENIZE_IDS + 1))
    short = long[:-1]
    for ids in (long, long, short, short):
        assert await rs.detokenize(ids) == ",".join(map(str, ids))
    assert backend.calls == [long, long, short]


async def test_a_failed_text_is_asked_again_and_the_texts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CountingDetokenizer(fail=1)
    rs = ReplicaSet([backend])  # type: ignore[list-item]
    with pytest.raises(APIConnectionError):
        await rs.detokenize([1])
    assert await rs.detokenize([1]) == "1"
    monkeypatch.setattr(replicas, "DETOKENIZE_CACHE", 2)
    for ids in ([2], [3], [3], [1]):  # [3] again is remembered; [1] was pushed out by [2] and [3]
        await rs.detokenize(ids)
    assert backend.calls == [[1], [1], [2], [3], [1]]


def test_requests_per_record_on_the_reference_servers(urls: tuple[str, str]) -> None:
    """Records of one token: one /tokenize per record on each server, and a /detokenize
    on the base only per distinct text (the first token is drawn from the teacher's
    top-k, so texts repeat); the step requests carry many records each. A run of one
    record first gives what start-up costs."""

    def sent(records: int) -> tuple[list[dict[str, int]], set[tuple[int, ...]]]:
        before = [request_counts(u) for u in urls]
        outs = run_coordinator(pair_config(urls, seed=3), [f"Question {i}: why?" for i in range(records)],
                               [f"Q{i}" for i in range(records)], max_tokens=1).outputs  # fmt: skip
        assert all(o.error is None for o in outs)
        texts = {tuple(o.token_ids) for o in outs if o.finish_reason != "stop"}
        after = [request_counts(u) for u in urls]
        return [{path: n - b.get(path, 0) for path, n in a.items()} for a, b in zip(after, before, strict=True)], texts

    one, _ = sent(1)
    many, texts = sent(40)
    assert 1 <= len(texts) < 40
    for model in (0, 1):
        assert many[model]["/tokenize"] - one[model]["/tokenize"] == 39
        assert many[model]["/v1/completions"] - one[model]["/v1/completions"] <= 3
    assert many[0].get("/detokenize", 0) == len(texts) and many[1].get("/detokenize", 0) == 0


def test_a_hidden_progress_bar_costs_no_summary_per_record(
    urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    summary = Coordinator.get_statistics

    def counted(self: Coordinator) -> dict[str, Any]:
        calls.append(1)
        return summary(self)

    monkeypatch.setattr(Coordinator, "get_statistics", counted)
    got = run_coordinator(pair_config(urls, seed=3), [f"Question {i}: why?" for i in range(20)], max_tokens=2)
    assert len(got.outputs) == 20
    assert len(calls) == 1  # run_coordinator's own, at the end


def test_a_tokenize_reply_must_hold_plain_integer_ids() -> None:
    assert token_list({"tokens": [1, 2, 3]}, "here") == [1, 2, 3]
    assert token_list({"tokens": []}, "here") == []
    for bad in ([1, True], [1, 2.0], [1, "2"], [None], "12", None):
        with pytest.raises(IncompleteReplyError):
            token_list({"tokens": bad}, "here")
    with pytest.raises(IncompleteReplyError):
        token_list([1, 2], "here")


async def test_text_requests_reuse_one_patient_client_per_replica() -> None:
    """The client with the text requests' retries is made once per replica, not per request."""
    from dualsample_rs.backends.vllm_completions import VLLMCompletionsBackend

    backend = VLLMCompletionsBackend("http://127.0.0.1:9", max_retries=2)
    rs = ReplicaSet([backend])
    try:
        first = rs._patient(backend)
        assert first is not backend and first.max_retries == replicas.TEXT_RETRIES  # type: ignore[attr-defined]
        backend.model = "named later"
        assert rs._patient(backend) is first and first.model == "named later"
    finally:
        await rs.aclose()


def test_rounds_of_one_token_take_the_short_path_with_the_same_records(
    urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without speculation every round has one row per sequence: it skips the drafts'
    bookkeeping, and its records are those of the general path."""
    from dualsample_rs.engine.round import Round

    prompts = [f"Question {i}: why?" for i in range(6)]

    def records() -> list[tuple[Any, ...]]:
        outs = run_coordinator(pair_config(urls, seed=5), prompts, max_tokens=6).outputs
        return [(o.token_ids, o.alpha_history, o.logp_theta, o.logp_t, o.logq, o.finish_reason) for o in outs]

    short: list[int] = []
    one_each = Round._apply_one_each

    def counted(self: Round, rows: Any, bundle: Any) -> None:
        short.append(len(rows))
        one_each(self, rows, bundle)

    def general(self: Round, rows: Any, bundle: Any) -> None:
        # Rows marked "nothing drafted" (-1) one by one: the general path, whose kernel
        # call draws every row afresh just the same.
        self.apply(rows, dataclasses.replace(bundle, drafts=np.full(len(bundle.lengths), -1, dtype=np.int64)))

    monkeypatch.setattr(Round, "_apply_one_each", counted)
    fast = records()
    assert short and sum(short) >= len(prompts)
    monkeypatch.setattr(Round, "_apply_one_each", general)
    assert records() == fast
