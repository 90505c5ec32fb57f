"""The three wire dialects end to end against reference servers of each flavor: the same
records through every dialect, exact scoring, rescoring, and each dialect's errors."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from dualsample_rs import (
    ConfigurationError,
    DualVLLMCoordinator,
    GenerationOutput,
    SGLangBackend,
    VLLMCompletionsBackend,
    VLLMGenerateBackend,
)
from dualsample_rs.backends import Context
from dualsample_rs.exceptions import BadRequestError, NotFoundError
from dualsample_rs.server import running_server
from dualsample_rs.server.corpus import chat
from support import PLAIN, QUESTIONS, pair_config, run_coordinator

# The teacher's chat template rendered here, so every dialect (SGLang's /tokenize has
# no chat templates) sees the same teacher prompts.
CHAT = [chat([{"role": "user", "content": q}], True) for q in QUESTIONS]
DIALECTS = ("vllm-completions", "vllm-generate", "sglang")


def _urls(flavors: dict[str, tuple[str, str]], dialect: str) -> tuple[str, str]:
    return flavors["sglang" if dialect == "sglang" else "vllm"]


def _run(urls: tuple[str, str], max_tokens: int = 24, **kw) -> tuple[list[GenerationOutput], DualVLLMCoordinator]:
    outs, _, coord = run_coordinator(pair_config(urls, **kw), PLAIN, CHAT, max_tokens=max_tokens)
    return outs, coord


def _records(outs: list[GenerationOutput]) -> list[dict]:
    return [o.to_record() for o in outs]


def test_every_dialect_gives_the_same_records(flavors: dict[str, tuple[str, str]]) -> None:
    runs = {}
    for dialect in DIALECTS:
        outs, coord = _run(_urls(flavors, dialect), seed=21, dialect=dialect, max_concurrency=5, max_batch_size=3)
        assert coord.info is not None and [i.dialect for i in coord.info] == [dialect, dialect]
        assert all(o.error is None for o in outs)
        runs[dialect] = _records(outs)
    assert runs["vllm-completions"] == runs["vllm-generate"] == runs["sglang"]
    # auto finds each server's dialect, also when the two differ
    mixed = (flavors["vllm"][0], flavors["sglang"][1])
    outs, coord = _run(mixed, seed=21, max_concurrency=5, max_batch_size=3)
    assert coord.info is not None and [i.dialect for i in coord.info] == ["vllm-completions", "sglang"]
    assert _records(outs) == runs["sglang"]
    assert _records(_run(mixed, seed=22)[0]) != runs["sglang"]  # and the seed matters


def _true_logprobs(url: str, ids: list[int], start: int) -> list[float]:
    """log π(ids[i] | ids[:i]) from the server's prompt log probabilities, asked directly."""
    r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}, timeout=30)
    entries = r.json()["choices"][0]["prompt_logprobs"]
    return [entries[i][str(ids[i])]["logprob"] for i in range(start, len(ids))]


def _prompt_ids(url: str, text: str) -> list[int]:
    return httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("dialect", DIALECTS)
def test_exact_scoring_reports_true_log_probabilities(flavors: dict[str, tuple[str, str]], dialect: str) -> None:
    outs, _ = _run(_urls(flavors, dialect), seed=23, dialect=dialect, scoring="exact", rescore=True)
    truth = flavors["vllm"]  # the same models, asked on their own
    for o, plain, teacher in zip(outs, PLAIN, CHAT, strict=True):
        assert o.error is None and all(o.observed_theta) and all(o.observed_t)
        a, b = _prompt_ids(truth[0], plain), _prompt_ids(truth[1], teacher)
        want_a = _true_logprobs(truth[0], a + o.token_ids, len(a))
        want_b = _true_logprobs(truth[1], b + o.token_ids, len(b))
        np.testing.assert_allclose(o.logp_theta, want_a, rtol=0, atol=1e-9)
        np.testing.assert_allclose(o.logp_t, want_b, rtol=0, atol=1e-9)
        np.testing.assert_allclose(o.logp_theta_exact, want_a, rtol=0, atol=1e-9)
        np.testing.assert_allclose(o.logp_t_exact, want_b, rtol=0, atol=1e-9)
        assert all(q <= 0 for q in o.logq)


@pytest.mark.slow
@pytest.mark.parametrize("dialect", DIALECTS)
def test_rescoring_in_topk_mode_gives_true_log_probabilities(flavors: dict[str, tuple[str, str]], dialect: str) -> None:
    outs, _ = _run(_urls(flavors, dialect), seed=24, dialect=dialect, rescore=True)
    truth = flavors["vllm"]
    estimated = 0
    for o, plain in zip(outs, PLAIN, strict=True):
        a = _prompt_ids(truth[0], plain)
        want = _true_logprobs(truth[0], a + o.token_ids, len(a))
        np.testing.assert_allclose(o.logp_theta_exact, want, rtol=0, atol=1e-9)
        assert len(o.logp_t_exact or []) == len(o.token_ids)
        estimated += sum(not seen for seen in o.observed_theta)
        assert "logp_theta_exact" in o.to_record()
    assert estimated > 0  # topk mode does estimate; rescoring is what makes those exact
    plain_run, _ = _run(_urls(flavors, dialect), seed=24, dialect=dialect)
    assert all(o.logp_theta_exact is None and "logp_theta_exact" not in o.to_record() for o in plain_run)


@pytest.mark.slow
def test_exact_scoring_refuses_more_ids_than_vllm_scores(flavors: dict[str, tuple[str, str]]) -> None:
    with running_server("base", max_logprobs=200) as a, running_server("teacher", max_logprobs=200) as b:
        with pytest.raises(ConfigurationError, match="at most 128 ids"):
            _run((a, b), scoring="exact", top_k=129, dialect="vllm-completions")
        outs, _ = _run((a, b), scoring="exact", top_k=128, max_tokens=3)
        assert all(o.error is None for o in outs)


def _backend(cls: type, url: str) -> VLLMCompletionsBackend:
    return cls(url, max_retries=0)


@pytest.mark.parametrize("cls,flavor", [(VLLMCompletionsBackend, "vllm"), (VLLMGenerateBackend, "vllm"),
                                        (SGLangBackend, "sglang")])  # fmt: skip
def test_each_dialect_maps_server_errors(flavors: dict[str, tuple[str, str]], cls: type, flavor: str) -> None:
    async def go() -> None:
        async with _backend(cls, flavors[flavor][0]) as backend:
            with pytest.raises(BadRequestError, match="out of vocabulary"):
                await backend.topk([Context([1, 2, 999])], 5)
            with pytest.raises(BadRequestError, match="out of vocabulary"):
                await backend.score([Context([1, 2])], np.array([[5, 900]]))
            got = await backend.score([Context([72, 101]), Context([87])], np.array([[5, 6, -1], [7, 8, 9]]))
            assert got.shape == (2, 3) and got[0, 2] == -np.inf and np.all(got[:, :2] < 0)

    asyncio.run(go())


def test_dialect_specific_errors(flavors: dict[str, tuple[str, str]], urls: tuple[str, str]) -> None:
    async def go() -> None:
        async with _backend(VLLMCompletionsBackend, flavors["vllm"][0]) as backend:
            with pytest.raises(BadRequestError, match="max allowed: 64"):  # the base verifies drafts: 64
                await backend.topk([Context([1, 2])], 65)
            # more than 128 ids in one request: the server's 400, named
            with pytest.raises(BadRequestError, match="greater than max allowed: 128"):
                await backend._completions([Context([1])], {"logprobs": 1, "logprob_token_ids": list(range(129))}, 2)
        async with _backend(VLLMGenerateBackend, flavors["vllm"][0]) as backend:
            with pytest.raises(BadRequestError, match="greater than max allowed: 128"):
                await backend.score([Context([1, 2])], np.arange(129)[None, :])
        # the generate route needs --enable-scale-out, which the plain base has not
        async with _backend(VLLMGenerateBackend, urls[0]) as backend:
            with pytest.raises(NotFoundError):
                await backend.topk([Context([1, 2])], 5)
        messages = [{"role": "user", "content": "hi"}]
        async with _backend(VLLMCompletionsBackend, flavors["vllm"][1]) as backend:
            vllm_chat = await backend.tokenize(messages=messages)
        async with _backend(SGLangBackend, flavors["sglang"][1]) as backend:
            # SGLang 0.5.23's /tokenize renders the chat template as vLLM's does
            assert await backend.tokenize(messages=messages) == vllm_chat
            with pytest.raises(BadRequestError, match="logprob_start_len"):
                await backend.post_json("/generate", {"input_ids": [1, 2, 3], "logprob_start_len": 3})

    asyncio.run(go())


def test_sequence_logprobs_agree_across_dialects(flavors: dict[str, tuple[str, str]]) -> None:
    ids = [*_prompt_ids(flavors["vllm"][1], CHAT[0]), 65, 32, 118, 111]
    want = _true_logprobs(flavors["vllm"][1], ids, 5)

    async def go(cls: type, url: str) -> list[float]:
        async with _backend(cls, url) as backend:
            return await backend.sequence_logprobs(ids, 5)

    for cls, flavor in ((VLLMCompletionsBackend, "vllm"), (VLLMGenerateBackend, "vllm"), (SGLangBackend, "sglang")):
        np.testing.assert_allclose(asyncio.run(go(cls, flavors[flavor][1])), want, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dialect", DIALECTS)
def test_demo_runs_in_every_dialect(dialect: str) -> None:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "demo", "--dialect", dialect, "--max-tokens", "12", "--samples", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "summary: 8 sequences" in p.stdout and "0 errors" in p.stdout
