"""Several replicas of one model behind the `Backend` protocol.

Each sequence stays on the replica it started on (its context grows by one token a step
and only that replica holds it in its prefix cache); a new sequence goes to the replica
with the fewest sequences. A batch is split into one request per replica. A replica that
still fails after its retries (unreachable, 5xx, replies that do not parse or answer
another request) is taken out of rotation and its sequences move to the others, losing
only their cache; it is probed in the background and taken back only once it passes the
same checks as at start (model, dialect, vocabulary, special tokens, context length,
log probabilities as many as asked). Only when every replica of the model is down do
requests fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from ..exceptions import APIConnectionError, DualSampleError, InternalServerError, InvalidResponseError
from .base import Backend, Positions, TopK, join, rows_of_sequences, stack
from .context import Context
from .facts import ModelCard, TokenizerFacts
from .http import RequestStats

log = logging.getLogger("dualsample_rs.replicas")
T = TypeVar("T")
# Seconds between probes of a replica out of rotation.
PROBE_INTERVAL = 1.0
# Prompts whose ids are remembered per model: users repeat prompts (n samples of each),
# and a prompt's ids do not change while the model's tokenizer does not.
TOKENIZE_CACHE = 4096
# Texts of generated ids remembered per model, for id lists of at most DETOKENIZE_IDS:
# short records (labels, short answers, `--max-tokens 2`) repeat the same few ids, and
# each repeat would otherwise cost a /detokenize request. Longer lists seldom repeat, so
# they are asked every time and never held.
DETOKENIZE_CACHE = 4096
DETOKENIZE_IDS = 16
# Retries, at least, of a /tokenize or /detokenize request: each is cheap and asked once
# per record, so a record should not fail for want of them on a server that refuses a
# share of requests (at 20% refused, three retries lose one request in 625, eight one in
# two million).
TEXT_RETRIES = 8


@dataclass
class ReplicaStats:
    """One replica's share of the work."""

    url: str
    sequences: int = 0
    failures: int = 0
    down: bool = False


def _patient(backend: Backend) -> Backend:
    """The replica with at least TEXT_RETRIES retries (see there). A backend with no
    retry limit of its own (one not over HTTP) is used as it is."""
    retries = getattr(backend, "max_retries", TEXT_RETRIES)
    if retries >= TEXT_RETRIES:
        return backend
    patient: Backend = backend.with_options(max_retries=TEXT_RETRIES)  # type: ignore[attr-defined]
    return patient


def _replica_failure(err: BaseException) -> bool:
    """Failures that say the replica is unwell, not that the request was wrong."""
    return isinstance(err, (APIConnectionError, InternalServerError, InvalidResponseError))


class ReplicaSet:
    """The replicas of one model; `probe(backend)` checks a replica as at start-up and
    returns what must not change when it comes back (raising when it fails a check)."""

    def __init__(
        self, replicas: Sequence[Backend], probe: Callable[[Backend], Awaitable[object]] | None = None
    ) -> None:
        self.replicas: list[Backend] = list(replicas)
        self.load = [0] * len(replicas)
        self.replica_stats = [ReplicaStats(r.base_url) for r in replicas]
        self.dialect = replicas[0].dialect
        self.max_scored_ids = replicas[0].max_scored_ids
        self.base_url = replicas[0].base_url if len(replicas) == 1 else ",".join(r.base_url for r in replicas)
        self._probe = probe
        self._expected: list[object] = [None] * len(replicas)
        self._probes: dict[int, asyncio.Task[None]] = {}
        # Ids of prompts tokenised before, and requests under way (so that n copies of a
        # prompt arriving together ask once).
        self._tokenized: _Remembered[tuple[object, ...], tuple[int, ...]] = _Remembered(lambda: TOKENIZE_CACHE)
        # The same for the texts of short id lists (see DETOKENIZE_CACHE).
        self._detokenized: _Remembered[tuple[int, ...], str] = _Remembered(lambda: DETOKENIZE_CACHE)
        # Each replica's client for text requests (see `_patient`), made once.
        self._patients: dict[int, Backend] = {}

    # ------------------------------------------------------------ bookkeeping
    @property
    def model(self) -> str | None:
        return self.replicas[0].model

    @model.setter
    def model(self, name: str | None) -> None:
        for r in self.replicas:
            r.model = name

    @property
    def stats(self) -> RequestStats:
        if len(self.replicas) == 1:
            return self.replicas[0].stats
        return RequestStats(**{f: sum(getattr(r.stats, f) for r in self.replicas) for f in RequestStats.counters()})

    def expect(self, index: int, fingerprint: object) -> None:
        """What replica `index` answered at start-up, to compare when it comes back."""
        self._expected[index] = fingerprint

    def _up(self) -> list[int]:
        return [i for i, s in enumerate(self.replica_stats) if not s.down]

    def _place(self, ctx: Context) -> int:
        if ctx.replica is None or self.replica_stats[ctx.replica].down:
            up = self._up()
            if not up:
                raise APIConnectionError(f"every replica is out of rotation: {self.base_url}")
            if ctx.replica is not None:
                self.load[ctx.replica] -= 1
            ctx.replica = min(up, key=lambda i: self.load[i])
            self.load[ctx.replica] += 1
            self.replica_stats[ctx.replica].sequences += 1
        return ctx.replica

    def release(self, contexts: Sequence[Context]) -> None:
        """The sequences of these contexts are finished: free their places."""
        for ctx in contexts:
            if ctx.replica is not None:
                self.load[ctx.replica] -= 1
                ctx.replica = None

    def _take_down(self, index: int, err: BaseException) -> None:
        if self.replica_stats[index].down:
            return
        self.replica_stats[index].down = True
        self.replica_stats[index].failures += 1
        log.warning("replica %s out of rotation after: %s", self.replicas[index].base_url, err)
        if self._probe is not None and len(self.replicas) > 1:
            self._probes[index] = asyncio.create_task(self._watch(index))

    def start_down(self, index: int, err: BaseException) -> None:
        """Replica `index` did not answer at start-up: out of rotation, probed."""
        self._take_down(index, err)

    async def _watch(self, index: int) -> None:
        replica = self.replicas[index]
        said = ""
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                assert self._probe is not None
                seen = await self._probe(replica)
            except DualSampleError as err:
                if not isinstance(err, APIConnectionError) and str(err) != said:
                    log.error("replica %s answers but fails a start-up check: %s", replica.base_url, err)
                    said = str(err)
                continue
            if seen != self._expected[index]:
                if said != "changed":
                    log.error(
                        "replica %s serves another model, vocabulary or context length; it stays out of rotation",
                        replica.base_url,
                    )
                    said = "changed"
                continue
            self.replica_stats[index].down = False
            log.warning("replica %s back in rotation", replica.base_url)
            return

    # ------------------------------------------------------------ requests
    async def _per_replica(
        self, contexts: Sequence[Context], call: Callable[[Backend, list[int]], Awaitable[T]]
    ) -> list[tuple[list[int], T]]:
        """`call(replica, rows)` for the rows each replica serves, all at once; rows of a
        replica that fails move to the others and are asked again there."""
        results: list[tuple[list[int], T]] = []
        todo = list(range(len(contexts)))
        while todo:
            groups: dict[int, list[int]] = {}
            for r in todo:
                groups.setdefault(self._place(contexts[r]), []).append(r)
            got = await asyncio.gather(
                *(call(self.replicas[i], rows) for i, rows in groups.items()), return_exceptions=True
            )
            todo = []
            for (i, rows), g in zip(groups.items(), got, strict=True):
                if isinstance(g, BaseException):
                    # Another call may have taken this replica down already: what
                    # matters is whether any other replica is still up.
                    if not _replica_failure(g) or not any(j != i for j in self._up()):
                        raise g
                    self._take_down(i, g)
                    todo += rows
                else:
                    results.append((rows, g))
        return results

    async def topk(self, contexts: Sequence[Context], top_k: int) -> TopK:
        if len(self.replicas) == 1:
            return await self.replicas[0].topk(contexts, top_k)
        parts = await self._per_replica(contexts, lambda b, rows: b.topk([contexts[r] for r in rows], top_k))
        width = max(p.ids.shape[1] for _, p in parts)
        ids = np.full((len(contexts), width), -1, dtype=np.int64)
        logp = np.full((len(contexts), width), -np.inf)
        for rows, p in parts:
            ids[rows, : p.ids.shape[1]] = p.ids
            logp[rows, : p.logp.shape[1]] = p.logp
        return TopK(ids, logp)

    async def score(self, contexts: Sequence[Context], ids: np.ndarray) -> np.ndarray:
        if len(self.replicas) == 1:
            return await self.replicas[0].score(contexts, ids)
        parts = await self._per_replica(contexts, lambda b, rows: b.score([contexts[r] for r in rows], ids[rows]))
        out = np.full(ids.shape, -np.inf)
        for rows, p in parts:
            out[rows] = p
        return out

    async def speculation_problem(
        self, verify: bool, recompute: bool = False, score_ids: bool = False, top_k: int = 1
    ) -> str | None:
        for replica in self.replicas:
            problem = await replica.speculation_problem(verify, recompute, score_ids, top_k)
            if problem is not None:
                return problem
        return None

    async def _per_sequence(
        self, contexts: Sequence[Context], lengths: np.ndarray, call: Callable[[Backend, list[int]], Awaitable[T]]
    ) -> tuple[list[T], np.ndarray]:
        """`call` for the sequences each replica serves; the answers (flat rows of those
        sequences, one after another) and where their rows go in the callers' order."""
        parts = await self._per_replica(contexts, call)
        order = np.concatenate([rows_of_sequences(lengths, rows) for rows, _ in parts])
        return [p for _, p in parts], np.argsort(order, kind="stable")

    async def draft(self, contexts: Sequence[Context], lengths: Sequence[int], top_k: int) -> Positions:
        if len(self.replicas) == 1:
            return await self.replicas[0].draft(contexts, lengths, top_k)
        parts = await self._per_replica(
            contexts, lambda b, rows: b.draft([contexts[r] for r in rows], [lengths[r] for r in rows], top_k)
        )
        joined = join([p for _, p in parts])
        where = {r: i for i, r in enumerate(r for rows, _ in parts for r in rows)}
        return joined.of([where[r] for r in range(len(contexts))])

    async def continuation_topk(self, contexts: Sequence[Context], continuations: Positions, top_k: int) -> TopK:
        if len(self.replicas) == 1:
            return await self.replicas[0].continuation_topk(contexts, continuations, top_k)
        parts, back = await self._per_sequence(
            contexts,
            continuations.lengths,
            lambda b, rows: b.continuation_topk([contexts[r] for r in rows], continuations.of(rows), top_k),
        )
        top = stack(parts)
        return TopK(top.ids[back], top.logp[back])

    async def continuation_scores(
        self, contexts: Sequence[Context], continuations: Positions, ids: np.ndarray
    ) -> np.ndarray:
        if len(self.replicas) == 1:
            return await self.replicas[0].continuation_scores(contexts, continuations, ids)
        parts, back = await self._per_sequence(
            contexts,
            continuations.lengths,
            lambda b, rows: b.continuation_scores(
                [contexts[r] for r in rows], continuations.of(rows), ids[continuations.rows_of(rows)]
            ),
        )
        scores: np.ndarray = np.concatenate(parts)[back]
        return scores

    async def _any(self, call: Callable[[Backend], Awaitable[T]]) -> T:
        """`call` on a replica in rotation, failing over to the others."""
        while True:
            up = self._up()
            if not up:
                raise APIConnectionError(f"every replica is out of rotation: {self.base_url}")
            index = min(up, key=lambda i: self.load[i])
            try:
                return await call(self.replicas[index])
            except DualSampleError as err:
                if not _replica_failure(err) or len(up) <= 1:
                    raise
                self._take_down(index, err)

    async def models(self) -> list[ModelCard]:
        return await self._any(lambda b: b.models())

    def _patient(self, backend: Backend) -> Backend:
        """`backend` with at least TEXT_RETRIES retries, the same client every time (a
        new one per request cost as much as the rest of the client's work on it)."""
        patient = self._patients.get(id(backend))
        if patient is None:
            patient = self._patients[id(backend)] = _patient(backend)
        patient.model = backend.model  # the handshake may name it after the first use
        return patient

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """The ids, asked of one replica once per distinct prompt (see TOKENIZE_CACHE)."""
        key = (prompt, None if messages is None else json.dumps(messages, sort_keys=True), add_special_tokens)
        ids = await self._tokenized.get(
            key,
            lambda: self._any(
                lambda b: self._patient(b).tokenize(prompt, messages=messages, add_special_tokens=add_special_tokens)
            ),
            tuple,
        )
        return list(ids)

    async def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`; for a short list, asked of one replica once per distinct list
        (see DETOKENIZE_CACHE)."""
        if len(ids) > DETOKENIZE_IDS:
            return await self._any(lambda b: self._patient(b).detokenize(ids))
        key = tuple(ids)
        return await self._detokenized.get(
            key, lambda: self._any(lambda b: self._patient(b).detokenize(list(key))), str
        )

    async def tokenizer_info(self) -> TokenizerFacts | None:
        return await self._any(lambda b: b.tokenizer_info())

    async def sequence_logprobs(self, ids: list[int], start: int) -> list[float]:
        return await self._any(lambda b: b.sequence_logprobs(ids, start))

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        await asyncio.gather(*(r.aclose() for r in self.replicas))


K = TypeVar("K")
V = TypeVar("V")


class _Remembered(Generic[K, V]):
    """Answers by key, the latest `size()` of them, and the requests under way, so that
    callers asking for one key together send one request. A failure is not remembered:
    the next caller asks again.

    The first caller for a key asks in place, with no task of its own: a task and the
    shield around it cost more than the rest of the call, and a short record makes two.
    Callers that come while it asks wait for its answer; if it is cancelled (its record
    dropped), its request goes with it and they ask again, one of them in its place."""

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size  # read at each insertion, so a test can shrink the module's constant
        self._done: OrderedDict[K, V] = OrderedDict()
        self._pending: dict[K, asyncio.Future[object]] = {}

    async def get(self, key: K, ask: Callable[[], Awaitable[T]], keep: Callable[[T], V]) -> V:
        """The answer remembered for `key`, else `keep(await ask())`, remembered."""
        while True:
            known = self._done.get(key)
            if known is not None:
                self._done.move_to_end(key)
                return known
            pending = self._pending.get(key)
            if pending is None:
                return await self._ask(key, ask, keep)
            # Shielded: a waiter cancelled leaves the shared answer to the others.
            got = await asyncio.shield(pending)
            if got is not _ASK_AGAIN:
                return got  # type: ignore[return-value]

    async def _ask(self, key: K, ask: Callable[[], Awaitable[T]], keep: Callable[[T], V]) -> V:
        shared: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[key] = shared
        try:
            value = keep(await ask())
        except asyncio.CancelledError:
            del self._pending[key]
            shared.set_result(_ASK_AGAIN)
            raise
        except BaseException as err:
            del self._pending[key]
            shared.set_exception(err)
            shared.exception()  # read here, so that no waiter is no warning
            raise
        del self._pending[key]
        self._done[key] = value
        if len(self._done) > self._size():
            self._done.popitem(last=False)
        shared.set_result(value)
        return value


# What the waiters on a cancelled caller's request get: ask again.
_ASK_AGAIN = object()
