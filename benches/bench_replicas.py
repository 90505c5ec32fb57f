"""Replicas per model: end-to-end tokens/s with 1, 2 and 4 replicas of each model at a
fixed per-request latency, and the coordinator's CPU per sequence-step at 1,024 in flight
across 4 replicas of each model (zero-latency fakes in another process)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from bench_coordinator import fakes_elsewhere
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.server import running_server

LATENCY = 0.02  # seconds added to every request: a stand-in for a forward pass


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_tokens_per_second_by_replicas(benchmark, replicas: int) -> None:
    benchmark.group = f"end to end, {LATENCY * 1e3:.0f} ms per request, 128 in flight, 32 tokens"
    with contextlib.ExitStack() as stack:
        urls = [
            tuple(stack.enter_context(running_server(m, latency=LATENCY, latency_rate=1.0)) for _ in range(replicas))
            for m in ("base", "teacher")
        ]
        config = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], max_concurrency=128, max_batch_size=32,
                                   stop_token_ids=())  # fmt: skip
        prompts = [f"Question {i}: why is the sky blue?\nAnswer:" for i in range(128)]

        async def go() -> int:
            async with DualVLLMCoordinator(config) as coord:
                outs = await coord.generate_batch(prompts, max_tokens=32, show_progress=False)
            return sum(len(o.token_ids) for o in outs)

        walls: list[float] = []

        def run() -> None:
            t0 = time.perf_counter()
            assert asyncio.run(go()) == 128 * 32
            walls.append(time.perf_counter() - t0)

        benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["tokens_per_second"] = 128 * 32 / min(walls)


@pytest.fixture(scope="module")
def many_fakes() -> Iterator[list[str]]:
    with fakes_elsewhere([(1 + i % 2, 20) for i in range(8)]) as urls:
        yield urls


def test_coordinator_cpu_at_1024_in_flight_over_4_replicas(benchmark, many_fakes: list[str]) -> None:
    benchmark.group = "coordinator CPU, 1,024 in flight, 4 replicas per model, zero-latency fakes"
    theta, t = tuple(many_fakes[0::2]), tuple(many_fakes[1::2])
    config = CoordinatorConfig(theta_url=theta, t_url=t, max_concurrency=1024, max_batch_size=256,
                               stop_token_ids=())  # fmt: skip
    prompts = [[65 + i % 26] * 40 for i in range(1024)]
    cpu: list[float] = []

    async def go() -> int:
        async with DualVLLMCoordinator(config) as coord:
            t0 = time.process_time()
            outs = await coord.generate_batch(prompts, max_tokens=32, show_progress=False)
            cpu.append(time.process_time() - t0)
            assert [r["sequences"] for r in coord.get_statistics()["replicas"]["theta"]] == [256] * 4
        return sum(len(o.token_ids) for o in outs)

    steps = benchmark.pedantic(lambda: asyncio.run(go()), rounds=2, iterations=1)
    assert steps == 1024 * 32
    benchmark.extra_info["us_per_sequence_step"] = 1e6 * min(cpu) / steps
