"""`/v1/completions` as vLLM 0.33 answers it: request checks, generation, response body.

Log probabilities are raw (vLLM's default ``raw_logprobs`` mode): the log-softmax of the
model before temperature; temperature only shapes the server's own sample.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import APIError, bad_request, valid_text
from .model import Model

MAX_PROMPTS = 1024
NEG_INF_WIRE = -9999.0  # vLLM sends -inf as this
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's cap on ids scored per request
# Caps on one request's work. vLLM caps `n` (VLLM_MAX_N_SEQUENCES); this server also caps
# the tokens one request may generate, so no request can run for hours.
MAX_N = 16384
MAX_REQUEST_TOKENS = 1_000_000
INT64 = (-(2**63), 2**63 - 1)


def _field(body: dict[str, Any], name: str, default: Any, kind: str, ok: Any) -> Any:
    """`body[name]` (None or absent: `default`), refused with pydantic's message unless `ok`."""
    value = body.get(name, default)
    if value is None:
        return default
    if not ok(value):
        raise bad_request(f"1 validation error for CompletionRequest\n{name}\n  Input should be a valid {kind}", name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, minimum: int | None = None) -> int | None:
    value: int | None = _field(body, name, default, "integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
    if value is not None and minimum is not None and value < minimum:
        raise bad_request(f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _float(body: dict[str, Any], name: str, default: float | None) -> float | None:
    value = _field(body, name, default, "number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    return None if value is None else float(value)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    return bool(_field(body, name, default, "boolean", lambda v: isinstance(v, bool)))


@dataclass
class Request:
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    seed: int | None
    n: int
    logprobs: int | None
    prompt_logprobs: int | None
    echo: bool
    ids_as_keys: bool
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    skip_special_tokens: bool
    model: str
    # ids whose log probabilities replace the top-k at each generated position
    logprob_token_ids: list[int] | None = None
    stream: bool = False
    # prompt tokens the prefix cache served, per prompt (set by the server), and whether
    # to report them (vLLM's --enable-prompt-tokens-details)
    cached_tokens: list[int] = field(default_factory=list)
    report_cached: bool = False
    # vLLM trace replay: the tokens to decode, in place of sampling
    trace: list[int] | None = None
    # the caller's request id (vLLM: the X-Request-Id header, or the generate route's
    # request_id), echoed in the reply's id
    request_id: str | None = None


def _prompts(body: dict[str, Any], model: Model) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list):
        items = prompt
    else:
        raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"At most {MAX_PROMPTS} prompts are allowed per request, got {len(items)}.", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
            ids = model.tokenize(valid_text(item, "prompt"))
        elif isinstance(item, list) and item and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            ids = list(item)
        else:
            raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")
        validate_prompt(ids, model)
        out.append(ids)
    return out


def validate_prompt(ids: list[int], model: Model, param: str = "prompt") -> None:
    """vLLM's checks of a prompt's ids: in the vocabulary, and room for one more token."""
    for t in ids:
        if t < 0 or t >= model.vocab_size:
            raise bad_request(f"Token id {t} is out of vocabulary", param)
    if len(ids) > model.max_model_len:
        raise bad_request(
            f"This model's maximum context length is {model.max_model_len} tokens. However, your prompt "
            f"contains {len(ids)} input tokens. Please reduce the length of the input prompt.",
            "input_tokens",
        )
    if len(ids) == model.max_model_len:
        raise bad_request("max_tokens must be at least 1, got 0.", "max_tokens")


def logprob_count(body: dict[str, Any], name: str, cap: int, kind: str) -> int | None:
    value = _int(body, name, None)
    if value is None:
        return None
    if value < -1:
        raise bad_request(f"`{name}` must be a positive value or -1.", name)
    if value == -1 and cap != -1:
        raise bad_request(
            f"Requested {kind} logprobs of -1, which is greater than max allowed: {cap} (parameter={name}, value=-1)",
            name,
        )
    if cap != -1 and value > cap:
        raise bad_request(
            f"Requested {kind} logprobs of {value}, which is greater than max allowed: {cap} "
            f"(parameter={name}, value={value})",
            name,
        )
    return value


def check_body(body: Any, model: Model, kind: str) -> None:
    """A body is an object, and the model it names (if any) is the one served."""
    if not isinstance(body, dict):
        raise bad_request(f"1 validation error for {kind}\n  Input should be a valid dictionary")
    name = body.get("model")
    if name is not None and name != model.name:
        raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")


def parse(body: Any, model: Model, max_logprobs: int) -> Request:
    """Check a request body the way vLLM does (unknown fields are ignored)."""
    check_body(body, model, "CompletionRequest")
    prompts = _prompts(body, model)
    temperature = _float(body, "temperature", 1.0)
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {temperature}.", "temperature")
    n = _int(body, "n", 1, minimum=1)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("stop must be a string or a list of strings", "stop")
    if any(s == "" for s in stop):
        raise bad_request("stop cannot contain an empty string.", "stop")
    for s_ in stop:
        valid_text(s_, "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise bad_request("stop_token_ids must be a list of integers", "stop_token_ids")
    echo = _bool(body, "echo", False)
    logprobs = logprob_count(body, "logprobs", max_logprobs, "sample")
    prompt_logprobs = logprob_count(body, "prompt_logprobs", max_logprobs, "prompt")
    if echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs
    seed = _int(body, "seed", None)
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise bad_request(
            "1 validation error for CompletionRequest\nseed\n  Input should be within the int64 range", "seed"
        )
    if n is not None and n > MAX_N:
        raise bad_request(
            f"n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
            "environment variable.",
            "n",
        )
    max_tokens = _int(body, "max_tokens", 16, minimum=1) or 16
    if (n or 1) * max_tokens * len(prompts) > MAX_REQUEST_TOKENS:
        raise bad_request(
            f"this request asks for up to {(n or 1) * max_tokens * len(prompts)} generated tokens (prompts × n × "
            f"max_tokens); this server allows {MAX_REQUEST_TOKENS} per request",
            "max_tokens",
        )
    score_ids = logprob_token_ids(body.get("logprob_token_ids"), model)
    if score_ids is not None and logprobs is None:
        raise bad_request("logprob_token_ids requires logprobs to be set.", "logprob_token_ids")
    if score_ids is not None and prompt_logprobs is not None:
        raise bad_request("logprob_token_ids cannot be used with prompt logprobs.", "logprob_token_ids")
    stream = _bool(body, "stream", False)
    if stream and prompt_logprobs is not None:
        raise bad_request("Prompt logprobs are not supported when stream is enabled.", "prompt_logprobs")
    return Request(
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        seed=seed,
        n=n or 1,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        ids_as_keys=_bool(body, "return_tokens_as_token_ids", False),
        stop=stop,
        stop_token_ids=list(stop_ids),
        ignore_eos=_bool(body, "ignore_eos", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        model=model.name,
        logprob_token_ids=score_ids,
        stream=stream,
    )


def logprob_token_ids(value: Any, model: Model) -> list[int] | None:
    """vLLM's checks of ``logprob_token_ids``: a list of at most 128 ids in the vocabulary."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request("logprob_token_ids must be a list of integers", "logprob_token_ids")
    if len(value) > MAX_LOGPROB_TOKEN_IDS:
        raise bad_request(
            f"Requested logprob_token_ids of length {len(value)}, which is greater than max allowed: "
            f"{MAX_LOGPROB_TOKEN_IDS}",
            "logprob_token_ids",
        )
    for t in value:
        if not 0 <= t < model.vocab_size:
            raise bad_request(f"Token id {t} in logprob_token_ids is out of vocabulary", "logprob_token_ids")
    return value


@dataclass
class Sequence:
    prompt: list[int]
    max_tokens: int
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""


def _sample(lp: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0.0:
        return int(np.argmax(lp))  # ties go to the lowest id
    x = lp / temperature
    p = np.exp(x - x.max())
    cum = np.cumsum(p)
    return int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))


class Stopped(Exception):
    """The server is shutting down: generation was abandoned mid-request."""


def generate(req: Request, model: Model, stopping: Any = None) -> list[Sequence]:
    """Run every (prompt, sample) to a stop condition, one batched model call per step.
    `stopping` (a `threading.Event`) abandons the work when set."""
    seqs = []
    for prompt in req.prompts:
        for j in range(req.n):
            # A negative seed is valid (int64): its two's complement seeds the generator.
            rng = np.random.default_rng([req.seed % 2**64, j] if req.seed is not None else None)
            limit = req.max_tokens if req.trace is None else min(req.max_tokens, len(req.trace))
            seqs.append(Sequence(prompt, min(limit, model.max_model_len - len(prompt)), rng))
    active = [s for s in seqs if s.max_tokens > 0]
    want = req.logprobs is not None
    while active:
        if stopping is not None and stopping.is_set():
            raise Stopped
        lps = model.next_logprobs([s.prompt + s.tokens for s in active])
        still = []
        for s, lp in zip(active, lps, strict=True):
            # A replayed trace is followed whatever the model prefers, and no stop ends it.
            tok = req.trace[len(s.tokens)] if req.trace is not None else _sample(lp, req.temperature, s.rng)
            s.tokens.append(tok)
            if want:
                s.logprobs.append(lp)
            if req.trace is not None:
                if len(s.tokens) >= s.max_tokens:
                    s.finish_reason = "length"
            elif tok == model.eos_token_id and not req.ignore_eos:
                s.finish_reason, s.stop_reason = "stop", None
            elif tok in req.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
            elif req.stop and _stop_string(s, req, model):
                pass
            elif len(s.tokens) >= s.max_tokens:
                s.finish_reason = "length"
            if s.finish_reason is None:
                still.append(s)
        active = still
    for s in seqs:
        if not s.text:
            s.text = model.detokenize(s.tokens, req.skip_special_tokens)
    return seqs


def _stop_string(s: Sequence, req: Request, model: Model) -> bool:
    text = model.detokenize(s.tokens, req.skip_special_tokens)
    hits = [(text.find(stop), stop) for stop in req.stop if stop in text]
    if not hits:
        return False
    pos, stop = min(hits)
    s.text, s.finish_reason, s.stop_reason = text[:pos], "stop", stop
    return True


def _key(model: Model, token: int, ids_as_keys: bool) -> str:
    return f"token_id:{token}" if ids_as_keys else model.token_text(token)


def wire(x: float) -> float:
    x = float(x)  # math on a Python float: np.isfinite on a numpy scalar is slow per entry
    return x if math.isfinite(x) else NEG_INF_WIRE


def entry_ids(lp: np.ndarray, sampled: int, k: int, score_ids: list[int] | None) -> list[int]:
    """The ids reported at a generated position, in vLLM's order: the sampled token first,
    then the given ids when scoring, else the top k (each id once)."""
    rest = score_ids if score_ids is not None else [int(t) for t in top_ids(lp, k)]
    return list(dict.fromkeys([sampled, *rest]))


def top_ids(lp: np.ndarray, k: int) -> np.ndarray:
    """The k most probable ids, most probable first, ties to the lower id."""
    if k < 0 or k >= lp.size:
        return np.argsort(-lp, kind="stable")
    part = np.argpartition(-lp, k - 1)[:k] if k > 0 else np.empty(0, dtype=np.int64)
    return part[np.lexsort((part, -lp[part]))]


def _top_logprobs(model: Model, lp: np.ndarray, sampled: int, req: Request) -> dict[str, float]:
    """The sampled token first, then the top k: k entries if it is among them, else k+1
    (or the ``logprob_token_ids``). Text keys that collide keep one entry, as in vLLM."""
    assert req.logprobs is not None
    return {
        _key(model, t, req.ids_as_keys): wire(lp[t])
        for t in entry_ids(lp, sampled, req.logprobs, req.logprob_token_ids)
    }


def prompt_logprob_entries(model: Model, prompt: list[int], k: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = [None]
    if len(prompt) < 2:
        return out
    lps = model.next_logprobs([prompt[:i] for i in range(1, len(prompt))])
    for i, lp in enumerate(lps, start=1):
        actual = prompt[i]
        ranks = np.argsort(-lp, kind="stable")
        rank_of = {int(t): r + 1 for r, t in enumerate(ranks)}
        entry = {
            str(actual): {
                "logprob": wire(lp[actual]),
                "rank": rank_of[actual],
                "decoded_token": model.token_text(actual),
            }
        }
        for t in top_ids(lp, k):
            t = int(t)
            entry[str(t)] = {"logprob": wire(lp[t]), "rank": rank_of[t], "decoded_token": model.token_text(t)}
        out.append(entry)
    return out


def respond(req: Request, model: Model, seqs: list[Sequence]) -> dict[str, Any]:
    """The response body, choices in prompt order with flat indices."""
    choices = []
    # One forward pass per prompt position: shared by echo, prompt_logprobs and the n
    # samples of a prompt (which share its token list).
    cache: dict[tuple[int, int], list[dict[str, Any] | None]] = {}

    def prompt_logprobs(prompt: list[int], k: int) -> list[dict[str, Any] | None]:
        key = (id(prompt), k)
        if key not in cache:
            cache[key] = prompt_logprob_entries(model, prompt, k)
        return cache[key]

    for index, s in enumerate(seqs):
        text = s.text
        logprobs = None
        if req.echo:
            text = model.detokenize(s.prompt, req.skip_special_tokens) + text
        if req.logprobs is not None:
            tokens, token_lps, tops, offsets = [], [], [], []
            if req.echo:
                plp = prompt_logprobs(s.prompt, req.logprobs)
                for t, e in zip(s.prompt, plp, strict=True):
                    tokens.append(_key(model, t, req.ids_as_keys))
                    token_lps.append(None if e is None else e[str(t)]["logprob"])
                    tops.append(
                        None
                        if e is None
                        else {_key(model, int(i), req.ids_as_keys): v["logprob"] for i, v in e.items()}
                    )
            for t, lp in zip(s.tokens, s.logprobs, strict=True):
                tokens.append(_key(model, t, req.ids_as_keys))
                token_lps.append(wire(lp[t]))
                tops.append(_top_logprobs(model, lp, t, req))
            pos = 0
            for tok in tokens:
                offsets.append(pos)
                pos += len(tok)
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "text_offset": offsets, "top_logprobs": tops}
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": s.finish_reason,
                "stop_reason": s.stop_reason,
                "prompt_logprobs": (
                    prompt_logprobs(s.prompt, req.prompt_logprobs) if req.prompt_logprobs is not None else None
                ),
            }
        )
    prompt_tokens = sum(len(p) for p in req.prompts)
    completion_tokens = sum(len(s.tokens) for s in seqs)
    return {
        "id": f"cmpl-{req.request_id or uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage(req, prompt_tokens, completion_tokens),
    }


def usage(req: Request, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """vLLM's usage block; with prompt token details, the cached tokens of the last prompt."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if req.report_cached and req.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": req.cached_tokens[-1]}
    return out


def stream_chunks(req: Request, model: Model, seqs: list[Sequence]) -> list[dict[str, Any]]:
    """The server-sent events of a streamed response, as vLLM sends them: one chunk per
    generated token of each choice (text delta, and its log probabilities when asked),
    then one with the finish reason. The text deltas add up to the whole text."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    chunks: list[dict[str, Any]] = []

    def chunk(index: int, text: str, finish: str | None, stop: Any, logprobs: Any) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice]}

    for index, s in enumerate(seqs):
        sent = ""
        lps: list[Any] = s.logprobs if s.logprobs else [None] * len(s.tokens)
        for i, (tok, lp) in enumerate(zip(s.tokens, lps, strict=True)):
            so_far = model.detokenize(s.tokens[: i + 1], req.skip_special_tokens)
            text = s.text if i == len(s.tokens) - 1 else so_far
            delta = "" if text.endswith("\ufffd") and i < len(s.tokens) - 1 else text[len(sent) :]
            sent += delta
            logprobs = None
            if req.logprobs is not None and lp is not None:
                key = _key(model, tok, req.ids_as_keys)
                logprobs = {"tokens": [key], "token_logprobs": [wire(lp[tok])], "text_offset": [0],
                            "top_logprobs": [_top_logprobs(model, lp, tok, req)]}  # fmt: skip
            chunks.append(chunk(index, delta, None, None, logprobs))
        chunks.append(chunk(index, "", s.finish_reason, s.stop_reason, None))
    return chunks
