"""The package against a real vLLM (the CPU build), every dialect and mode it supports,
each checked against vLLM's own answers (see `checks`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dualsample_rs import ConfigurationError, CoordinatorConfig, DualVLLMCoordinator, VLLMClient
from dualsample_rs.backends import Context

from . import checks, gateway_checks
from .checks import PLAIN, Engine
from .vllm_engine import ensure_models, start_vllm


@pytest.fixture(scope="module")
def models() -> Path:
    return ensure_models()


@pytest.fixture(scope="module")
def engine(models: Path) -> Iterator[Engine]:
    # The base in dev mode, for its control routes (/pause, /resume, /reset_prefix_cache, ...),
    # which the gateway tests reach through the gateway.
    with (
        start_vllm(models / "base", 0, env={"VLLM_SERVER_DEV_MODE": "1"}) as base,
        start_vllm(models / "teacher", 0) as teacher,
    ):
        yield Engine("vllm", base.url, teacher.url, "base", "teacher")


def _stop_ids(engine: Engine) -> tuple[int, ...]:
    return tuple(checks.tokenize(engine.theta, "base", text=s)[0] for s in ("<|endoftext|>", "<|im_end|>"))


CASES = [(d, m) for d in ("vllm-completions", "vllm-generate") for m in ("topk", "exact", "rescore")] + [
    ("auto", "topk")
]


@pytest.mark.parametrize("dialect,mode", CASES)
def test_dialects_and_modes_give_the_engines_numbers(engine: Engine, dialect: str, mode: str) -> None:
    coord = checks.run_mode(engine, dialect, mode, _stop_ids(engine))
    assert coord.info is not None and coord.info[0].dialect == ("vllm-completions" if dialect == "auto" else dialect)


def test_both_vllm_dialects_give_the_same_records(engine: Engine) -> None:
    a, _, _ = checks.run(engine.theta, engine.teacher, dialect="vllm-completions")
    b, _, _ = checks.run(engine.theta, engine.teacher, dialect="vllm-generate")
    assert [o.to_record() for o in a] == [o.to_record() for o in b]


def test_speculative_rounds_through_prompt_logprobs(engine: Engine) -> None:
    outs, stats, coord = checks.run(
        engine.theta, engine.teacher, dialect="vllm-completions", speculate=3, verify_prompt_logprobs=True
    )
    assert coord.speculate == 3 and stats["rounds"] > 0 and stats["drafted"] > 0
    checks.check_records(engine, outs, stats, _stop_ids(engine), rebuilt=True)


def test_saved_top_ids_are_the_engines_own(engine: Engine) -> None:
    """save_topk against vLLM's own top-k at every position (generate route, both models)."""
    outs, stats, _ = checks.run(
        engine.theta, engine.teacher, dialect="vllm-generate", top_k=8, save_topk=5, save_topk_of="both"
    )
    assert stats["errors"] == 0
    checks.check_saved_topk(engine, outs, 5, 8)


def test_replicas_give_the_single_server_records(engine: Engine, models: Path) -> None:
    with start_vllm(models / "base", 0) as second:
        outs, stats, _ = checks.run((engine.theta, second.url), engine.teacher, dialect="vllm-completions")
    single, _, _ = checks.run(engine.theta, engine.teacher, dialect="vllm-completions")
    assert [o.to_record() for o in outs] == [o.to_record() for o in single]
    assert sum(r["sequences"] for r in stats["replicas"]["theta"]) == len(PLAIN)


def test_bad_input_fails_its_record_and_the_vocabulary_is_found(engine: Engine, models: Path) -> None:
    async def go() -> tuple[list[Any], int | None]:
        config = CoordinatorConfig(theta_url=engine.theta, t_url=engine.teacher, dialect="vllm-completions")
        async with DualVLLMCoordinator(config) as coord:
            assert coord.info is not None
            vocab = coord.info[0].vocab_size
            assert vocab is not None
            outs = await coord.generate_batch([[72, 101], [72, vocab], [72] * 2048], 4,
                                              show_progress=False)  # fmt: skip
            return outs, vocab

    outs, vocab = asyncio.run(go())
    config_vocab = json.loads((models / "base" / "config.json").read_text())["vocab_size"]
    assert vocab is not None and config_vocab - 64 < vocab <= config_vocab  # the tokenizer's, or the padded size
    assert outs[0].error is None
    assert f"token id {vocab} is outside the vocabulary" in str(outs[1].error)
    assert "the prompt is 2048 tokens" in str(outs[2].error)


def test_chat_prompts_get_one_bos_and_sampling_defaults_are_not_applied(models: Path) -> None:
    """A tokenizer that adds a BOS, a generation_config with sampling defaults, and
    --logprobs-mode processed_logprobs (as verl, TRL and prime-rl run vLLM): the numbers
    must still be the model's raw log-softmax."""
    with (
        start_vllm(models / "base_bos", 0, "--logprobs-mode", "processed_logprobs") as base,
        start_vllm(models / "teacher_bos", 0, "--logprobs-mode", "processed_logprobs") as teacher,
    ):
        engine = Engine("vllm", base.url, teacher.url, "base_bos", "teacher_bos")
        bos = checks.tokenize(base.url, "base_bos", text="Hi")[0]
        chat = checks.tokenize(teacher.url, "teacher_bos", messages=[{"role": "user", "content": "Hi"}])
        assert chat.count(bos) == 1
        outs, stats, _ = checks.run(base.url, teacher.url, dialect="vllm-completions", rescore=True)
        assert all(o.error is None for o in outs)
        for out in outs:
            for lp, exact, seen in ((out.logp_theta, out.logp_theta_exact, out.observed_theta),
                                    (out.logp_t, out.logp_t_exact, out.observed_t)):  # fmt: skip
                assert exact is not None
                listed = [abs(a - b) for a, b, s in zip(lp, exact, seen, strict=True) if s]
                assert listed and max(listed) < 1e-5, listed
        assert stats["errors"] == 0 and engine.theta


def test_the_generate_route_as_vllm_answers_it(engine: Engine) -> None:
    """What the reference server imitates (vllm-protocol.md §13), asked of vLLM itself."""

    def generate(params: dict[str, Any]) -> Any:
        body = {"model": "base", "token_ids": [72, 101, 108], "sampling_params": {"max_tokens": 1,
                "temperature": 0, "detokenize": False, **params}}  # fmt: skip
        return httpx.post(engine.theta + "/inference/v1/generate", json=body, timeout=60)

    assert generate({"logprob_token_ids": [5, 6, 7]}).json()["choices"][0]["logprobs"] is None
    assert generate({"logprob_token_ids": [5, 6, 7], "logprobs": 1}).status_code == 400
    got = generate({"logprob_token_ids": [5, 6, 7, 5], "logprobs": 4}).json()
    listed = {e["token_id"] for e in got["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    assert {5, 6, 7} <= listed
    top = generate({"logprobs": 3}).json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert len(top) == 3


def test_request_ids_and_prompt_tokens_are_echoed(engine: Engine) -> None:
    """The reply checks rely on vLLM echoing the request id and counting prompt tokens."""

    async def go() -> None:
        async with VLLMClient(engine.theta, max_retries=0) as c:
            c.model = "base"
            top = await c.topk([Context([72, 101]), Context([72, 101, 108])], 5)
            assert top.ids.shape[0] == 2

    asyncio.run(go())
    r = httpx.post(engine.theta + "/v1/completions", headers={"X-Request-Id": "abc123"},
                   json={"model": "base", "prompt": [[1, 2], [3, 4, 5]], "max_tokens": 1}, timeout=60)  # fmt: skip
    assert "abc123" in r.json()["id"].split("-") and r.json()["usage"]["prompt_tokens"] == 5
    # the generate route answers generate-tokens-<id>, the header's id as the client sends it
    g = httpx.post(engine.theta + "/inference/v1/generate", headers={"X-Request-Id": "hdr7"},
                   json={"model": "base", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 1}},
                   timeout=60)  # fmt: skip
    assert g.json()["request_id"] == "generate-tokens-hdr7" and g.json()["usage"]["prompt_tokens"] == 3


def test_top_k_over_the_vocabulary_is_refused(engine: Engine) -> None:
    with pytest.raises(ConfigurationError):
        checks.run(engine.theta, engine.teacher, top_k=100_000)


@pytest.mark.parametrize("dialect", ["vllm-completions", "vllm-generate"])
def test_several_teachers_route_and_mix(engine: Engine, dialect: str) -> None:
    assert checks.check_several_teachers(engine, dialect) > 0


def test_gateway_answers_are_the_generate_records_and_vllms_numbers(engine: Engine) -> None:
    """The gateway in front of vLLM: completions (whole and streamed) and chat through the
    openai client, and vLLM's /inference/v1/generate, each the `dualsample generate`
    record of its id to the last bit, and rebuilt from vLLM's own top-k lists."""
    done = gateway_checks.check_answers(engine, "vllm-completions", tol=0.0)
    assert done["answers"] == 13 and done["positions"] >= 8


def test_gateway_streams_at_a_requests_stream_interval_as_vllm_does(engine: Engine) -> None:
    gateway_checks.check_stream_interval(engine, "vllm-completions")


def test_gateway_passes_vllms_control_routes_to_the_base(engine: Engine) -> None:
    """/reset_prefix_cache and /pause, /resume reach the real base through the gateway
    (vLLM says so itself on /is_paused); rounds wait while it is paused."""
    prompt = checks.tokenize(engine.theta, "base", text=PLAIN[0])

    def is_paused() -> bool:
        r = httpx.get(engine.theta + "/is_paused", timeout=30)
        assert r.status_code == 200, r.text
        return bool(r.json()["is_paused"])

    async def body(gw: Any) -> None:
        status, text = await gateway_checks.forward(gw, "POST", "/reset_prefix_cache")
        assert status == 200, text

        async def pause() -> None:
            status, text = await gateway_checks.forward(gw, "POST", "/pause?mode=keep")
            assert status == 200 and json.loads(text) == {"status": "paused"}, text
            assert is_paused()

        waiting = await gateway_checks.held_while_paused(gw, prompt, pause())
        status, text = await gateway_checks.forward(gw, "POST", "/resume")
        assert status == 200 and json.loads(text) == {"status": "resumed"}, text
        assert not is_paused() and not gw.serving.paused
        answer = await asyncio.wait_for(waiting, 120)
        assert 1 <= len(answer["choices"][0]["token_ids"]) <= 4

    gateway_checks.with_gateway(engine, "vllm-completions", body)
