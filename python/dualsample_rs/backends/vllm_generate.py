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
from ..exceptions import BadRequestError, InvalidInputError, InvalidResponseError
from .base import VLLM_MAX_SCORED_IDS, Draft, TopK, gather_scores, split_positions
from .context import Context, body_with_list
from .vllm_completions import VLLMCompletionsBackend

GENERATE_PATH = "/inference/v1/generate"


class VLLMGenerateBackend(VLLMCompletionsBackend):
    """One vLLM server through ``/inference/v1/generate`` (tokenising through ``/tokenize``)."""

    dialect = "vllm-generate"

    def _body(self, context: Context, params: dict[str, Any]) -> bytes:  # type: ignore[override]
        head: dict[str, Any] = {
            "sampling_params": {"max_tokens": 1, "temperature": 0, "detokenize": False, **params},
            "output_mode": "tokens",
        }
        if self.model:
            head["model"] = self.model
        return body_with_list(head, "token_ids", context)

    async def _one(self, context: Context, params: dict[str, Any], width: int) -> TopK:
        top: TopK = await self._request(
            "POST", GENERATE_PATH, content=self._body(context, params), decode=lambda raw: _parse(raw, width)
        )
        self.stats.count_cache(top.cached_tokens, len(context))
        return top

    async def _each(self, contexts: Sequence[Context], params: list[dict[str, Any]], width: int) -> TopK:
        got = await asyncio.gather(*(self._one(c, p, width) for c, p in zip(contexts, params, strict=True)))
        return TopK(np.concatenate([g.ids for g in got]), np.concatenate([g.logp for g in got]))

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        return await self._each(contexts, [{"logprobs": top_k}] * len(contexts), top_k + 1)

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        params = [{"logprob_token_ids": [int(t) for t in row if t >= 0]} for row in ids]
        got = await self._each(contexts, params, ids.shape[1] + 1)
        return gather_scores(ids, got, f"{self.base_url} logprob_token_ids")

    # ------------------------------------------------------------ speculative rounds
    async def speculation_problem(self, verify: bool, recompute: bool = False, exact: bool = False) -> str | None:
        if not verify:
            return None
        try:  # one replayed token past a one-token context
            await self._positions(Context([0]), {"max_tokens": 1, "logprobs": 1, "trace_decode_token_ids": [0]}, 2, 1)
        except BadRequestError as err:
            if "trace" not in str(err).lower():
                raise
            return (
                f"{self.base_url}: vLLM cannot verify drafted tokens without --enable-trace-replay ({err}); "
                "or use the vllm-completions dialect for the base with prompt-logprobs verification"
            )
        return None

    async def _positions(
        self, context: Context, params: dict[str, Any], width: int, top_k: int | None
    ) -> tuple[list[int], TopK]:
        """The tokens and rows (one per generated position) of one generate reply."""

        def decode(raw: bytes) -> Any:
            try:
                return _core.parse_generate_positions([raw], width, top_k)
            except InvalidInputError as exc:
                raise InvalidResponseError(f"unexpected generate reply: {exc}") from exc

        content = self._body(context, params)
        tokens, ids, logp, lengths, cached = await self._request("POST", GENERATE_PATH, content=content, decode=decode)
        self.stats.count_cache(cached, len(context))
        return split_positions(tokens, ids, logp, lengths)[0]

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> list[Draft]:
        async def one(context: Context, length: int) -> Draft:
            params = {"max_tokens": length, "logprobs": top_k, "ignore_eos": True}
            return Draft(*await self._positions(context, params, top_k + 1, top_k))

        return list(await asyncio.gather(*(one(c, n) for c, n in zip(contexts, lengths, strict=True))))

    async def continuation_topk(
        self, contexts: Sequence[Context], continuations: Sequence[list[int]], top_k: int
    ) -> list[TopK]:
        async def one(context: Context, cont: list[int]) -> TopK:
            params = {"max_tokens": len(cont), "logprobs": top_k, "trace_decode_token_ids": cont}
            return self._replayed(cont, await self._positions(context, params, top_k + 1, top_k))

        return list(await asyncio.gather(*(one(c, t) for c, t in zip(contexts, continuations, strict=True))))

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Sequence[list[int]], ids: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        async def one(context: Context, cont: list[int], wanted: np.ndarray) -> np.ndarray:
            # `logprob_token_ids` is one list for every position: the union of the rows.
            union = sorted({int(t) for t in wanted.ravel() if t >= 0})
            if len(union) > VLLM_MAX_SCORED_IDS:
                raise InvalidInputError(f"{len(union)} ids to score over a round, over vLLM's cap of 128")
            params = {"max_tokens": len(cont), "logprob_token_ids": union, "trace_decode_token_ids": cont}
            got = self._replayed(cont, await self._positions(context, params, len(union) + 1, None))
            return gather_scores(wanted, got, f"{self.base_url} logprob_token_ids")

        calls = (one(c, t, w) for c, t, w in zip(contexts, continuations, ids, strict=True))
        return list(await asyncio.gather(*calls))

    def _replayed(self, cont: list[int], got: tuple[list[int], TopK]) -> TopK:
        if got[0] != cont:
            raise InvalidResponseError(f"{self.base_url}: the replayed tokens differ from the trace sent")
        return got[1]

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        params = {"max_tokens": 1, "temperature": 0, "detokenize": False, "prompt_logprobs": 0}
        body: dict[str, Any] = {"token_ids": ids, "sampling_params": params}
        if self.model:
            body["model"] = self.model
        data = await self._request("POST", GENERATE_PATH, body)
        return self._prompt_logprobs(lambda: data["prompt_logprobs"], ids, start)


def _parse(raw: bytes, width: int) -> TopK:
    try:
        ids, logp, cached = _core.parse_generate_topk([raw], width)
    except InvalidInputError as exc:
        raise InvalidResponseError(f"unexpected generate reply: {exc}") from exc
    return TopK(ids, logp, cached)
