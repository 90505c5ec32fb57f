"""`dualsample gateway` in front of a real engine pair: its answers against
`dualsample generate`'s records for the same ids and seed, and against the engine's own
numbers (position by position, as `checks` rebuilds records); its control routes
forwarded to the base."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
from dualsample_rs import CoordinatorConfig
from dualsample_rs.gateway import RunningGateway, open_gateway

from . import checks, rebuild
from .checks import PLAIN, QUESTIONS, Engine

SEED = 11
MAX_TOKENS = 12
FIELDS = (("logq", "logq"), ("alpha", "alpha"), ("logp_base", "logp_theta"), ("logp_teacher", "logp_t"))


def generate_records(engine: Engine, dialect: str, lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`dualsample generate` (the command) on `lines`: its records by id."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        done = subprocess.run(
            [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", engine.theta, "--t-url",
             engine.teacher, "--dialect", dialect, "--input", str(inp), "--output", str(out), "--max-tokens",
             str(MAX_TOKENS), "--seed", str(SEED), "--quiet"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    return {r["id"]: r for r in records}


def with_gateway(engine: Engine, dialect: str, body: Callable[[RunningGateway], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        config = CoordinatorConfig(theta_url=engine.theta, t_url=engine.teacher, dialect=dialect, seed=SEED)
        async with open_gateway(config) as gw:
            return await body(gw)

    return asyncio.run(go())


def _same(got: list[float], want: list[float], tol: float, what: str) -> None:
    assert len(got) == len(want), (what, got, want)
    if tol == 0:
        assert got == want, (what, got, want)
    else:
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < tol, (what, got, want)


def check_against_record(answer: dict[str, Any], record: dict[str, Any], tol: float) -> None:
    """An answer (normalised by `_completion`, `_chat` or `_native`) is the record: the
    same tokens and finish, and log q*, α and both models' values equal (within `tol`)."""
    what = record["id"]
    assert answer["token_ids"] == record["token_ids"], (what, answer["token_ids"], record["token_ids"])
    assert answer["finish_reason"] == record["finish_reason"], what
    if "text" in answer:
        assert answer["text"] == record["text"], what
    for got, want in FIELDS:
        _same(answer[got], record[want], tol, f"{what} {got}")
    assert answer["observed_base"] == record["observed_theta"], what
    assert answer["observed_teacher"] == record["observed_t"], what


def check_against_engine(engine: Engine, answer: dict[str, Any], prompt_base: list[int], prompt_t: list[int]) -> int:
    """An answer against the engine's own lists asked one position at a time (see
    `rebuild`), and its text against the engine's detokenizer; the positions checked."""
    ids = answer["token_ids"]
    text_ids = ids[:-1] if answer["finish_reason"] == "stop" else ids
    if "text" in answer:
        assert answer["text"] == engine.detokenize(text_ids)
    return rebuild.check_record(
        ids, prompt_base, prompt_t, answer["alpha"], answer["logq"], answer["logp_base"], answer["logp_teacher"],
        engine.topk("theta", 20), engine.topk("t", 20), tol=1e-4,
    )  # fmt: skip


def _ext(numbers: dict[str, Any], extension: dict[str, Any]) -> dict[str, Any]:
    keep = ("alpha", "logp_base", "logp_teacher", "observed_base", "observed_teacher")
    return numbers | {k: extension[k] for k in keep}


def _completion(choice: Any) -> dict[str, Any]:
    extra = choice.model_extra
    return _ext({"token_ids": extra["token_ids"], "prompt_token_ids": extra["prompt_token_ids"], "text": choice.text,
                 "finish_reason": choice.finish_reason, "logq": choice.logprobs.token_logprobs},
                extra["dualsample"])  # fmt: skip


def _chat(answer: Any) -> dict[str, Any]:
    choice = answer.choices[0]
    extra = choice.model_extra
    return _ext({"token_ids": extra["token_ids"], "prompt_token_ids": answer.model_extra["prompt_token_ids"],
                 "text": choice.message.content or "", "finish_reason": choice.finish_reason,
                 "logq": [x.logprob for x in choice.logprobs.content]}, extra["dualsample"])  # fmt: skip


def _native(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `/inference/v1/generate` or SGLang's `/generate` answer, normalised."""
    if kind == "vllm":
        choice = body["choices"][0]
        ids = choice["token_ids"]
        assert [e["token_id"] for e in choice["logprobs"]["content"]] == ids
        return _ext({"token_ids": ids, "finish_reason": choice["finish_reason"],
                     "logq": [e["logprob"] for e in choice["logprobs"]["content"]]}, choice["dualsample"])  # fmt: skip
    meta = body["meta_info"]
    assert [t[1] for t in meta["output_token_logprobs"]] == body["output_ids"]
    return _ext({"token_ids": body["output_ids"], "finish_reason": meta["finish_reason"]["type"], "text": body["text"],
                 "logq": [t[0] for t in meta["output_token_logprobs"]]}, meta["dualsample"])  # fmt: skip


def check_answers(engine: Engine, dialect: str, tol: float) -> dict[str, int]:
    """Completions (whole and streamed) and chat through the official openai client, and
    the engine's native route, asked of the gateway in front of `engine` at once: each
    answer is `dualsample generate`'s record for its id (numbers within `tol`; 0:
    equal), and the completions and chat answers are rebuilt from the engine's own lists.
    Returns the answers and positions checked."""
    n = len(QUESTIONS)
    base_plain = [checks.tokenize(engine.theta, engine.theta_model, text=p) for p in PLAIN]
    base_chat = [checks.tokenize(engine.theta, engine.theta_model, messages=[{"role": "user", "content": q}])
                 for q in QUESTIONS]  # fmt: skip
    teacher_chat = [checks.tokenize(engine.teacher, engine.teacher_model, messages=[{"role": "user", "content": q}])
                    for q in QUESTIONS]  # fmt: skip
    lines = [{"id": f"plain{i}", "prompt": PLAIN[i], "teacher_prompt": teacher_chat[i]} for i in range(n)]
    lines += [{"id": f"chat{i}", "prompt": base_chat[i], "teacher_prompt": teacher_chat[i]} for i in range(n)]
    records = generate_records(engine, dialect, lines)

    async def body(gw: RunningGateway) -> dict[str, dict[str, Any]]:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=300)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
                return await ask_all(gw, client, http)
        finally:
            await client.close()

    async def ask_all(gw: RunningGateway, client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> Any:
        async def completion(i: int) -> tuple[str, dict[str, Any]]:
            got = await client.completions.create(
                model=engine.theta_model, prompt=PLAIN[i], max_tokens=MAX_TOKENS, logprobs=0, seed=SEED,
                extra_body={"id": f"plain{i}", "teacher_prompt": teacher_chat[i], "return_token_ids": True},
            )  # fmt: skip
            return f"completions plain{i}", _completion(got.choices[0])

        async def streamed(i: int) -> tuple[str, dict[str, Any]]:
            parts: dict[str, Any] = {"token_ids": [], "text": "", "logq": [], "alpha": []}
            finish = None
            async for chunk in await client.completions.create(
                model=engine.theta_model, prompt=PLAIN[i], max_tokens=MAX_TOKENS, logprobs=0, stream=True,
                extra_body={"id": f"plain{i}", "teacher_prompt": teacher_chat[i], "return_token_ids": True},
            ):  # fmt: skip
                for c in chunk.choices:
                    parts["token_ids"] += c.model_extra.get("token_ids") or []
                    parts["text"] += c.text
                    parts["logq"] += c.logprobs.token_logprobs if c.logprobs is not None else []
                    parts["alpha"] += (c.model_extra.get("dualsample") or {}).get("alpha") or []
                    finish = c.finish_reason or finish
            return f"streamed plain{i}", parts | {"finish_reason": finish}

        async def chat(i: int) -> tuple[str, dict[str, Any]]:
            got = await client.chat.completions.create(
                model=engine.theta_model, messages=[{"role": "user", "content": QUESTIONS[i]}],
                max_tokens=MAX_TOKENS, logprobs=True, extra_body={"id": f"chat{i}", "return_token_ids": True},
            )  # fmt: skip
            return f"chat chat{i}", _chat(got)

        async def native(i: int) -> tuple[str, dict[str, Any]]:
            ext = {"id": f"plain{i}", "teacher_prompt": teacher_chat[i]}
            if engine.kind == "vllm":
                path = "/inference/v1/generate"
                req = {"model": engine.theta_model, "token_ids": base_plain[i],
                       "sampling_params": {"max_tokens": MAX_TOKENS, "logprobs": 0}} | ext  # fmt: skip
            else:
                path = "/generate"
                req = {"input_ids": base_plain[i], "return_logprob": True,
                       "sampling_params": {"max_new_tokens": MAX_TOKENS}} | ext  # fmt: skip
            async with http.post(gw.url + path, json=req) as resp:
                assert resp.status == 200, await resp.text()
                return f"native plain{i}", _native(engine.kind, await resp.json())

        asks = [f(i) for i in range(n) for f in (completion, chat, native)] + [streamed(0)]
        got = dict(await asyncio.gather(*asks))
        # The engine's single-token texts concatenate to its decode (a byte-level BPE), so the
        # streamed text was built from pieces, and still equals the record's text (below).
        assert await gw.sampler.additive()
        return got

    answers = with_gateway(engine, dialect, body)
    positions = 0
    for name, answer in answers.items():
        route, key = name.split()
        record = records[key]
        if route == "streamed":
            # the concatenated stream is the whole answer (the numbers the record's)
            assert answer["token_ids"] == record["token_ids"] and answer["text"] == record["text"], name
            assert answer["finish_reason"] == record["finish_reason"], name
            _same(answer["logq"], record["logq"], tol, name)
            _same(answer["alpha"], record["alpha"], tol, name)
            continue
        check_against_record(answer, record, tol)
        i = int(key[-1])
        if route == "completions":
            assert answer["prompt_token_ids"] == base_plain[i], name
            positions += check_against_engine(engine, answer, base_plain[i], teacher_chat[i])
        elif route == "chat":
            # the base's messages in the base's chat template, the teacher's in its own
            assert answer["prompt_token_ids"] == base_chat[i], name
            positions += check_against_engine(engine, answer, base_chat[i], teacher_chat[i])
    return {"answers": len(answers), "positions": positions}


async def forward(gw: RunningGateway, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """A call to the gateway: its status and body text."""
    async with aiohttp.ClientSession() as http, http.request(method, gw.url + path, json=body) as resp:
        return resp.status, await resp.text()


async def held_while_paused(gw: RunningGateway, prompt: list[int], pause: Awaitable[None]) -> asyncio.Task[Any]:
    """After `pause` (a control call through the gateway), a completion sent to the
    gateway waits; the task that will hold its answer."""
    await pause
    assert gw.serving.paused

    async def ask() -> Any:
        req = {"prompt": prompt, "max_tokens": 4, "seed": 1, "return_token_ids": True}
        async with aiohttp.ClientSession() as http, http.post(gw.url + "/v1/completions", json=req) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    waiting = asyncio.ensure_future(ask())
    await asyncio.sleep(1.0)
    assert not waiting.done()  # rounds wait while the base is paused
    return waiting


async def _event_sizes(http: aiohttp.ClientSession, url: str, body: dict[str, Any], cumulative: bool) -> list[int]:
    """The tokens each event of a streamed answer carries (on SGLang's cumulative
    /generate, what each adds), leaving out events that carry none (the start, or an
    end sent apart from the last tokens)."""
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = (await resp.read()).decode()
    sizes, seen = [], 0
    for event in raw.split("\n\n"):
        if not event.startswith("data: {"):
            continue
        got = json.loads(event[len("data: ") :])
        if cumulative:
            count = len(got["output_ids"]) - seen
            seen += count
        else:
            count = sum(len(c.get("token_ids") or ()) for c in got["choices"])
        if count:
            sizes.append(count)
    return sizes


def check_stream_interval(engine: Engine, dialect: str) -> tuple[list[int], list[int]]:
    """A request's stream_interval of 3, sent to the engine and to the gateway in front of
    it (vLLM's /v1/completions, or SGLang's /generate): the engine's events and the
    gateway's both follow the rule the gateway takes from the engines, every event but the
    first and the last carrying at least 3 tokens, and the gateway's are exactly
    1, 3, 3, 3, 1 for 11 tokens. (An engine's own events may carry more: vLLM's server
    merges the steps its HTTP stream has not yet read, so one event can hold them all.)
    The engine's sizes and the gateway's."""
    sglang = dialect == "sglang"
    prompt = checks.tokenize(engine.theta, engine.theta_model, text=PLAIN[0])
    if sglang:
        path = "/generate"
        body: dict[str, Any] = {"input_ids": prompt, "stream": True, "sampling_params": {
            "max_new_tokens": 11, "ignore_eos": True, "stream_interval": 3}}  # fmt: skip
    else:
        path = "/v1/completions"
        body = {"model": engine.theta_model, "prompt": prompt, "max_tokens": 11, "ignore_eos": True, "stream": True,
                "stream_interval": 3, "return_token_ids": True}  # fmt: skip

    async def both(gw: RunningGateway) -> tuple[list[int], list[int]]:
        async with aiohttp.ClientSession() as http:
            own = await _event_sizes(http, engine.theta + path, body, sglang)
            ours = await _event_sizes(http, gw.url + path, body, sglang)
            return own, ours

    own, ours = with_gateway(engine, dialect, both)
    assert sum(own) == 11 and all(size >= 3 for size in own[1:-1]), own
    assert ours == [1, 3, 3, 3, 1], ours
    return own, ours
