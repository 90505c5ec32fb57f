"""Each route's answer, whole or streamed, from the sampler's results.

The shapes are the engines' own (vLLM 0.33's OpenAI routes and ``/inference/v1/generate``,
SGLang 0.5's native ``/generate``), with one extension object per choice, ``dualsample``,
holding per-token α, log π_θ, log π_t, whether each was observed, whether the position
fell back, and the teacher; on ``/generate`` it sits in ``meta_info``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..server.completions import wire
from .sampler import ChoiceResult, SampleRequest, TokenResult

__all__ = ["EXTENSION", "Answer", "Stream", "dumps", "render"]

EXTENSION = "dualsample"


def dumps(body: Any) -> bytes:
    """An answer's JSON, by orjson: the gateway encodes a streamed event per sequence
    per round, and the json module's encoder was the largest single cost in a profile
    of its streamed answers (bench_gateway reports their CPU per token). It would write
    NaN and infinities as null, but none reach it: every log probability in an answer
    has been through `wire` (-inf as vLLM's -9999.0) and α is in [0, 1]."""
    return orjson.dumps(body, default=_plain)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (orjson takes only Python's)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass
class Answer:
    """What a response is made from: the request, each prompt's base ids, and the
    text an echo puts before each prompt's choices."""

    req: SampleRequest
    prompt_ids: list[list[int]]
    model: str
    echo_texts: list[str] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, choices: Sequence[Sequence[TokenResult]]) -> dict[str, int]:
        """vLLM's usage block: prompt tokens summed over prompts (not times n)."""
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(toks) for toks in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def prompt_of(self, index: int) -> list[int]:
        return self.prompt_ids[self.req.prompt_index(index)]


def _opt(x: float | None) -> float | None:
    return None if x is None else wire(x)


def extension(tokens: Sequence[TokenResult], teacher: str | None) -> dict[str, Any]:
    """The per-choice extension object over `tokens`."""
    return {
        "alpha": [float(t.alpha) for t in tokens],
        "logp_base": [_opt(t.logp_base) for t in tokens],
        "logp_teacher": [_opt(t.logp_teacher) for t in tokens],
        "observed_base": [t.observed_base for t in tokens],
        "observed_teacher": [t.observed_teacher for t in tokens],
        "fallback": [t.fallback for t in tokens],
        "teacher": teacher,
    }


def _key(req: SampleRequest, tok: TokenResult, token_id: int) -> str:
    return f"token_id:{token_id}" if req.tokens_as_ids else tok.pieces.get(token_id, "")


def _top(req: SampleRequest, tok: TokenResult) -> tuple[tuple[int, float], ...]:
    return tok.top[: req.logprobs or 0]


# ------------------------------------------------------------------ /v1/completions
def completion_logprobs(req: SampleRequest, tokens: Sequence[TokenResult], offset: int = 0) -> dict[str, Any]:
    """The completions ``logprobs`` block: each position's sampled token first, then the
    top alternatives (so k or k + 1 entries, as vLLM lists them)."""
    keys, lps, offsets, tops = [], [], [], []
    for tok in tokens:
        key = _key(req, tok, tok.token_id)
        keys.append(key)
        lps.append(wire(tok.logprob))
        offsets.append(offset)
        offset += len(key)
        entries = {key: wire(tok.logprob)}
        for tid, lp in _top(req, tok):
            entries.setdefault(_key(req, tok, tid), wire(lp))
        tops.append(entries)
    return {"tokens": keys, "token_logprobs": lps, "text_offset": offsets, "top_logprobs": tops}


def _completion_choice(ans: Answer, index: int, c: ChoiceResult) -> dict[str, Any]:
    req = ans.req
    echo = ans.echo_texts[req.prompt_index(index)] if ans.echo_texts is not None else ""
    return {
        "index": index,
        "text": echo + c.text,
        "logprobs": None if req.logprobs is None else completion_logprobs(req, c.tokens),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_logprobs": None,
        "prompt_token_ids": ans.prompt_of(index) if req.return_token_ids else None,
        "token_ids": [t.token_id for t in c.tokens] if req.return_token_ids else None,
        EXTENSION: extension(c.tokens, c.teacher),
    }


def completion_body(ans: Answer, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{ans.id}",
        "object": "text_completion",
        "created": ans.created,
        "model": ans.model,
        "choices": [_completion_choice(ans, i, c) for i, c in enumerate(choices)],
        "usage": ans.usage([c.tokens for c in choices]),
    }


# ------------------------------------------------------------------ /v1/chat/completions
def _chat_entry(req: SampleRequest, tok: TokenResult, token_id: int, logprob: float) -> dict[str, Any]:
    key = _key(req, tok, token_id)
    return {"token": key, "logprob": wire(logprob), "bytes": list(tok.pieces.get(token_id, key).encode())}


def chat_logprobs(req: SampleRequest, tokens: Sequence[TokenResult]) -> dict[str, Any]:
    """The chat ``logprobs`` block: per position the sampled token and the top
    ``top_logprobs`` alternatives."""
    content = []
    for tok in tokens:
        entry = _chat_entry(req, tok, tok.token_id, tok.logprob)
        entry["top_logprobs"] = [_chat_entry(req, tok, tid, lp) for tid, lp in _top(req, tok)]
        content.append(entry)
    return {"content": content}


def chat_body(ans: Answer, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
    req = ans.req
    return {
        "id": f"chatcmpl-{ans.id}",
        "object": "chat.completion",
        "created": ans.created,
        "model": ans.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                "logprobs": None if req.logprobs is None else chat_logprobs(req, c.tokens),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": [t.token_id for t in c.tokens] if req.return_token_ids else None,
                EXTENSION: extension(c.tokens, c.teacher),
            }
            for i, c in enumerate(choices)
        ],
        "usage": ans.usage([c.tokens for c in choices]),
        "prompt_token_ids": ans.prompt_ids[0] if req.return_token_ids else None,
    }


# ------------------------------------------------------------------ /inference/v1/generate
def _rank(tok: TokenResult, token_id: int) -> int | None:
    for r, (tid, _) in enumerate(tok.top, start=1):
        if tid == token_id:
            return r
    return None


def generate_logprobs(req: SampleRequest, tokens: Sequence[TokenResult]) -> dict[str, Any]:
    """``logprobs.content`` with integer ids; ``top_logprobs`` lists k entries, the sampled
    token first (as vLLM 0.32 answered on this route)."""
    k = req.logprobs or 0
    content = []
    for tok in tokens:
        values = {tok.token_id: tok.logprob}
        for tid, lp in tok.top:
            values.setdefault(tid, lp)
        ids = list(dict.fromkeys([tok.token_id, *(tid for tid, _ in tok.top[:k])]))[:k]
        content.append(
            {
                "token_id": tok.token_id,
                "logprob": wire(tok.logprob),
                "rank": _rank(tok, tok.token_id),
                "top_logprobs": [{"token_id": t, "logprob": wire(values[t]), "rank": _rank(tok, t)} for t in ids],
            }
        )
    return {"content": content}


def vllm_generate_body(ans: Answer, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
    req = ans.req
    rid = req.rids[0] if req.rids else ans.id
    return {
        "request_id": f"generate-tokens-{rid}",
        "model": ans.model,
        "created": ans.created,
        "usage": ans.usage([c.tokens for c in choices]),
        "prompt_token_ids": ans.prompt_ids[0] if req.return_token_ids else None,
        "prompt_logprobs": None,
        "choices": [
            {
                "index": i,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": [t.token_id for t in c.tokens],
                "logprobs": None if req.logprobs is None else generate_logprobs(req, c.tokens),
                EXTENSION: extension(c.tokens, c.teacher),
            }
            for i, c in enumerate(choices)
        ],
    }


# ------------------------------------------------------------------ SGLang /generate
def _triple(req: SampleRequest, tok: TokenResult, token_id: int, logprob: float) -> list[Any]:
    text = tok.pieces.get(token_id) if req.return_text_in_logprobs else None
    return [logprob if logprob == logprob and logprob != float("-inf") else None, token_id, text]


def _sglang_finish(c: ChoiceResult | None, tokens: Sequence[TokenResult]) -> dict[str, Any] | None:
    if c is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": len(tokens)}
    if c.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    matched = c.stop_reason if c.stop_reason is not None else (tokens[-1].token_id if tokens else None)
    return {"type": "stop", "matched": matched}


def sglang_item(
    ans: Answer, index: int, tokens: Sequence[TokenResult], text: str, c: ChoiceResult | None
) -> dict[str, Any]:
    """One choice as SGLang answers it (`c` None: not finished yet, while streaming)."""
    req = ans.req
    prompt = ans.prompt_of(index)
    rid = req.rids[req.prompt_index(index)] if req.rids else f"{ans.id}-{index}"
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": _sglang_finish(c, tokens),
        "prompt_tokens": len(prompt),
        "completion_tokens": len(tokens),
        "cached_tokens": 0,
    }
    if req.logprobs is not None:
        k = req.logprobs
        meta["input_token_logprobs"] = []
        meta["input_top_logprobs"] = None
        meta["output_token_logprobs"] = [_triple(req, t, t.token_id, t.logprob) for t in tokens]
        meta["output_top_logprobs"] = (
            [[_triple(req, t, tid, lp) for tid, lp in t.top[:k]] for t in tokens] if k > 0 else None
        )
    meta[EXTENSION] = extension(tokens, None if c is None else c.teacher)
    return {"text": text, "output_ids": [t.token_id for t in tokens], "meta_info": meta}


def sglang_body(ans: Answer, choices: Sequence[ChoiceResult]) -> Any:
    items = [sglang_item(ans, i, c.tokens, c.text, c) for i, c in enumerate(choices)]
    return items[0] if ans.req.single and ans.req.n == 1 else items


def render(ans: Answer, choices: Sequence[ChoiceResult]) -> Any:
    """The whole (non-streamed) body of the request's route."""
    route = ans.req.route
    if route == "completions":
        return completion_body(ans, choices)
    if route == "chat":
        return chat_body(ans, choices)
    if route == "vllm_generate":
        return vllm_generate_body(ans, choices)
    return sglang_body(ans, choices)


# ------------------------------------------------------------------ streaming
class Stream:
    """The events of a streamed answer, one call per thing that happens: a choice
    starts, a token is drawn, a choice ends, the stream ends. Each returns the JSON
    objects to send as ``data:`` events (``data: [DONE]`` is the caller's).

    OpenAI routes send deltas (the text, ids and log probabilities of the new tokens);
    SGLang's ``/generate`` sends the choice so far each time (its default, cumulative
    output), with ``index``. The deltas of a choice add up to its whole answer: the
    finishing event carries the tokens not sent yet and the text the sampler held back.

    `interval` is the engines' stream interval: a choice's first token goes out at once,
    then an event whenever `interval` tokens are unsent, and the rest with the end.
    """

    def __init__(self, ans: Answer, interval: int = 1) -> None:
        self.ans = ans
        self.interval = interval
        self.tokens: dict[int, list[TokenResult]] = {}
        self.unsent: dict[int, list[TokenResult]] = {}
        self.sent: dict[int, str] = {}

    def _chunk(self, index: int, choice: dict[str, Any]) -> dict[str, Any]:
        chat = self.ans.req.route == "chat"
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + self.ans.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.ans.created,
            "model": self.ans.model,
            "choices": [{"index": index, **choice}],
        }

    def start(self, index: int) -> list[Any]:
        req = self.ans.req
        self.tokens[index] = []
        self.unsent[index] = []
        self.sent[index] = ""
        if req.route == "chat":
            chunk = self._chunk(index, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None, EXTENSION: extension([], None)})  # fmt: skip
            if req.return_token_ids:
                chunk["prompt_token_ids"] = self.ans.prompt_of(index)
            return [chunk]
        if req.route == "completions" and (req.echo or req.return_token_ids):
            echo = self.ans.echo_texts[req.prompt_index(index)] if self.ans.echo_texts is not None else ""
            choice: dict[str, Any] = {"text": echo, "logprobs": None, "finish_reason": None, "stop_reason": None}
            if req.return_token_ids:
                choice["prompt_token_ids"] = self.ans.prompt_of(index)
                choice["token_ids"] = []
            choice[EXTENSION] = extension([], None)
            return [self._chunk(index, choice)]
        return []

    def token(self, index: int, tok: TokenResult) -> list[Any]:
        tokens, unsent = self.tokens[index], self.unsent[index]
        tokens.append(tok)
        unsent.append(tok)
        if len(tokens) > 1 and len(unsent) < self.interval:
            return []
        self.unsent[index] = []
        if self.ans.req.route == "sglang_generate":
            text = self.sent[index] = self.sent[index] + "".join(t.text for t in unsent)
            return [{**sglang_item(self.ans, index, tokens, text, None), "index": index}]
        return [self._chunk(index, self._delta(index, unsent, "".join(t.text for t in unsent), None))]

    def _delta(self, index: int, toks: list[TokenResult], text: str, c: ChoiceResult | None) -> dict[str, Any]:
        """The choice of an OpenAI route's event: `toks` and `text` new since the last
        event, and the finish reason once `c` has ended."""
        req = self.ans.req
        offset = len(self.sent[index])
        self.sent[index] += text
        finish = None if c is None else c.finish_reason
        logprobs: dict[str, Any] | None = None
        if req.logprobs is not None and toks:
            logprobs = chat_logprobs(req, toks) if req.route == "chat" else completion_logprobs(req, toks, offset)
        choice: dict[str, Any]
        if req.route == "chat":
            delta = {"content": text} if text or c is None else {}
            choice = {"delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if c is not None:
                choice["stop_reason"] = c.stop_reason
        else:
            choice = {"text": text, "logprobs": logprobs, "finish_reason": finish,
                      "stop_reason": None if c is None else c.stop_reason}  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = [t.token_id for t in toks]
        choice[EXTENSION] = extension(toks, None if c is None else c.teacher)
        return choice

    def finish(self, index: int, c: ChoiceResult) -> list[Any]:
        unsent, self.unsent[index] = self.unsent[index], []
        if self.ans.req.route == "sglang_generate":
            self.sent[index] = c.text
            return [{**sglang_item(self.ans, index, self.tokens[index], c.text, c), "index": index}]
        # The text of the tokens not sent yet, then what the sampler held back.
        sent = self.sent[index] + "".join(t.text for t in unsent)
        rest = c.text[len(sent) :] if c.text.startswith(sent) else ""
        return [self._chunk(index, self._delta(index, unsent, sent[len(self.sent[index]) :] + rest, c))]

    def end(self) -> list[Any]:
        """The usage chunk (when asked for), after every choice."""
        req = self.ans.req
        if not req.include_usage or req.route == "sglang_generate":
            return []
        chunk = self._chunk(0, {})
        chunk["choices"] = []
        chunk["usage"] = self.ans.usage(list(self.tokens.values()))
        return [chunk]
