"""SGLang's native ``POST /generate`` (0.5.x), as the reference server's sglang flavor.

``input_ids`` is one prompt or a batch; the reply is an object or a list of them, whose
``meta_info`` holds per-position ``[logprob, token_id, text]`` triples. Log probabilities
are the log-softmax of logits / temperature (temperature 0 counts as 1, so raw), with
-inf written as null. Scoring the input from ``logprob_start_len`` answers None exactly
at that position, as SGLang does.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from .completions import Request, Sequence, top_ids, validate_prompt
from .errors import bad_request, valid_text
from .model import Model

DEFAULT_MAX_NEW_TOKENS = 128


def _triple(lp: float, token: int) -> list[Any]:
    return [float(lp) if np.isfinite(lp) else None, int(token), None]


def _scaled(lp: np.ndarray, temperature: float) -> np.ndarray:
    if temperature in (0.0, 1.0):
        return lp
    x = lp / temperature
    scaled: np.ndarray = x - np.logaddexp.reduce(x)
    return scaled


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """A setting given once for the batch, or as a list with one value per prompt."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise bad_request(f"{name}: {len(value)} values for {n} prompts")
    return value


class GenerateCall:
    """A parsed ``/generate`` body: the generation request and what to report."""

    def __init__(self, body: Any, model: Model) -> None:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        ids = body.get("input_ids")
        text = body.get("text")
        if ids is None and text is None:
            raise bad_request("Either text or input_ids should be provided.")
        if ids is not None:
            self.single = bool(ids) and not isinstance(ids[0], list)
            prompts = [ids] if self.single else ids
        else:
            self.single = isinstance(text, str)
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise bad_request("text must be a string or a list of strings")
            prompts = [model.tokenize(valid_text(t, "text")) for t in texts]
        if not isinstance(prompts, list) or not prompts:
            raise bad_request("input_ids must be a non-empty list")
        for p in prompts:
            if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise bad_request("input_ids must be a list of integers or a list of such lists")
            validate_prompt(p, model, "input_ids")
        n = len(prompts)
        rid = body.get("rid")
        self.rids: list[str] | None = (
            None if rid is None else [str(r) for r in (rid if isinstance(rid, list) else [rid])]
        )
        if self.rids is not None and len(self.rids) != n:
            raise bad_request(f"rid: {len(self.rids)} ids for {n} prompts")
        params = body.get("sampling_params") or {}
        if isinstance(params, list):
            if len(params) != n:
                raise bad_request(f"sampling_params: {len(params)} entries for {n} prompts")
            params = params[0]  # one generation config per call here
        if not isinstance(params, dict):
            raise bad_request("sampling_params must be an object")
        temperature = float(params.get("temperature", 1.0))
        max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(max_new, int) or max_new < 0:
            raise bad_request(f"max_new_tokens must be a non-negative integer, got {max_new}")
        if temperature < 0:
            raise bad_request(f"temperature must be non-negative, got {temperature}")
        self.return_logprob = bool(body.get("return_logprob", False))
        self.start = [int(s) for s in _per_prompt(body.get("logprob_start_len", -1), n, "logprob_start_len")]
        for p, s in zip(prompts, self.start, strict=True):
            if s >= len(p):
                raise bad_request(f"logprob_start_len ({s}) is superior or equal to the input length ({len(p)}).")
        self.top_n = [int(k or 0) for k in _per_prompt(body.get("top_logprobs_num", 0), n, "top_logprobs_num")]
        token_ids = body.get("token_ids_logprob")
        if token_ids is not None and token_ids and not isinstance(token_ids[0], list):
            token_ids = [token_ids] * n
        self.token_ids: list[list[int] | None] = list(token_ids) if token_ids is not None else [None] * n
        if len(self.token_ids) != n:
            raise bad_request(f"token_ids_logprob: {len(self.token_ids)} lists for {n} prompts")
        for ids_ in self.token_ids:
            for t in ids_ or []:
                if not isinstance(t, int) or not 0 <= t < model.vocab_size:
                    raise bad_request(f"token_ids_logprob: token id {t} is out of vocabulary")
        self.temperature = temperature
        self.request = Request(
            prompts=prompts,
            max_tokens=max(1, max_new),
            temperature=temperature,
            seed=params.get("sampling_seed"),
            n=1,
            logprobs=0,  # keep every position's distribution for the reply
            prompt_logprobs=None,
            echo=False,
            ids_as_keys=True,
            stop=[],
            stop_token_ids=list(params.get("stop_token_ids") or []),
            ignore_eos=bool(params.get("ignore_eos", False)),
            skip_special_tokens=bool(params.get("skip_special_tokens", True)),
            model=model.name,
        )

    def respond(self, model: Model, seqs: list[Sequence]) -> Any:
        items = [self._item(model, i, s) for i, s in enumerate(seqs)]
        return items[0] if self.single else items

    def _item(self, model: Model, i: int, s: Sequence) -> dict[str, Any]:
        eos_hit = s.finish_reason == "stop"
        finish = (
            {"type": "stop", "matched": s.stop_reason if s.stop_reason is not None else model.eos_token_id}
            if eos_hit
            else {"type": "length", "length": len(s.tokens)}
        )
        meta: dict[str, Any] = {
            "id": self.rids[i] if self.rids else uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(s.prompt),
            "completion_tokens": len(s.tokens),
            "cached_tokens": self.request.cached_tokens[i] if self.request.cached_tokens else 0,
        }
        if self.return_logprob:
            lps = [_scaled(lp, self.temperature) for lp in s.logprobs]
            meta["output_token_logprobs"] = [_triple(lp[t], t) for t, lp in zip(s.tokens, lps, strict=True)]
            k, ids = self.top_n[i], self.token_ids[i]
            meta["output_top_logprobs"] = [[_triple(lp[t], t) for t in top_ids(lp, k)] for lp in lps] if k else None
            meta["output_token_ids_logprobs"] = [[_triple(lp[t], t) for t in ids] for lp in lps] if ids else None
            inputs = self._input(model, s.prompt, i)
            meta["input_token_logprobs"], meta["input_top_logprobs"], meta["input_token_ids_logprobs"] = inputs
        return {"text": model.detokenize(s.tokens, self.request.skip_special_tokens), "output_ids": s.tokens,
                "meta_info": meta}  # fmt: skip

    def _input(self, model: Model, prompt: list[int], i: int) -> tuple[Any, Any, Any]:
        """The input positions' token entries, top-k and given ids' entries from
        ``logprob_start_len`` on, each None at that first position as SGLang answers
        (the last two only when asked for): how a continuation given in the input is
        scored in one request."""
        start, k, ids = self.start[i], self.top_n[i], self.token_ids[i]
        if start < 0:
            return [], None, None
        contexts = [prompt[:p] for p in range(start + 1, len(prompt))]
        lps = [_scaled(lp, self.temperature) for lp in model.next_logprobs(contexts)] if contexts else []
        # As SGLang does: an id >= vocab_size - 1 is reported as 0 here (its value is right).
        last = model.vocab_size - 1
        scored = (_triple(lp[prompt[p]], prompt[p] if prompt[p] < last else 0) for p, lp in enumerate(lps, start + 1))
        tokens = [[None, prompt[start], None], *scored]
        top = [None, *([_triple(lp[t], t) for t in top_ids(lp, k)] for lp in lps)] if k else None
        given = [None, *([_triple(lp[t], t) for t in ids] for lp in lps)] if ids else None
        return tokens, top, given
