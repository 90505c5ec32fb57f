"""The reference server's rate for batched one-token top-20 requests, as the coordinator
sends them: B token-id prompts per request, max_tokens=1, logprobs=20, temperature 0.
Sequence-steps per second = B / mean time; `extra_info` records it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from dualsample_rs.server import running_server


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with running_server("base") as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("rows", [1, 64, 256])
def test_server_one_token_step(benchmark, client: httpx.Client, rows: int) -> None:
    benchmark.group = "reference server: one-token top-20 step"
    rng = np.random.default_rng(0)
    base = [list(rng.integers(32, 127, size=60)) for _ in range(rows)]
    counter = itertools.count()

    def step() -> dict:
        # A fresh last token each call, so no context is served from the model's cache.
        k = next(counter)
        prompts = [[int(x) for x in p] + [32 + (k + i) % 90, 32 + k % 77] for i, p in enumerate(base)]
        body = {
            "prompt": prompts,
            "max_tokens": 1,
            "logprobs": 20,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
        }
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()

    out = benchmark(step)
    assert len(out["choices"]) == rows
    if benchmark.stats is not None:
        benchmark.extra_info["sequence_steps_per_s"] = rows / benchmark.stats.stats.mean
