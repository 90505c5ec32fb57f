"""The coordinator's own cost per sequence-step, and end-to-end tokens/s.

Overhead: two fake servers (aiohttp on loopback, in a process of their own, answering
every dialect from cached bodies, no model), and the CPU time of the coordinator's
process alone: HTTP requests, building bodies, parsing replies, the Rust step,
bookkeeping. 256 sequences in flight, 64 tokens each; ``extra_info`` has µs of
coordinator CPU per sequence-step. End to end: two reference servers over loopback
(their n-gram models share the machine's two cores with the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import dualsample_rs
import numpy as np
import previous
import pytest
from aiohttp import web
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.server import running_flavors

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

    def prompt_scores(self, path: str, body: bytes) -> Any:
        """The start-up check's prompt log probabilities (raw values of the same table)."""
        data = json.loads(body)
        table = dict(zip(self.ids, self.logp, strict=True))
        if path == "/generate":
            ids, start = data["input_ids"], data["logprob_start_len"]
            entries = [[table.get(t, -12.0), t, None] for t in ids[start:]]
            return {"text": "", "meta_info": {"input_token_logprobs": entries}}
        ids = data.get("prompt") or data.get("token_ids")
        entries = [None] + [{str(t): {"logprob": table.get(t, -12.0), "rank": 1}} for t in ids[1:]]
        if path == "/v1/completions":
            return {"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]}
        return {"choices": [{"index": 0, "token_ids": [1]}], "prompt_logprobs": entries}

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        body = await request.read()
        if b"prompt_logprobs" in body or b"logprob_start_len" in body:
            return web.json_response(self.prompt_scores(path, body))
        if path == "/v1/completions":
            return web.Response(body=self.completions(body), content_type="application/json")
        if path == "/inference/v1/generate":
            return web.Response(body=self.generate(body), content_type="application/json")
        if path == "/generate":
            return web.Response(body=self.sglang(body), content_type="application/json")
        if path == "/v1/models":
            return web.json_response({"data": [{"id": "fake", "max_model_len": 1 << 20}]})
        if path == "/tokenize":
            text = json.loads(body).get("prompt", "")
            return web.json_response({"tokens": list(text.encode()), "count": len(text)})
        if path == "/detokenize":
            return web.json_response({"prompt": "text", "text": "text"})
        return web.json_response({"error": {"message": "no"}}, status=404)


def _serve_fakes(conn: Any, specs: list[tuple[int, int]]) -> None:
    """In a process of its own: one fake per (seed, top_k) of `specs`; sends their URLs."""

    async def main() -> None:
        urls = []
        for seed, top_k in specs:
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", _FakeServer(seed, top_k).handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        conn.send(urls)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def fakes_elsewhere(specs: list[tuple[int, int]]) -> Iterator[list[str]]:
    """Fakes in another process, so the CPU time measured here is the coordinator's."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_fakes, args=(child, specs), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the fake servers did not start")
        yield parent.recv()
    finally:
        proc.terminate()
        proc.join(10)


@pytest.fixture(scope="module")
def fake_servers() -> Iterator[dict[int, tuple[str, str]]]:
    """A base and a teacher fake, per top-k."""
    with fakes_elsewhere([(1, 20), (2, 20), (1, 100), (2, 100)]) as urls:
        yield {20: (urls[0], urls[1]), 100: (urls[2], urls[3])}


# Every dialect and scoring mode at top-20; top-100 for the default path.
OVERHEAD_CASES = [(20, d, s) for d in DIALECTS for s in ("topk", "exact")] + [(100, "vllm-completions", "topk")]


@pytest.mark.parametrize("top_k,dialect,scoring", OVERHEAD_CASES)
@pytest.mark.parametrize("package", ["now", "previous"])
def test_coordinator_overhead(
    benchmark, fake_servers: dict[int, tuple[str, str]], top_k: int, dialect: str, scoring: str, package: str
) -> None:
    """`package`: this one, or the one before the HTTP client moved to aiohttp (see
    `previous`), side by side."""
    benchmark.group = "coordinator overhead (zero-latency fake servers in another process), 256 in flight"
    # Run once by `make test`: the same path, an eighth of the work.
    in_flight, tokens = (32, 8) if benchmark.disabled else (256, 64)
    urls = fake_servers[top_k]
    ds = previous.require() if package == "previous" else dualsample_rs
    CoordinatorConfig, DualVLLMCoordinator = ds.CoordinatorConfig, ds.DualVLLMCoordinator
    config = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], top_k=top_k, max_concurrency=in_flight,
                               max_batch_size=in_flight, stop_token_ids=(), dialect=dialect,
                               scoring=scoring)  # fmt: skip
    prompts = [[65 + i % 26] * 40 for i in range(in_flight)]
    cpu: list[float] = []

    async def go() -> int:
        async with DualVLLMCoordinator(config) as coord:
            t0 = time.process_time()
            outs = await coord.generate_batch(prompts, max_tokens=tokens, show_progress=False)
            cpu.append(time.process_time() - t0)
        assert all(o.error is None for o in outs), outs[0].error
        return sum(len(o.token_ids) for o in outs)

    steps = benchmark.pedantic(lambda: asyncio.run(go()), rounds=3, iterations=1)
    assert steps == in_flight * tokens
    benchmark.extra_info["us_per_sequence_step"] = 1e6 * min(cpu) / steps


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[str, str]]]:
    with running_flavors() as urls:
        yield urls


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


@pytest.mark.parametrize("context", [100, 2000, 8000, 32000])
def test_cost_by_context_length(benchmark, fake_servers: dict[int, tuple[str, str]], context: int) -> None:
    """Coordinator CPU per sequence-step as contexts grow. Per-prompt work (checking and
    encoding the prompt once) is taken out by timing runs of 1 and 17 tokens: what is left
    grows only with the copy of each context into the request body."""
    benchmark.group = "coordinator CPU by context length (64 in flight, top-20, vllm-completions)"
    in_flight = 64
    urls = fake_servers[20]
    config = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], max_concurrency=in_flight, max_batch_size=in_flight,
                               stop_token_ids=(), dialect="vllm-completions")  # fmt: skip
    prompts = [[65 + (i + j) % 26 for j in range(context)] for i in range(in_flight)]
    cpu: dict[int, list[float]] = {1: [], 17: []}

    async def go() -> None:
        async with DualVLLMCoordinator(config) as coord:
            for tokens in (1, 17):
                t0 = time.process_time()
                outs = await coord.generate_batch(prompts, max_tokens=tokens, show_progress=False)
                cpu[tokens].append(time.process_time() - t0)
                assert sum(len(o.token_ids) for o in outs) == in_flight * tokens

    benchmark.pedantic(lambda: asyncio.run(go()), rounds=2, iterations=1)
    benchmark.extra_info["us_per_sequence_step"] = 1e6 * (min(cpu[17]) - min(cpu[1])) / (16 * in_flight)
