"""Several named teachers in one run: each record routed to its teacher gives exactly the
record a run with that teacher alone gives, on every dialect; a teacher that goes down
fails only its own records, and ``--resume`` completes them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator
from dualsample_rs.backends import Context, TopK
from dualsample_rs.config.coordinator import TeacherSettings, mix_text, teacher_text
from dualsample_rs.engine.sequence import Sequence, WorkItem, stable_key
from dualsample_rs.exceptions import BadRequestError, ConfigurationError, Response
from dualsample_rs.io.record import GenerationOutput
from support import PLAIN, QUESTIONS, doomed_server, generate_cli, read_records, wait_cli

# (dialect, flavor of the servers)
DIALECTS = [("vllm-completions", "vllm"), ("vllm-generate", "vllm"), ("sglang", "sglang")]


def items(route: list[str | None]) -> list[WorkItem]:
    """One item per question, the i-th routed to ``route[i]`` (None: the default teacher)."""
    return [
        WorkItem(stable_key(f"q{i}"), PLAIN[i % len(PLAIN)], QUESTIONS[i % len(QUESTIONS)], f"q{i}", teacher=name)
        for i, name in enumerate(route)
    ]


def generate(config: CoordinatorConfig, work: list[WorkItem], **kwargs: Any) -> tuple[dict[str, dict], dict]:
    """Records by id, and the statistics at the end."""

    async def go() -> tuple[dict[str, dict], dict]:
        async with DualVLLMCoordinator(config) as coord:
            got = {}
            async for _, out in coord.iter_generate(work, 24, show_progress=False, **kwargs):
                got[out.id] = out.to_record()
            return got, coord.get_statistics()

    return asyncio.run(go())


ROUTE = ["chat", "math", None, "math", "chat", "math", None, "chat", "math", "math"]


@pytest.mark.parametrize("speculate", [0, 2])
@pytest.mark.parametrize(("dialect", "flavor"), DIALECTS)
def test_routed_records_equal_one_teacher_runs(
    dialect: str, flavor: str, speculate: int, flavors: dict, math_teachers: dict
) -> None:
    if speculate and dialect == "vllm-completions":
        pytest.skip("speculative rounds need the generate route or SGLang")
    base, chat_url = flavors[flavor]
    math_url = math_teachers[flavor]
    common = {"theta_url": base, "dialect": dialect, "seed": 5, "speculate": speculate}
    # The chat teacher is given its prompt in its chat template; the maths one plain, hotter.
    chat = TeacherSettings(chat_url, chat=True)
    math = TeacherSettings(math_url, temperature=1.3)
    both, stats = generate(CoordinatorConfig(teachers={"chat": chat, "math": math}, **common), items(ROUTE))
    assert stats["errors"] == 0
    alone = {}
    for name, teacher in (("chat", chat), ("math", math)):
        # The same items, each teacher alone (the default teacher's items go to "chat").
        mine = [i for i in items(ROUTE) if (i.teacher or "chat") == name]
        got, _ = generate(CoordinatorConfig(teachers={name: teacher}, **common), mine)
        alone |= got
    assert set(both) == set(alone) == {f"q{i}" for i in range(len(ROUTE))}
    for key, record in both.items():
        assert record == alone[key], key
        assert record["teacher"] == (ROUTE[int(key[1:])] or "chat")
    # The teachers differ, so routing is seen in the records: the same question, two teachers.
    assert both["q0"]["token_ids"] != both["q8"]["token_ids"] or both["q0"]["logp_t"] != both["q8"]["logp_t"]
    counts = stats["teachers"]
    assert counts["chat"]["sequences"] == 5 and counts["math"]["sequences"] == 5
    assert counts["math"]["tokens"] == sum(len(r["token_ids"]) for r in both.values() if r["teacher"] == "math")
    assert counts["chat"]["requests"] > 0 and counts["math"]["requests"] > 0
    assert stats["requests_t"] == counts["chat"]["requests"] + counts["math"]["requests"]


def test_a_named_teacher_gives_the_unnamed_teachers_records(urls: tuple[str, str]) -> None:
    """A run with one named teacher is the run with --t-url, plus the record's teacher."""
    work = items([None] * 4)
    named, _ = generate(CoordinatorConfig(theta_url=urls[0], teachers={"t": urls[1]}, seed=2), work)
    plain, _ = generate(CoordinatorConfig(theta_url=urls[0], t_url=urls[1], seed=2), work)
    for key, record in plain.items():
        assert "teacher" not in record
        assert named[key] == {**record, "teacher": "t"}


def test_unknown_or_unroutable_teacher_fails_its_own_record(urls: tuple[str, str]) -> None:
    config = CoordinatorConfig(theta_url=urls[0], teachers={"a": urls[1], "b": urls[1]}, default_teacher="b", seed=1)
    work = items(["a", "nobody", None])
    got, stats = generate(config, work)
    assert got["q1"]["finish_reason"] == "error"
    assert "unknown teacher 'nobody'" in got["q1"]["error"] and "a, b" in got["q1"]["error"]
    assert [got[k]["teacher"] for k in ("q0", "q2")] == ["a", "b"]
    assert stats["errors"] == 1
    # A record that names a teacher in a run with one unnamed teacher.
    got, _ = generate(CoordinatorConfig(theta_url=urls[0], t_url=urls[1]), items(["a"]))
    assert "one unnamed teacher" in got["q0"]["error"]


def test_a_teacher_with_another_vocabulary_is_refused_by_name(urls: tuple[str, str]) -> None:
    from dualsample_rs.server import running_server

    with running_server("teacher-bpe") as other:
        config = CoordinatorConfig(theta_url=urls[0], teachers={"good": urls[1], "bpe": other})
        with pytest.raises(ConfigurationError, match=r"teacher 'bpe'.*vocabulary"):
            generate(config, items([None]))


def test_teacher_flags_are_parsed_and_checked() -> None:
    name, t = teacher_text("math=http://a:1,http://a:2;temperature=0.7;chat;dialect=sglang;prompt_field=q;model=m")
    assert name == "math"
    assert t == TeacherSettings(("http://a:1", "http://a:2"), "sglang", "m", None, 0.7, True, "q")
    assert teacher_text("c=http://b;chat=no")[1].chat is False
    for bad in ["nourl", "x=ftp://a", "x=http://a;colour=red", "x=http://a;temperature=hot", "x y=http://a",
                "x=http://a;temperature=0", "x=http://a;dialect=grpc"]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            teacher_text(bad)
    assert mix_text("a=0.25,b=0.75") == {"a": 0.25, "b": 0.75}
    with pytest.raises(argparse.ArgumentTypeError):
        mix_text("a=half")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"teachers": {"a": "http://x", "b": "http://y"}, "default_teacher": "c"}, "default_teacher: 'c'"),
        ({"default_teacher": "c"}, "give teachers="),
        ({"mix": {"a": 1.0}}, "mix: a mixture needs named teachers"),
        ({"teachers": {"a": "http://x"}, "mix": {"a": 0.4}}, "sum to 1"),
        ({"teachers": {"a": "http://x"}, "mix": {"z": 1.0}}, "unknown teacher 'z'"),
        ({"teachers": {"a": 5}}, r"teachers\['a'\]: expected a URL"),
        ({"teachers": {"a": {"urls": "http://x", "temperature": -1}}}, r"teachers\['a'\]"),
        ({"teachers": (("a", "http://x"), ("a", "http://y"))}, "a name is given twice"),
        ({"teachers": {"a": "http://x", "b": "http://y"}, "mix": {"a": 1.5, "b": -0.5}}, "finite number >= 0"),
        ({"teachers": {"a": "http://x"}, "mix": {"a": "all"}}, "finite number >= 0"),
    ],
)
def test_bad_teacher_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CoordinatorConfig(**kwargs)


def test_the_command_line_refuses_both_teacher_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dualsample_rs.cli.parsing import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    common = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    for flags, message in [
        (["--teacher", "a=http://127.0.0.1:9", "--t-url", "http://127.0.0.1:9"], "--teacher: give named teachers"),
        (["--default-teacher", "a"], "--default-teacher: only with named teachers"),
        (["--mix", "a=1"], "--mix: only with named teachers"),
    ]:
        assert main([*common, *flags]) == 2
        assert message in capsys.readouterr().err


def _write_routed(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)]
            name = "math" if i % 2 else "chat"
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question: {q}\nAnswer:", "teacher_prompt": q,
                                "teacher": name}) + "\n")  # fmt: skip


def _cli(urls: tuple[str, str], math: str, inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    """The base and the chat teacher at `urls`, the maths teacher at `math`; few retries."""
    teachers = [f"chat={urls[1]};chat", f"math={math}"]
    flags = ("--max-retries", "1", "--retry-delay", "0.01", "--max-concurrency", "8")
    return generate_cli(urls, inp, out, *flags, *extra, teachers=teachers)


@pytest.mark.slow
def test_a_teacher_killed_mid_run_fails_only_its_records_and_resume_completes_them(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    inp, out, whole = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    _write_routed(inp, 60)
    with doomed_server(model="teacher-math", latency=0.05) as (math_url, math_proc):
        run = _cli(urls, math_url, inp, out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
            time.sleep(0.05)
        math_proc.kill()
        status, err = wait_cli(run)
    assert status == 1, err  # some records failed
    records = {r["id"]: r for r in read_records(out)}
    assert len(records) == 60
    failed = [r for r in records.values() if r["finish_reason"] == "error"]
    assert failed and all(r["teacher"] == "math" for r in failed)
    assert all(r["finish_reason"] != "error" for r in records.values() if r["teacher"] == "chat")
    assert "teacher 'math'" not in err  # the run went on: no start-up error
    with doomed_server(model="teacher-math", latency=0.0) as (math_url, _):
        status, err = wait_cli(_cli(urls, math_url, inp, out, "--resume", "--retry-errors"))
        assert status == 0, err
        status, err = wait_cli(_cli(urls, math_url, inp, whole))
        assert status == 0, err
    resumed = {r["id"]: r for r in read_records(out)}
    uninterrupted = {r["id"]: r for r in read_records(whole)}
    assert resumed == uninterrupted


def mix_items(n: int, mix: dict[str, float] | None) -> list[WorkItem]:
    return [WorkItem(stable_key(f"q{i}"), PLAIN[i], QUESTIONS[i], f"q{i}", mix=mix) for i in range(n)]


@pytest.mark.parametrize(("dialect", "flavor"), DIALECTS)
def test_a_mixture_with_one_teacher_at_weight_one_is_that_teacher(
    dialect: str, flavor: str, flavors: dict, math_teachers: dict
) -> None:
    base, chat_url = flavors[flavor]
    config = CoordinatorConfig(theta_url=base, teachers={"chat": chat_url, "math": math_teachers[flavor]},
                               dialect=dialect, seed=9)  # fmt: skip
    routed, before = generate(config, items(["chat"] * 4))
    mixed, stats = generate(config, mix_items(4, {"chat": 1.0, "math": 0.0}))
    for key, record in routed.items():
        got = mixed[key]
        assert got["teachers"] == {"chat": 1.0} and "teacher" not in got
        for field in ("token_ids", "alpha", "logq", "logp_theta", "logp_t", "observed_theta", "observed_t", "text"):
            assert got[field] == record[field], (key, field)
        assert got["logp_teachers"] == {"chat": record["logp_t"]}
        assert got["observed_teachers"] == {"chat": record["observed_t"]}
    assert stats["teachers"]["chat=1"]["sequences"] == 4
    # A teacher at weight 0 is not asked: its requests are start-up's, as when not named.
    assert stats["teachers"]["math"]["requests"] == before["teachers"]["math"]["requests"]


@pytest.mark.parametrize("temperatures", [(None, None), (0.8, 1.25)])
def test_mixture_records_follow_the_numpy_reference(
    urls: tuple[str, str], math_teachers: dict, temperatures: tuple[float | None, float | None]
) -> None:
    """Every token of a 0.3/0.7 mixture, recomputed from the servers' own lists by the
    numpy twins of the mixture and the step: the same token, α and log q* to 1e-9.
    Teachers with their own temperatures τ_i are the mixture at weights ∝ w_i/τ_i
    tempered by 1/Σ(w_i/τ_i)."""
    from dualsample_rs import reference
    from dualsample_rs.backends import Context

    weights = {"chat": 0.3, "math": 0.7}
    # No stop ids: every record runs its 12 tokens.
    teachers = {
        "chat": TeacherSettings(urls[1], chat=True, temperature=temperatures[0]),
        "math": TeacherSettings(math_teachers["vllm"], temperature=temperatures[1]),
    }
    config = CoordinatorConfig(theta_url=urls[0], teachers=teachers, seed=13, top_k=8, stop_token_ids=())
    work = mix_items(3, weights)
    mixed_weights, tau = list(weights.values()), 1.0
    if temperatures[0] is not None and temperatures[1] is not None:
        scaled = [w / t for w, t in zip(weights.values(), temperatures, strict=True)]
        mixed_weights, tau = [x / sum(scaled) for x in scaled], 1 / sum(scaled)

    async def go() -> int:
        checked = 0
        async with DualVLLMCoordinator(config) as coord:
            outs = [o async for _, o in coord.iter_generate(work, 12, show_progress=False)]
            sampler = config.replace(temperature_t=tau).sampler_config(coord.exclude_ids)
            lanes = [coord.lanes["chat"].replicas, coord.lanes["math"].replicas]
            for out in outs:
                item = work[int(out.id[1:])]
                assert out.error is None
                assert any(0 < a < 1 for a in out.alpha_history[1:])  # the base takes part
                assert out.logp_teachers["chat"] != out.logp_teachers["math"]
                prompt_base = await coord.base.tokenize(item.prompt)
                prompts_t = [
                    await lanes[0].tokenize(messages=[{"role": "user", "content": item.prompt_t}]),
                    await lanes[1].tokenize(item.prompt_t),
                ]
                for j, token in enumerate(out.token_ids):
                    done = out.token_ids[:j]
                    base = await coord.base.topk([Context(prompt_base + done)], 8)
                    tops = [await lane.topk([Context(p + done)], 8) for lane, p in zip(lanes, prompts_t, strict=True)]
                    ids, logp = reference.mix_teachers([t.ids for t in tops], [t.logp for t in tops], mixed_weights)
                    ref = reference.step(base.ids, base.logp, ids, logp, config=sampler, seed=13,
                                         positions=[j], row_keys=[item.key], force_teacher=[j == 0])  # fmt: skip
                    assert int(ref.token_id[0]) == token
                    assert abs(float(ref.alpha[0]) - out.alpha_history[j]) <= 1e-9
                    assert abs(float(ref.logq[0]) - out.logq[j]) <= 1e-9
                    assert out.observed_t[j] == all(token in list(t.ids[0]) for t in tops)
                    for name, top in zip(weights, tops, strict=True):
                        row = list(top.ids[0])
                        if token in row:
                            assert out.observed_teachers[name][j]
                            assert out.logp_teachers[name][j] == top.logp[0][row.index(token)]
                    checked += 1
        return checked

    assert asyncio.run(go()) == 36


def test_mixture_refusals(urls: tuple[str, str]) -> None:
    two = {"a": urls[1], "c": urls[1]}
    with pytest.raises(ConfigurationError, match=r"mix: .*speculative"):
        CoordinatorConfig(teachers=two, mix={"a": 0.5, "c": 0.5}, speculate=2)
    with pytest.raises(ConfigurationError, match=r"mix: .*exact"):
        CoordinatorConfig(teachers=two, mix={"a": 0.5, "c": 0.5}, scoring="exact")
    # Per record: a mixture that names an unknown teacher, or that the run cannot sample,
    # fails its own record; the others go on.
    work = [*mix_items(1, {"a": 0.5, "z": 0.5}), WorkItem(stable_key("q9"), PLAIN[0], QUESTIONS[0], "q9", teacher="c")]
    got, stats = generate(CoordinatorConfig(theta_url=urls[0], teachers=two, seed=1), work)
    assert "teachers: unknown teacher 'z'" in got["q0"]["error"]
    assert got["q9"]["finish_reason"] != "error" and stats["errors"] == 1
    got, _ = generate(CoordinatorConfig(theta_url=urls[0], teachers=two, seed=1), mix_items(1, "a"))
    assert "teachers: expected an object of teacher names to weights" in got["q0"]["error"]
    work = [*mix_items(1, {"a": 0.5, "c": 0.5}), work[1]]
    got, stats = generate(CoordinatorConfig(theta_url=urls[0], teachers=two, seed=1, scoring="exact"), work)
    assert "scoring topk, not exact" in got["q0"]["error"]
    assert got["q9"]["finish_reason"] != "error" and stats["errors"] == 1


@pytest.mark.slow
def test_command_line_routing_mixtures_rescoring_and_parquet(
    urls: tuple[str, str], math_teachers: dict, tmp_path: Path
) -> None:
    """``--teacher`` twice, ``--mix`` for lines that name none, a line's own ``teachers``;
    the Parquet output holds exactly the JSONL records; a mixture's exact values are its
    teachers' own, summed by weight."""
    from dualsample_rs.cli.parsing import main
    from dualsample_rs.io.parquet_file import iter_records

    inp = tmp_path / "in.jsonl"
    lines = [{"teacher": "chat"}, {"teacher": "math"}, {"teachers": {"chat": 0.25, "math": 0.75}}, {}, {}]
    with inp.open("w") as f:
        for i, extra in enumerate(lines):
            f.write(json.dumps({"id": i, "prompt": PLAIN[i], "teacher_prompt": QUESTIONS[i], **extra}) + "\n")
    outputs = {}
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"out.{suffix}"
        status = main(["generate", "--theta-url", urls[0], "--teacher", f"chat={urls[1]};chat=yes", "--teacher",
                       f"math={math_teachers['vllm']}", "--mix", "chat=0.5,math=0.5", "--rescore", "--input",
                       str(inp), "--output", str(out), "--max-tokens", "10", "--seed", "3", "--quiet"])  # fmt: skip
        assert status == 0
        outputs[suffix] = out
    records = {r["id"]: r for r in read_records(outputs["jsonl"])}
    assert {r["id"]: r for r in iter_records(str(outputs["parquet"]))} == records
    assert [records[i].get("teacher") for i in range(5)] == ["chat", "math", None, None, None]
    assert records[2]["teachers"] == {"chat": 0.25, "math": 0.75}
    assert records[3]["teachers"] == records[4]["teachers"] == {"chat": 0.5, "math": 0.5}
    for record in (records[2], records[3]):
        weights = record["teachers"]
        exact = record["logp_teachers_exact"]
        for j, total in enumerate(record["logp_t_exact"]):
            assert total == pytest.approx(sum(w * exact[n][j] for n, w in weights.items()), abs=1e-12)
            if record["observed_t"][j]:  # every teacher listed it: the mix of their own values
                mixed = sum(w * record["logp_teachers"][n][j] for n, w in weights.items())
                assert record["logp_t"][j] == pytest.approx(mixed, abs=1e-12)
            for name in weights:  # listed values are the model's own
                if record["observed_teachers"][name][j]:
                    assert record["logp_teachers"][name][j] == pytest.approx(exact[name][j], abs=1e-6)


def test_own_prompt_field_teacher_field_and_default_teacher_on_the_command_line(
    urls: tuple[str, str], math_teachers: dict, tmp_path: Path
) -> None:
    """A teacher that reads its prompt from a field of its own, lines routed by another
    field, and a default teacher that is not the first."""
    from dualsample_rs.cli.parsing import main

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    problem = "Ana has 3 apples and gets 4 more. How many apples does Ana have now?"
    lines = [{"who": "math", "problem": problem}, {"who": "chat"}, {}]
    with inp.open("w") as f:
        for i, extra in enumerate(lines):
            f.write(json.dumps({"id": i, "prompt": PLAIN[i], "teacher_prompt": QUESTIONS[i], **extra}) + "\n")
    status = main(["generate", "--theta-url", urls[0], "--teacher", f"chat={urls[1]}", "--teacher",
                   f"math={math_teachers['vllm']};prompt_field=problem;chat=yes", "--teacher-field", "who",
                   "--default-teacher", "math", "--input", str(inp), "--output", str(out), "--max-tokens", "8",
                   "--quiet"])  # fmt: skip
    assert status == 0
    records = {r["id"]: r for r in read_records(out)}
    assert [records[i]["teacher"] for i in range(3)] == ["math", "chat", "math"]
    assert records[0]["teacher_prompt"] == problem  # its own field
    assert records[1]["teacher_prompt"] == QUESTIONS[1]
    assert records[2]["teacher_prompt"] == QUESTIONS[2]  # no "problem" field: the teacher prompt


def test_the_progress_line_counts_per_teacher(urls: tuple[str, str]) -> None:
    config = CoordinatorConfig(theta_url=urls[0], teachers={"a": urls[1], "b": urls[1]}, seed=1)

    async def go() -> dict[str, str]:
        async with DualVLLMCoordinator(config) as coord:
            async for _ in coord.iter_generate(items(["a", "b", "b"]), 4, show_progress=False):
                pass
            return coord._postfix()

    shown = asyncio.run(go())
    assert shown["a"] == "1" and shown["b"] == "2"


def test_the_base_is_asked_once_a_step_for_every_teacher(urls: tuple[str, str], math_teachers: dict) -> None:
    """Eight records, half to each of two teachers: the base gets one request a step
    (beyond start-up's), each teacher one a step too."""
    common = {"theta_url": urls[0], "stop_token_ids": (), "seed": 2}
    two = CoordinatorConfig(teachers={"chat": urls[1], "math": math_teachers["vllm"]}, **common)
    _, idle = generate(two, [])  # start-up's requests alone
    _, routed = generate(two, items(["chat", "math"] * 4))
    steps = routed["steps"]
    assert 24 <= steps <= 26  # 24 tokens; a step or two before all eight have joined
    # Beyond start-up: a step's top-k, and per record its prompt tokenised and its text
    # detokenised (the base), or its prompt tokenised (its teacher).
    assert routed["requests_theta"] - idle["requests_theta"] == steps + 2 * 8
    for name in ("chat", "math"):
        assert routed["teachers"][name]["requests"] - idle["teachers"][name]["requests"] <= steps + 4


def test_each_teacher_speaks_its_own_dialect(flavors: dict, math_teachers: dict) -> None:
    """A vLLM base, a teacher on vLLM's generate route and one on SGLang, in one run: each
    record is the record of a run with its teacher alone."""
    teachers = {
        "chat": TeacherSettings(flavors["vllm"][1], dialect="vllm-generate"),
        "math": TeacherSettings(math_teachers["sglang"], dialect="sglang"),
    }
    common = {"theta_url": flavors["vllm"][0], "dialect": "vllm-completions", "seed": 4}
    route = ["chat", "math", "math", "chat"]
    both, _ = generate(CoordinatorConfig(teachers=teachers, **common), items(route))
    for name, teacher in teachers.items():
        alone, _ = generate(CoordinatorConfig(teachers={name: teacher}, **common), [
            i for i in items(route) if i.teacher == name
        ])  # fmt: skip
        assert alone and all(both[key] == record for key, record in alone.items())
    assert {r["teacher"] for r in both.values()} == {"chat", "math"}


def test_a_teacher_with_replicas(urls: tuple[str, str], flavors: dict) -> None:
    """A named teacher with two replicas gives the records of one replica, and its
    replicas' share is counted under "t:NAME"."""
    replicas = (urls[1], flavors["vllm"][1])  # two servers of the same teacher model
    common = {"theta_url": urls[0], "dialect": "vllm-completions", "seed": 8}
    work = items(["two", "one"] * 4)
    both, stats = generate(CoordinatorConfig(teachers={"two": replicas, "one": urls[1]}, **common), work)
    single, _ = generate(CoordinatorConfig(teachers={"two": urls[1], "one": urls[1]}, **common), work)
    assert both == single
    assert sum(r.get("sequences", 0) for r in stats["replicas"]["t:two"]) == 4
    assert all(r["requests"] > 0 for r in stats["replicas"]["t:two"])


class _FakeModel:
    """A model for `Routed` without a server: the same top-k at every context, a 400 for
    any request holding a context with the `poison` id, and the size of each request."""

    def __init__(self, k: int, seed: int, poison: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.ids = rng.permutation(64)[:k].astype(np.int64)
        self.logp = np.log(rng.dirichlet(np.ones(k)))
        self.poison = poison
        self.asked: list[int] = []

    async def topk(self, contexts: list[Context], k: int) -> TopK:
        self.asked.append(len(contexts))
        if any(self.poison in c.ids() for c in contexts):
            response = Response(400, {}, b"", "POST", "http://fake/v1/completions")
            raise BadRequestError("the poisoned context", response)
        n = len(contexts)
        return TopK(np.tile(self.ids, (n, 1)), np.tile(self.logp, (n, 1)))


def _routed_step(base: _FakeModel, poisoned: set[int]) -> list[Sequence]:
    """One step of four sequences, two per teacher, the base poisoned in `poisoned`."""
    from dualsample_rs.engine.round import Round, Routed
    from dualsample_rs.engine.stats import Statistics
    from dualsample_rs.engine.strategies import BothTopK

    config, stats = CoordinatorConfig(top_k=8), Statistics()
    rounds = {  # keyed by (teacher, the sequence's temperature), as the engine keys them
        (name, 1.0): Round(BothTopK(base, _FakeModel(8, seed), 8), config, config.sampler_config(()), 0, (),
                           (99, 99), stats, False)
        for name, seed in (("a", 1), ("b", 2))
    }  # fmt: skip
    batch = [
        Sequence(item, i, Context([1, 2] + ([base.poison] if i in poisoned else [])), Context([1, 2]), 4,
                 GenerationOutput(item.prompt), teacher=item.teacher)
        for i, item in enumerate(items(["a", "b", "a", "b"]))
    ]  # fmt: skip
    asyncio.run(Routed(rounds, rounds.__getitem__, base, 8, stats)(batch))
    return batch


def test_the_base_is_asked_once_for_every_teachers_share_and_a_refusal_is_narrowed() -> None:
    """One base request for the four sequences of a step; when the base refuses it, each
    teacher's share asks alone and halves its request until the one sequence it was
    refused for fails alone."""
    base = _FakeModel(8, 0, poison=63)
    batch = _routed_step(base, set())
    assert base.asked == [4] and all(len(s.out.token_ids) == 1 for s in batch)
    base = _FakeModel(8, 0, poison=63)
    batch = _routed_step(base, {2})
    assert [s.out.finish_reason for s in batch] == [None, None, "error", None]
    assert "BadRequestError" in (batch[2].out.error or "")
    assert [len(s.out.token_ids) for s in batch] == [1, 1, 0, 1]
    # the shared request, each share alone, then the poisoned share halved
    assert base.asked[0] == 4 and sorted(base.asked[1:]) == [1, 1, 2, 2]


def test_a_teachers_own_temperature_and_chat_setting_take_effect(urls: tuple[str, str]) -> None:
    """A named teacher at temperature 1.3 in its chat template gives the records of the
    unnamed teacher with temperature_t 1.3 and teacher_chat; either setting changes them."""
    work = items([None] * 4)
    in_chat = [dataclasses.replace(i, teacher_chat=True) for i in work]
    own = TeacherSettings(urls[1], temperature=1.3, chat=True)
    named, _ = generate(CoordinatorConfig(theta_url=urls[0], teachers={"t": own}, seed=2), work)
    unnamed = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], temperature_t=1.3, seed=2)
    same, _ = generate(unnamed, in_chat)
    assert named == {key: {**record, "teacher": "t"} for key, record in same.items()}
    cooler, _ = generate(unnamed.replace(temperature_t=None), in_chat)
    plain, _ = generate(unnamed, work)
    for other in (cooler, plain):
        assert any(other[key]["logq"] != record["logq"] for key, record in same.items())
