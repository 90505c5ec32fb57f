"""What the dual step asks of a server, whatever its wire dialect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..exceptions import IncompleteReplyError, InvalidResponseError, MismatchedReplyError
from .context import Context
from .facts import ModelCard, TokenizerFacts
from .http import RequestStats

# vLLM's cap on ids scored in one request (`MAX_LOGPROB_TOKEN_IDS`).
VLLM_MAX_SCORED_IDS = 128


@dataclass
class TopK:
    """Each row's entries at the next position: ids (int64, -1 padding) and raw log
    probabilities (-inf padding), one row per context."""

    ids: np.ndarray
    logp: np.ndarray
    #: prompt tokens the server's prefix cache served, where the reply says
    cached_tokens: int | None = None

    def rows(self, start: int, stop: int | None) -> TopK:
        return TopK(self.ids[start:stop], self.logp[start:stop])


@dataclass
class Positions:
    """Rows at consecutive positions of several sequences, flat: sequence s owns
    ``lengths[s]`` rows, in order after those of the sequences before it. ``tokens[i]``
    is the token at row i's position (drafted, or replayed) and ``top`` its entries
    (the row before the token)."""

    tokens: np.ndarray
    top: TopK
    lengths: np.ndarray

    def rows_of(self, sequences: Sequence[int]) -> np.ndarray:
        """The row indices of the given sequences, in that order."""
        return rows_of_sequences(self.lengths, sequences)

    def of(self, sequences: Sequence[int]) -> Positions:
        """The bundle of the given sequences only, in that order."""
        rows = self.rows_of(sequences)
        top = TopK(self.top.ids[rows], self.top.logp[rows])
        return Positions(self.tokens[rows], top, self.lengths[list(sequences)])

    def split_tokens(self) -> list[list[int]]:
        """Each sequence's tokens (to build one request per sequence)."""
        return [t.tolist() for t in np.split(self.tokens, np.cumsum(self.lengths)[:-1])]


def rows_of_sequences(lengths: np.ndarray, sequences: Sequence[int]) -> np.ndarray:
    """The flat row indices of `sequences` when sequence s has ``lengths[s]`` rows."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    parts = [np.arange(starts[s], starts[s] + lengths[s], dtype=np.int64) for s in sequences]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def stack(parts: Sequence[TopK]) -> TopK:
    """The rows of several `TopK` one after another (narrower ones padded)."""
    width = max((p.ids.shape[1] for p in parts), default=1)
    rows = sum(p.ids.shape[0] for p in parts)
    ids = np.full((rows, width), -1, dtype=np.int64)
    logp = np.full((rows, width), -np.inf)
    r = 0
    for p in parts:
        n, w = p.ids.shape
        ids[r : r + n, :w], logp[r : r + n, :w] = p.ids, p.logp
        r += n
    return TopK(ids, logp)


def join(parts: Sequence[Positions]) -> Positions:
    """Several bundles, sequences of each after those of the one before."""
    return Positions(
        np.concatenate([p.tokens for p in parts]).astype(np.int64),
        stack([p.top for p in parts]),
        np.concatenate([p.lengths for p in parts]).astype(np.int64),
    )


async def drafts_by_length(
    contexts: Sequence[Context],
    lengths: Sequence[int],
    group: Callable[[int, list[Context]], Awaitable[Positions]],
) -> Positions:
    """Drafts from batched requests that take one generation length each: `group`
    drafts that many tokens past each of its contexts; groups run at once."""
    rows_of_length: dict[int, list[int]] = {}
    for r, n in enumerate(lengths):
        rows_of_length.setdefault(n, []).append(r)
    groups = list(rows_of_length.items())
    got = await asyncio.gather(*(group(n, [contexts[r] for r in rows]) for n, rows in groups))
    joined = join(got)
    # Back in the callers' order: sequence r is the i-th of the joined groups.
    order = [r for _, rows in groups for r in rows]
    where = {r: i for i, r in enumerate(order)}
    return joined.of([where[r] for r in range(len(contexts))])


def rows_of(positions: list[list[tuple[int, float]]], width: int) -> TopK:
    """(positions, width) arrays from each position's ``(id, logprob)`` entries."""
    ids = np.full((len(positions), width), -1, dtype=np.int64)
    logp = np.full((len(positions), width), -np.inf)
    for r, entries in enumerate(positions):
        for c, (t, lp) in enumerate(entries[:width]):
            ids[r, c], logp[r, c] = t, lp
    return TopK(ids, logp)


class Backend(Protocol):
    """One server in one wire dialect. Contexts are token ids; every log probability is
    the model's raw log-softmax (temperature is applied by the caller)."""

    dialect: str
    base_url: str
    model: str | None
    #: The most ids one scoring request may name (None: no cap).
    max_scored_ids: int | None

    @property
    def stats(self) -> RequestStats:
        """Requests, retries and failures so far."""
        ...

    async def models(self) -> list[ModelCard]: ...

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]: ...

    async def detokenize(self, ids: list[int]) -> str: ...

    async def tokenizer_info(self) -> TokenizerFacts | None: ...

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        """The top-k at the next position of each context: (rows, top_k + 1) arrays."""
        ...

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        """The log probability of each of ``ids[r]`` (-1 padding) at the next position of
        ``contexts[r]``: an array shaped like `ids`, -inf at the padding."""
        ...

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        """log π(ids[i] | ids[:i]) for every i from `start` (>= 1) to the end."""
        ...

    async def speculation_problem(
        self, verify: bool, recompute: bool = False, score_ids: bool = False, top_k: int = 1
    ) -> str | None:
        """Why this server cannot draft in speculative rounds, or with `verify` score the
        drafted positions (keeping its prefix cache, unless `recompute` allows scoring
        the whole context again; with `score_ids`, given ids (the teacher's candidates); `top_k` entries
        per position); None when it can."""
        ...

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> Positions:
        """``lengths[r]`` tokens generated greedily past each context (no stop), with the
        top-k at each of their positions."""
        ...

    async def continuation_topk(self, contexts: Sequence[Context], continuations: Positions, top_k: int) -> TopK:
        """The top-k at each row of `continuations` (its sequence r continues
        ``contexts[r]``), in one request per context that keeps its prefix cache; the
        rows come back in the same order."""
        ...

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Positions, ids: np.ndarray
    ) -> np.ndarray:
        """Like `continuation_topk`, the log probabilities of given ids instead: row i
        of `ids` (-1 padding) at row i of `continuations`."""
        ...

    async def aclose(self) -> None: ...


def check_echo(where: str, got_id: Any, request_id: str, got_tokens: Any, sent_tokens: int) -> None:
    """A reply read in Python against its request, as the Rust readers check theirs: the
    id it echoes (``request_id`` as a whole ``-``-separated part) and its prompt tokens,
    each where the reply has them."""
    if isinstance(got_id, str) and request_id not in got_id.split("-"):
        raise MismatchedReplyError(f"{where}: a reply to another request (id {got_id!r}, sent {request_id!r})")
    if isinstance(got_tokens, int) and got_tokens != sent_tokens:
        raise MismatchedReplyError(
            f"{where}: a reply to another request ({got_tokens} prompt tokens, the request sent {sent_tokens})"
        )


def gather_scores(wanted: np.ndarray, got: TopK, where: str) -> np.ndarray:
    """Each row's log probabilities of the ids in `wanted` (-1 padding), looked up among
    the ids the server returned for that row; a wanted id the reply lacks is an error."""
    match = wanted[:, :, None] == got.ids[:, None, :]  # (rows, m, width)
    found = match.any(axis=2)
    pad = wanted < 0
    if not (found | pad).all():
        r, c = np.argwhere(~(found | pad))[0]
        raise IncompleteReplyError(f"{where}: the reply has no log probability for id {wanted[r, c]} (row {r})")
    # An id listed twice is read once (its first entry).
    first = match.argmax(axis=2)
    out: np.ndarray = got.logp[np.arange(len(wanted))[:, None], first]
    out[pad] = -np.inf
    return out


def scoring_groups(ids: np.ndarray, cap: int) -> list[tuple[np.ndarray, list[int]]]:
    """Rows grouped so that the ids each group names together are at most `cap`:
    ``(row indices, sorted union of their ids)``. Rows are taken in order and a group
    is closed when the next row would push it over the cap."""
    groups: list[tuple[np.ndarray, list[int]]] = []
    rows: list[int] = []
    union: set[int] = set()
    for r in range(ids.shape[0]):
        row = {int(t) for t in ids[r] if t >= 0}
        if len(row) > cap:
            raise InvalidResponseError(f"row {r}: {len(row)} ids to score, more than the server's cap of {cap}")
        if rows and len(union | row) > cap:
            groups.append((np.array(rows), sorted(union)))
            rows, union = [], set()
        rows.append(r)
        union |= row
    if rows:
        groups.append((np.array(rows), sorted(union)))
    return groups
