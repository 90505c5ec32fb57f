"""The coordinator end to end against two real reference servers over loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import dualsample_rs as ds
import pytest
from dualsample_rs import ConfigurationError, CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.engine.coordinator import WorkItem
from dualsample_rs.server import running_server
from support import (
    PLAIN,
    QUESTIONS,
    doomed_server,
    generate_cli,
    pair_config,
    read_records,
    run_coordinator,
    wait_cli,
    write_input,
)

IM_START, IM_END, EOS = 257, 258, 256


def run(config: CoordinatorConfig, prompts_theta=PLAIN, prompts_t=QUESTIONS, **kwargs) -> list[ds.GenerationOutput]:
    """The outputs of a run, the teacher's prompts through its chat template unless told."""
    return run_coordinator(config, prompts_theta, prompts_t, **{"teacher_chat": True, **kwargs}).outputs


cfg = pair_config


def test_dual_prompts_give_aligned_outputs(urls: tuple[str, str]) -> None:
    outs = run(cfg(urls, seed=1), max_tokens=40, return_diagnostics=True)
    assert [o.prompt for o in outs] == PLAIN and [o.prompt_t for o in outs] == QUESTIONS
    for o in outs:
        n = len(o.token_ids)
        assert 1 <= n <= 40 and o.finish_reason in ("stop", "length") and o.error is None
        for field in ("alpha_history", "logp_theta", "logp_t", "logq", "observed_theta", "observed_t"):
            assert len(getattr(o, field)) == n
        assert all(0.0 <= a <= 1.0 for a in o.alpha_history)
        assert all(q <= 0 for q in o.logq)
        assert set(o.diagnostics) == {"kl_theta", "kl_t", "ess_theta", "ess_t", "entropy", "js"}
        assert o.generated_tokens == o.token_ids
    # the two contexts differ: the teacher's chat prompt changes what the teacher predicts
    assert any(0.0 < a < 1.0 for o in outs for a in o.alpha_history[1:])


def test_first_token_is_forced_to_the_teacher(urls: tuple[str, str]) -> None:
    forced = run(cfg(urls, seed=2), max_tokens=5)
    assert all(o.alpha_history[0] == 1.0 for o in forced)
    # q* is then the teacher's distribution on the candidates: its own log probability
    # (the record's) renormalised over them, which on these lists hold nearly all its mass
    assert all(o.observed_t[0] and abs(o.logq[0] - o.logp_t[0]) < 1e-6 for o in forced)
    free = run(cfg(urls, seed=2, force_first_token=False), max_tokens=5)
    assert any(o.alpha_history[0] < 1.0 for o in free)


def test_support_constraint(urls: tuple[str, str]) -> None:
    # A tiny top-p keeps only the teacher's most probable token: q* is a point mass there.
    outs = run(cfg(urls, seed=3, constraint_to_target=True, target_top_p=0.01), max_tokens=12)
    for o in outs:
        # logp_t is the teacher's own log probability of its top token, not q*'s 0
        assert all(q == 0.0 for q in o.logq) and all(o.observed_t) and all(t < 0.0 for t in o.logp_t)
    plain = run(cfg(urls, seed=3), max_tokens=12)
    assert any(q < 0.0 for o in plain for q in o.logq)


def test_special_tokens_are_excluded_but_stop_ids_are_not(urls: tuple[str, str]) -> None:
    teacher_only = {"alpha_method": "fixed", "alpha": 1.0, "alpha_min": 1.0}
    plain = run(cfg(urls, seed=4, stop_token_ids=(EOS,), **teacher_only), max_tokens=60)
    assert any(IM_END in o.token_ids for o in plain)  # the teacher does produce <|im_end|>
    outs = run(
        cfg(urls, seed=4, stop_token_ids=(EOS,), exclude_special_tokens=True, special_token_ids=(IM_START, IM_END, EOS),
            **teacher_only),
        max_tokens=60,
    )  # fmt: skip
    for o in outs:
        assert IM_START not in o.token_ids and IM_END not in o.token_ids
    auto = run(cfg(urls, seed=4, exclude_special_tokens=True), max_tokens=60)
    assert not any(IM_START in o.token_ids for o in auto)


def test_eos_stops_with_finish_reason_stop(urls: tuple[str, str]) -> None:
    outs = run(cfg(urls, seed=5, alpha_method="fixed", alpha=1.0, alpha_min=1.0), max_tokens=200)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= len(outs) // 2
    for o in stopped:
        assert o.token_ids[-1] in (EOS, IM_END)
        assert "<|im_end|>" not in o.generated_text and "<|endoftext|>" not in o.generated_text
    short = run(cfg(urls, seed=5), max_tokens=3)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 3 for o in short if o.finish_reason != "stop")


def _records(outs: list[ds.GenerationOutput]) -> list[tuple]:
    return [(o.token_ids, o.alpha_history, o.logq, o.logp_theta, o.logp_t, o.finish_reason) for o in outs]


@pytest.mark.slow
def test_same_seed_same_records_whatever_concurrency(urls: tuple[str, str]) -> None:
    runs = [
        _records(run(cfg(urls, seed=6, max_concurrency=c, max_batch_size=b), max_tokens=30))
        for c, b in ((1, 1), (8, 8), (6, 2), (3, 3))
    ]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    other = _records(run(cfg(urls, seed=7), max_tokens=30))
    assert other != runs[0]


def test_statistics(urls: tuple[str, str]) -> None:
    config = cfg(urls, seed=8, constraint_to_target=True, target_top_p=0.9, enable_stability_check=True,
                 stability_threshold_js=0.05)  # fmt: skip
    outs, stats, _ = run_coordinator(config, PLAIN, QUESTIONS, max_tokens=10, teacher_chat=True)
    assert stats["total_tokens"] == sum(len(o.token_ids) for o in outs)
    assert stats["sequences"] == len(QUESTIONS) and stats["errors"] == 0
    assert stats["first_token_forced"] == len(QUESTIONS)
    # counted where the constraint removed a candidate: with top-p 1 it never does
    assert 0 < stats["constraint_applied"] <= stats["total_tokens"]
    keep_all = cfg(urls, seed=8, constraint_to_target=True, target_top_p=1.0)
    _, kept, _ = run_coordinator(keep_all, PLAIN, QUESTIONS, max_tokens=10, teacher_chat=True)
    assert kept["constraint_applied"] == 0
    # each statistic under one name
    for gone in ("tokens", "requests", "failures", "first_tokens_forced"):
        assert gone not in stats
    assert stats["failed_requests"] == 0 and stats["success_rate"] == 1.0
    assert stats["stability_fallbacks"] > 0  # a low JS threshold makes some rows fall back
    assert stats["total_requests"] > 0 and stats["tokens_per_second"] > 0 and 0 <= stats["mean_alpha"] <= 1


def test_top_k_over_the_cap_is_refused(urls: tuple[str, str]) -> None:
    with pytest.raises(ConfigurationError, match=r"--max-logprobs 30"):
        run(cfg(urls, top_k=30), max_tokens=2)
    with running_server("base", max_logprobs=40) as a, running_server("teacher", max_logprobs=40) as b:
        assert run(CoordinatorConfig(theta_url=a, t_url=b, top_k=30), max_tokens=2)[0].error is None


def test_mismatched_vocabularies_are_refused(urls: tuple[str, str]) -> None:
    with running_server("base-reversed") as other:
        with pytest.raises(ConfigurationError, match="do not share a vocabulary"):
            run(CoordinatorConfig(theta_url=other, t_url=urls[1]), max_tokens=2)


@pytest.mark.slow
def test_faults_are_retried_and_counted(urls: tuple[str, str]) -> None:
    clean = run(cfg(urls, seed=9), max_tokens=20)
    faults = {"fault_seed": 3, "error_503_rate": 0.15, "retry_after": 0.05, "drop_rate": 0.05, "error_500_rate": 0.05,
              "malformed_rate": 0.05, "slow_body_rate": 0.05, "slow_body_seconds": 0.2}  # fmt: skip

    with running_server("base", **faults) as a, running_server("teacher", **{**faults, "fault_seed": 4}) as b:
        config = CoordinatorConfig(theta_url=a, t_url=b, seed=9, max_retries=8, retry_delay=0.01)
        outs, stats, _ = run_coordinator(config, PLAIN, QUESTIONS, max_tokens=20, teacher_chat=True)
    assert all(o.error is None for o in outs)
    assert stats["retries"] > 5 and stats["failed_requests"] == 0
    assert _records(outs) == _records(clean)  # faults change nothing but the time taken


def test_a_dead_server_becomes_per_sequence_errors(urls: tuple[str, str]) -> None:
    with doomed_server(model="teacher", latency=0.05) as (url, proc):

        async def go() -> tuple[list[ds.GenerationOutput], dict]:
            config = CoordinatorConfig(
                theta_url=urls[0], t_url=url, max_retries=2, request_timeout=5, stop_token_ids=(), retry_delay=0.05
            )
            async with DualVLLMCoordinator(config) as coord:

                async def kill_soon() -> None:
                    await asyncio.sleep(0.8)
                    proc.kill()

                killer = asyncio.create_task(kill_soon())
                outs = await coord.generate_batch_dual_prompts(PLAIN, QUESTIONS, 400, show_progress=False)
                await killer
                return outs, coord.get_statistics()

        t0 = time.monotonic()
        outs, stats = asyncio.run(asyncio.wait_for(go(), timeout=60))
        assert time.monotonic() - t0 < 60
    failed = [o for o in outs if o.finish_reason == "error"]
    assert failed and all("APIConnectionError" in (o.error or "") for o in failed)
    assert stats["errors"] == len(failed) and stats["failed_requests"] >= 1


@pytest.mark.slow
def test_cli_killed_and_resumed_loses_and_duplicates_nothing(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_input(inp, 300)
    code, err = wait_cli(generate_cli(urls, inp, full, "--max-concurrency", "8"))
    assert code == 0, err
    reference = {r["id"]: r for r in read_records(full)}
    assert len(reference) == 300

    p = generate_cli(urls, inp, part, "--max-concurrency", "3")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 10):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    wait_cli(p)
    written = part.read_text().count("\n")
    assert 10 <= written < 300
    with part.open("a") as f:
        f.write('{"id": "q299", "prompt": "Question: half a rec')  # a write cut short by the kill
    code, err = wait_cli(generate_cli(urls, inp, part, "--max-concurrency", "5", "--resume"))
    assert code == 0, err
    records = read_records(part)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 300
    for r in records:
        assert r == reference[r["id"]]  # same seed, same record, whatever the interruption


@pytest.mark.slow
def test_cli_refuses_to_clobber_and_reports_failures(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    out.write_text('{"id": "x"}\n')
    code, err = wait_cli(generate_cli(urls, inp, out))
    assert code == 2 and "--resume" in err
    code, err = wait_cli(generate_cli(urls, inp, out, "--overwrite", "--top-k", "25"))
    assert code == 2 and "--max-logprobs 25" in err
    with inp.open("a") as f:
        f.write(json.dumps({"id": "bad", "prompt": [1, 2, 999]}) + "\n")  # out of vocabulary
    code, _ = wait_cli(generate_cli(urls, inp, out, "--overwrite"))
    records = {r["id"]: r for r in read_records(out)}
    assert (
        code == 1
        and records["bad"]["finish_reason"] == "error"
        and "token id 999 is outside the vocabulary" in records["bad"]["error"]
    )
    assert all(records[f"q{i}"]["finish_reason"] in ("stop", "length") for i in range(3))


def test_config_validation() -> None:
    with pytest.raises(ConfigurationError, match="top_k"):
        CoordinatorConfig(top_k=0)
    with pytest.raises(ConfigurationError, match="theta_url"):
        CoordinatorConfig(theta_url="localhost:8000")
    with pytest.raises(ConfigurationError, match="target_top_p"):
        CoordinatorConfig(target_top_p=1.5)
    with pytest.raises(ConfigurationError, match="alpha_min"):
        CoordinatorConfig(alpha_min=0.9, alpha_max=0.1)
    with pytest.raises(ConfigurationError, match="method"):
        CoordinatorConfig(alpha_method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CoordinatorConfig(max_batch_size=5000)
    assert ds.EnhancedCoordinatorConfig is CoordinatorConfig and ds.EnhancedDualVLLMCoordinator is DualVLLMCoordinator
    changed = CoordinatorConfig().replace(top_k=7)
    assert changed.top_k == 7 and changed.theta_url == CoordinatorConfig().theta_url
    with pytest.raises(ConfigurationError, match="top_k"):
        CoordinatorConfig().replace(top_k=-1)
    # every field checked when built, so a mistake never becomes a per-sequence failure
    for bad in ({"seed": 2**64}, {"seed": 1.5}, {"dialect": "vllm"}, {"scoring": "all"}, {"rescore": "yes"},
                {"request_timeout": "1"}, {"retry_delay": -1.0}, {"max_concurrency": True}):  # fmt: skip
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            CoordinatorConfig(**bad)  # type: ignore[arg-type]
    parts = CoordinatorConfig(dialect=("vllm-completions", "sglang"), seed=5, scoring="exact", api_key=("a", "b"))
    assert [s.dialect for s in parts.servers] == ["vllm-completions", "sglang"]
    assert [s.api_key for s in parts.servers] == ["a", "b"]
    assert parts.run.seed == 5 and parts.run.scoring == "exact" and parts.run.max_concurrency == 256


@pytest.mark.slow
def test_cli_resume_can_retry_failed_records(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 4)
    code, err = wait_cli(generate_cli(urls, inp, out))
    assert code == 0, err
    records = read_records(out)
    broken = dict(records[1], finish_reason="error", error="APIConnectionError: gone", token_ids=[])
    out.write_text("".join(json.dumps(r) + "\n" for r in [records[0], broken, records[2], records[3]]))
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume"))  # failures stay failures without the flag
    assert code == 0 and len(read_records(out)) == 4
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume", "--retry-errors"))
    assert code == 0, err
    again = {r["id"]: r for r in read_records(out)}
    assert len(read_records(out)) == 4 and again[records[1]["id"]] == records[1]


def test_a_failing_prompt_source_raises_instead_of_hanging(urls: tuple[str, str]) -> None:
    def items() -> Iterator[WorkItem]:
        yield WorkItem(0, "Water is", "Water is")
        raise RuntimeError("the prompt file went away")

    async def go() -> None:
        async with DualVLLMCoordinator(cfg(urls)) as coord:
            async for _ in coord.iter_generate(items(), max_tokens=5, show_progress=False, total=2):
                pass

    with pytest.raises(RuntimeError, match="went away"):
        asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_cli_reports_a_malformed_input_line(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    with inp.open("a") as f:
        f.write("{not json\n")
    code, err = wait_cli(generate_cli(urls, inp, out), timeout=60)
    assert code == 2 and "line 4: not JSON" in err


def test_one_call_convenience(urls: tuple[str, str]) -> None:
    outs = asyncio.run(
        ds.generate_with_dual_prompts(PLAIN[:2], QUESTIONS[:2], cfg(urls, seed=12), max_tokens=6, show_progress=False)
    )
    assert [o.prompt for o in outs] == PLAIN[:2] and all(1 <= len(o.token_ids) <= 6 for o in outs)
    assert _records(outs) == _records(
        run(cfg(urls, seed=12), PLAIN[:2], QUESTIONS[:2], max_tokens=6, teacher_chat=False)
    )


def test_stability_check_without_fallback_only_counts(urls: tuple[str, str]) -> None:
    def go(auto: bool) -> tuple[list[ds.GenerationOutput], dict]:
        config = cfg(urls, seed=13, enable_stability_check=True, stability_threshold_js=0.05, auto_fallback=auto)
        outs, stats, _ = run_coordinator(config, QUESTIONS, max_tokens=10)
        return outs, stats

    outs, stats = go(False)
    assert stats["stability_flagged"] > 0 and stats["stability_fallbacks"] == 0
    assert not any(f for o in outs for f in o.fallback)
    _, with_fallback = go(True)
    assert with_fallback["stability_fallbacks"] > 0 and with_fallback["stability_flagged"] == 0


@pytest.mark.slow
def test_stop_ids_come_from_tokenizer_info_when_enabled(urls: tuple[str, str]) -> None:
    async def stop_ids(theta: str, t: str) -> tuple[int, ...]:
        async with DualVLLMCoordinator(CoordinatorConfig(theta_url=theta, t_url=t)) as coord:
            return coord.stop_ids

    # Without the endpoint: every known end-of-sequence string that is one token.
    assert asyncio.run(stop_ids(*urls)) == (EOS, IM_END)
    with running_server("base", enable_tokenizer_info_endpoint=True) as a:
        with running_server("teacher", enable_tokenizer_info_endpoint=True) as b:
            assert asyncio.run(stop_ids(a, b)) == (EOS,)  # only the tokenizer's own EOS


@pytest.mark.slow
def test_start_up_survives_a_flaky_server() -> None:
    # 30% of requests answer 503: every start-up request is retried, so every start succeeds.
    flaky = {"error_503_rate": 0.3, "retry_after": 0.01}
    with running_server("base", **flaky) as a, running_server("teacher", fault_seed=1, **flaky) as b:

        async def start() -> tuple[int, ...]:
            async with DualVLLMCoordinator(CoordinatorConfig(theta_url=a, t_url=b, max_retries=8)) as coord:
                return coord.stop_ids

        assert [asyncio.run(start()) for _ in range(10)] == [(EOS, IM_END)] * 10


def test_prompts_are_read_ahead_a_bounded_number_at_a_time(urls: tuple[str, str]) -> None:
    pulled = 0

    def items() -> Iterator[WorkItem]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield WorkItem(i, "Water is", "Water is")

    async def go() -> int:
        async with DualVLLMCoordinator(cfg(urls, max_concurrency=8, max_batch_size=8)) as coord:
            async for _ in coord.iter_generate(items(), max_tokens=2, show_progress=False, total=1_000_000):
                return pulled
        return pulled

    # Memory must not grow with the input: only a few dozen prompts are ever ahead.
    assert asyncio.run(asyncio.wait_for(go(), timeout=60)) < 200


def test_the_replicas_exist_once_started() -> None:
    """The backends are built in their dialect at start-up: before it there are none."""
    coord = DualVLLMCoordinator(CoordinatorConfig(theta_url="http://127.0.0.1:9", t_url="http://127.0.0.1:9"))
    assert coord.model_names == (None, None)
    with pytest.raises(ds.DualSampleError, match="has not started"):
        coord.theta  # noqa: B018
    asyncio.run(coord.aclose())
