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
from ..exceptions import InvalidInputError, InvalidResponseError
from .base import TopK, gather_scores
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
