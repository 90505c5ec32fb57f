"""The gateway's protocol layer over real sockets, with a fake sampler.

The fake draws from a seeded law over a few byte tokens (EOS = 256), so answers are
reproducible; the base servers are small aiohttp apps that record what reaches them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest
from aiohttp import web
from dualsample_rs.gateway import (
    ChoiceResult,
    GatewayOptions,
    Limits,
    RequestError,
    SampleRequest,
    TokenResult,
    UpstreamError,
    make_app,
)
from dualsample_rs.gateway.sampler import Prompt
from hypothesis import given
from hypothesis import strategies as st

_T = TypeVar("_T")
EOS = 256
VOCAB = 257
CONTEXT = 64
ALPHABET = [*(ord(c) for c in "abcdefgh "), EOS]


def _render(p: Prompt) -> list[int]:
    if p.token_ids is not None:
        return list(p.token_ids)
    if p.text is not None:
        return list(p.text.encode())
    assert p.messages is not None
    return list("".join(f"{m['role']}: {m['content']}\n" for m in p.messages).encode())


class FakeSampler:
    """Deterministic q*: a seeded law over ALPHABET at each step, with the request's
    temperature, top_k and top_p applied, stop strings held back until they cannot match."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.started = 0

    async def tokenize(self, req: SampleRequest) -> list[list[int]]:
        out = []
        param = {"sglang_generate": "input_ids", "vllm_generate": "token_ids", "chat": "messages"}.get(
            req.route, "prompt"
        )
        for p in req.prompts:
            ids = _render(p)
            for t in ids:
                if not 0 <= t < VOCAB:
                    raise RequestError(f"Token id {t} is out of vocabulary", param)
            if not ids:
                raise RequestError("the prompt is empty", param)
            if len(ids) >= CONTEXT:
                raise RequestError(f"This model's maximum context length is {CONTEXT} tokens.", "input_tokens")
            out.append(ids)
        return out

    async def detokenize(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", "replace")

    async def sample(
        self,
        req: SampleRequest,
        choice_index: int,
        prompt_ids: list[int],
        on_token: Callable[[TokenResult], None] | None = None,
    ) -> ChoiceResult:
        self.started += 1
        teacher = req.teacher or ("+".join(sorted(req.teachers)) if req.teachers else "default")
        if teacher == "down":
            raise UpstreamError("http://teacher-down:1", "connection refused")
        seed = req.seed if req.seed is not None else sum(prompt_ids)
        rng = random.Random(f"{seed}/{choice_index % req.n}/{prompt_ids}")
        slow = bytes(t for t in prompt_ids if t < 256).startswith(b"slow")
        limit = CONTEXT - len(prompt_ids) if req.max_tokens is None else min(req.max_tokens, CONTEXT - len(prompt_ids))
        tokens: list[TokenResult] = []
        out, emitted = "", 0
        finish: Any = "length"
        stop_reason: int | str | None = None
        try:
            while len(tokens) < limit:
                await asyncio.sleep(0.05 if slow else 0)
                logits = {t: rng.gauss(0.0, 1.5) for t in ALPHABET}
                temp = 1.0 if req.temperature is None else req.temperature
                ranked = sorted(ALPHABET, key=lambda t: -logits[t])
                if req.top_k is not None:
                    ranked = ranked[: req.top_k]
                scaled = {t: logits[t] / max(temp, 1e-6) for t in ranked}
                z = math.log(sum(math.exp(v) for v in scaled.values()))
                law = {t: scaled[t] - z for t in ranked}
                if req.top_p is not None:
                    kept, mass = [], 0.0
                    for t in ranked:
                        kept.append(t)
                        mass += math.exp(law[t])
                        if mass >= req.top_p:
                            break
                    z2 = math.log(sum(math.exp(law[t]) for t in kept))
                    law = {t: law[t] - z2 for t in kept}
                if temp == 0.0:
                    tok = ranked[0]
                else:
                    u, acc, tok = rng.random(), 0.0, ranked[-1]
                    for t in law:
                        acc += math.exp(law[t])
                        if u < acc:
                            tok = t
                            break
                done = False
                piece = "" if tok == EOS else chr(tok)
                if tok == EOS and not req.ignore_eos and len(tokens) >= req.min_tokens:
                    finish, done = "stop", True
                elif tok in req.stop_token_ids:
                    finish, stop_reason, done = "stop", tok, True
                else:
                    out += piece
                hits = [(out.find(s), s) for s in req.stop if s in out]
                if hits:
                    pos, s = min(hits)
                    out = out[: pos + len(s)] if req.include_stop_str_in_output else out[:pos]
                    finish, stop_reason, done = "stop", s, True
                    safe = len(out)
                elif done:
                    safe = len(out)
                else:
                    hold = max(
                        (k for k in range(1, len(out) + 1) for s in req.stop if s.startswith(out[-k:])), default=0
                    )
                    safe = len(out) - hold
                text = out[emitted:safe] if safe > emitted else ""
                emitted = max(emitted, safe)
                lp = law[tok]
                result = TokenResult(
                    token_id=tok,
                    text=text,
                    logprob=lp,
                    top=tuple(sorted(law.items(), key=lambda kv: -kv[1])),
                    pieces={t: ("" if t == EOS else chr(t)) for t in ALPHABET},
                    alpha=0.25 + 0.5 * rng.random(),
                    logp_base=lp - 0.5,
                    logp_teacher=lp + 0.25,
                    observed_base=True,
                    observed_teacher=len(tokens) % 3 != 2,
                    fallback=len(tokens) % 5 == 4,
                )
                tokens.append(result)
                if on_token is not None:
                    on_token(result)
                if done:
                    break
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ChoiceResult(tuple(tokens), out, finish, stop_reason, teacher)


class Loop:
    """An event loop in a thread, serving aiohttp apps on loopback ports."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        return self.call(start())

    def close(self) -> None:
        for r in self.runners:
            self.call(r.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def fake_base(replica: int, seen: list[tuple[int, str, str, bytes]]) -> web.Application:
    """A base replica: records every request, answers 200, except `/flaky` on replica 1."""

    async def any_route(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((replica, request.method, request.rel_url.path_qs, body))
        if request.path == "/flaky" and replica == 1:
            return web.json_response({"error": "replica 1 refused"}, status=500)
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "base", "object": "model"}]})
        return web.json_response({"replica": replica, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_route)
    return app


class Env:
    def __init__(self) -> None:
        self.loop = Loop()
        self.seen: list[tuple[int, str, str, bytes]] = []
        self.bases = [self.loop.serve(fake_base(k, self.seen)) for k in range(2)]
        self.sampler = FakeSampler()
        opts = GatewayOptions(model_name="fake", limits=Limits(max_n=8), max_concurrent_requests=64)
        self.url = self.loop.serve(
            make_app(self.sampler, self.bases, ["/areal_update_weights", "/flaky"], options=opts)
        )
        self.small_sampler = FakeSampler()
        small = GatewayOptions(max_concurrent_requests=1, max_queued_requests=1, retry_after=2)
        self.small_url = self.loop.serve(make_app(self.small_sampler, self.bases, options=small))
        self.sglang_url = self.loop.serve(make_app(FakeSampler(), [], options=GatewayOptions(flavor="sglang")))
        self.http = httpx.Client(timeout=30)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.http.close()
    e.loop.close()


def post(env: Env, path: str, body: Any, url: str | None = None) -> httpx.Response:
    return env.http.post((url or env.url) + path, json=body)


def sse(resp: httpx.Response) -> list[Any]:
    events = [line[len("data: ") :] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------ the openai client
def test_openai_completions_stream_equals_whole(env: Env) -> None:
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="k")
    args: dict[str, Any] = {
        "model": "m",
        "prompt": ["hi", "yo"],
        "max_tokens": 12,
        "n": 2,
        "logprobs": 2,
        "seed": 7,
        "stop": ["ha"],
        "extra_body": {"return_token_ids": True},
    }
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.usage is not None and whole.usage.prompt_tokens == 4
    assert whole.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in whole.choices)  # type: ignore[union-attr]
    parts: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            p = parts.setdefault(
                c.index, {"text": "", "tokens": [], "lps": [], "tops": [], "finish": None, "alpha": []}
            )
            p["text"] += c.text
            if c.logprobs is not None:
                p["tokens"] += c.logprobs.tokens
                p["lps"] += c.logprobs.token_logprobs
                p["tops"] += c.logprobs.top_logprobs
            p["alpha"] += (c.model_extra or {})["dualsample"]["alpha"]
            p["finish"] = c.finish_reason or p["finish"]
    assert usage == whole.usage
    for c in whole.choices:
        p = parts[c.index]
        assert c.logprobs is not None
        assert (p["text"], p["tokens"], p["lps"], p["tops"], p["finish"]) == (
            c.text,
            c.logprobs.tokens,
            c.logprobs.token_logprobs,
            c.logprobs.top_logprobs,
            c.finish_reason,
        )
        ext = (c.model_extra or {})["dualsample"]
        assert p["alpha"] == ext["alpha"] and len(ext["logp_base"]) == len(c.logprobs.tokens)
        # the sampled token first, then the top 2: two or three entries, the sampled one's value its logprob
        for tok, lp, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs, strict=True):
            assert top[tok] == lp and 2 <= len(top) <= 3
        assert "ha" not in c.text
        assert (c.model_extra or {})["prompt_token_ids"] == list(b"hi" if c.index < 2 else b"yo")


def test_openai_chat_stream_equals_whole(env: Env) -> None:
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="k")
    args: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 10,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "seed": 3,
    }
    whole = client.chat.completions.create(**args)
    texts: dict[int, str] = {}
    lps: dict[int, list[tuple[str, float, int]]] = {}
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            for e in c.logprobs.content if c.logprobs and c.logprobs.content else []:
                lps.setdefault(c.index, []).append((e.token, e.logprob, len(e.top_logprobs)))
    assert len(whole.choices) == 2
    for c in whole.choices:
        assert c.message.content == texts[c.index]
        assert c.logprobs is not None and c.logprobs.content is not None
        assert [(e.token, e.logprob, len(e.top_logprobs)) for e in c.logprobs.content] == lps[c.index]
        assert all(len(e.top_logprobs) == 3 for e in c.logprobs.content)


@pytest.mark.parametrize("seed", range(6))
def test_stream_holds_back_stop_strings(env: Env, seed: int) -> None:
    body = {"prompt": "s", "max_tokens": 30, "seed": seed, "stop": ["a b", "hh"], "temperature": 1.5}
    whole = post(env, "/v1/completions", body).json()["choices"][0]
    chunks = sse(post(env, "/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


# ------------------------------------------------------------------ the frameworks' own bodies
def test_areal_vllm_completions(env: Env) -> None:
    # AReaL, areal/engine/vllm_remote.py (VLLMBackend.build_generation_request / parse_generation_response)
    body = {
        "top_p": 1.0,
        "top_k": int(1e8),
        "max_tokens": 16,
        "temperature": 1.0,
        "stop_token_ids": [ord("h")],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "return_tokens_as_token_ids": True,
        "logprobs": 0,
        "use_beam_search": False,
        "stream": False,
        "prompt": [104, 105],
    }
    resp = post(env, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    meta = resp.json()["choices"][0]
    tokens = [int(t.split(":")[1]) for t in meta["logprobs"]["tokens"]]
    logprobs = meta["logprobs"]["token_logprobs"]
    assert len(tokens) == len(logprobs) == resp.json()["usage"]["completion_tokens"] > 0
    assert all(t in ALPHABET for t in tokens) and all(lp <= 0 for lp in logprobs)
    assert meta["finish_reason"] in ("stop", "length")
    if meta["finish_reason"] == "stop" and meta["stop_reason"] is not None:
        assert tokens[-1] == ord("h")


def test_areal_vllm_chat(env: Env) -> None:
    # AReaL, areal/engine/vllm_remote.py: messages, logprobs true, tokens as "token_id:N" in logprobs.content
    body = {
        "top_p": 1.0,
        "top_k": int(1e8),
        "max_tokens": 8,
        "temperature": 1.0,
        "stop_token_ids": [],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "return_tokens_as_token_ids": True,
        "logprobs": True,
        "use_beam_search": False,
        "stream": False,
        "messages": [{"role": "user", "content": "2+2?"}],
    }
    meta = post(env, "/v1/chat/completions", body).json()["choices"][0]
    outputs = meta["logprobs"]["content"]
    tokens = [int(t["token"].split(":")[1]) for t in outputs]
    assert tokens and all(t in ALPHABET for t in tokens)
    assert [t["logprob"] for t in outputs] == [t["logprob"] for t in outputs if t["logprob"] <= 0]


def test_areal_and_slime_sglang_generate(env: Env) -> None:
    # AReaL, areal/engine/sglang_remote.py (build_generation_request / parse_generation_response)
    areal = {
        "input_ids": [1, 2, 3],
        "image_data": None,
        "return_logprob": True,
        "stream": False,
        "sampling_params": {
            "top_p": 1.0,
            "top_k": int(1e8),
            "max_new_tokens": 9,
            "temperature": 1.0,
            "stop_token_ids": [],
            "ignore_eos": False,
            "skip_special_tokens": True,
            "frequency_penalty": 0.0,
        },
    }
    # slime, slime/rollout/sglang_rollout.py (GenerateState.sampling_params, generate)
    slime = {
        "input_ids": [4, 5],
        "return_logprob": True,
        "sampling_params": {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": 9,
            "stop": None,
            "stop_token_ids": None,
            "skip_special_tokens": True,
            "no_stop_trim": True,
            "spaces_between_special_tokens": False,
            "sampling_seed": 11,
        },
    }
    for body in (areal, slime):
        resp = post(env, "/generate", body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        meta = out["meta_info"]
        tokens = [x[1] for x in meta["output_token_logprobs"]]
        logprobs = [x[0] for x in meta["output_token_logprobs"]]
        assert tokens == out["output_ids"] and len(logprobs) == meta["completion_tokens"] > 0
        assert meta["finish_reason"]["type"] in ("stop", "length", "abort")
        assert meta["prompt_tokens"] == len(body["input_ids"]) and meta["cached_tokens"] == 0
        assert isinstance(out["text"], str)
        assert len(meta["dualsample"]["alpha"]) == len(tokens)
    # a batch answers a list, one item per prompt
    batch = post(env, "/generate", {**slime, "input_ids": [[4, 5], [6]]}).json()
    assert isinstance(batch, list) and [b["meta_info"]["prompt_tokens"] for b in batch] == [2, 1]


def test_rllm_gateway_fields(env: Env) -> None:
    # rLLM, rllm-model-gateway/src/rllm_model_gateway/middleware.py adds logprobs/return_token_ids;
    # data_process.py reads prompt_token_ids (top level, or choices[0]), choices[0].token_ids, logprobs
    chat = post(
        env,
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "logprobs": True,
            "return_token_ids": True,
        },
    ).json()
    assert chat["prompt_token_ids"] == list(b"user: hi\n")
    c = chat["choices"][0]
    assert len(c["token_ids"]) == len([e["logprob"] for e in c["logprobs"]["content"]]) > 0
    comp = post(
        env,
        "/v1/completions",
        {"model": "m", "prompt": "hi", "max_tokens": 6, "logprobs": True, "return_token_ids": True},
    ).json()
    c = comp["choices"][0]
    assert c["prompt_token_ids"] == list(b"hi") and len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"])
    assert all(len(top) in (1, 2) for top in c["logprobs"]["top_logprobs"])  # `true` reads as 1
    # streamed: prompt_token_ids from the first chunk, token_ids and logprobs deltas from each
    chunks = sse(
        post(
            env,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 6,
                "logprobs": True,
                "return_token_ids": True,
                "stream": True,
                "seed": 1,
            },
        )
    )
    assert chunks[0]["prompt_token_ids"] == list(b"user: hi\n")
    ids = [t for ch in chunks for c in ch["choices"] for t in c.get("token_ids") or []]
    lps = [e["logprob"] for ch in chunks for c in ch["choices"] for e in ((c["logprobs"] or {}).get("content") or [])]
    assert len(ids) == len(lps) > 0


def test_prime_rl_and_skyrl(env: Env) -> None:
    # prime-rl, src/prime_rl/orchestrator/utils.py (before 1a1a3961): logprobs true, extra_body top_k -1,
    # min_p 0.0, return_token_ids true
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "logprobs": True,
        "top_k": -1,
        "min_p": 0.0,
        "return_token_ids": True,
        "cache_salt": "7",
    }
    c = post(env, "/v1/chat/completions", body).json()["choices"][0]
    assert len(c["token_ids"]) == len(c["logprobs"]["content"]) > 0
    # SkyRL, skyrl/backends/skyrl_train/inference_servers/remote_inference_client.py (_generate_single) with
    # engine_utils.get_vllm_sampling_params
    sky = {
        "model": "m",
        "token_ids": [7, 8, 9],
        "cache_salt": "3",
        "sampling_params": {
            "min_tokens": 1,
            "skip_special_tokens": True,
            "include_stop_str_in_output": True,
            "max_tokens": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "logprobs": 0,
            "stop": None,
            "n": 1,
        },
    }
    resp = post(env, "/inference/v1/generate", sky)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    response_logprobs = [info["logprob"] for info in choice["logprobs"]["content"]]
    assert len(choice["token_ids"]) == len(response_logprobs) > 0 and choice["finish_reason"] in ("stop", "length")
    # the Tinker path: n samples, every choice read
    tinker = {
        "model": "m",
        "token_ids": [7, 8],
        "sampling_params": {"n": 3, "logprobs": 0, "output_kind": 2, "max_tokens": 4, "seed": 5},
    }
    out = post(env, "/inference/v1/generate", tinker).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and all(c["token_ids"] for c in out["choices"])


def test_seed_fixes_the_tokens_whatever_else_is_asked(env: Env) -> None:
    body = {"prompt": "ab", "max_tokens": 10, "seed": 42}
    a = post(env, "/v1/completions", body).json()["choices"][0]
    b = post(env, "/v1/completions", {**body, "n": 3, "logprobs": 4}).json()["choices"][0]
    assert a["text"] == b["text"] and a["dualsample"] == b["dualsample"]


# ------------------------------------------------------------------ bad input
VLLM_BAD = [
    ("/v1/completions", b"{", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, -1]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, "prompt"),
    ("/v1/completions", {"prompt": [[1], "x", 3]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 100}, "input_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.1}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "teacher": "a", "teachers": {"a": 1}}, "teachers"),
    ("/v1/completions", {"prompt": "x", "teacher_prompt": ["a", "b"]}, "teacher_prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ("/inference/v1/generate", {"token_ids": []}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"max_tokens": -1}}, "sampling_params.max_tokens"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": []}, "sampling_params"),
]


@pytest.mark.parametrize(("path", "body", "param"), VLLM_BAD)
def test_bad_input_is_a_vllm_400_naming_the_field(env: Env, path: str, body: Any, param: str | None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = env.http.post(env.url + path, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError" and err["param"] == param


SGLANG_BAD = [
    ({"input_ids": []}, "input_ids"),
    ({"sampling_params": {}}, "input_ids"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"text": "x", "return_logprob": True, "top_logprobs_num": 50}, "top_logprobs_num"),
    ({"text": "x", "sampling_params": {"frequency_penalty": 0.3}}, "frequency_penalty"),
    ({"text": "x", "logprob_start_len": 0}, "logprob_start_len"),
    ({"text": "x", "image_data": "abc"}, "image_data"),
]


@pytest.mark.parametrize(("body", "field"), SGLANG_BAD)
def test_bad_input_is_an_sglang_400_naming_the_field(env: Env, body: Any, field: str) -> None:
    resp = post(env, "/generate", body)
    assert resp.status_code == 400, resp.text
    assert list(resp.json()) == ["error"] and field in resp.json()["error"]["message"]


def test_sglang_flavor_answers_flat_errors(env: Env) -> None:
    resp = post(env, "/v1/completions", {"prompt": "x", "n": 0}, url=env.sglang_url)
    assert resp.status_code == 400
    assert resp.json()["object"] == "error" and resp.json()["param"] == "n"


def test_a_server_down_fails_its_request_with_a_503_naming_it(env: Env) -> None:
    resp = post(env, "/v1/completions", {"prompt": "x", "teacher": "down"})
    assert resp.status_code == 503 and "teacher-down" in resp.json()["error"]["message"]
    assert post(env, "/v1/completions", {"prompt": "x"}).status_code == 200


# ------------------------------------------------------------------ forwarding, limits, disconnects
def test_engine_routes_reach_every_base_replica(env: Env) -> None:
    env.seen.clear()
    for path in ("/update_weights_from_disk?x=1", "/pause", "/areal_update_weights"):
        resp = env.http.post(env.url + path, json={"model_path": "/ckpt"})
        assert resp.status_code == 200 and resp.json()["replica"] == 0
        hits = sorted((r, m, q, b) for r, m, q, b in env.seen if q == path)
        assert [(r, m) for r, m, _, _ in hits] == [(0, "POST"), (1, "POST")]
        assert all(json.loads(b) == {"model_path": "/ckpt"} for *_, b in hits)
    assert env.http.get(env.url + "/flush_cache").status_code == 200
    # the first error wins
    resp = env.http.post(env.url + "/flaky", json={})
    assert resp.status_code == 500 and resp.json() == {"error": "replica 1 refused"}
    # informational routes go to the first replica only
    env.seen.clear()
    assert env.http.get(env.url + "/v1/models").json()["data"][0]["id"] == "base"
    assert [r for r, *_ in env.seen] == [0]


def test_queue_limit_answers_503_with_retry_after(env: Env) -> None:
    body = {"prompt": "slow", "max_tokens": 6, "ignore_eos": True}
    results: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(timeout=30) as c:
            results.append(c.post(env.small_url + "/v1/completions", json=body))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 503]
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["Retry-After"] == "2" and busy.json()["error"]["type"] == "ServiceUnavailableError"


def _wait(cond: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_disconnect_cancels_sampling(env: Env) -> None:
    before = env.sampler.cancelled
    # streamed: read one event, then leave
    with (
        httpx.Client(timeout=30) as c,
        c.stream(
            "POST",
            env.url + "/v1/completions",
            json={"prompt": "slow", "max_tokens": 50, "n": 2, "stream": True, "ignore_eos": True},
        ) as r,
    ):
        next(r.iter_lines())
    assert _wait(lambda: env.sampler.cancelled == before + 2)
    # whole: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as c:
        c.post(env.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 50, "ignore_eos": True})
    assert _wait(lambda: env.sampler.cancelled == before + 3)
    metrics = env.http.get(env.url + "/metrics").text
    assert _wait(lambda: "dualsample_gateway_sequences_in_flight 0.0" in env.http.get(env.url + "/metrics").text)
    assert "dualsample_gateway_cancelled_sequences_total" in metrics
    # Both requests are counted as the client's leaving (499), neither as answered.
    assert _wait(lambda: 'route="completions",status="499"} 2.0' in env.http.get(env.url + "/metrics").text)


def test_metrics(env: Env) -> None:
    post(env, "/v1/completions", {"prompt": "x", "max_tokens": 5, "seed": 1})
    assert env.http.get(env.url + "/v1/models").status_code == 200  # a call the base answers
    text = env.http.get(env.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["dualsample_gateway_generated_tokens_total"] > 0
    assert values["dualsample_gateway_alpha_count"] == values["dualsample_gateway_generated_tokens_total"]
    assert 0.25 <= values["dualsample_gateway_alpha_sum"] / values["dualsample_gateway_alpha_count"] <= 0.75
    assert values['dualsample_gateway_requests_total{route="completions",status="200"}'] >= 1
    assert any(k.startswith("dualsample_gateway_upstream_seconds_count{server=") for k in values)


# ------------------------------------------------------------------ the fuzzer
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
KEYS = [
    "prompt",
    "messages",
    "token_ids",
    "input_ids",
    "text",
    "sampling_params",
    "max_tokens",
    "max_new_tokens",
    "n",
    "logprobs",
    "top_logprobs",
    "top_logprobs_num",
    "return_logprob",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "echo",
    "stream",
    "stream_options",
    "teacher",
    "teachers",
    "teacher_prompt",
    "teacher_messages",
    "id",
    "rid",
    "return_token_ids",
    "ignore_eos",
    "min_tokens",
]
SMALL = st.one_of(
    st.integers(-3, 40),
    st.lists(st.integers(-2, 300), max_size=5),
    st.sampled_from(["ab", "", "slo"]),
    st.fixed_dictionaries(
        {},
        optional={
            "max_new_tokens": st.integers(-1, 20),
            "n": st.integers(-1, 3),
            "max_tokens": st.integers(-1, 20),
            "temperature": st.floats(-1, 3),
        },
    ),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", 3]), "content": st.sampled_from(["hi", None, 4])}),
        max_size=2,
    ),
    JSON,
)
BODIES = st.one_of(JSON, st.fixed_dictionaries({}, optional={k: SMALL for k in KEYS}))


@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/inference/v1/generate", "/generate"]),
    body=BODIES,
    raw=st.none() | st.binary(max_size=40),
)
def test_fuzzed_bodies_never_fail_the_gateway(env: Env, path: str, body: Any, raw: bytes | None) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    resp = env.http.post(env.url + path, content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert "error" in resp.json()
    elif isinstance(body, dict) and body.get("stream") is True and raw is None:
        sse(resp)
    assert post(env, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------ faults inside the gateway
class FailingSampler(FakeSampler):
    """Draws `after` tokens, then fails with `error`."""

    def __init__(self, after: int, error: BaseException) -> None:
        super().__init__()
        self.after, self.error = after, error

    async def sample(
        self,
        req: SampleRequest,
        choice_index: int,
        prompt_ids: list[int],
        on_token: Callable[[TokenResult], None] | None = None,
    ) -> ChoiceResult:
        for _ in range(self.after):
            await asyncio.sleep(0)
            if on_token is not None:
                on_token(TokenResult(token_id=ord("a"), text="a", logprob=-1.0))
        raise self.error


def test_a_bug_in_the_sampler_is_an_engine_shaped_500_and_the_gateway_serves_on(env: Env) -> None:
    url = env.loop.serve(make_app(FailingSampler(0, RuntimeError("boom")), env.bases))
    resp = post(env, "/v1/completions", {"prompt": "hi", "max_tokens": 3}, url)
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["type"] == "InternalServerError" and err["code"] == 500 and "boom" not in err["message"]
    resp = post(env, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}, url)
    assert resp.status_code == 500 and resp.json() == {"error": {"message": "Internal server error"}}
    assert post(env, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("error", "message"),
    [(RuntimeError("boom"), "Internal server error"), (UpstreamError("http://t:1", "refused"), "http://t:1")],
)
def test_a_choice_failing_mid_stream_ends_the_stream_with_an_error_event(
    env: Env, error: BaseException, message: str
) -> None:
    url = env.loop.serve(make_app(FailingSampler(2, error), env.bases))
    resp = post(env, "/v1/completions", {"prompt": "hi", "max_tokens": 9, "stream": True}, url)
    assert resp.status_code == 200  # the stream had begun
    events = sse(resp)  # and ends with [DONE]
    texts = [c["choices"][0]["text"] for c in events if c.get("choices")]
    assert "".join(texts) == "aa"  # the two tokens drawn before the failure went out
    assert message in events[-1]["error"]["message"]


def test_an_oversized_body_is_a_413_in_the_engine_shape(env: Env) -> None:
    url = env.loop.serve(make_app(FakeSampler(), env.bases, options=GatewayOptions(client_max_size=1000)))
    resp = post(env, "/v1/completions", {"prompt": "x" * 2000, "max_tokens": 1}, url)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == 413
    assert post(env, "/v1/completions", {"prompt": "x" * 40, "max_tokens": 1}, url).status_code == 200


def test_an_unreachable_replica_on_a_forwarded_route_is_a_503_naming_it(env: Env) -> None:
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    url = env.loop.serve(make_app(FakeSampler(), [env.bases[0], dead]))
    resp = env.http.post(url + "/pause")
    assert resp.status_code == 503
    assert dead in resp.json()["error"]["message"]
    # A route answered by the first replica alone still works.
    assert env.http.get(url + "/v1/models").status_code == 200


def test_answers_json_has_numbers_where_numpy_or_infinities_were() -> None:
    """The answers' encoder takes numpy scalars as the numbers they hold, and an
    infinite log probability reaches it as vLLM's -9999.0 (orjson would write an
    infinity as null)."""
    import numpy as np
    from dualsample_rs.gateway.response import completion_logprobs, dumps, extension
    from dualsample_rs.gateway.sampler import SampleRequest, TokenResult

    assert json.loads(dumps({"a": np.float64(0.25), "b": np.int64(3), "c": [np.float32(0.5)]})) == {
        "a": 0.25, "b": 3, "c": [0.5]}  # fmt: skip
    with pytest.raises(TypeError):
        dumps({"a": object()})
    tok = TokenResult(token_id=5, text="x", logprob=float("-inf"), top=((5, float("-inf")), (6, -1.0)), pieces={},
                      alpha=0.5, logp_base=float("-inf"), logp_teacher=None, observed_base=True,
                      observed_teacher=False, fallback=False)  # fmt: skip
    req = SampleRequest(route="completions", prompts=(Prompt(token_ids=(1,)),), logprobs=2, tokens_as_ids=True)
    body = json.loads(dumps({"logprobs": completion_logprobs(req, [tok]), "ext": extension([tok], None)}))
    assert body["logprobs"]["token_logprobs"] == [-9999.0]
    assert body["logprobs"]["top_logprobs"] == [{"token_id:5": -9999.0, "token_id:6": -1.0}]
    assert body["ext"]["logp_base"] == [-9999.0] and body["ext"]["logp_teacher"] == [None]
