"""The package against a real SGLang (0.5.23 on CPU), every mode it supports, each
checked against SGLang's own answers (see `checks`); and a vLLM base with an SGLang
teacher."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, SGLangBackend

from . import checks, gateway_checks
from .checks import PLAIN, Engine
from .sglang_engine import start_sglang
from .vllm_engine import ensure_models, start_vllm


@pytest.fixture(scope="module")
def models() -> Path:
    return ensure_models()


@pytest.fixture(scope="module")
def engine(models: Path) -> Iterator[Engine]:
    with start_sglang(models / "base") as base, start_sglang(models / "teacher") as teacher:
        yield Engine("sglang", base.url, teacher.url, "base", "teacher", (str(base.log_path), str(teacher.log_path)))


def _stop_ids(engine: Engine) -> tuple[int, ...]:
    return tuple(checks.tokenize(engine.theta, "base", text=s)[0] for s in ("<|endoftext|>", "<|im_end|>"))


@pytest.mark.parametrize(
    "dialect,mode", [("sglang", "topk"), ("sglang", "exact"), ("sglang", "rescore"), ("auto", "topk")]
)
def test_modes_give_the_engines_numbers(engine: Engine, dialect: str, mode: str) -> None:
    coord = checks.run_mode(engine, dialect, mode, _stop_ids(engine), tol_exact=1e-4)
    assert coord.info is not None and coord.info[0].dialect == "sglang"


def test_speculative_rounds(engine: Engine) -> None:
    outs, stats, coord = checks.run(engine.theta, engine.teacher, dialect="sglang", speculate=3)
    assert coord.speculate == 3 and stats["rounds"] > 0 and stats["drafted"] > 0
    checks.check_records(engine, outs, stats, _stop_ids(engine), rebuilt=True)


def test_speculative_rounds_with_exact_scoring(engine: Engine) -> None:
    outs, stats, _ = checks.run(engine.theta, engine.teacher, dialect="sglang", speculate=3, scoring="exact")
    checks.check_records(engine, outs, stats, _stop_ids(engine), exact=True, tol_exact=1e-4)


def test_saved_top_ids_are_the_engines_own(engine: Engine) -> None:
    """save_topk against SGLang's own top-k at every position, in speculative rounds
    (drafted and verified lists, both models)."""
    outs, stats, coord = checks.run(
        engine.theta, engine.teacher, dialect="sglang", speculate=3, top_k=8, save_topk=5, save_topk_of="both"
    )
    assert coord.speculate == 3 and stats["errors"] == 0
    checks.check_saved_topk(engine, outs, 5, 8)


def test_replicas_give_the_single_server_records(engine: Engine, models: Path) -> None:
    with start_sglang(models / "base") as second:
        outs, stats, _ = checks.run((engine.theta, second.url), engine.teacher, dialect="sglang")
    single, _, _ = checks.run(engine.theta, engine.teacher, dialect="sglang")
    assert [o.token_ids for o in outs] == [o.token_ids for o in single]
    assert sum(r["sequences"] for r in stats["replicas"]["theta"]) == len(PLAIN)


def test_no_record_takes_the_server_down(engine: Engine, models: Path) -> None:
    """Ids past the vocabulary and empty prompts crash a whole SGLang server when sent;
    they fail their own records here, and the server stays up."""

    async def go() -> tuple[list[Any], int | None]:
        config = CoordinatorConfig(theta_url=engine.theta, t_url=engine.teacher, dialect="sglang")
        async with DualVLLMCoordinator(config) as coord:
            assert coord.info is not None
            vocab = coord.info[0].vocab_size
            outs = await coord.generate_batch([[72, 101], [72, (vocab or 0) + 3], []], 4, show_progress=False)
            return outs, vocab

    outs, vocab = asyncio.run(go())
    assert vocab is not None
    assert outs[0].error is None and "outside the vocabulary" in str(outs[1].error) and "empty" in str(outs[2].error)
    assert httpx.get(engine.theta + "/health", timeout=30).status_code == 200


def test_the_last_id_of_the_vocabulary_is_rescored(engine: Engine, models: Path) -> None:
    """SGLang reports ids >= vocab_size - 1 as 0 in input_token_logprobs."""

    async def go() -> list[float]:
        async with SGLangBackend(engine.theta) as b:
            from dualsample_rs.engine.handshake import _vocab_size

            vocab = await _vocab_size(b, [72])
            assert vocab is not None
            return await b.sequence_logprobs([72, 101, vocab - 1, 33], 1)

    values = asyncio.run(go())
    assert len(values) == 3


def test_vllm_base_with_an_sglang_teacher(engine: Engine, models: Path) -> None:
    with start_vllm(models / "base", 0) as base:
        outs, stats, coord = checks.run(base.url, engine.teacher, dialect=("vllm-completions", "sglang"), rescore=True)
        mixed = Engine("vllm", base.url, engine.teacher, "base", "teacher")
        assert stats["errors"] == 0
        for out in outs:
            assert out.logp_t_exact is not None and out.logp_theta_exact is not None
        checks.check_records(mixed, outs, stats, _stop_ids(engine))
    assert coord.info is not None and [i.dialect for i in coord.info] == ["vllm-completions", "sglang"]


def test_several_teachers_route_and_mix(engine: Engine) -> None:
    assert checks.check_several_teachers(engine, "sglang") > 0


def test_gateway_answers_are_the_generate_records_and_sglangs_numbers(engine: Engine) -> None:
    """The gateway in front of SGLang: completions (whole and streamed) and chat through
    the openai client, and SGLang's /generate, each the `dualsample generate` record of
    its id (the same tokens; SGLang's numbers move with the batch it forms, so within
    1e-4), and rebuilt from SGLang's own top-k lists."""
    done = gateway_checks.check_answers(engine, "sglang", tol=1e-4)
    assert done["answers"] == 13 and done["positions"] >= 8


def test_gateway_streams_at_a_requests_stream_interval_as_sglang_does(engine: Engine) -> None:
    own, _ = gateway_checks.check_stream_interval(engine, "sglang")
    assert own == [1, 3, 3, 3, 1]  # SGLang's scheduler decides each event by the count


def test_gateway_passes_sglangs_control_routes_to_the_base(engine: Engine) -> None:
    """/flush_cache reaches the real base through the gateway (SGLang's own answer comes
    back), and so do /pause_generation and /continue_generation; rounds wait between."""
    prompt = checks.tokenize(engine.theta, "base", text=PLAIN[0])

    async def body(gw: Any) -> None:
        status, text = await gateway_checks.forward(gw, "POST", "/flush_cache")
        assert status == 200 and text.startswith("Cache flushed."), text

        async def pause() -> None:
            status, text = await gateway_checks.forward(gw, "POST", "/pause_generation", {})
            assert status == 200 and "paused" in text, text

        waiting = await gateway_checks.held_while_paused(gw, prompt, pause())
        status, text = await gateway_checks.forward(gw, "POST", "/continue_generation", {})
        assert status == 200 and "continued" in text, text
        assert not gw.serving.paused
        answer = await asyncio.wait_for(waiting, 120)
        assert 1 <= len(answer["choices"][0]["token_ids"]) <= 4

    gateway_checks.with_gateway(engine, "sglang", body)
