"""SGLang's native ``/generate``: a batch of ``input_ids`` per request, integer ids back.

The top-k comes from ``top_logprobs_num`` (exactly k entries: SGLang does not add the
sampled token), given ids are scored with ``token_ids_logprob`` (one list per prompt),
and a finished sequence is scored with ``logprob_start_len``, which keeps the radix cache
for the prefix before it. ``temperature: 0`` makes SGLang report raw log probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .. import _core
from ..exceptions import APIStatusError, ConfigurationError, InvalidResponseError, Response, status_error
from .base import Positions, TopK, check_echo, drafts_by_length, gather_scores
from .context import Context, body_with_lists
from .facts import TokenizerFacts
from .http import HttpBackend, json_body
from .vllm_completions import chat_or_text, token_list


class SGLangBackend(HttpBackend):
    """One SGLang server through its native API."""

    dialect = "sglang"
    max_scored_ids: int | None = None

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Ids of a text, or of chat messages rendered by the server's chat template
        (SGLang 0.5.23's ``/tokenize`` takes ``messages``)."""
        try:
            data = await self._request("POST", "/tokenize", chat_or_text(prompt, messages, add_special_tokens))
        except APIStatusError as err:
            if messages is None or err.status_code not in (400, 422):
                raise
            raise ConfigurationError(
                f"{self.base_url}: this SGLang's /tokenize does not render chat templates ({err.message}), so "
                "teacher_chat cannot be used with it; render the template into the teacher prompt instead"
            ) from err
        return token_list(data, self.base_url)

    async def detokenize(self, ids: list[int]) -> str:
        data = await self._request("POST", "/detokenize", {"tokens": ids})
        return str(data["text"])

    async def tokenizer_info(self) -> TokenizerFacts | None:
        return None  # SGLang has no such endpoint; stop ids come from known strings

    def read_error(self, response: Response, body: Any) -> APIStatusError:
        return status_error(response, sglang_error_message(body), body)

    async def _generate(
        self, contexts: Sequence[Context], fields: dict[str, Any], width: int, field: Literal["top", "token_ids"]
    ) -> TopK:
        rows, sent = len(contexts), [len(c) for c in contexts]
        head = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True, **fields}
        top: TopK = await self._request(
            "POST",
            "/generate",
            content=lambda rid: body_with_lists({**head, "rid": _rids(rid, rows)}, "input_ids", contexts),
            decode=lambda raw, rid: TopK(*_core.parse_sglang_topk(raw, rows, width, field, rid, sent)),
        )
        self.stats.count_cache(top.cached_tokens, sum(len(c) for c in contexts))
        return top

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        return await self._generate(contexts, {"top_logprobs_num": top_k}, top_k, "top")

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        lists = [[int(t) for t in row if t >= 0] for row in ids]
        got = await self._generate(contexts, {"token_ids_logprob": lists}, ids.shape[1], "token_ids")
        return gather_scores(ids, got, f"{self.base_url} token_ids_logprob")

    # ------------------------------------------------------------ speculative rounds
    async def speculation_problem(
        self, verify: bool, recompute: bool = False, score_ids: bool = False, top_k: int = 1
    ) -> str | None:
        return None

    async def _positions(
        self,
        head: dict[str, Any],
        contexts: Sequence[Context],
        width: int,
        field: Literal["top", "token_ids"],
        expected: Sequence[int],
        tails: Sequence[list[int]] | None = None,
    ) -> Positions:
        """The tokens and rows (one per position, flat: ``expected[r]`` for context r) of
        a batched ``/generate`` of the contexts, each followed by its tail ids: a draft,
        or with `tails` the scoring of the continuations."""
        rows, scored = len(contexts), tails is not None
        sent = [len(c) + (len(tails[i]) if tails is not None else 0) for i, c in enumerate(contexts)]

        def content(rid: str) -> bytes:
            return body_with_lists({**head, "rid": _rids(rid, rows)}, "input_ids", contexts, tails)

        def decode(raw: bytes, rid: str) -> Any:
            return _core.parse_sglang_positions(raw, rows, width, field, scored, rid, sent, lengths=list(expected))

        tokens, ids, logp, lengths, cached = await self._request("POST", "/generate", content=content, decode=decode)
        self.stats.count_cache(cached, sum(sent))
        return Positions(tokens, TopK(ids, logp), lengths)

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> Positions:
        async def group(length: int, batch: list[Context]) -> Positions:
            head = {
                "sampling_params": {"max_new_tokens": length, "temperature": 0, "ignore_eos": True},
                "return_logprob": True,
                "top_logprobs_num": top_k,
            }
            return await self._positions(head, batch, top_k, "top", [length] * len(batch))

        return await drafts_by_length(contexts, lengths, group)

    async def _continuation(
        self,
        contexts: Sequence[Context],
        continuations: Positions,
        fields: dict[str, Any],
        width: int,
        field: Literal["top", "token_ids"],
    ) -> TopK:
        """The rows at each continuation's positions: the input positions of all but its
        last token (scored from just before the continuation, which keeps the radix
        cache of the context; SGLang answers None at that first position) and the one
        generated position after them."""
        head = {
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": [len(c) - 1 for c in contexts],
            **fields,
        }
        tails = [t[:-1] for t in continuations.split_tokens()]
        got = await self._positions(head, contexts, width, field, continuations.lengths.tolist(), tails)
        return got.top

    async def continuation_topk(self, contexts: Sequence[Context], continuations: Positions, top_k: int) -> TopK:
        return await self._continuation(contexts, continuations, {"top_logprobs_num": top_k}, top_k, "top")

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Positions, ids: np.ndarray
    ) -> np.ndarray:
        # `token_ids_logprob` is one list per prompt for all its positions: the union.
        unions = [
            sorted({int(t) for t in ids[continuations.rows_of([s])].ravel() if t >= 0}) for s in range(len(contexts))
        ]
        width = max(len(u) for u in unions)
        got = await self._continuation(contexts, continuations, {"token_ids_logprob": unions}, width, "token_ids")
        return gather_scores(ids, got, f"{self.base_url} token_ids_logprob")

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        if start >= len(ids):
            return []
        # Scoring from start - 1 keeps the radix cache for the prefix before it; SGLang
        # answers None at exactly logprob_start_len, so that entry is dropped.
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start - 1,
        }

        def decode(raw: bytes, rid: str) -> Any:
            data = json_body(raw)
            meta = data.get("meta_info") if isinstance(data, dict) else None
            if isinstance(meta, dict):
                check_echo("the reply", meta.get("id"), rid, meta.get("prompt_tokens"), len(ids))
            return data

        data = await self._request(
            "POST", "/generate", content=lambda rid: json.dumps({**body, "rid": rid}).encode(), decode=decode
        )
        try:
            entries = data["meta_info"]["input_token_logprobs"][-(len(ids) - start) :]
            values = [float(e[0]) if e[0] is not None else -np.inf for e in entries]
            # SGLang reports every id >= vocab_size - 1 as 0 in input_token_logprobs (the
            # value is the right one), so 0 stands for any id there.
            ok = len(values) == len(ids) - start and all(
                e[1] == t or e[1] == 0 for e, t in zip(entries, ids[start:], strict=True)
            )
        except (KeyError, IndexError, TypeError) as err:
            raise InvalidResponseError(f"{self.base_url}: unexpected input_token_logprobs ({err})") from err
        if not ok:
            raise InvalidResponseError(f"{self.base_url}: input_token_logprobs do not match the scored ids")
        return values


def sglang_error_message(body: Any) -> str | None:
    """The message of an SGLang error body: the flat ``{"object": "error", "message",
    ...}`` of its OpenAI-compatible routes, ``{"error": {"message": ...}}`` of its native
    ones, and ``{"error": "Unauthorized"}`` from its API-key check."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("message"), str):
        return str(body["message"])
    err = body.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return err if isinstance(err, str) else None


def _rids(request_id: str, rows: int) -> list[str]:
    """SGLang's ``rid`` for each item of a batch, which its reply echoes as ``meta_info.id``."""
    return [f"{request_id}-{r}" for r in range(rows)]
