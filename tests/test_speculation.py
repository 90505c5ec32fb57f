"""Speculative rounds against the reference servers: the same law as one token per step,
the same per-token numbers for the same context, and the usual guarantees (concurrency,
kill and resume, clear fall-back)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, GenerationOutput
from dualsample_rs.backends import (
    Context,
    Positions,
    SGLangBackend,
    TopK,
    VLLMCompletionsBackend,
    VLLMGenerateBackend,
)
from dualsample_rs.engine import coordinator
from dualsample_rs.engine.pace import WEIGHT, Pace
from dualsample_rs.exceptions import ConfigurationError, InvalidInputError, InvalidResponseError
from dualsample_rs.server import running_server
from scipy import stats
from support import doomed_server, generate_cli, pair_config, read_records, run_coordinator, wait_cli, write_input

DIALECT = {"vllm": "vllm-generate", "sglang": "sglang"}


def generate(
    urls: tuple[str, str], dialect: str | tuple[str, str], prompts: list[str], max_tokens: int, **options: Any
) -> tuple[list[GenerationOutput], dict[str, Any]]:
    """The outputs and statistics of a run in `dialect`, both models given the same prompts."""
    outs, stats, _ = run_coordinator(pair_config(urls, dialect=dialect, **options), prompts, max_tokens=max_tokens)
    return outs, stats


# ------------------------------------------------------------ the lists of a round
BACKENDS = {"vllm-generate": VLLMGenerateBackend, "sglang": SGLangBackend, "vllm-completions": VLLMCompletionsBackend}


@pytest.mark.parametrize("dialect", list(BACKENDS))
def test_round_lists_are_the_one_token_lists(flavors: dict[str, tuple[str, str]], dialect: str) -> None:
    """A draft's top-k at each position, and the base's scoring of those positions in one
    request, equal what the one-token requests return for each prefix (vllm-completions
    scores through prompt log probabilities, top-k only)."""
    kind = BACKENDS[dialect]

    async def run() -> None:
        base, teacher = (kind(u) for u in flavors["sglang" if dialect == "sglang" else "vllm"])
        async with base, teacher:
            contexts = [Context(await base.tokenize(p)) for p in ("The cat sat", "Question: Why is the sky blue?")]
            drafted = await teacher.draft(contexts, [5, 3], 6)
            assert drafted.lengths.tolist() == [5, 3]
            top = await base.continuation_topk(contexts, drafted, 6)
            if dialect == "vllm-completions":
                score = np.zeros(drafted.top.ids.shape)  # not offered: only compared below
            else:
                score = await base.continuation_scores(contexts, drafted, drafted.top.ids)
            for s, ctx in enumerate(contexts):
                rows = drafted.rows_of([s])
                tokens = drafted.tokens[rows].tolist()
                d_top = TopK(drafted.top.ids[rows], drafted.top.logp[rows])
                a_top, sc = TopK(top.ids[rows], top.logp[rows]), score[rows]
                prefixes = [Context([*ctx.ids(), *tokens[:j]]) for j in range(len(tokens))]
                one_t, one_a = await teacher.topk(prefixes, 6), await base.topk(prefixes, 6)
                one_sc = await base.score(prefixes, d_top.ids)
                for j in range(len(tokens)):
                    assert tokens[j] == one_t.ids[j, np.argmax(one_t.logp[j])]  # greedy
                    for got, want in ((d_top, one_t), (a_top, one_a)):
                        g = dict(zip(got.ids[j].tolist(), got.logp[j].tolist(), strict=True))
                        w = dict(zip(want.ids[j].tolist(), want.logp[j].tolist(), strict=True))
                        g.pop(-1, None), w.pop(-1, None)
                        # the same ids; values to the last bits (batch shapes change the sums)
                        assert sorted(g) == sorted(w)
                        np.testing.assert_allclose([g[t] for t in w], list(w.values()), rtol=0, atol=1e-12)
                    if dialect != "vllm-completions":
                        np.testing.assert_allclose(sc[j], one_sc[j], rtol=0, atol=1e-12)

    asyncio.run(run())


# ------------------------------------------------------------ exact in law
def _outcomes(outs: list[GenerationOutput]) -> Counter[tuple[int, ...]]:
    return Counter(tuple(o.token_ids) for o in outs)


def _same_law(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> float:
    """The p-value of a chi-square test that two samples of joint outcomes share a law
    (outcomes seen fewer than 20 times in both together pooled into one cell)."""
    keys = sorted(set(a) | set(b))
    common = [k for k in keys if a[k] + b[k] >= 20]
    rare = [k for k in keys if a[k] + b[k] < 20]
    table = [[a[k] for k in common] + [sum(a[k] for k in rare)], [b[k] for k in common] + [sum(b[k] for k in rare)]]
    table = [row for row in np.array(table).T.tolist() if sum(row) > 0]
    return float(stats.chi2_contingency(np.array(table).T).pvalue)


def _numbers_by_context(outs: list[GenerationOutput]) -> dict[tuple[int, ...], tuple[float, float, float, float]]:
    """Each (prefix, token) reached: the token's α, logp_theta, logp_t and logq."""
    seen = {}
    for o in outs:
        for j, tok in enumerate(o.token_ids):
            seen[(*o.token_ids[:j], tok)] = (o.alpha_history[j], o.logp_theta[j], o.logp_t[j], o.logq[j])
    return seen


def _assert_same_numbers(one: list[GenerationOutput], spec: list[GenerationOutput], at_least: int) -> None:
    """Every token both reached from the same prefix has the same α and log
    probabilities, and more than `at_least` such tokens were compared."""
    ref, got = _numbers_by_context(one), _numbers_by_context(spec)
    shared = set(ref) & set(got)
    assert len(shared) > at_least
    for key in shared:
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-12, err_msg=str(key))


LAW_CASES = {
    "kl_symmetry": {},
    "support constraint": {"constraint_to_target": True, "target_top_p": 0.9},
    "no forcing, temperature 0.7": {"force_first_token": False, "temperature": 0.7},
    "exact scoring": {"scoring": "exact"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", LAW_CASES)
def test_joint_law_of_three_tokens_is_the_one_token_law(flavors: dict[str, tuple[str, str]], case: str) -> None:
    """12,000 sequences of 3 tokens each way (independent seeds): the joint law of the 3
    tokens under --speculate 4 and under one token per step agree by a chi-square test,
    and every token reached by both with the same prefix has the same α, log
    probabilities and log q*."""
    options = {"max_concurrency": 1024, "max_batch_size": 1024, **LAW_CASES[case]}
    n, prompt = 12_000, ["The cat sat on the"]
    one, _ = generate(flavors["sglang"], "sglang", prompt * n, 3, seed=1, **options)
    spec, st = generate(flavors["sglang"], "sglang", prompt * n, 3, seed=2, speculate=4, **options)
    assert not any(o.error for o in one + spec)
    assert st["rounds"] < 0.8 * st["total_tokens"]  # drafts were really accepted
    a, b = _outcomes(one), _outcomes(spec)
    assert len(a) > 10  # a law with room to differ
    assert _same_law(a, b) > 1e-3, (a.most_common(8), b.most_common(8))
    _assert_same_numbers(one, spec, at_least=30)


@pytest.mark.slow
def test_the_law_test_notices_a_wrong_law(flavors: dict[str, tuple[str, str]]) -> None:
    """The test above can fail: a small change of temperature is found at this size."""
    options = {"max_concurrency": 1024, "max_batch_size": 1024}
    n, prompt = 12_000, ["The cat sat on the"]
    one, _ = generate(flavors["sglang"], "sglang", prompt * n, 3, seed=1, **options)
    warmer, _ = generate(flavors["sglang"], "sglang", prompt * n, 3, seed=2, speculate=4, temperature=1.1, **options)
    assert _same_law(_outcomes(one), _outcomes(warmer)) < 1e-6


@pytest.mark.slow
def test_vllm_generate_rounds_give_the_one_token_numbers(flavors: dict[str, tuple[str, str]]) -> None:
    """Over trace replay, every token reached by both paths with the same prefix has the
    same numbers, and a round makes several tokens with two requests."""
    prompts = ["Question: Why is the sky blue?\nAnswer:"] * 300
    one, s1 = generate(flavors["vllm"], "vllm-generate", prompts, 12, seed=1, scoring="exact")
    spec, s4 = generate(flavors["vllm"], "vllm-generate", prompts, 12, seed=2, scoring="exact", speculate=4)
    _assert_same_numbers(one, spec, at_least=50)
    assert s4["tokens_per_round"] > 2 and s4["total_requests"] < 0.6 * s1["total_requests"]
    for o in spec:
        assert o.round is not None and o.drafted is not None and len(o.round) == len(o.token_ids)
        assert o.round == sorted(o.round) and o.round[0] == 0
        # a round ends at its first token that is not an accepted draft, or where the sequence ends
        for r in set(o.round):
            flags = [d for d, rr in zip(o.drafted, o.round, strict=True) if rr == r]
            assert all(flags[:-1]) and (not flags[-1] or r == o.round[-1])
    assert s4["accepted"] == sum(sum(o.drafted or []) for o in spec)


# ------------------------------------------------------------ records and guarantees
@pytest.mark.slow
@pytest.mark.parametrize("speculate", [3, "auto"])
def test_same_records_whatever_the_concurrency(flavors: dict[str, tuple[str, str]], speculate: int | str) -> None:
    prompts = [f"Question: {q}\nAnswer:" for q in ("Why is the sky blue?", "What is gravity?", "How is bread made?")]
    prompts = prompts * 12
    runs = [
        generate(flavors[f], DIALECT[f], prompts, 30, seed=5, speculate=speculate, max_concurrency=c, max_batch_size=b)
        for f, c, b in (("vllm", 1, 1), ("vllm", 64, 8), ("sglang", 36, 36), ("sglang", 5, 2))
    ]
    # Under "auto" the rounds' kinds follow the timings: the records but their rounds.
    strip = ("round", "drafted") if speculate == "auto" else ()
    records = [[{k: v for k, v in o.to_record().items() if k not in strip} for o in outs] for outs, _ in runs]
    # Each dialect, whatever the batching. (Across dialects the servers' sums differ in
    # the last bits, which can tip a greedy draft between near-equal tokens.)
    assert records[0] == records[1] and records[2] == records[3]
    assert any(any(o.drafted or []) for o in runs[0][0])


@pytest.mark.slow
def test_a_stop_id_ends_the_sequence_inside_a_round(flavors: dict[str, tuple[str, str]]) -> None:
    """A drafted token that is a stop id ends the sequence where it stands, as step by step."""
    prompts = ["Question: Why is the sky blue?\nAnswer:"] * 200
    base, _ = generate(flavors["vllm"], "vllm-generate", prompts[:20], 20, seed=3, speculate=6)
    common = Counter(t for o in base for t in o.token_ids[1:]).most_common(1)[0][0]
    outs, _ = generate(flavors["vllm"], "vllm-generate", prompts, 20, seed=3, speculate=6, stop_token_ids=(common,))
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) > 50
    for o in outs:
        assert common not in o.token_ids[:-1]
        assert (o.token_ids[-1] == common) == (o.finish_reason == "stop")
    assert any(o.drafted and o.drafted[-1] for o in stopped)  # stopped by an accepted draft


@pytest.mark.slow
def test_prompt_logprobs_verification_gives_the_one_token_numbers(flavors: dict[str, tuple[str, str]]) -> None:
    """On request, a vllm-completions base scores the drafts through prompt log
    probabilities (its context recomputed): same numbers per context, several tokens a round."""
    prompts = ["Question: Why is the sky blue?\nAnswer:"] * 200
    one, _ = generate(flavors["vllm"], "vllm-completions", prompts, 12, seed=1)
    spec, st = generate(flavors["vllm"], "vllm-completions", prompts, 12, seed=2, speculate=4,
                        verify_prompt_logprobs=True)  # fmt: skip
    assert not any(o.error for o in spec) and st["tokens_per_round"] > 1.8
    _assert_same_numbers(one, spec, at_least=50)


@pytest.mark.parametrize(
    "where", ["vllm-completions", "no trace replay", "a logprob cap of top_k", "exact via prompt logprobs"]
)
def test_servers_that_cannot_verify_fall_back_with_one_line(
    flavors: dict[str, tuple[str, str]], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = ["Question: What is gravity?\nAnswer:"] * 4
    # replay needs top_k + 1 log probabilities: a base with trace replay and a cap of 20
    trace = {"enable_trace_replay": True} if where == "a logprob cap of top_k" else {}
    with running_server("base", enable_scale_out=True, **trace) as plain_base:
        own_base = where in ("no trace replay", "a logprob cap of top_k")
        urls = (plain_base, flavors["vllm"][1]) if own_base else flavors["vllm"]
        dialect = "vllm-generate" if own_base else "vllm-completions"
        options: dict[str, Any] = {"seed": 4}
        if where == "exact via prompt logprobs":
            options.update(scoring="exact", verify_prompt_logprobs=True)
        with caplog.at_level(logging.WARNING, logger="dualsample_rs"):
            outs, st = generate(urls, dialect, prompts, 10, speculate=4, **options)
        plain, _ = generate(urls, dialect, prompts, 10, **options)
    warnings = [r.getMessage() for r in caplog.records if "speculative rounds are off" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    expected = {"vllm-completions": "--enable-trace-replay", "no trace replay": "--enable-trace-replay",
                "a logprob cap of top_k": "--max-logprobs 21",
                "exact via prompt logprobs": "not exact scoring"}  # fmt: skip
    assert expected[where] in warnings[0]
    assert where != "vllm-completions" or "prompt-logprobs verification" in warnings[0]
    assert st["rounds"] == 0 and [o.to_record() for o in outs] == [o.to_record() for o in plain]


@pytest.mark.slow
def test_cli_speculating_killed_and_resumed_loses_and_duplicates_nothing(
    flavors: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    urls = flavors["sglang"]
    inp, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_input(inp, 200)
    flags = ("--dialect", "sglang", "--speculate", "4")
    code, err = wait_cli(generate_cli(urls, inp, full, *flags, "--max-concurrency", "8"))
    assert code == 0, err
    assert "tokens per round" in err  # the run's summary says how the rounds went
    reference = {r["id"]: r for r in read_records(full)}
    assert all(len(r["round"]) == len(r["token_ids"]) for r in reference.values())
    p = generate_cli(urls, inp, part, *flags, "--max-concurrency", "2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 5):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    wait_cli(p)
    assert 5 <= part.read_text().count("\n") < 200
    code, err = wait_cli(generate_cli(urls, inp, part, *flags, "--max-concurrency", "5", "--resume"))
    assert code == 0, err
    records = read_records(part)
    assert sorted(r["id"] for r in records) == sorted(reference)
    assert all(r == reference[r["id"]] for r in records)


@pytest.mark.slow
def test_exact_scoring_rounds_fit_vllm_cap_of_128_ids() -> None:
    """Top-60 candidates at up to nine positions pass vLLM's 128 scored ids: each round is
    cut to the positions that fit, and the numbers stay the one-token path's."""
    prompts = ["Question: What makes thunder?\nAnswer:"] * 100
    options = {"scoring": "exact", "top_k": 60}
    with (
        running_server("base", enable_scale_out=True, enable_trace_replay=True, max_logprobs=64) as a,
        running_server("teacher", enable_scale_out=True, max_logprobs=64) as b,
    ):
        one, _ = generate((a, b), "vllm-generate", prompts, 10, seed=1, **options)
        spec, st = generate((a, b), "vllm-generate", prompts, 10, seed=2, speculate=8, **options)
    assert not any(o.error for o in spec)
    assert 1 < st["tokens_per_round"] < 2.5  # two or three positions fit, not nine
    _assert_same_numbers(one, spec, at_least=20)


# ------------------------------------------------------------ speculate="auto"
def _drive(pace: Pace, rounds: int, cost: dict[int, float]) -> list[int]:
    """`rounds` rounds one after another, a round of kind K taking ``cost[K]`` seconds
    per token over a batch of 8 sequences making 1 + 0.75·K tokens each: the kinds chosen."""
    chosen = []
    for _ in range(rounds):
        k = pace.choose()
        tokens = int(8 * (1 + 0.75 * k))
        pace.observe(k, cost[k] * tokens, tokens, pace.start(k))
        chosen.append(k)
    return chosen


def test_auto_settles_on_one_token_where_drafting_costs_more_per_token() -> None:
    pace = Pace()
    chosen = _drive(pace, 4096, {0: 1.0, 2: 1.5, 4: 2.0, 8: 3.0})
    # a block of one token, then K = 4 until two of its rounds were measured slower
    start = pace.block + 2
    assert chosen[:start] == [0] * pace.block + [4, 4] and chosen[start] == 0
    after = chosen[start:]
    assert pace.faster() == 0
    assert sum(k != 0 for k in after) <= len(after) / 16
    assert set(after) == {0, 2, 4, 8}  # every other kind still explored


def test_auto_is_not_lured_into_drafting_by_a_figure_measured_long_ago() -> None:
    """Contexts grow, so every kind's rounds slow down together (here 17x over the run),
    drafting always at twice one token's cost per token. The kind in use is measured as
    it slows and the others' figures date from when they were explored, so they come to
    look faster than they are; a block chosen for such a figure is a trial, cut short
    once it measures slower (a whole block each time: 208 drafting rounds; now 26)."""
    pace = Pace()
    chosen = []
    for i in range(4096):
        k = pace.choose()
        tokens = int(8 * (1 + 0.75 * k))
        cost = {0: 1.0, 2: 1.6, 4: 2.0, 8: 3.0}[k] * (1 + i / 256)
        pace.observe(k, cost * tokens, tokens, pace.start(k))
        chosen.append(k)
    assert sum(k != 0 for k in chosen) <= 48 and pace.faster() == 0


def test_a_trial_far_slower_ends_after_one_measured_round() -> None:
    """Drafting at three times one token's cost per token (under half its rate): the
    start's block of K = 4 ends after its first measured round; at twice the cost
    (exactly half the rate) it takes two, as any block slower than the best does."""
    far, near = Pace(), Pace()
    chosen_far = _drive(far, far.block + 4, {0: 1.0, 2: 3.0, 4: 3.0, 8: 3.0})
    chosen_near = _drive(near, near.block + 4, {0: 1.0, 2: 2.0, 4: 2.0, 8: 2.0})
    assert chosen_far[far.block :] == [4, 0, 0, 0]
    assert chosen_near[near.block :] == [4, 4, 0, 0]


def test_auto_explores_at_most_a_sixteenth_of_the_time() -> None:
    """Where a drafting round takes ten times as long per token, exploring it is
    bounded by its time, not only by its rounds."""
    pace = Pace()
    cost = {0: 1.0, 2: 10.0, 4: 10.0, 8: 10.0}
    _drive(pace, pace.block + 2, cost)  # the start
    before = dict(pace.seconds)
    chosen = _drive(pace, 8192, cost)
    explored = pace.seconds["exploring"] - before["exploring"]
    chosen_time = pace.seconds["chosen"] - before["chosen"]
    assert explored <= (explored + chosen_time) / 16 and set(chosen) == {0, 2, 4, 8}


def test_auto_settles_on_drafting_where_it_pays() -> None:
    pace = Pace()
    chosen = _drive(pace, 4096, {0: 1.0, 2: 0.5, 4: 0.4, 8: 0.3})
    after = chosen[2 * pace.block :]
    # K = 4 until exploration finds K = 8 (the first kind never measured it tries)
    assert pace.faster() == 8 and chosen[-1024:].count(8) >= 1024 * 15 / 16
    assert sum(k == 0 for k in after) <= len(after) / 16
    assert pace.summary()[8]["rounds"] == chosen.count(8)


def test_auto_follows_the_costs_when_they_swap() -> None:
    pace = Pace()
    cheap_drafts, dear_drafts = {0: 1.0, 2: 0.6, 4: 0.4, 8: 0.5}, {0: 1.0, 2: 2.0, 4: 3.0, 8: 5.0}
    first = _drive(pace, 2048, cheap_drafts)
    second = _drive(pace, 2048, dear_drafts)
    third = _drive(pace, 4096, cheap_drafts)
    assert first[-512:].count(4) >= 480
    # the kind in use is measured as it runs, and the next best drafting kind's rate is
    # older: leaving drafting takes at most a block of each drafting kind (and the one under way)
    assert second[4 * pace.block :].count(0) >= (2048 - 4 * pace.block) * 15 / 16
    # back to drafting at the first exploration block of a drafting kind, then to the best
    assert sum(k != 0 for k in third[-2048:]) >= 2048 * 15 / 16 and pace.faster() == 4


def test_auto_measures_only_rounds_without_another_kind_beside_them() -> None:
    """A round that ran beside a round of another kind would measure their queue on
    the servers, not its own cost: it is not counted."""
    pace = Pace(arms=(0, 4), block=2)
    a = pace.start(0)
    b = pace.start(4)  # began while `a` was in flight
    pace.observe(0, 1.0, 8, a)
    pace.observe(4, 1.0, 8, b)
    assert pace.measured == {0: 0, 4: 0}
    c = pace.start(0)
    pace.observe(0, 1.0, 8, c)  # alone
    assert pace.measured == {0: 1, 4: 0} and pace.rate(0) == 8.0 and pace.rate(4) is None
    pace.observe(4, 0.5, 8)  # without a lap: one round at a time, counted
    assert pace.rate(4) == 16.0 and pace.faster() == 4


def test_joined_one_token_rounds_weigh_as_one_measurement() -> None:
    """Eight one-token rounds that shared one request end together with one time: one
    slow request moves the average as one slow round would, not as eight."""
    alone, joined = Pace(arms=(0, 4), block=100), Pace(arms=(0, 4), block=100, joined=8)
    for pace, rounds in ((alone, 1), (joined, 8)):
        for _ in range(5 * rounds):
            pace.observe(0, 1.0, 8)
        for _ in range(rounds):
            pace.observe(0, 4.0, 8)  # a slow request
    assert alone.rate(0) == pytest.approx(joined.rate(0), rel=1e-9)
    assert joined.rate(0) == pytest.approx(8 / (0.8 + 0.2 * 4.0))
    # drafting rounds are not joined: each is a measurement of its own
    one, eight = Pace(arms=(0, 4), joined=1), Pace(arms=(0, 4), joined=8)
    for pace in (one, eight):
        pace.observe(4, 1.0, 8)
        pace.observe(4, 4.0, 8)
    assert one.rate(4) == eight.rate(4) == pytest.approx(8 / (1 - WEIGHT + WEIGHT * 4.0))
    with pytest.raises(InvalidInputError, match="joined"):
        Pace(joined=0)


def test_auto_tries_again_a_first_kind_it_could_not_measure() -> None:
    pace = Pace(arms=(0, 4), block=1)
    k0 = pace.choose()
    lap0 = pace.start(k0)
    k4 = pace.choose()
    lap4 = pace.start(k4)  # beside the first: neither is measured
    pace.observe(k0, 1.0, 8, lap0)
    pace.observe(k4, 1.0, 32, lap4)
    assert (k0, k4) == (0, 4) and pace.choose() == 0  # their blocks again
    pace.observe(0, 1.0, 8)
    assert pace.choose() == 4
    pace.observe(4, 1.0, 32)
    assert pace.choose() == 4 and pace.faster() == 4


def test_bad_pace_settings_are_refused() -> None:
    bads = ({"block": 0}, {"period": 1}, {"weight": 0.0}, {"arms": (0,)}, {"arms": (0, -1)}, {"block": True},
            {"first": 5})  # fmt: skip
    for bad in bads:
        with pytest.raises(InvalidInputError, match=next(iter(bad))) as err:
            Pace(**bad)  # type: ignore[arg-type]
        assert isinstance(err.value, ValueError)


AUTO_PROMPTS = [f"({i}) Question: Why is the sky blue?\nAnswer:" for i in range(32)]
AUTO_OPTIONS: dict[str, Any] = {"seed": 7, "max_concurrency": 32, "max_batch_size": 32, "stop_token_ids": ()}


def _without_rounds(outs: list[GenerationOutput]) -> list[dict[str, Any]]:
    """The records but the rounds they came in (which depend on the kinds chosen)."""
    return [{k: v for k, v in o.to_record().items() if k not in ("round", "drafted")} for o in outs]


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_auto_records_do_not_depend_on_the_kinds_chosen(
    flavors: dict[str, tuple[str, str]], flavor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` draws every position as one token per step does, in one order of the
    candidates whichever route listed them: runs held to one token per step, to K = 2
    and to K = 8 (and one left to choose) give the same records."""
    runs = []
    for arms in ((0, 8), (2, 0), (8, 0), None):
        if arms is not None:  # one kind only: a block longer than the run
            held = lambda block, joined, arms=arms: Pace(arms=arms, first=1, block=10**6)  # noqa: E731
            monkeypatch.setattr(coordinator, "Pace", held)
        else:
            monkeypatch.undo()
        runs.append(generate(flavors[flavor], DIALECT[flavor], AUTO_PROMPTS, 24, speculate="auto", **AUTO_OPTIONS))
    (one, s0), (two, s2), (eight, s8), (chosen, _) = runs
    assert s0["mode_rounds"]["K=0"] == s0["mode_rounds"]["one_token"] > 0 and s0["tokens_per_round"] == 1
    assert s8["mode_rounds"]["K=8"] > 0 and s8["tokens_per_round"] > 2 and s2["tokens_per_drafting_round"] > 1.5
    assert _without_rounds(one) == _without_rounds(two) == _without_rounds(eight) == _without_rounds(chosen)
    assert s8["acceptance_rate"] == pytest.approx(s2["acceptance_rate"], abs=0.1)


def test_auto_one_token_rounds_of_every_worker_share_requests(
    flavors: dict[str, tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` runs eight workers of four sequences here; its rounds of one token per
    sequence ask as one token per step does, about one request per step for all 32,
    not one per worker (192 for 24 tokens), and the records are the same."""
    urls = flavors["sglang"]
    _, s_plain = generate(urls, "sglang", AUTO_PROMPTS, 24, **AUTO_OPTIONS)
    monkeypatch.setattr(coordinator, "Pace", lambda block, joined: Pace(arms=(0, 8), first=1, block=10**6))
    joined, s_joined = generate(urls, "sglang", AUTO_PROMPTS, 24, speculate="auto", **AUTO_OPTIONS)
    monkeypatch.setattr(coordinator, "Joined", lambda inner, limit: inner)  # each worker asks alone
    alone, s_alone = generate(urls, "sglang", AUTO_PROMPTS, 24, speculate="auto", **AUTO_OPTIONS)
    # eight workers' rounds (more where a worker began before its batch was full)
    assert min(s_joined["mode_rounds"]["one_token"], s_alone["mode_rounds"]["one_token"]) >= 8 * 24
    for server in ("requests_theta", "requests_t"):
        assert s_joined[server] <= s_plain[server] + 24 < s_alone[server] - 100
    assert _without_rounds(joined) == _without_rounds(alone)


@pytest.mark.slow
def test_auto_makes_one_token_per_step_where_each_position_costs() -> None:
    """Servers busy 6 ms per position they compute, one position after another (a CPU
    engine): drafting rounds make fewer tokens per second, and after its first blocks
    `auto` makes one token per step but for its exploration (one block in 16)."""
    busy = {"flavor": "sglang", "latency_per_position": 0.006}
    with running_server("base", **busy) as a, running_server("teacher", **busy) as b:
        _, st = generate((a, b), "sglang", AUTO_PROMPTS, 40, speculate="auto", **AUTO_OPTIONS)
    modes, block = st["mode_rounds"], 4 * 8  # four rounds per worker
    # a block of K = 4 at the start (cut short once measured slower), again if none of
    # its rounds could be measured, and two to spare for a machine loaded by others (one
    # run in about a dozen needed more than one there)
    assert modes["drafting"] <= 4 * block + modes["one_token"] / 15
    assert modes["one_token"] >= 0.5 * (modes["one_token"] + modes["drafting"])


@pytest.mark.slow
def test_auto_drafts_where_round_trips_cost() -> None:
    """Servers whose every request takes 50 ms whatever its positions: drafting rounds
    pay, and `auto` drafts."""
    slow = {"flavor": "sglang", "latency": 0.05, "latency_rate": 1.0}
    with running_server("base", **slow) as a, running_server("teacher", **slow) as b:
        _, st = generate((a, b), "sglang", AUTO_PROMPTS, 96, speculate="auto", **AUTO_OPTIONS)
    modes, block = st["mode_rounds"], 4 * 8
    # a block of one token at the start, again if none of its rounds could be measured,
    # and two to spare for a machine loaded by others
    assert modes["one_token"] <= 4 * block + modes["drafting"] / 15
    assert modes["drafting"] >= 0.5 * (modes["one_token"] + modes["drafting"])
    assert st["tokens_per_drafting_round"] > 2 and st["tokens_per_round"] > 2


def test_bad_speculate_values_are_refused() -> None:
    for bad in (-1, 65, True, 2.0, "fast"):
        with pytest.raises(ConfigurationError, match="speculate"):
            CoordinatorConfig(speculate=bad)  # type: ignore[arg-type]
    p = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "generate", "--input", "x", "--output", "y", "--speculate", "-2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "--speculate" in p.stderr


@pytest.mark.slow
def test_a_replica_lost_mid_round_costs_no_record(flavors: dict[str, tuple[str, str]]) -> None:
    """Two base replicas, one killed mid-run: its sequences move with their rounds, and
    the records are those of one server (drafts depend only on the model and context).
    Rounds run several batches at once, so more than one may find the replica dead."""
    base, teacher = flavors["sglang"]
    prompts = [f"({i}) Question: Why is the sky blue?\nAnswer:" for i in range(24)]
    options = {"seed": 8, "speculate": 4, "max_concurrency": 12, "max_batch_size": 6}
    single, _ = generate((base, teacher), "sglang", prompts, 30, **options)
    with doomed_server("--flavor", "sglang") as (doomed, proc):

        async def go() -> tuple[list[GenerationOutput], dict[str, Any]]:
            config = CoordinatorConfig(theta_url=(base, doomed), t_url=teacher, dialect="sglang", max_retries=1,
                                       retry_delay=0.01, **options)  # type: ignore[arg-type]  # fmt: skip
            async with DualVLLMCoordinator(config) as coord:
                asyncio.get_running_loop().call_later(0.3, proc.kill)
                outs = await coord.generate_batch(prompts, max_tokens=30, show_progress=False)
                return outs, coord.get_statistics()

        outs, st = asyncio.run(asyncio.wait_for(go(), timeout=120))
    assert st["replicas"]["theta"][1]["down"] and st["replicas"]["theta"][1]["requests"] > 0
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]


@pytest.mark.slow
def test_mixed_dialects_speculate(flavors: dict[str, tuple[str, str]]) -> None:
    """A teacher on vLLM drafting for a base on SGLang: the same numbers per context."""
    urls = (flavors["sglang"][0], flavors["vllm"][1])
    prompts = ["Question: What is water made of?\nAnswer:"] * 150
    dialect = ("sglang", "vllm-generate")
    one, _ = generate(urls, dialect, prompts, 10, seed=1)
    spec, st = generate(urls, dialect, prompts, 10, seed=2, speculate=4)
    assert not any(o.error for o in spec) and st["tokens_per_round"] > 2
    _assert_same_numbers(one, spec, at_least=30)


@pytest.mark.slow
def test_faulty_servers_give_the_clean_records(flavors: dict[str, tuple[str, str]]) -> None:
    """503s, 500s, dropped connections, malformed and slow bodies on both servers during
    rounds: retried, and the records are those of clean servers."""
    prompts = [f"({i}) Question: What causes wind?\nAnswer:" for i in range(16)]
    options = {"seed": 6, "speculate": 4, "max_concurrency": 8, "max_batch_size": 4}
    clean, _ = generate(flavors["sglang"], "sglang", prompts, 20, **options)
    faults = {"error_503_rate": 0.05, "error_500_rate": 0.05, "drop_rate": 0.03, "malformed_rate": 0.03,
              "slow_body_rate": 0.03, "slow_body_seconds": 0.05, "retry_after": 0.01}  # fmt: skip
    with (
        running_server("base", flavor="sglang", **faults) as a,
        running_server("teacher", flavor="sglang", fault_seed=3, **faults) as b,
    ):
        faulty, st = generate((a, b), "sglang", prompts, 20, max_retries=8, retry_delay=0.01, **options)
    assert st["retries"] > 0  # the faults happened
    assert [o.to_record() for o in faulty] == [o.to_record() for o in clean]


def _replying(backend: Any, *bodies: bytes) -> Any:
    """`backend` with each request answered by the next of `bodies` (decoded as the
    request asks), so a test can hand it replies a server should never send."""
    queue = list(bodies)

    async def request(method: str, path: str, body: Any = None, content: Any = None, probe: bool = False,
                      decode: Any = None) -> Any:  # fmt: skip
        raw = queue.pop(0)
        return decode(raw, "r1") if decode is not None else json.loads(raw)

    backend._request = request
    return backend


def _tail(*tokens: int) -> Positions:
    """One sequence's continuation, as a round hands it to the base."""
    n = len(tokens)
    return Positions(np.array(tokens), TopK(np.full((n, 1), -1), np.full((n, 1), -np.inf)), np.array([n]))


def test_replies_that_do_not_fit_the_round_are_refused() -> None:
    """A replay that is not the trace sent, a draft missing positions, too few scored
    positions, and ids past vLLM's cap are errors, never tokens."""
    ctx = [Context([1, 2, 3])]

    def generate_reply(*tokens: int) -> bytes:
        content = [{"token_id": t, "top_logprobs": [{"token_id": t, "logprob": -0.1}]} for t in tokens]
        return json.dumps({"choices": [{"logprobs": {"content": content}}]}).encode()

    async def run() -> None:
        vllm = _replying(VLLMGenerateBackend("http://x"), generate_reply(5, 9))
        with pytest.raises(InvalidResponseError, match="replayed tokens differ"):
            await vllm.continuation_topk(ctx, _tail(5, 6), 1)
        too_many = np.arange(130, dtype=np.int64).reshape(1, 130)
        with pytest.raises(InvalidInputError, match="cap of 128"):
            await VLLMGenerateBackend("http://x").continuation_scores(ctx, _tail(5), too_many)
        draft = {"choices": [{"index": 0, "logprobs": {"tokens": ["token_id:5", "token_id:6"],
                                                       "top_logprobs": [{"token_id:5": -0.1}]}}]}  # fmt: skip
        completions = _replying(VLLMCompletionsBackend("http://x"), json.dumps(draft).encode())
        with pytest.raises(InvalidResponseError, match="top-k at every position"):
            await completions.draft(ctx, [2], 1)
        with pytest.raises(ConfigurationError, match="not exact scoring"):
            await completions.continuation_scores(ctx, _tail(5), np.array([[5]]))
        item = {"meta_info": {"input_top_logprobs": [None], "output_top_logprobs": [[[-0.1, 5, None]]]}}
        sglang = _replying(SGLangBackend("http://x"), json.dumps([item]).encode())
        with pytest.raises(InvalidResponseError, match="1 positions for 3"):
            await sglang.continuation_topk(ctx, _tail(5, 6, 7), 1)

    asyncio.run(run())


def test_the_command_line_says_when_speculation_is_off(flavors: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    """`--speculate` against a vLLM at its default logprob cap (20) with the default top-k
    (20) cannot verify drafts: the run says so before its progress and in its summary."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 2)
    with running_server("base", enable_scale_out=True, enable_trace_replay=True) as base:
        flags = ("--dialect", "vllm-generate", "--speculate", "4", "--max-tokens", "4")
        code, err = wait_cli(generate_cli((base, flavors["vllm"][1]), inp, out, *flags))
    assert code == 0, err
    said = [line for line in err.splitlines() if "--speculate is off" in line]
    assert len(said) == 1 and "--max-logprobs 21" in said[0]
    assert "speculation: off, one token per step" in err
