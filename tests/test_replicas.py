"""Several replicas per model: the same records as one server, each sequence on one
replica per model, a replica lost mid-run costs nothing, a mismatched one is refused."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from dualsample_rs import ConfigurationError, CoordinatorConfig, DualVLLMCoordinator, GenerationOutput
from dualsample_rs.server import running_server
from dualsample_rs.server.corpus import chat
from dualsample_rs.server.process import READY_PREFIX
from support import PLAIN, QUESTIONS, doomed_server, pair_config, run_coordinator

PLAIN_MANY = [f"({i}) {p}" for i in range(3) for p in PLAIN]  # 24 sequences, distinct first ids
QUESTIONS_MANY = [f"({i}) {q}" for i in range(3) for q in QUESTIONS]
CHAT_MANY = [chat([{"role": "user", "content": q}], True) for q in QUESTIONS_MANY]


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    with running_server("base") as a1, running_server("base") as a2:
        with running_server("teacher") as b1, running_server("teacher") as b2:
            yield (a1, a2), (b1, b2)


def _run(
    theta: str | tuple[str, ...], t: str | tuple[str, ...], teacher_chat: bool = True, **kw
) -> tuple[list[GenerationOutput], dict]:
    config = pair_config((theta, t), seed=31, max_concurrency=12, max_batch_size=12, **kw)
    teacher = QUESTIONS_MANY if teacher_chat else CHAT_MANY
    outs, stats, _ = run_coordinator(config, PLAIN_MANY, teacher, max_tokens=30, teacher_chat=teacher_chat)
    return outs, stats


def _prompt_counts(url: str) -> dict[str, int]:
    """Requests per prompt key; keys of the handshake's short probes are left out."""
    counts = httpx.get(url + "/dualsample/prompts", timeout=10).json()
    return {k: n for k, n in counts.items() if k.count(",") == 23}


def test_replicas_give_the_same_records_and_keep_each_sequence_on_one(
    replicas: tuple[tuple[str, str], tuple[str, str]], urls: tuple[str, str]
) -> None:
    (a1, a2), (b1, b2) = replicas
    before = [_prompt_counts(u) for u in (a1, a2, b1, b2)]
    outs, stats = _run((a1, a2), (b1, b2))
    after = [_prompt_counts(u) for u in (a1, a2, b1, b2)]
    single, _ = _run(urls[0], urls[1])
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]
    # requests per sequence (keyed by its prompt's first ids) on each replica of each model
    for pair in ((0, 1), (2, 3)):
        seen = [{k: after[i][k] - before[i].get(k, 0) for k in after[i] if after[i][k] > before[i].get(k, 0)}
                for i in pair]  # fmt: skip
        assert not set(seen[0]) & set(seen[1])  # no sequence on both replicas
        assert len(seen[0]) + len(seen[1]) == len(PLAIN_MANY) and min(len(s) for s in seen) >= 8  # spread out
    assert [r["sequences"] for r in stats["replicas"]["theta"]] == [12, 12]


def test_a_replica_lost_mid_run_costs_no_record(replicas, urls: tuple[str, str]) -> None:
    (a1, _), (b1, b2) = replicas
    with doomed_server() as (doomed, proc):

        async def go() -> tuple[list[GenerationOutput], dict]:
            config = CoordinatorConfig(theta_url=(a1, doomed), t_url=(b1, b2), seed=31, max_concurrency=12,
                                       max_batch_size=12, max_retries=1, retry_delay=0.01)  # fmt: skip
            async with DualVLLMCoordinator(config) as coord:

                async def kill_soon() -> None:
                    await asyncio.sleep(0.3)
                    proc.kill()

                killer = asyncio.create_task(kill_soon())
                outs = await coord.generate_batch_dual_prompts(PLAIN_MANY, QUESTIONS_MANY, 30, show_progress=False,
                                                               teacher_chat=True)  # fmt: skip
                await killer
                return outs, coord.get_statistics()

        outs, stats = asyncio.run(asyncio.wait_for(go(), timeout=120))
    assert all(o.error is None for o in outs)
    single, _ = _run(urls[0], urls[1])
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]  # moved sequences keep their tokens
    doomed_stats = stats["replicas"]["theta"][1]
    assert doomed_stats["down"] and doomed_stats["failures"] == 1 and doomed_stats["requests"] > 0


def test_a_replica_with_another_vocabulary_is_refused(replicas) -> None:
    (a1, _), (b1, _) = replicas
    with running_server("base-reversed", served_model_name="dualsample-base") as other:
        with pytest.raises(ConfigurationError, match="do not share a vocabulary"):
            _run((a1, other), b1)
    with running_server("base", served_model_name="another-model") as renamed:
        with pytest.raises(ConfigurationError, match="same model"):
            _run((a1, renamed), b1)


def test_cli_takes_repeated_and_comma_separated_urls(replicas) -> None:
    import argparse

    from dualsample_rs.cli.parsing import _generate_parser, config_from_args

    (a1, a2), (b1, b2) = replicas
    parser = argparse.ArgumentParser()
    _generate_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--input", "x", "--output", "y", "--theta-url", a1, "--theta-url", a2,
                              "--t-url", f"{b1},{b2}"])  # fmt: skip
    config = config_from_args(args)
    assert config.theta_url == (a1, a2) and config.t_url == (b1, b2)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_prefix_cache_hit_rate_per_replica(flavor: str) -> None:
    opts: dict = {"flavor": "sglang"} if flavor == "sglang" else {"enable_prompt_tokens_details": True}
    with running_server("base", **opts) as a1, running_server("base", **opts) as a2:
        with running_server("teacher", **opts) as b1:
            outs, stats = _run((a1, a2), b1, teacher_chat=flavor == "vllm")  # SGLang renders no chat template
    assert all(o.error is None for o in outs)
    rates = [r["cache_hit_rate"] for r in stats["replicas"]["theta"]]
    # each sequence stays where its context is cached: after the first step, every
    # request finds all but the last (partial) block of its prompt in the cache
    assert all(r is not None and r > 0.5 for r in rates), rates
    assert stats["replicas"]["t"][0]["cache_hit_rate"] > 0.5


def test_no_hit_rate_where_the_server_does_not_report_it(replicas) -> None:
    (a1, a2), (b1, b2) = replicas
    _, stats = _run((a1, a2), (b1, b2))
    assert all(r["cache_hit_rate"] is None for r in stats["replicas"]["theta"])


def _serve_on(port: int, model: str = "base", *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "serve", "--model", model, "--port", str(port), *flags],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith(READY_PREFIX)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "comes_back_as,flags,back,says",
    [
        ("base", (), True, ""),
        ("base-reversed", (), False, "serves another model, vocabulary or context length"),
        ("base", ("--max-logprobs", "2"), False, "fails a start-up check"),
    ],
    ids=["as it was", "another vocabulary", "a lower logprob cap"],
)
def test_a_replica_is_taken_back_only_as_it_was(
    replicas, comes_back_as: str, flags: tuple[str, ...], back: bool, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    from dualsample_rs.backends import Context
    from dualsample_rs.backends.replicas import PROBE_INTERVAL

    (a1, _), _ = replicas
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve_on(port, "base", "--served-model-name", "dualsample-base")
    url = f"http://127.0.0.1:{port}"

    async def go() -> list[bool]:
        config = CoordinatorConfig(theta_url=(a1, url), t_url=a1, max_retries=0, retry_delay=0.0)
        async with DualVLLMCoordinator(config) as coord:
            contexts = [Context([72, 105, i]) for i in range(4)]
            await coord.theta.topk(contexts, 5)  # two on each replica
            _stop(proc)
            await coord.theta.topk(contexts, 5)  # the dead one leaves, its sequences move
            states = [coord.base.replica_stats[1].down]
            again = _serve_on(port, comes_back_as, "--served-model-name", "dualsample-base", *flags)
            try:
                await asyncio.sleep(3 * PROBE_INTERVAL)
                states.append(coord.base.replica_stats[1].down)
            finally:
                _stop(again)
            return states

    try:
        states = asyncio.run(asyncio.wait_for(go(), timeout=60))
    finally:
        _stop(proc)
    assert states == [True, not back]
    assert says in caplog.text


def test_replies_that_keep_failing_to_parse_take_a_replica_out(replicas, urls: tuple[str, str]) -> None:
    (a1, _), (b1, _) = replicas
    with doomed_server("--malformed-rate", "0.3", "--fault-seed", "3") as (bad, _):
        outs, stats = _run((a1, bad), b1, max_retries=1, retry_delay=0.0)
    single, _ = _run(urls[0], urls[1])
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]
    assert stats["replicas"]["theta"][1]["down"]


def test_a_dead_replica_at_start_is_a_warning(
    replicas, urls: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    (a1, _), (b1, _) = replicas
    outs, stats = _run((a1, "http://127.0.0.1:9"), b1, retry_delay=0.0)
    single, _ = _run(urls[0], urls[1])
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]
    assert [r["down"] for r in stats["replicas"]["theta"]] == [False, True]
    assert "does not answer" in caplog.text and "starting without it" in caplog.text
    with pytest.raises(Exception, match="connection"):
        _run(("http://127.0.0.1:9", "http://127.0.0.1:7"), b1, retry_delay=0.0)


def test_one_replica_counts_its_sequences(urls: tuple[str, str]) -> None:
    _, stats = _run(urls[0], urls[1])
    assert stats["replicas"]["theta"][0]["sequences"] == len(PLAIN_MANY)
