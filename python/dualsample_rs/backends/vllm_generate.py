"""vLLM's tokens-in/tokens-out ``/inference/v1/generate`` (server flag ``--enable-scale-out``).

One prompt per request, so a step sends one request per context, all at once. The body
carries the engine's own ``sampling_params`` (``detokenize: false``: no text work on the
server), and the reply lists integer ids: nothing to re-key or re-tokenise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core
from ..exceptions import BadRequestError, InvalidInputError, LogprobsLimitError
from .base import VLLM_MAX_SCORED_IDS, Positions, TopK, gather_scores, join
from .context import Context, body_with_list
from .vllm_completions import VLLMCompletionsBackend, checked

GENERATE_PATH = "/inference/v1/generate"


class VLLMGenerateBackend(VLLMCompletionsBackend):
    """One vLLM server through ``/inference/v1/generate`` (tokenising through ``/tokenize``)."""

    dialect = "vllm-generate"
    # One id is sent twice when scoring (see `_scored`).
    max_scored_ids: int | None = VLLM_MAX_SCORED_IDS - 1

    def _generate_body(self, context: Context, params: dict[str, Any]) -> bytes:
        """One request for one context (its id goes in the ``X-Request-Id`` header, which
        vLLM echoes as ``generate-tokens-<id>``)."""
        head: dict[str, Any] = {
            "sampling_params": {"max_tokens": 1, "temperature": 0, "detokenize": False, **params},
            "output_mode": "tokens",
        }
        if self.model:
            head["model"] = self.model
        return body_with_list(head, "token_ids", context)

    async def _one(self, context: Context, params: dict[str, Any], width: int) -> TopK:
        sent = [len(context)]
        top: TopK = await self._request(
            "POST",
            GENERATE_PATH,
            content=self._generate_body(context, params),
            decode=lambda raw, rid: TopK(*_core.parse_generate_topk([raw], width, rid, sent)),
        )
        self.stats.count_cache(top.cached_tokens, len(context))
        return top

    async def _each(self, contexts: Sequence[Context], params: list[dict[str, Any]], width: int) -> TopK:
        got = await asyncio.gather(*(self._one(c, p, width) for c, p in zip(contexts, params, strict=True)))
        return TopK(np.concatenate([g.ids for g in got]), np.concatenate([g.logp for g in got]))

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        return await self._each(contexts, [{"logprobs": top_k}] * len(contexts), top_k + 1)

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        params = [_scored([int(t) for t in row if t >= 0]) for row in ids]
        got = await self._each(contexts, params, ids.shape[1] + 2)
        return gather_scores(ids, got, f"{self.base_url} logprob_token_ids")

    # ------------------------------------------------------------ speculative rounds
    async def speculation_problem(
        self, verify: bool, recompute: bool = False, score_ids: bool = False, top_k: int = 1
    ) -> str | None:
        if not verify:
            return None
        # One replayed token past a one-token context: can it replay at all, and list
        # top_k + 1 entries as the rounds do (see `continuation_topk`)?
        for logprobs in (1, top_k + 1):
            params = {"max_tokens": 1, "logprobs": logprobs, "trace_decode_token_ids": [0]}
            try:
                await self._positions(Context([0]), params, logprobs + 1, logprobs)
            except BadRequestError as err:
                if logprobs == 1 and "trace" in str(err).lower():
                    return (
                        f"{self.base_url}: vLLM cannot verify drafted tokens without --enable-trace-replay ({err}); "
                        "or use the vllm-completions dialect for the base with prompt-logprobs verification"
                    )
                if logprobs > 1 and isinstance(err, LogprobsLimitError):
                    return (
                        f"{self.base_url}: verifying drafts lists top_k + 1 = {logprobs} log probabilities per "
                        f"position (the replayed token comes first); start vLLM with --max-logprobs {logprobs} or "
                        f"more ({err})"
                    )
                raise
        return None

    async def _positions(
        self, context: Context, params: dict[str, Any], width: int, top_k: int | None, replay: list[int] | None = None
    ) -> Positions:
        """The tokens and rows (one per generated position) of one generate reply: as
        many positions as ``max_tokens`` asks, and with `replay` those tokens."""

        sent, length = [len(context)], [int(params["max_tokens"])]

        def decode(raw: bytes, rid: str) -> Any:
            return _core.parse_generate_positions([raw], width, top_k, rid, sent, lengths=length, tokens=replay)

        content = self._generate_body(context, params)
        tokens, ids, logp, lengths, cached = await self._request("POST", GENERATE_PATH, content=content, decode=decode)
        self.stats.count_cache(cached, len(context))
        return Positions(tokens, TopK(ids, logp), lengths)

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> Positions:
        async def one(context: Context, length: int) -> Positions:
            params = {"max_tokens": length, "logprobs": top_k, "ignore_eos": True}
            return await self._positions(context, params, top_k + 1, top_k)

        return join(await asyncio.gather(*(one(c, n) for c, n in zip(contexts, lengths, strict=True))))

    async def continuation_topk(self, contexts: Sequence[Context], continuations: Positions, top_k: int) -> TopK:
        async def one(context: Context, cont: list[int]) -> Positions:
            # This route lists `logprobs` entries, the replayed token first: one more than
            # top_k keeps the whole top k when the replayed token is outside it, and the
            # reader keeps the entries ranked within top_k.
            params = {"max_tokens": len(cont), "logprobs": top_k + 1, "trace_decode_token_ids": cont}
            return await self._positions(context, params, top_k + 1, top_k, replay=cont)

        conts = continuations.split_tokens()
        return join(await asyncio.gather(*(one(c, t) for c, t in zip(contexts, conts, strict=True)))).top

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Positions, ids: np.ndarray
    ) -> np.ndarray:
        async def one(context: Context, cont: list[int], wanted: np.ndarray) -> np.ndarray:
            # `logprob_token_ids` is one list for every position: the union of the rows.
            union = sorted({int(t) for t in wanted.ravel() if t >= 0})
            if len(union) > VLLM_MAX_SCORED_IDS - 1:
                raise InvalidInputError(f"{len(union)} ids to score over a round, over vLLM's cap of 128 (127 here)")
            params = {"max_tokens": len(cont), **_scored(union), "trace_decode_token_ids": cont}
            got = await self._positions(context, params, len(union) + 2, None, replay=cont)
            return gather_scores(wanted, got.top, f"{self.base_url} logprob_token_ids")

        conts = continuations.split_tokens()
        wanted = [ids[continuations.rows_of([s])] for s in range(len(contexts))]
        calls = (one(c, t, w) for c, t, w in zip(contexts, conts, wanted, strict=True))
        return np.concatenate(await asyncio.gather(*calls))

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        params = {"max_tokens": 1, "temperature": 0, "detokenize": False, "prompt_logprobs": 0}
        head: dict[str, Any] = {"sampling_params": params}
        if self.model:
            head["model"] = self.model
        data = await self._request(
            "POST", GENERATE_PATH, {**head, "token_ids": ids}, decode=checked("request_id", len(ids))
        )
        return self._prompt_logprobs(lambda: data["prompt_logprobs"], ids, start)


def _scored(ids: list[int]) -> dict[str, Any]:
    """Sampling parameters that score `ids` at each generated position. This route
    scores ``logprob_token_ids`` only with ``logprobs`` set, which must then equal their
    number, and lists that many entries with the sampled token first: when the sampled
    token is not among the ids, the last one would be left out. So the first id is sent
    twice, and all of them come back whether the sampled token is among them or not
    (repeated ids are read once)."""
    padded = [*ids, ids[0]] if ids else ids
    return {"logprob_token_ids": padded, "logprobs": len(padded)}
