"""SGLang's native ``/generate``: a batch of ``input_ids`` per request, integer ids back.

The top-k comes from ``top_logprobs_num`` (exactly k entries: SGLang does not add the
sampled token), given ids are scored with ``token_ids_logprob`` (one list per prompt),
and a finished sequence is scored with ``logprob_start_len``, which keeps the radix cache
for the prefix before it. ``temperature: 0`` makes SGLang report raw log probabilities.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .. import _core
from ..exceptions import ConfigurationError, InvalidInputError, InvalidResponseError
from .base import Draft, TopK, gather_scores, topk_rows
from .context import Context, body_with_lists
from .http import HttpBackend


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
        if messages is not None:
            raise ConfigurationError(
                f"{self.base_url}: SGLang's /tokenize does not render chat templates, so teacher_chat cannot be "
                "used with an SGLang teacher; render the template into the teacher prompt instead"
            )
        data = await self._request("POST", "/tokenize", {"prompt": prompt, "add_special_tokens": add_special_tokens})
        return [int(t) for t in data["tokens"]]

    async def detokenize(self, ids: list[int]) -> str:
        data = await self._request("POST", "/detokenize", {"tokens": ids})
        return str(data["text"])

    async def tokenizer_info(self) -> dict[str, Any] | None:
        return None  # SGLang has no such endpoint; stop ids come from known strings

    async def _generate(
        self, contexts: Sequence[Context], fields: dict[str, Any], width: int, field: Literal["top", "token_ids"]
    ) -> TopK:
        head = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True, **fields}
        content = body_with_lists(head, "input_ids", contexts)
        rows = len(contexts)
        top: TopK = await self._request(
            "POST", "/generate", content=content, decode=lambda raw: _parse(raw, rows, width, field)
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
    async def speculation_problem(self, verify: bool) -> str | None:
        return None

    async def _meta(
        self, head: dict[str, Any], inputs: Sequence[Context], tails: Sequence[list[int]] | None = None
    ) -> list[dict[str, Any]]:
        """Each item's ``meta_info`` of a batched ``/generate`` of the contexts (each
        followed by its tail ids)."""
        data = await self._request("POST", "/generate", content=body_with_lists(head, "input_ids", inputs, tails))
        rows = len(inputs)
        items = data if isinstance(data, list) else [data]
        try:
            metas = [item["meta_info"] for item in items]
        except (KeyError, TypeError) as err:
            raise InvalidResponseError(f"{self.base_url}: /generate reply without meta_info ({err})") from err
        if len(metas) != rows:
            raise InvalidResponseError(f"{self.base_url}: {len(metas)} items in the reply for {rows} prompts")
        for r, meta in enumerate(metas):
            cached = meta.get("cached_tokens")
            length = len(inputs[r]) + (len(tails[r]) if tails is not None else 0)
            self.stats.count_cache(int(cached) if cached is not None else None, length)
        return metas

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> list[Draft]:
        # One generation length per request: contexts are grouped by length.
        groups: dict[int, list[int]] = {}
        for r, n in enumerate(lengths):
            groups.setdefault(n, []).append(r)
        out: list[Draft | None] = [None] * len(contexts)

        async def group(length: int, rows: list[int]) -> None:
            head = {
                "sampling_params": {"max_new_tokens": length, "temperature": 0, "ignore_eos": True},
                "return_logprob": True,
                "top_logprobs_num": top_k,
            }
            for r, meta in zip(rows, await self._meta(head, [contexts[r] for r in rows]), strict=True):
                tokens = [int(e[1]) for e in _positions(meta, "output_token_logprobs", self.base_url)]
                tops = _positions(meta, "output_top_logprobs", self.base_url)
                out[r] = Draft(tokens, topk_rows([_entries(p) for p in tops], top_k))

        await asyncio.gather(*(group(n, rows) for n, rows in groups.items()))
        return [d for d in out if d is not None]

    async def _continuation(
        self, contexts: Sequence[Context], continuations: Sequence[list[int]], fields: dict[str, Any], kind: str
    ) -> list[list[list[tuple[int, float]]]]:
        """Each continuation's entries at its positions: the input positions of all but
        its last token (scored from just before the continuation, which keeps the radix
        cache of the context; SGLang answers None at that first position) and the one
        generated position after them."""
        head = {
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": [len(c) - 1 for c in contexts],
            **fields,
        }
        metas = await self._meta(head, contexts, [t[:-1] for t in continuations])
        out = []
        for meta, cont in zip(metas, continuations, strict=True):
            scored = _positions(meta, f"input_{kind}", self.base_url)[1:] if len(cont) > 1 else []
            positions = [*scored, *_positions(meta, f"output_{kind}", self.base_url)[:1]]
            if len(positions) != len(cont):
                raise InvalidResponseError(f"{self.base_url}: {len(positions)} scored positions for {len(cont)}")
            out.append([_entries(p) for p in positions])
        return out

    async def continuation_topk(
        self, contexts: Sequence[Context], continuations: Sequence[list[int]], top_k: int
    ) -> list[TopK]:
        got = await self._continuation(contexts, continuations, {"top_logprobs_num": top_k}, "top_logprobs")
        return [topk_rows(p, top_k) for p in got]

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Sequence[list[int]], ids: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        # `token_ids_logprob` is one list per prompt for all its positions: the union.
        unions = [sorted({int(t) for t in w.ravel() if t >= 0}) for w in ids]
        fields = {"token_ids_logprob": unions}
        got = await self._continuation(contexts, continuations, fields, "token_ids_logprobs")
        return [
            gather_scores(w, topk_rows(p, len(u)), f"{self.base_url} token_ids_logprob")
            for w, p, u in zip(ids, got, unions, strict=True)
        ]

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
        data = await self._request("POST", "/generate", body)
        try:
            entries = data["meta_info"]["input_token_logprobs"][-(len(ids) - start) :]
            values = [float(e[0]) if e[0] is not None else -np.inf for e in entries]
            ok = len(values) == len(ids) - start and all(e[1] == t for e, t in zip(entries, ids[start:], strict=True))
        except (KeyError, IndexError, TypeError) as err:
            raise InvalidResponseError(f"{self.base_url}: unexpected input_token_logprobs ({err})") from err
        if not ok:
            raise InvalidResponseError(f"{self.base_url}: input_token_logprobs do not match the scored ids")
        return values


def _positions(meta: dict[str, Any], key: str, where: str) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list):
        raise InvalidResponseError(f"{where}: /generate reply without {key}")
    return value


def _entries(position: Any) -> list[tuple[int, float]]:
    """``[logprob, id, text]`` triples as ``(id, logprob)`` (null: -inf)."""
    if position is None:
        return []
    try:
        return [(int(e[1]), float(e[0]) if e[0] is not None else -np.inf) for e in position]
    except (IndexError, TypeError, ValueError) as err:
        raise InvalidResponseError(f"unexpected SGLang logprob entry ({err})") from err


def _parse(raw: bytes, rows: int, width: int, field: Literal["top", "token_ids"]) -> TopK:
    try:
        ids, logp, cached = _core.parse_sglang_topk(raw, rows, width, field)
    except InvalidInputError as exc:
        raise InvalidResponseError(f"unexpected SGLang reply: {exc}") from exc
    return TopK(ids, logp, cached)
