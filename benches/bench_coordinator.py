"""The coordinator's own cost per sequence-step, and end-to-end tokens/s.

Overhead: two in-process "servers" (an ``httpx.MockTransport`` answering from cached
bodies, no sockets, no model) so the time is the coordinator's: building requests,
parsing replies, the Rust step, bookkeeping. 256 sequences in flight, 64 tokens each;
``extra_info`` has µs per sequence-step. End to end: the two reference servers over
loopback (their n-gram models share the machine's two cores with the coordinator).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.server import running_server

TOP_K = 20
VOCAB = 259


def _fake_server(seed: int, top_k: int = TOP_K) -> httpx.MockTransport:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(3, 250), size=top_k, replace=False)  # no special or stop ids
    logp = np.sort(np.log(rng.dirichlet(np.ones(top_k) * 0.5)) - 0.2)[::-1]
    top = {f"token_id:{int(i)}": float(v) for i, v in zip(ids, logp, strict=True)}
    logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [top]}
    choice = json.dumps({"index": 0, "text": "", "logprobs": logprobs, "finish_reason": "length"})
    cache: dict[int, bytes] = {}

    def completions(rows: int) -> bytes:
        if rows not in cache:
            choices = ",".join(choice.replace('"index": 0', f'"index": {i}', 1) for i in range(rows))
            cache[rows] = ('{"object":"text_completion","choices":[' + choices + "]}").encode()
        return cache[rows]

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/completions":
            return httpx.Response(200, content=completions(request.content.count(b"[") - 1))
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 1 << 20}]})
        if path == "/tokenize":
            text = json.loads(request.content).get("prompt", "")
            return httpx.Response(200, json={"tokens": list(text.encode()), "count": len(text)})
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": "text"})
        return httpx.Response(404, json={"error": {"message": "no"}})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("top_k", [20, 100])
@pytest.mark.parametrize("in_flight", [256])
def test_coordinator_overhead(benchmark, in_flight: int, top_k: int) -> None:
    benchmark.group = "coordinator overhead (in-process zero-latency servers)"
    tokens = 64
    config = CoordinatorConfig(theta_url="http://theta", t_url="http://t", top_k=top_k, max_concurrency=in_flight,
                               max_batch_size=in_flight, stop_token_ids=())  # fmt: skip
    prompts = [[65 + i % 26] * 40 for i in range(in_flight)]

    async def go() -> int:
        clients = (
            httpx.AsyncClient(transport=_fake_server(1, top_k)),
            httpx.AsyncClient(transport=_fake_server(2, top_k)),
        )
        async with DualVLLMCoordinator(config, http_clients=clients) as coord:
            outs = await coord.generate_batch(prompts, max_tokens=tokens, show_progress=False)
        for c in clients:
            await c.aclose()
        return sum(len(o.token_ids) for o in outs)

    steps = benchmark.pedantic(lambda: asyncio.run(go()), rounds=3, iterations=1)
    assert steps == in_flight * tokens
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_sequence_step"] = 1e6 * benchmark.stats.stats.mean / steps


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


@pytest.mark.parametrize("in_flight", [16, 64])
def test_end_to_end_tokens_per_second(benchmark, servers: tuple[str, str], in_flight: int) -> None:
    benchmark.group = "end to end against the reference servers (64 tokens per sequence)"
    config = CoordinatorConfig(theta_url=servers[0], t_url=servers[1], max_concurrency=in_flight,
                               max_batch_size=in_flight, stop_token_ids=())  # fmt: skip
    prompts = [f"Question {i}: why is the sky blue?\nAnswer:" for i in range(in_flight)]

    async def go() -> int:
        async with DualVLLMCoordinator(config) as coord:
            outs = await coord.generate_batch(prompts, max_tokens=64, show_progress=False)
        return sum(len(o.token_ids) for o in outs)

    tokens = benchmark.pedantic(lambda: asyncio.run(go()), rounds=2, iterations=1)
    assert tokens == in_flight * 64
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_second"] = tokens / benchmark.stats.stats.mean
