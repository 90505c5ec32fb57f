"""vLLM's OpenAI-compatible ``/v1/completions``: many contexts per request.

Contexts go as id prompts with ``return_tokens_as_token_ids`` (text keys collide),
``max_tokens=1`` and ``temperature=0``: the reply's top-k at the one generated position
is the model's raw log-softmax. Scoring given ids uses ``logprob_token_ids``, which is
one list per request, so rows are grouped until their ids together reach vLLM's 128.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _core
from ..exceptions import (
    APIStatusError,
    ConfigurationError,
    IncompleteReplyError,
    InvalidResponseError,
    LogprobsLimitError,
    NotFoundError,
    Response,
    status_error,
)
from .base import (
    VLLM_MAX_SCORED_IDS,
    Positions,
    TopK,
    check_echo,
    drafts_by_length,
    gather_scores,
    rows_of,
    scoring_groups,
    stack,
)
from .context import Context, body_with_lists
from .facts import TokenizerFacts
from .http import HttpBackend, json_body, log


class VLLMCompletionsBackend(HttpBackend):
    """One vLLM server through ``/v1/completions`` (batched)."""

    dialect = "vllm-completions"
    max_scored_ids: int | None = VLLM_MAX_SCORED_IDS

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Ids of a text, or of chat messages rendered by the server's chat template
        (without added special tokens: the template holds them, and a tokenizer that adds
        a BOS would otherwise start the prompt with two; vLLM's own default for chat)."""
        body = chat_or_text(prompt, messages, add_special_tokens)
        data = await self._request("POST", "/tokenize", body)
        return token_list(data, self.base_url)

    async def detokenize(self, ids: list[int]) -> str:
        data = await self._request("POST", "/detokenize", {"tokens": ids})
        return str(data["prompt"])

    async def tokenizer_info(self) -> TokenizerFacts | None:
        """What the tokenizer declares, or None where the endpoint is not enabled
        (``--enable-tokenizer-info-endpoint``)."""
        try:
            data = await self._request("GET", "/tokenizer_info", probe=True)
        except NotFoundError:
            return None
        except APIStatusError as err:
            if err.status_code in (404, 405, 501):
                return None
            raise
        return tokenizer_facts(data) if isinstance(data, dict) else None

    def read_error(self, response: Response, body: Any) -> APIStatusError:
        """vLLM's error bodies; a refusal of more log probabilities than its cap is a
        `LogprobsLimitError`."""
        detail = vllm_error_message(body)
        over = response.status_code == 400 and _over_logprobs_cap(body, detail)
        return status_error(response, detail, body, LogprobsLimitError if over else None)

    def _body(self, contexts: Sequence[Context], fields: dict[str, Any]) -> bytes:
        head = {"max_tokens": 1, "temperature": 0, "return_tokens_as_token_ids": True, **fields}
        if self.model:
            head["model"] = self.model
        return body_with_lists(head, "prompt", contexts)

    async def _completions(self, contexts: Sequence[Context], fields: dict[str, Any], width: int) -> TopK:
        rows, sent = len(contexts), [len(c) for c in contexts]
        t0 = time.perf_counter()
        top = await self._request(
            "POST",
            "/v1/completions",
            content=self._body(contexts, fields),
            decode=lambda raw, rid: parse_topk(raw, rows, width, rid, sent),
        )
        log.debug("completions of %d rows in %.1f ms", rows, 1e3 * (time.perf_counter() - t0))
        # vLLM reports the cache use of the batch's last prompt only
        self.stats.count_cache(top.cached_tokens, len(contexts[-1]))
        return top

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        return await self._completions(contexts, {"logprobs": top_k}, top_k + 1)

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, -np.inf)
        groups = scoring_groups(ids, VLLM_MAX_SCORED_IDS)

        async def one(rows: np.ndarray, union: list[int]) -> None:
            # `logprobs` must be set, but `logprob_token_ids` replaces the top-k it asks for.
            fields = {"logprobs": 1, "logprob_token_ids": union}
            got = await self._completions([contexts[r] for r in rows], fields, len(union) + 1)
            out[rows] = gather_scores(ids[rows], got, f"{self.base_url} logprob_token_ids")

        await asyncio.gather(*(one(rows, union) for rows, union in groups))
        return out

    # ------------------------------------------------------------ speculative rounds
    async def speculation_problem(
        self, verify: bool, recompute: bool = False, score_ids: bool = False, top_k: int = 1
    ) -> str | None:
        if not verify:
            return None
        if not recompute:
            return (
                f"{self.base_url}: the vllm-completions dialect cannot verify drafted tokens with the prefix cache "
                "kept (use vllm-generate with --enable-trace-replay on the base's server, or sglang; or allow "
                "prompt-logprobs verification, which recomputes each context)"
            )
        if score_ids:
            return f"{self.base_url}: prompt-logprobs verification gives top-k lists, not exact scoring"
        return None

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> Positions:
        async def group(length: int, batch: list[Context]) -> Positions:
            fields = {"max_tokens": length, "logprobs": top_k, "ignore_eos": True}
            tokens: list[int] = []
            tops: list[list[tuple[int, float]]] = []
            counts = []
            for choice in await self._choices(batch, fields):
                lp = choice.get("logprobs") or {}
                drafted = [_token_id(t) for t in lp.get("tokens") or []]
                listed = [_keyed_entries(d) for d in lp.get("top_logprobs") or []]
                if len(drafted) != length or len(listed) != length:
                    raise InvalidResponseError(f"{self.base_url}: a draft without its top-k at every position")
                tokens += drafted
                tops += listed
                counts.append(len(drafted))
            top = rows_of(tops, top_k + 1)
            return Positions(np.array(tokens, dtype=np.int64), top, np.array(counts, dtype=np.int64))

        return await drafts_by_length(contexts, lengths, group)

    async def continuation_topk(self, contexts: Sequence[Context], continuations: Positions, top_k: int) -> TopK:
        """Through ``prompt_logprobs`` (opt-in): vLLM recomputes each whole context."""
        fields = {"logprobs": top_k, "prompt_logprobs": top_k}
        conts = continuations.split_tokens()
        choices = await self._choices(contexts, fields, [t[:-1] for t in conts])
        out = []
        for ctx, cont, choice in zip(contexts, conts, choices, strict=True):
            try:
                prompt = choice["prompt_logprobs"][len(ctx) : len(ctx) + len(cont) - 1]
                scored = [_ranked_entries(e, top_k) for e in prompt]
                last = _keyed_entries(choice["logprobs"]["top_logprobs"][0])
            except (KeyError, IndexError, TypeError) as err:
                raise InvalidResponseError(f"{self.base_url}: prompt_logprobs reply without position {err}") from err
            if len(scored) != len(cont) - 1:
                raise InvalidResponseError(f"{self.base_url}: {len(scored) + 1} scored positions for {len(cont)}")
            out.append(rows_of([*scored, last], top_k + 1))
        return stack(out)

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Positions, ids: np.ndarray
    ) -> np.ndarray:
        raise ConfigurationError(f"{self.base_url}: prompt-logprobs verification gives top-k lists, not exact scoring")

    async def _choices(
        self, contexts: Sequence[Context], fields: dict[str, Any], tails: Sequence[list[int]] | None = None
    ) -> list[dict[str, Any]]:
        """The choices of one completions request for the contexts (each followed by
        its tail ids), in prompt order."""
        head = {"max_tokens": 1, "temperature": 0, "return_tokens_as_token_ids": True, **fields}
        if self.model:
            head["model"] = self.model
        sent = sum(len(c) for c in contexts) + sum(len(t) for t in tails or ())
        content = body_with_lists(head, "prompt", contexts, tails)
        data = await self._request("POST", "/v1/completions", content=content, decode=checked("id", sent))
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as err:
            raise InvalidResponseError(f"{self.base_url}: completions reply without choices ({err})") from err
        if len(choices) != len(contexts):
            raise InvalidResponseError(f"{self.base_url}: {len(choices)} choices for {len(contexts)} prompts")
        return choices

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        # Prompt log probabilities: exact, but they skip the prefix cache (the whole
        # sequence is computed again).
        body: dict[str, Any] = {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        if self.model:
            body["model"] = self.model
        data = await self._request("POST", "/v1/completions", body, decode=checked("id", len(ids)))
        return self._prompt_logprobs(lambda: data["choices"][0]["prompt_logprobs"], ids, start)

    def _prompt_logprobs(self, entries_of: Callable[[], Any], ids: list[int], start: int) -> list[float]:
        """Each token's log probability from vLLM's ``prompt_logprobs`` (one object per
        position, keyed by id), from `start` on; `entries_of` finds them in the reply."""
        try:
            entries = entries_of()
            return [_wire(entries[i][str(ids[i])]["logprob"]) for i in range(start, len(ids))]
        except (KeyError, IndexError, TypeError) as err:
            raise InvalidResponseError(f"{self.base_url}: prompt_logprobs reply without position {err}") from err


def vllm_error_message(body: Any) -> str | None:
    """The message of a vLLM error body: ``{"error": {"message", "type", "param",
    "code"}}`` since 0.10.1, the flat ``{"object": "error", "message", ...}`` up to
    0.10.0, and ``{"error": "Unauthorized"}`` from its API-key check."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(body.get("message"), str):
        return str(body["message"])
    return err if isinstance(err, str) else None


def _over_logprobs_cap(body: Any, message: str | None) -> bool:
    """vLLM's refusal of a request for more log probabilities than ``--max-logprobs``:
    ``param`` names ``logprobs`` or ``prompt_logprobs`` (0.10.1 on), or the message says
    so ("Requested sample logprobs of 25, which is greater than max allowed: 20")."""
    fields = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
    param = fields.get("param") if isinstance(fields, dict) else None
    if param in ("logprobs", "prompt_logprobs"):
        return True
    return message is not None and "logprobs" in message and "max" in message.lower()


def tokenizer_facts(data: dict[str, Any]) -> TokenizerFacts:
    """What vLLM's ``/tokenizer_info`` declares (the tokenizer's configuration: its
    special strings, ``model_max_length``, ``added_tokens_decoder`` by id)."""
    specials: dict[str, int] = {}
    added = data.get("added_tokens_decoder")
    for key, token in (added if isinstance(added, dict) else {}).items():
        if isinstance(token, dict) and token.get("special") and isinstance(token.get("content"), str):
            try:
                specials[token["content"]] = int(key)
            except ValueError:
                continue
    length = data.get("model_max_length")
    return TokenizerFacts(
        eos_token=_token_text(data.get("eos_token")),
        bos_token=_token_text(data.get("bos_token")),
        model_max_length=length if isinstance(length, int) and not isinstance(length, bool) else None,
        special_tokens=specials,
    )


def _token_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _token_id(key: Any) -> int:
    """An id from a ``token_id:N`` key (``return_tokens_as_token_ids``)."""
    try:
        return int(str(key).rsplit(":", 1)[-1])
    except ValueError as err:
        raise InvalidResponseError(f"a token key that is not an id: {key!r}") from err


def _keyed_entries(top: Any) -> list[tuple[int, float]]:
    """A generated position's ``{"token_id:N": logprob}`` entries."""
    if not isinstance(top, dict):
        raise InvalidResponseError(f"unexpected top_logprobs entry: {top!r}")
    return [(_token_id(k), _wire(v)) for k, v in top.items()]


def _ranked_entries(entry: Any, top_k: int) -> list[tuple[int, float]]:
    """A prompt position's entries within the top k (vLLM adds the prompt's own token,
    which may rank lower: left out, as the one-token path sees the position)."""
    if not isinstance(entry, dict):
        raise InvalidResponseError(f"unexpected prompt_logprobs entry: {entry!r}")
    ranked = sorted(entry.items(), key=lambda kv: kv[1].get("rank") or top_k + 1)
    return [(int(k), _wire(v["logprob"])) for k, v in ranked if (v.get("rank") or top_k + 1) <= top_k]


def _wire(value: Any) -> float:
    return -np.inf if value is None or value <= -9999.0 else float(value)


def token_list(data: Any, where: str) -> list[int]:
    """The ids of a ``/tokenize`` reply (``{"tokens": [...], ...}``)."""
    tokens = data.get("tokens") if isinstance(data, dict) else None
    # Each id's type looked at in C (a JSON reply's ids are plain ints; a bool, float or
    # string is another type): a Python loop over a long prompt cost as much as the request.
    if not isinstance(tokens, list) or not set(map(type, tokens)) <= {int}:
        raise IncompleteReplyError(f"{where}: a /tokenize reply without a list of token ids: {str(data)[:200]}")
    return tokens


def chat_or_text(prompt: str | None, messages: list[dict[str, str]] | None, add_special_tokens: bool) -> dict[str, Any]:
    """A ``/tokenize`` body, the same for vLLM and SGLang: chat messages rendered by the
    server's template with the generation prompt and no added special tokens, or a text."""
    if messages is not None:
        return {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
    return {"prompt": prompt, "add_special_tokens": add_special_tokens}


def checked(id_key: str, sent: int) -> Callable[[bytes, str], Any]:
    """A decoder of a JSON reply that checks it against its request: its id (at
    `id_key`) and ``usage.prompt_tokens`` (`sent`), where it has them."""

    def decode(raw: bytes, request_id: str) -> Any:
        data = json_body(raw)
        if isinstance(data, dict):
            usage = data.get("usage")
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            check_echo("the reply", data.get(id_key), request_id, tokens, sent)
        return data

    return decode


def parse_topk(raw: bytes, rows: int, width: int, request_id: str | None = None, sent: list[int] | None = None) -> TopK:
    """Arrays from a completions reply (parsed in Rust, without building Python objects),
    checked against the request's id and prompt token counts."""
    ids, logp, cached = _core.parse_completions_topk(raw, rows, width, request_id, sent)
    return TopK(ids, logp, cached)
