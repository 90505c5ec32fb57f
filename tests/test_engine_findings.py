"""What the real engines showed, held on the reference servers made to answer as the
engines do (the engine tests in tests/engines check the same against vLLM and SGLang
themselves): each test fails without its fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, web
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, GenerationOutput, SGLangBackend, VLLMClient, _core
from dualsample_rs.backends import Context
from dualsample_rs.exceptions import ConfigurationError, IncompleteReplyError
from dualsample_rs.server import running_server
from support import PLAIN, pair_config, run_coordinator


def _run(urls: tuple[str, str], prompts: list[Any], teacher: list[Any] | None = None, **kw: Any) -> tuple[list, dict]:
    config = pair_config(urls, seed=3, **kw)
    outs, stats, _ = run_coordinator(config, prompts, teacher or prompts, max_tokens=20, teacher_chat=teacher is None)
    return outs, stats


def test_a_generate_exact_scoring_gets_every_id(generate_pair: tuple[str, str], urls: tuple[str, str]) -> None:
    """(a) The generate route scores ids only with ``logprobs`` set to their number and
    leaves the last out when the sampled token is not among them."""
    outs, stats = _run(generate_pair, PLAIN[:4], dialect="vllm-generate", scoring="exact")
    assert stats["errors"] == 0, [o.error for o in outs]
    same, _ = _run(urls, PLAIN[:4], dialect="vllm-completions", scoring="exact")
    assert [o.to_record() for o in outs] == [o.to_record() for o in same]


def test_b_generate_lists_k_entries_with_the_sampled_token_first(generate_pair: tuple[str, str]) -> None:
    """(b) The reference answers as vLLM's generate route: ``logprobs`` entries, the
    sampled token first (so it and the top k-1 when it is outside the top k)."""

    async def go() -> list[Any]:
        async with VLLMClient(generate_pair[0]) as c:
            # a replayed token that is far down the list
            body = {"token_ids": [72, 101, 108], "sampling_params": {"max_tokens": 1, "logprobs": 3,
                    "temperature": 0, "detokenize": False}}  # fmt: skip
            first = await c.post_json("/inference/v1/generate", body)
            return first["choices"][0]["logprobs"]["content"]

    content = asyncio.run(go())
    assert len(content[0]["top_logprobs"]) == 3
    ranks = [e["rank"] for e in content[0]["top_logprobs"]]
    assert ranks[0] == 1 and sorted(ranks) == [1, 2, 3]  # greedy: the sampled token is the top one
    # the reader of replayed positions keeps the true top k whatever comes first
    entries = [{"token_id": 9, "logprob": -7.0, "rank": 30}, {"token_id": 1, "logprob": -0.2, "rank": 1},
               {"token_id": 2, "logprob": -1.9, "rank": 2}]  # fmt: skip
    reply = json.dumps({"choices": [{"logprobs": {"content": [{"token_id": 9, "top_logprobs": entries}]}}]})
    _, ids, _, _, _ = _core.parse_generate_positions([reply.encode()], 3, 2)
    assert ids[0].tolist() == [1, 2, -1]


def test_c_sglang_rescoring_takes_the_last_id_of_the_vocabulary(sglang_pair: tuple[str, str]) -> None:
    """(c) SGLang reports every id >= vocab_size - 1 as 0 in input_token_logprobs."""

    async def go() -> tuple[list[float], int]:
        async with SGLangBackend(sglang_pair[0]) as b:
            vocab = await _vocab_of(b)
            return await b.sequence_logprobs([72, 105, vocab - 1, 33], 1), vocab

    values, vocab = asyncio.run(go())
    assert len(values) == 3 and all(np.isfinite(values)) and vocab > 100


async def _vocab_of(backend: SGLangBackend) -> int:
    from dualsample_rs.engine.handshake import _vocab_size

    size = await _vocab_size(backend, [72])
    assert size is not None
    return size


def test_d_sglang_renders_the_teachers_chat_template(sglang_pair: tuple[str, str], urls: tuple[str, str]) -> None:
    """(d) SGLang's /tokenize takes ``messages``: --teacher-chat works with an SGLang teacher."""
    outs, stats = _run(sglang_pair, PLAIN[:3], dialect="sglang")
    assert stats["errors"] == 0
    same, _ = _run(urls, PLAIN[:3], dialect="vllm-completions")
    assert [o.token_ids for o in outs] == [o.token_ids for o in same]


def test_e_ids_outside_the_vocabulary_fail_their_own_record(sglang_pair: tuple[str, str]) -> None:
    """(e) An id the model does not know, or an empty prompt, never reaches a server."""

    async def go() -> tuple[list[GenerationOutput], dict]:
        config = CoordinatorConfig(theta_url=sglang_pair[0], t_url=sglang_pair[1], dialect="sglang", seed=1)
        async with DualVLLMCoordinator(config) as coord:
            assert coord.info is not None and coord.info[0].vocab_size is not None
            vocab = coord.info[0].vocab_size
            prompts: list[Any] = [[72, 105], [72, vocab + 5], [72, vocab]]
            outs = await coord.generate_batch(prompts, 8, show_progress=False)
            return outs, {"vocab": vocab}

    outs, seen = asyncio.run(go())
    assert outs[0].error is None
    for out, bad in zip(outs[1:], (seen["vocab"] + 5, seen["vocab"]), strict=True):
        assert out.finish_reason == "error" and f"token id {bad} is outside the vocabulary" in str(out.error)
    with pytest.raises(ConfigurationError, match="more than the"):
        _run(sglang_pair, PLAIN[:1], dialect="sglang", top_k=100_000)


def test_f_bound_is_never_minus_infinity() -> None:
    """(f) Lists that hold all the mass, or a hair more in float32, leave an unlisted
    token a finite upper bound."""
    lp = np.log(np.array([[0.6, 0.40000007]]))
    ids_a, ids_b = np.array([[1, 2]]), np.array([[3, 1]])
    res = _core.step(ids_a, lp, ids_b, np.log(np.array([[0.5, 0.5]])), seed=0, positions=np.array([1]))
    merged = _core.merge_topk(ids_a, lp, ids_b, np.log(np.array([[0.5, 0.5]])))
    assert np.isfinite(merged[1][merged[0] >= 0]).all()
    assert np.isfinite(res.logp_theta).all() and np.isfinite(res.logq).all()


def test_g_chat_messages_are_tokenized_without_added_special_tokens() -> None:
    """(g) vLLM's default for chat is no added special tokens (a BOS tokenizer would
    otherwise give two); the client says so explicitly, to vLLM and SGLang alike."""
    bodies: list[dict] = []

    async def tokenize(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"tokens": [1, 2], "count": 2, "max_model_len": 64})

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/tokenize", tokenize)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            for cls in (VLLMClient, SGLangBackend):
                async with cls(url) as c:
                    await c.tokenize(messages=[{"role": "user", "content": "hi"}])
                    await c.tokenize("hi")
        finally:
            await runner.cleanup()

    asyncio.run(go())
    chats = [b for b in bodies if "messages" in b]
    texts = [b for b in bodies if "prompt" in b]
    assert len(chats) == 2 and all(b["add_special_tokens"] is False and b["add_generation_prompt"] for b in chats)
    assert all(b["add_special_tokens"] is True for b in texts)


def test_h_a_well_formed_reply_lacking_the_asked_fields_is_not_retried() -> None:
    """(h) Retry what can be transient (a torn body), fail at once what cannot."""
    calls = []

    async def completions(request: web.Request) -> web.Response:
        calls.append(1)
        return web.json_response({"choices": [{"index": 0, "logprobs": None}]})

    async def go() -> Exception:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with VLLMClient(f"http://127.0.0.1:{runner.addresses[0][1]}", max_retries=3) as c:
                try:
                    await c.topk([Context([1, 2])], 5)
                except Exception as err:
                    return err
        finally:
            await runner.cleanup()
        raise AssertionError("no error")

    err = asyncio.run(go())
    assert isinstance(err, IncompleteReplyError) and "no top_logprobs" in str(err)
    assert len(calls) == 1


def test_j_a_prompt_that_fills_the_context_says_so() -> None:
    """(j) Not the engine's "max_tokens must be at least 1, got 0"."""
    with running_server("base", max_model_len=16) as a, running_server("teacher", max_model_len=16) as b:
        outs, _ = _run((a, b), [list(range(60, 80)), [72, 105]], [[72, 105], [72, 105]])
    assert "the prompt is 20 tokens" in str(outs[0].error) and "takes 16 in all" in str(outs[0].error)
    assert outs[1].error is None


@pytest.mark.parametrize("dialect", ["vllm-completions", "sglang"])
def test_k_records_hold_the_models_own_log_probabilities(
    dialect: str, urls: tuple[str, str], sglang_pair: tuple[str, str]
) -> None:
    """(k) Where a server listed the token, ``logp_*`` is that model's raw log-softmax
    (the exact rescored value), not the kernel's renormalised one; elsewhere the bound."""
    pair = sglang_pair if dialect == "sglang" else urls
    outs, stats = _run(pair, PLAIN[:6], dialect=dialect, rescore=True, top_k=5)
    assert stats["errors"] == 0
    listed = unlisted = 0
    for o in outs:
        for lp, exact, seen in ((o.logp_theta, o.logp_theta_exact, o.observed_theta), (o.logp_t, o.logp_t_exact,
                                                                                        o.observed_t)):  # fmt: skip
            assert exact is not None
            for v, x, s in zip(lp, exact, seen, strict=True):
                if s:
                    assert abs(v - x) < 1e-9
                    listed += 1
                else:
                    assert np.isfinite(v) and v >= x - 1e-9  # an upper bound
                    unlisted += 1
    assert listed > 50 and unlisted > 0


def test_processed_log_probabilities_are_refused_at_start(urls: tuple[str, str]) -> None:
    """vLLM --logprobs-mode processed_logprobs (with a model's sampling defaults) changes
    the top-k values but not prompt log probabilities: a server whose top-k disagrees
    with its own prompt log probabilities is refused, with the cause."""

    async def shifted(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-request-id")}
        async with ClientSession() as s, s.request(request.method, urls[0] + request.path, data=body or None,
                                                    headers=headers) as r:  # fmt: skip
            data = await r.json()
        for choice in data.get("choices", []) if isinstance(data, dict) else []:
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
            for top in tops:
                for key in list(top or {}):
                    top[key] = top[key] * 0.5  # what a tempered, top-p-cut distribution looks like
        return web.json_response(data, status=r.status)

    async def go() -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", shifted)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            config = CoordinatorConfig(theta_url=f"http://127.0.0.1:{runner.addresses[0][1]}", t_url=urls[1],
                                       dialect="vllm-completions")  # fmt: skip
            try:
                async with DualVLLMCoordinator(config):
                    pass
            except ConfigurationError as err:
                return str(err)
            return "started"
        finally:
            await runner.cleanup()

    said = asyncio.run(go())
    assert "processed log probabilities" in said and "--logprobs-mode" in said
