"""How a round asks the servers: one strategy per run, chosen once at start-up.

Every strategy answers with one `Bundle` of flat rows, one per (sequence, position),
which is what the Rust `step` takes:

- `BothTopK`: one position per sequence; both models' top-k, asked at once.
- `TeacherThenBase` (``scoring="exact"``): one position; the teacher's top-k, then the
  base scores exactly those candidates, so q* lives on the teacher's candidates and
  every reported number is a model's own.
- `Mixed` (a mixture of teachers): one position; the base's and every teacher's top-k,
  asked at once, the teachers' lists made one mixed teacher by the Rust `mix_teachers`.
- `DraftThenVerify` (``speculate``): the teacher drafts L tokens greedily with its top-k
  at each of their positions; the base then lists its own top-k at those positions, or
  with exact scoring scores the teacher's candidates there, in one request that keeps
  its prefix cache.

This is the one module that knows what exact scoring changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from .. import _core
from ..backends import Backend, Positions, TopK
from ..config.coordinator import CoordinatorConfig
from ..exceptions import BadRequestError
from .sequence import Sequence


@dataclass
class Bundle:
    """A round's rows: sequence s owns ``lengths[s]`` consecutive rows; ``base`` and
    ``teacher`` are each model's entries at those rows; ``drafts`` is the drafted token
    each row tests (-1: drawn afresh), None when nothing is drafted. When
    ``base_scores_teacher_ids``, the base's row holds its values of the teacher's ids.
    For a mixture, ``teacher`` is the mixed teacher and ``teachers`` each one's lists."""

    lengths: np.ndarray
    base: TopK
    teacher: TopK
    drafts: np.ndarray | None = None
    base_scores_teacher_ids: bool = False
    teachers: dict[str, TopK] | None = None
    #: each row's entries are by ascending id (see `in_id_order`)
    by_id: bool = False

    def in_id_order(self) -> Bundle:
        """The bundle with each row's entries by ascending id, padding (-1) last; a base
        row that holds its values of the teacher's ids keeps their order."""
        if self.by_id:
            return self

        def order(top: TopK) -> np.ndarray:
            return np.argsort(np.where(top.ids < 0, np.iinfo(np.int64).max, top.ids), axis=1, kind="stable")

        def take(top: TopK, at: np.ndarray) -> TopK:
            return TopK(np.take_along_axis(top.ids, at, axis=1), np.take_along_axis(top.logp, at, axis=1))

        by_t = order(self.teacher)
        base = take(self.base, by_t if self.base_scores_teacher_ids else order(self.base))
        return dataclasses.replace(self, base=base, teacher=take(self.teacher, by_t), by_id=True)

    def rows(self, start: int, stop: int) -> Bundle:
        """The rows of sequences ``start`` to ``stop``."""
        ends = np.cumsum(self.lengths)
        a = int(ends[start - 1]) if start else 0
        b = int(ends[stop - 1]) if stop else 0
        return Bundle(
            self.lengths[start:stop],
            TopK(self.base.ids[a:b], self.base.logp[a:b]),
            TopK(self.teacher.ids[a:b], self.teacher.logp[a:b]),
            None if self.drafts is None else self.drafts[a:b],
            self.base_scores_teacher_ids,
            None if self.teachers is None else {name: top.rows(a, b) for name, top in self.teachers.items()},
            self.by_id,
        )


class SharedBase:
    """The base's top-k at the next position of every sequence of a batch, asked in one
    request and shared by the rounds of the batch's teachers (docs/design.md, 3.2.1)."""

    def __init__(self, base: Backend, batch: list[Sequence], top_k: int) -> None:
        self.index = {id(s): i for i, s in enumerate(batch)}
        self.task = asyncio.ensure_future(base.topk([s.ctx_base for s in batch], top_k))

    async def rows(self, rows: list[Sequence]) -> TopK | None:
        """The shared reply's rows for `rows`; None when some are not in it, or when the
        server refused the request (each share then asks alone, so that the sequence it
        was refused for is found)."""
        at = [self.index.get(id(s)) for s in rows]
        if any(i is None for i in at):
            return None
        try:
            top = await asyncio.shield(self.task)
        except BadRequestError:
            return None
        pick = np.array(at, dtype=np.int64)
        return TopK(top.ids[pick], top.logp[pick])

    async def close(self) -> None:
        """Cancel the request if no share waited for it, else collect its error."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _base_topk(base: Backend, rows: list[Sequence], top_k: int, shared: SharedBase | None) -> TopK:
    """The base's top-k for `rows`: from the batch's shared request where it has them."""
    got = None if shared is None else await shared.rows(rows)
    return got if got is not None else await base.topk([s.ctx_base for s in rows], top_k)


class Strategy(Protocol):
    """Asks both servers for a round's rows."""

    #: it asks the teacher, then the base (two workers or more keep both busy); if not, it
    #: asks the base for its top-k at the next position beside the teacher, and takes it
    #: from `shared` where given
    serial: bool

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        """The rows for ``lengths[s]`` positions of each sequence ``rows[s]`` (`shared`:
        the base's top-k for the whole batch, for a strategy that is not serial)."""
        ...


def scored_ids(config: CoordinatorConfig) -> tuple[int, int]:
    """The most ids each server, (base, teacher), will be asked to score at one
    position (0: none), which start-up checks against the server's cap."""
    return (config.sampler.top_k if config.base_scores_candidates else 0), 0


def choose(config: CoordinatorConfig, base: Backend, teacher: Backend, speculate: int | str) -> Strategy:
    """The run's strategy (`speculate`: what start-up found the servers allow)."""
    exact, k = config.base_scores_candidates, config.sampler.top_k
    if speculate:
        return DraftThenVerify(base, teacher, k, exact)
    return TeacherThenBase(base, teacher, k) if exact else BothTopK(base, teacher, k)


async def speculation_problem(config: CoordinatorConfig, base: Backend, teacher: Backend) -> str | None:
    """Why speculative rounds cannot run on these servers (None: they can)."""
    return await teacher.speculation_problem(False, top_k=config.sampler.top_k) or await base.speculation_problem(
        True, config.run.verify_prompt_logprobs, config.base_scores_candidates, config.sampler.top_k
    )


class BothTopK:
    """Both models' top-k at the next position, asked at once."""

    serial = False

    def __init__(self, base: Backend, teacher: Backend, top_k: int) -> None:
        self.base, self.teacher, self.top_k = base, teacher, top_k

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        got = await asyncio.gather(
            _base_topk(self.base, rows, self.top_k, shared),
            self.teacher.topk([s.ctx_teacher for s in rows], self.top_k),
            return_exceptions=True,
        )
        base, teacher = got
        # The base's error first, as when asked one after the other.
        for g in got:
            if isinstance(g, BaseException):
                raise g
        assert isinstance(base, TopK) and isinstance(teacher, TopK)
        return Bundle(np.ones(len(rows), dtype=np.int64), base, teacher)


class Mixed:
    """The base's and each teacher's top-k at the next position, asked at once; the
    teachers' lists become one teacher, Σ w_i log π_i over their union (the step then
    normalises it: the teachers' normalised geometric mean). Each teacher's context is
    the sequence's ``ctx_teacher`` for the first, then ``more_teachers`` in order."""

    serial = False

    def __init__(
        self,
        base: Backend,
        teachers: Mapping[str, tuple[Backend, float]],
        top_k: int,
        missing: Literal["bound", "drop"] | float,
    ) -> None:
        self.base, self.teachers, self.top_k, self.missing = base, teachers, top_k, missing

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        asks = [_base_topk(self.base, rows, self.top_k, shared)]
        for i, (backend, _) in enumerate(self.teachers.values()):
            asks.append(backend.topk([s.ctx_teacher if i == 0 else s.more_teachers[i - 1] for s in rows], self.top_k))
        got = await asyncio.gather(*asks, return_exceptions=True)
        for g in got:  # the base's error first, then the teachers' in order
            if isinstance(g, BaseException):
                raise g
        base, *tops = (g for g in got if isinstance(g, TopK))
        ids, logp = _core.mix_teachers(
            [t.ids for t in tops], [t.logp for t in tops], [w for _, w in self.teachers.values()],
            missing=self.missing,
        )  # fmt: skip
        teachers = dict(zip(self.teachers, tops, strict=True))
        return Bundle(np.ones(len(rows), dtype=np.int64), base, TopK(ids, logp), teachers=teachers)


class TeacherThenBase:
    """The teacher's top-k, then the base's log probabilities of exactly those ids."""

    serial = True

    def __init__(self, base: Backend, teacher: Backend, top_k: int) -> None:
        self.base, self.teacher, self.top_k = base, teacher, top_k

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        teacher = await self.teacher.topk([s.ctx_teacher for s in rows], self.top_k)
        scores = await self.base.score([s.ctx_base for s in rows], teacher.ids)
        return Bundle(np.ones(len(rows), dtype=np.int64), TopK(teacher.ids, scores), teacher, None, True)


class DraftThenVerify:
    """The teacher drafts, then the base verifies the drafted positions in one request
    per context. Every position but each sequence's last tests its drafted token; the
    last is drawn afresh (its draft only carries the base's scoring there)."""

    serial = True

    def __init__(self, base: Backend, teacher: Backend, top_k: int, score_candidates: bool) -> None:
        self.base, self.teacher, self.top_k = base, teacher, top_k
        self.score_candidates = score_candidates

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        # Each backend's reader checks that the reply has the positions asked for.
        drafted = await self.teacher.draft([s.ctx_teacher for s in rows], lengths, self.top_k)
        contexts = [s.ctx_base for s in rows]
        if self.score_candidates:
            cap = self.base.max_scored_ids
            drafted = within_cap(drafted, cap) if cap is not None else drafted
            scores = await self.base.continuation_scores(contexts, drafted, drafted.top.ids)
            base = TopK(drafted.top.ids, scores)
        else:
            base = await self.base.continuation_topk(contexts, drafted, self.top_k)
        tested = drafted.tokens.astype(np.int64, copy=True)
        tested[np.cumsum(drafted.lengths) - 1] = -1
        return Bundle(drafted.lengths, base, drafted.top, tested, self.score_candidates)


class Joined:
    """A one-token strategy whose concurrent rounds share requests: the rounds of every
    worker that ask while a request is under way go together in the next one.

    `speculate="auto"` runs many workers with small batches, since speculative rounds
    vary in length; its rounds of one token per sequence would then send each worker's
    batch as a request of its own, where one token per step sends one request for every
    sequence in flight, and on a real engine each request costs (SGLang on CPU here: 363
    against 524 tokens/s, docs/engine-time.md). Joined, those rounds ask as one token
    per step asks: one request at a time per server (two for a strategy that asks in
    series, as one token per step then runs two workers), of at most `limit` sequences.

    A joined request the server refuses is asked again one round at a time, so that a
    bad sequence fails only its own round (which then narrows it down); any other error
    is every joined round's.
    """

    def __init__(self, inner: Strategy, limit: int) -> None:
        self.inner, self.limit = inner, limit
        self.serial = inner.serial
        self._waiting: list[tuple[list[Sequence], asyncio.Future[Bundle]]] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def __call__(self, rows: list[Sequence], lengths: list[int], shared: SharedBase | None = None) -> Bundle:
        if shared is not None:  # a batch of several teachers: its base request is shared already
            return await self.inner(rows, lengths, shared)
        future: asyncio.Future[Bundle] = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, future))
        self._start_sender()
        return await future

    def _start_sender(self) -> None:
        if len(self._senders) < (2 if self.serial else 1) and self._waiting:
            task = asyncio.create_task(self._send())
            self._senders.add(task)
            task.add_done_callback(self._sender_done)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        # A sender whose rounds were all cancelled is cancelled with them (its request
        # goes); rounds that still wait get another.
        self._senders.discard(task)
        self._start_sender()

    async def _send(self) -> None:
        """Send what waits, in requests of at most `limit` sequences, while anything does.
        The task starts on the loop's next turn, so rounds asking in the same turn
        (workers woken by one reply) go together."""
        while True:
            await asyncio.sleep(0)
            groups: list[tuple[list[Sequence], asyncio.Future[Bundle]]] = []
            size = 0
            while self._waiting and (not groups or size + len(self._waiting[0][0]) <= self.limit):
                rows, future = self._waiting.pop(0)
                if not future.done():  # its round was cancelled while it waited
                    groups.append((rows, future))
                    size += len(rows)
            if not groups:
                return
            await self._ask(groups)

    async def _ask(self, groups: list[tuple[list[Sequence], asyncio.Future[Bundle]]]) -> None:
        rows = [seq for group, _ in groups for seq in group]
        task = asyncio.current_task()

        def cancelled(_: object) -> None:
            if task is not None and all(f.cancelled() for _, f in groups):
                task.cancel()

        for _, future in groups:
            future.add_done_callback(cancelled)
        try:
            bundle = await self.inner(rows, [1] * len(rows))
        except BadRequestError as err:
            if len(groups) == 1:
                _settle(groups[0][1], error=err)
                return
            got = await asyncio.gather(*(self.inner(g, [1] * len(g)) for g, _ in groups), return_exceptions=True)
            for (_, future), g in zip(groups, got, strict=True):
                _settle(future, *((None, g) if isinstance(g, BaseException) else (g, None)))
            return
        except Exception as err:  # the server's or the reply's: every joined round's
            for _, future in groups:
                _settle(future, error=err)
            return
        # `auto` draws every row in id order (round.py): put so once per request here,
        # not once per round.
        bundle = bundle.in_id_order()
        start = 0
        for group, future in groups:
            _settle(future, bundle.rows(start, start + len(group)))
            start += len(group)


def _settle(future: asyncio.Future[Bundle], bundle: Bundle | None = None, error: BaseException | None = None) -> None:
    """Hand a joined round its rows or its error, unless it was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert bundle is not None
        future.set_result(bundle)


def within_cap(drafted: Positions, cap: int) -> Positions:
    """Each draft cut to its longest head whose positions' candidates together fit one
    scoring request (vLLM scores one list of ids for every position)."""
    heads = []
    start = 0
    for n in drafted.lengths.tolist():
        union: set[int] = set()
        keep = n
        for j in range(n):
            union |= {int(t) for t in drafted.top.ids[start + j] if t >= 0}
            if len(union) > cap:
                keep = j or n  # one position over the cap: the request says so
                break
        heads.append(np.arange(start, start + keep))
        start += n
    rows = np.concatenate(heads)
    if len(rows) == drafted.tokens.shape[0]:
        return drafted
    lengths = np.array([len(h) for h in heads], dtype=np.int64)
    return Positions(drafted.tokens[rows], TopK(drafted.top.ids[rows], drafted.top.logp[rows]), lengths)
