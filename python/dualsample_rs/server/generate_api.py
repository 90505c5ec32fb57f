"""vLLM's tokens-in/tokens-out ``POST /inference/v1/generate`` (behind ``--enable-scale-out``).

One prompt per request; ``sampling_params`` are the engine's own fields; the reply lists
integer ids, and ``top_logprobs`` is a list in engine order (sampled token first).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from .completions import (
    Request,
    Sequence,
    check_body,
    entry_ids,
    logprob_count,
    logprob_token_ids,
    prompt_logprob_entries,
    usage,
    validate_prompt,
    wire,
)
from .errors import bad_request
from .model import Model

PATH = "/inference/v1/generate"


def _ranks(lp: np.ndarray) -> np.ndarray:
    """Each id's 1-based rank over the vocabulary (ties to the lower id)."""
    ranks = np.empty(lp.size, dtype=np.int64)
    ranks[np.argsort(-lp, kind="stable")] = np.arange(1, lp.size + 1)
    return ranks


def _trace(params: dict[str, Any], model: Model, enabled: bool) -> list[int] | None:
    """vLLM's checks of ``trace_decode_token_ids`` (replaying a given continuation)."""
    trace = params.get("trace_decode_token_ids")
    if trace is None:
        return None
    if not enabled:
        raise bad_request(
            "trace_decode_token_ids is set but trace replay is not enabled. Start the server with "
            "--enable-trace-replay.",
            "trace_decode_token_ids",
        )
    if (
        not isinstance(trace, list)
        or not trace
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in trace)
    ):
        raise bad_request("trace_decode_token_ids must be a non-empty list of integers", "trace_decode_token_ids")
    if any(not 0 <= t < model.vocab_size for t in trace):
        raise bad_request("trace_decode_token_ids has a token id out of vocabulary", "trace_decode_token_ids")
    if params.get("prompt_logprobs") is not None:
        raise bad_request("trace_decode_token_ids cannot be used with prompt_logprobs", "trace_decode_token_ids")
    if params.get("n", 1) != 1:
        raise bad_request("trace_decode_token_ids requires n=1", "trace_decode_token_ids")
    return trace


def parse(body: Any, model: Model, max_logprobs: int, trace_replay: bool = False) -> Request:
    check_body(body, model, "GenerateRequest")
    ids = body.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request(
            "1 validation error for GenerateRequest\ntoken_ids\n  Input should be a non-empty list of integers",
            "token_ids",
        )
    if any(t < 0 for t in ids):
        raise bad_request("token_ids must not contain negative values", "token_ids")
    validate_prompt(ids, model)
    if body.get("stream"):
        raise bad_request("streaming is not supported by this server", "stream")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise bad_request("sampling_params must be an object", "sampling_params")
    detokenize = params.get("detokenize", True)
    if body.get("output_mode", "tokens") != "tokens" and not detokenize:
        raise bad_request("output_mode='text' requires sampling_params.detokenize to be true", "output_mode")
    score_ids = logprob_token_ids(params.get("logprob_token_ids"), model)
    if score_ids is not None and params.get("logprobs") is not None and params["logprobs"] != len(score_ids):
        raise bad_request(
            "When both logprobs and logprob_token_ids are set, logprobs must equal len(logprob_token_ids)", "logprobs"
        )
    if params.get("logprobs") is None:
        score_ids = None  # as vLLM 0.32: the ids are not scored unless logprobs is set
    logprobs = logprob_count(params, "logprobs", max_logprobs, "sample") if score_ids is None else None
    temperature = params.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {temperature}.", "temperature")
    max_tokens = params.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    return Request(
        prompts=[ids],
        max_tokens=max_tokens,
        temperature=float(temperature),
        seed=params.get("seed"),
        n=1,
        logprobs=len(score_ids) if score_ids is not None else logprobs,
        prompt_logprobs=logprob_count(params, "prompt_logprobs", max_logprobs, "prompt"),
        echo=False,
        ids_as_keys=True,
        stop=[],
        stop_token_ids=list(params.get("stop_token_ids") or []),
        ignore_eos=bool(params.get("ignore_eos", False)),
        skip_special_tokens=True,
        model=model.name,
        logprob_token_ids=score_ids,
        trace=_trace(params, model, trace_replay),
        # as vLLM answers it: generate-tokens-<id> (app.py puts the X-Request-Id header's first)
        request_id=f"generate-tokens-{body['request_id']}" if body.get("request_id") is not None else None,
    )


def _generate_entry_ids(lp: np.ndarray, sampled: int, k: int, score_ids: list[int] | None) -> list[int]:
    """The ids this route lists at a generated position, as vLLM 0.32 does: `k` of them
    (`k` = ``logprobs``), the sampled token first, then the top k (so the sampled token
    and the top k - 1 when it is outside the top k), or the given ids (so the last is
    left out when the sampled token is not among them)."""
    return entry_ids(lp, sampled, k, score_ids)[:k]


def respond(req: Request, model: Model, seq: Sequence, return_token_ids: bool) -> dict[str, Any]:
    content = None
    if req.logprobs is not None:
        content = []
        for tok, lp in zip(seq.tokens, seq.logprobs, strict=True):
            ranks = _ranks(lp)
            entries = [
                {"token_id": t, "logprob": wire(lp[t]), "rank": int(ranks[t])}
                for t in _generate_entry_ids(lp, tok, req.logprobs, req.logprob_token_ids)
            ]
            content.append(
                {"token_id": tok, "logprob": wire(lp[tok]), "rank": int(ranks[tok]), "top_logprobs": entries}
            )
    prompt_logprobs = None
    if req.prompt_logprobs is not None:
        prompt_logprobs = [
            None if e is None else {k: {"logprob": v["logprob"], "rank": v["rank"]} for k, v in e.items()}
            for e in prompt_logprob_entries(model, seq.prompt, req.prompt_logprobs)
        ]
    return {
        "request_id": req.request_id or uuid.uuid4().hex,
        "model": model.name,
        "created": int(time.time()),
        "usage": usage(req, len(seq.prompt), len(seq.tokens)),
        "prompt_token_ids": seq.prompt if return_token_ids else None,
        "prompt_logprobs": prompt_logprobs,
        "choices": [
            {
                "index": 0,
                "finish_reason": seq.finish_reason,
                "stop_reason": seq.stop_reason,
                "token_ids": seq.tokens,
                "logprobs": None if content is None else {"content": content},
            }
        ],
    }
