"""The coordinator's own cost per sequence-step, and end-to-end tokens/s.

Overhead: two in-process "servers" (an ``httpx.MockTransport`` answering every dialect
from cached bodies, no sockets, no model) so the time is the coordinator's: building
requests, parsing replies, the Rust step, bookkeeping. 256 sequences in flight, 64
tokens each; ``extra_info`` has µs per sequence-step. End to end: two reference servers
over loopback (their n-gram models share the machine's two cores with the coordinator).
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
DIALECTS = ("vllm-completions", "vllm-generate", "sglang")


class _FakeServer:
    """Fixed top-k lists (no special or stop ids) in whichever dialect is asked."""

    def __init__(self, seed: int, top_k: int) -> None:
        rng = np.random.default_rng(seed)
        self.ids = [int(i) for i in rng.choice(np.arange(3, 250), size=top_k, replace=False)]
        self.logp = [float(v) for v in np.sort(np.log(rng.dirichlet(np.ones(top_k) * 0.5)) - 0.2)[::-1]]
        self.cache: dict[tuple[str, int], bytes] = {}

    def _entries(self, ids: list[int] | None) -> list[tuple[int, float]]:
        table = dict(zip(self.ids, self.logp, strict=True))
        return [(i, table.get(i, -12.0)) for i in ids] if ids else list(table.items())

    # Replies are cached by the request's head (everything but the contexts), so the fake
    # costs next to nothing per request and the time measured is the coordinator's.
    def completions(self, body: bytes) -> bytes:
        head, contexts = body.split(b',"prompt":', 1)
        key = (head, contexts.count(b"[") - 1)
        if key not in self.cache:
            ids = json.loads(head + b"}").get("logprob_token_ids")
            top = {f"token_id:{i}": v for i, v in self._entries(ids)}
            choice = json.dumps(
                {"index": 0, "text": "", "logprobs": {"top_logprobs": [top]}, "finish_reason": "length"}
            )
            choices = ",".join(choice.replace('"index": 0', f'"index": {i}', 1) for i in range(key[1]))
            self.cache[key] = ('{"object":"text_completion","choices":[' + choices + "]}").encode()
        return self.cache[key]

    def generate(self, body: bytes) -> bytes:
        head = body.split(b',"token_ids":', 1)[0]
        if (head, 1) not in self.cache:
            ids = json.loads(head + b"}")["sampling_params"].get("logprob_token_ids")
            entries = [{"token_id": i, "logprob": v, "rank": r + 1} for r, (i, v) in enumerate(self._entries(ids))]
            content = [{**entries[0], "top_logprobs": entries}]
            reply = {"choices": [{"index": 0, "token_ids": [entries[0]["token_id"]], "logprobs": {"content": content}}]}
            self.cache[(head, 1)] = json.dumps(reply).encode()
        return self.cache[(head, 1)]

    def sglang(self, body: bytes) -> bytes:
        head, contexts = body.split(b',"input_ids":', 1)
        key = (head, contexts.count(b"[") - 1)
        if key not in self.cache:
            lists = json.loads(head + b"}").get("token_ids_logprob") or [None] * key[1]
            items = []
            for ids in lists:
                triples = [[v, i, None] for i, v in self._entries(ids)]
                field = "output_token_ids_logprobs" if ids else "output_top_logprobs"
                items.append({"text": "", "output_ids": [triples[0][1]], "meta_info": {field: [triples]}})
            self.cache[key] = json.dumps(items).encode()
        return self.cache[key]

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/completions":
            return httpx.Response(200, content=self.completions(request.content))
        if path == "/inference/v1/generate":
            return httpx.Response(200, content=self.generate(request.content))
        if path == "/generate":
            return httpx.Response(200, content=self.sglang(request.content))
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 1 << 20}]})
        if path == "/tokenize":
            text = json.loads(request.content).get("prompt", "")
            return httpx.Response(200, json={"tokens": list(text.encode()), "count": len(text)})
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": "text", "text": "text"})
        return httpx.Response(404, json={"error": {"message": "no"}})


@pytest.mark.parametrize("scoring", ["topk", "exact"])
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("top_k", [20, 100])
def test_coordinator_overhead(benchmark, top_k: int, dialect: str, scoring: str) -> None:
    if top_k == 100 and (dialect != "vllm-completions" or scoring != "topk"):
        pytest.skip("top-100 is measured for the default path only")
    benchmark.group = "coordinator overhead (in-process zero-latency servers), 256 in flight"
    in_flight, tokens = 256, 64
    config = CoordinatorConfig(theta_url="http://theta", t_url="http://t", top_k=top_k, max_concurrency=in_flight,
                               max_batch_size=in_flight, stop_token_ids=(), dialect=dialect,
                               scoring=scoring)  # fmt: skip
    prompts = [[65 + i % 26] * 40 for i in range(in_flight)]

    async def go() -> int:
        clients = tuple(httpx.AsyncClient(transport=httpx.MockTransport(_FakeServer(s, top_k).handler)) for s in (1, 2))
        async with DualVLLMCoordinator(config, http_clients=clients) as coord:  # type: ignore[arg-type]
            outs = await coord.generate_batch(prompts, max_tokens=tokens, show_progress=False)
        for c in clients:
            await c.aclose()
        assert all(o.error is None for o in outs), outs[0].error
        return sum(len(o.token_ids) for o in outs)

    steps = benchmark.pedantic(lambda: asyncio.run(go()), rounds=3, iterations=1)
    assert steps == in_flight * tokens
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_sequence_step"] = 1e6 * benchmark.stats.stats.mean / steps


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[str, str]]]:
    with (
        running_server("base", enable_scale_out=True) as va,
        running_server("teacher", enable_scale_out=True) as vb,
        running_server("base", flavor="sglang") as sa,
        running_server("teacher", flavor="sglang") as sb,
    ):
        yield {"vllm": (va, vb), "sglang": (sa, sb)}


@pytest.mark.parametrize("scoring", ["topk", "exact"])
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("in_flight", [16, 64])
def test_end_to_end_tokens_per_second(
    benchmark, servers: dict[str, tuple[str, str]], in_flight: int, dialect: str, scoring: str
) -> None:
    benchmark.group = f"end to end against the reference servers, {in_flight} in flight (64 tokens per sequence)"
    urls = servers["sglang" if dialect == "sglang" else "vllm"]
    config = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], max_concurrency=in_flight, max_batch_size=in_flight,
                               stop_token_ids=(), dialect=dialect, scoring=scoring)  # fmt: skip
    prompts = [f"Question {i}: why is the sky blue?\nAnswer:" for i in range(in_flight)]

    async def go() -> int:
        async with DualVLLMCoordinator(config) as coord:
            outs = await coord.generate_batch(prompts, max_tokens=64, show_progress=False)
        return sum(len(o.token_ids) for o in outs)

    tokens = benchmark.pedantic(lambda: asyncio.run(go()), rounds=2, iterations=1)
    assert tokens == in_flight * 64
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_second"] = tokens / benchmark.stats.stats.mean
