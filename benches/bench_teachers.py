"""Several teachers: the same total of records with one teacher, routed half to each of two
teachers, and from a 50/50 mixture of the two, side by side. End to end against
reference servers with a fixed per-request latency (a stand-in for a forward pass), and
the coordinator's CPU per sequence-step against zero-latency fakes in another process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bench_coordinator import fakes_elsewhere
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.server import running_server

LATENCY = 0.02  # seconds added to every request
RECORDS, TOKENS = 128, 32
SHAPES = ["one teacher", "two teachers, routed", "mixture of two"]


def _config(shape: str, base: str, teachers: tuple[str, str], **options: Any) -> tuple[CoordinatorConfig, list[Any]]:
    """The run's config and each record's route for a shape."""
    if shape == "one teacher":
        return CoordinatorConfig(theta_url=base, teachers={"a": teachers[0]}, **options), [None] * RECORDS
    config = CoordinatorConfig(theta_url=base, teachers={"a": teachers[0], "b": teachers[1]}, **options)
    if shape == "mixture of two":
        return config, [{"a": 0.5, "b": 0.5}] * RECORDS
    return config, ["a" if i % 2 else "b" for i in range(RECORDS)]


def _generate(config: CoordinatorConfig, prompts: list[Any], routes: list[Any], cpu: list[float]) -> int:
    async def go() -> int:
        async with DualVLLMCoordinator(config) as coord:
            t0 = time.process_time()
            outs = await coord.generate_batch_dual_prompts(prompts, prompts, TOKENS, show_progress=False,
                                                           teachers=routes)  # fmt: skip
            cpu.append(time.process_time() - t0)
        assert all(o.error is None for o in outs), [o.error for o in outs if o.error][:1]
        return sum(len(o.token_ids) for o in outs)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def slow_servers() -> Iterator[tuple[str, tuple[str, str]]]:
    """A base, a teacher and a second teacher, each taking LATENCY a request."""
    with contextlib.ExitStack() as stack:
        base, a, b = (stack.enter_context(running_server(m, latency=LATENCY, latency_rate=1.0))
                      for m in ("base", "teacher", "teacher-math"))  # fmt: skip
        yield base, (a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_tokens_per_second(benchmark, slow_servers: tuple[str, tuple[str, str]], shape: str) -> None:
    benchmark.group = f"teachers: end to end, {LATENCY * 1e3:.0f} ms per request, {RECORDS} records in flight"
    config, routes = _config(shape, *slow_servers, max_concurrency=RECORDS, max_batch_size=RECORDS,
                             stop_token_ids=())  # fmt: skip
    prompts = [f"Question {i}: why is the sky blue?\nAnswer:" for i in range(RECORDS)]
    walls: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        assert _generate(config, prompts, routes, []) == RECORDS * TOKENS
        walls.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["tokens_per_second"] = RECORDS * TOKENS / min(walls)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[str, tuple[str, str]]]:
    with fakes_elsewhere([(1, 20), (2, 20), (3, 20)]) as urls:
        yield urls[0], (urls[1], urls[2])


@pytest.mark.parametrize("shape", SHAPES)
def test_coordinator_cpu(benchmark, fakes: tuple[str, tuple[str, str]], shape: str) -> None:
    benchmark.group = f"teachers: coordinator CPU per sequence-step, {RECORDS * 2} in flight, zero-latency fakes"
    n = RECORDS * 2
    config, routes = _config(shape, *fakes, max_concurrency=n, max_batch_size=n, stop_token_ids=())
    routes = (routes * 2)[:n]
    prompts = [[65 + i % 26] * 40 for i in range(n)]
    cpu: list[float] = []
    steps = benchmark.pedantic(lambda: _generate(config, prompts, routes, cpu), rounds=3, iterations=1)
    assert steps == n * TOKENS
    benchmark.extra_info["us_per_sequence_step"] = 1e6 * min(cpu) / steps
