"""One round for a batch of sequences: ask the servers (the run's strategy), one Rust
`step` over the flat rows, apply the results.

One token per step is the round with no drafts (K = 0): one row per sequence. With
speculative rounds a sequence has K + 1 rows: the first K test the teacher's drafted
tokens in order, each accepted with probability q*(token) (a greedy draft is a point
mass, so min(1, q*/p_draft) = q*); the first rejected one is replaced by a draw from the
residual, q* without it, and ends the round; when all are accepted the last row's token
is drawn from q*. Each position's draws are keyed by (seed, sequence, position), so the
records do not depend on batching, concurrency or K: speculative rounds have exactly
the law of one token per step.

Under `speculate="auto"` a `Pace` chooses each round's kind from measured speed (K
drafts, or one token per sequence through the run's one-token strategy), and every
row is drawn as one token per step draws it, from q* at its context with the position's
uniform, over the candidates in id order; a draft counts as accepted when the draw is
the drafted token. For a greedy (point-mass) draft that is the speculative test itself,
accepted with probability q*(d), so rounds yield as many tokens; and a token does not
depend on which kind of round reached its position, so the records do not depend on
the machine's timings (but for `round` and `drafted`, which say how the run went).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from ..backends import Backend, TopK
from ..config.coordinator import CoordinatorConfig
from ..exceptions import APIError, BadRequestError, DualSampleError, InvalidInputError
from ..io.record import DIAGNOSTIC_NAMES, GenerationOutput
from .pace import Pace
from .sequence import Sequence, Truncation
from .stats import Statistics
from .strategies import Bundle, SharedBase, Strategy

_COLUMNS = ("token_id", "alpha", "logp_theta", "logp_t", "logq", "observed_theta", "observed_t", "fallback")


async def narrow(
    rows: list[Sequence],
    attempt: Callable[[int, int], Awaitable[None]],
    splittable: type[BaseException],
    start: int = 0,
    stop: int | None = None,
) -> None:
    """Run ``attempt(start, stop)`` over a range of `rows`. When it fails with
    `splittable` for more than one row, halve the range and try each half, so that one
    bad row fails alone; any other error the package raises fails every row in range."""
    stop = len(rows) if stop is None else stop
    try:
        await attempt(start, stop)
    except (APIError, DualSampleError) as err:
        if isinstance(err, splittable) and stop - start > 1:
            mid = (start + stop) // 2
            await narrow(rows, attempt, splittable, start, mid)
            await narrow(rows, attempt, splittable, mid, stop)
            return
        for seq in rows[start:stop]:
            seq.fail(err)


@dataclass
class Drawn:
    """One kernel call's result: the Rust columns, and the reported ones as lists
    (``top_cols``: the kept top ids and values, see `_top_columns`)."""

    res: _core.StepResult
    force: np.ndarray
    cols: list[list[Any]]
    diag_cols: list[list[Any]]
    top_cols: list[list[Any]]
    #: for a mixture, each teacher's (raw log probability, listed) of the token per row
    teacher_cols: dict[str, tuple[list[float], list[bool]]] | None = None
    #: per row, the most probable tokens of the law drawn from, as [ids, log probabilities]
    alternatives: list[list[Any]] | None = None


# A round's key: its teacher's name or mixture's key, and the temperature multiplying both
# models' (a call's, or a served item's own).
RoundKey = tuple[str, float]


class Routed:
    """Advances a batch whose sequences go to several teachers: each teacher's share of
    the batch in its own round, all at once (so each teacher gets one batched request,
    in parallel with the others, and one that is down fails only its own sequences).
    Sequences of one teacher at different temperatures are shares of their own."""

    def __init__(
        self,
        rounds: dict[RoundKey, Round],
        make: Callable[[RoundKey], Round],
        base: Backend,
        top_k: int,
        stats: Statistics,
    ) -> None:
        self.rounds, self.make, self.base, self.top_k, self.stats = rounds, make, base, top_k, stats

    async def __call__(self, batch: list[Sequence]) -> None:
        self.stats.steps += 1  # one step of a batch, whatever its teachers
        groups: dict[RoundKey, list[Sequence]] = {}
        for seq in batch:
            groups.setdefault(seq.round_key, []).append(seq)
        for key in groups:
            if key not in self.rounds:  # a mixture first named by a record, or another temperature
                self.rounds[key] = self.make(key)
        if len(groups) == 1:
            key, rows = next(iter(groups.items()))
            await self.rounds[key](rows)
            return
        # Where every share asks the base beside its teacher, not after it (a strategy that
        # is not serial asks the base for its top-k at the next position), the base is
        # asked once for the whole batch.
        rounds = [self.rounds[key] for key in groups]
        shared = None
        if not any(r.ask.serial for r in rounds):
            shared = SharedBase(self.base, batch, self.top_k)
        try:
            await asyncio.gather(*(r(rows, shared) for r, rows in zip(rounds, groups.values(), strict=True)))
        finally:
            if shared is not None:
                await shared.close()


class Round:
    """Advances a batch of sequences by one round each (one token, or with
    `speculate` up to K + 1).

    Args:
        ask: the run's strategy.
        config: the run's settings; `sampler` the kernel's.
        speculate: drafted tokens per round, ``"auto"``, or 0 for one token per step.
        stop_ids: ids that end a sequence; `max_model_len` each server's context length.
        diagnostics: keep the kernel's per-position divergences in the records.
        one: under ``"auto"``, the strategy of a round of one token per sequence (the
            run's without speculation); `pace` chooses each round's kind (a new one
            when not given), from round times read from `clock`.

    With ``save_topk`` N in the config, each token's record also keeps the teacher's N
    most likely ids at its position with their raw log probabilities, and the base's
    (its own N, or its values of the teacher's ids where it scored those).
    """

    def __init__(
        self,
        ask: Strategy,
        config: CoordinatorConfig,
        sampler: _core.SamplerConfig,
        speculate: int | str,
        stop_ids: tuple[int, ...],
        max_model_len: tuple[int, int],
        stats: Statistics,
        diagnostics: bool,
        one: Strategy | None = None,
        pace: Pace | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.ask, self.config, self.sampler, self.speculate = ask, config, sampler, speculate
        self.stop = frozenset(stop_ids)
        self.max_model_len = max_model_len
        self.stats, self.diagnostics = stats, diagnostics
        self.auto = speculate == "auto" and one is not None
        self.one = one
        self.pace = (pace or Pace()) if self.auto else None
        self.clock = clock

    async def __call__(self, batch: list[Sequence], shared: SharedBase | None = None) -> None:
        """One round for every sequence in `batch`; failures become per-sequence errors
        (a rejected request is split to find the sequences it was rejected for, and rows
        the kernel refuses, for bad data from a server, are isolated the same way).
        `shared`: the base's top-k for a batch holding these sequences."""
        if self.pace is None:
            await self._round(batch, shared, None)
            return
        # "auto": the pace chooses K (0: one token); it learns the round's time and tokens.
        pace = self.pace
        k = pace.choose()
        lap = pace.start(k)
        self.stats.mode_rounds[k] = self.stats.mode_rounds.get(k, 0) + 1
        before = sum(len(s.out.token_ids) for s in batch)
        t0 = self.clock()
        try:
            await self._round(batch, shared, k)
        finally:
            made = sum(len(s.out.token_ids) for s in batch) - before
            pace.observe(k, self.clock() - t0, made, lap)

    async def _round(self, batch: list[Sequence], shared: SharedBase | None, k: int | None) -> None:
        """The round, with `k` drafts per sequence under ``"auto"`` (0: one token,
        asked as without speculation; None: the run's `speculate`)."""
        ask = self.one if k == 0 and self.one is not None else self.ask

        async def attempt(start: int, stop: int) -> None:
            rows = batch[start:stop]
            lengths = [1] * len(rows) if k == 0 else [self._length(s, k) for s in rows]
            bundle = await ask(rows, lengths, shared)

            async def apply(a: int, b: int) -> None:
                self.apply(rows[a:b], bundle.rows(a, b))

            await narrow(rows, apply, InvalidInputError)

        await narrow(batch, attempt, BadRequestError)

    def _length(self, seq: Sequence, k: int | None = None) -> int:
        """Positions in this round: K drafts to test plus one (`k`, else the run's
        `speculate`), within the sequence's token budget and both servers' context
        lengths (so every draft fits)."""
        if k is None:
            if not self.speculate or self.speculate == "auto":  # auto without a pace: one token
                return 1
            k = int(self.speculate)
        max_base, max_teacher = self.max_model_len
        room = min(
            seq.max_tokens - len(seq.out.token_ids),
            max_base - len(seq.ctx_base),
            max_teacher - len(seq.ctx_teacher),
        )
        return max(1, min(k + 1, room))

    def apply(self, rows: list[Sequence], bundle: Bundle) -> None:
        """One kernel call over the bundle's rows, then each sequence takes its tokens
        in order up to its first rejected draft, a stop id, or a length limit."""
        if bundle.drafts is None and len(bundle.lengths) == len(bundle.base.ids):
            if not self.speculate:
                self._apply_one_each(rows, bundle)
                return
            if self.auto:  # auto's round of one token per sequence: rows in id order (below)
                self._apply_one_each(rows, bundle.in_id_order(), speculative=True)
                return
        lengths = bundle.lengths.tolist()
        positions = np.concatenate(
            [len(s.out.token_ids) + np.arange(n, dtype=np.int64) for s, n in zip(rows, lengths, strict=True)]
        )
        keys = np.repeat(np.fromiter((s.item.key for s in rows), dtype=np.int64, count=len(rows)), lengths)
        spec, stats = bool(self.speculate), self.stats
        if self.auto:
            # Every row drawn afresh, as one token per step draws it (no drafts given to
            # the kernel); a draft is accepted where the draw is the drafted token. The
            # draw walks the candidates in the order the servers listed them, and routes
            # list in different orders (vLLM's generate route puts the sampled or
            # replayed token first): each row is put in id order, so a token is the same
            # whichever kind of round reached its position.
            bundle = bundle.in_id_order()
            drawn = self._kernel(bundle, positions, keys, _law_arguments(rows, lengths), drafts=False)
            drafts = bundle.drafts  # a drafting round: auto's one-token rounds took the path above
            assert drafts is not None
            accepted = ((drawn.res.token_id == drafts) & (drafts >= 0)).tolist()
        else:
            drawn = self._kernel(bundle, positions, keys, _law_arguments(rows, lengths))
            accepted = drawn.res.accepted.tolist()
        emitted = np.zeros(len(positions), dtype=bool)
        offset = 0
        for seq, n in zip(rows, lengths, strict=True):
            # Speculative runs record each token's round and whether it was a draft kept.
            rounds: list[int] | None = None
            kept: list[bool] | None = None
            if spec:
                rounds, kept = _round_lists(seq.out)
            this_round = rounds[-1] + 1 if rounds else 0
            for i in range(offset, offset + n):
                self._emit(seq, drawn, i)
                emitted[i] = True
                if rounds is not None and kept is not None:
                    rounds.append(this_round)
                    kept.append(accepted[i])
                    if bundle.drafts is not None and bundle.drafts[i] >= 0:
                        seq.tested += 1
                        seq.accepted += accepted[i]
                        stats.drafted += 1
                        stats.accepted += accepted[i]
                if seq.done or not accepted[i]:
                    break
            if spec:
                stats.rounds += 1
            offset += n
        if spec:
            made = int(emitted.sum())
            stats.round_tokens += made
            if bundle.drafts is not None:  # a drafting round (every speculative one but auto's one-token rounds)
                stats.drafting_rounds += len(rows)
                stats.drafting_round_tokens += made
        self._count(drawn, emitted)

    def _apply_one_each(self, rows: list[Sequence], bundle: Bundle, speculative: bool = False) -> None:
        """`apply` for a round of one row per sequence and nothing drafted (every round
        without speculation, and `auto`'s one-token rounds, `speculative`): each
        sequence takes its row's token. The same records, without the per-row
        bookkeeping of drafts, which cost a third of the coordinator's time per
        sequence-step there; a `speculative` run's records also note each token's round
        (none of them a kept draft)."""
        n = len(rows)
        positions = np.fromiter((len(s.out.token_ids) for s in rows), dtype=np.int64, count=n)
        keys = np.fromiter((s.item.key for s in rows), dtype=np.int64, count=n)
        drawn = self._kernel(bundle, positions, keys, _law_arguments(rows, [1] * n))
        emit = self._emit
        if speculative:
            for i, seq in enumerate(rows):
                rounds, kept = _round_lists(seq.out)
                this_round = rounds[-1] + 1 if rounds else 0
                emit(seq, drawn, i)
                rounds.append(this_round)
                kept.append(False)
            self.stats.rounds += n
            self.stats.round_tokens += n
        else:
            for i, seq in enumerate(rows):
                emit(seq, drawn, i)
        self._count(drawn, np.ones(n, dtype=bool))

    def _kernel(
        self, bundle: Bundle, positions: np.ndarray, keys: np.ndarray, law: dict[str, Any], drafts: bool = True
    ) -> Drawn:
        """The Rust step over the rows, as Python columns; `law`: the per-row sampling
        parameters and alternatives wanted (see `_law_arguments`); without `drafts`,
        every row is drawn afresh whatever the bundle drafted."""
        base, teacher = bundle.base, bundle.teacher
        force = positions == 0 if self.config.sampler.force_first_token else np.zeros(len(positions), dtype=bool)
        res = _core.step(
            base.ids, base.logp, teacher.ids, teacher.logp,
            config=self.sampler, seed=self.config.run.seed, positions=positions, row_keys=keys, force_teacher=force,
            drafts=bundle.drafts if drafts else None, **law,
        )  # fmt: skip
        cols: list[list[Any]] = [getattr(res, name).tolist() for name in _COLUMNS]
        # The record holds each model's own log probability of the token where its server
        # listed it (the kernel's are renormalised over the candidates and tempered), and
        # the missing rule's estimate where it did not (`observed_*` false). When the base
        # scored the teacher's candidates, every value is a model's own.
        missing = self.config.sampler.missing
        for c, top, observed in ((2, base, res.observed_theta), (3, teacher, res.observed_t)):
            cols[c] = _raw_log_probabilities(top, res.token_id, observed, missing, res_value=getattr(res, _COLUMNS[c]))
        diag_cols = [getattr(res, name).tolist() for name in DIAGNOSTIC_NAMES] if self.diagnostics else []
        teacher_cols = None
        if bundle.teachers is not None:
            teacher_cols = {}
            # A token a teacher did not list is valued as `missing` says, "drop" as "bound"
            # (the mixture keeps only tokens every teacher listed, where they share any).
            rule = "bound" if missing == "drop" else missing
            every = np.ones(len(res.token_id), dtype=bool)
            for name, top in bundle.teachers.items():
                listed = (top.ids == res.token_id[:, None]).any(axis=1)
                values = _raw_log_probabilities(top, res.token_id, listed, rule, res_value=res.logp_t)
                teacher_cols[name] = (values, listed.tolist())
                every &= listed
            # The mixed teacher's value is the teachers' own only where every one listed it.
            cols[6] = every.tolist()
        alternatives = None
        if res.top_ids is not None and res.top_logq is not None:
            alternatives = [res.top_ids.tolist(), res.top_logq.tolist()]
        return Drawn(res, force, cols, diag_cols, self._top_columns(bundle), teacher_cols, alternatives)

    def _top_columns(self, bundle: Bundle) -> list[list[Any]]:
        """Per row, the kept top ids and values: the teacher's, then (when kept) the
        base's; empty without ``save_topk``."""
        n = self.config.run.save_topk
        if not n:
            return []
        teacher = _most_likely(bundle.teacher, bundle.teacher, n)
        if bundle.base_scores_teacher_ids:
            # The base scored the teacher's ids: its values of the same ids, in the same order.
            return [*teacher, *_most_likely(bundle.base, bundle.teacher, n)]
        if self.config.run.save_topk_of == "both":
            return [*teacher, *_most_likely(bundle.base, bundle.base, n)]
        return teacher

    def _emit(self, seq: Sequence, drawn: Drawn, i: int) -> None:
        """Append row `i`'s token to `seq` and end it on a stop id or a length limit."""
        cols = drawn.cols
        tok = cols[0][i]
        out = seq.out
        out.token_ids.append(tok)
        out.alpha_history.append(cols[1][i])
        out.logp_theta.append(cols[2][i])
        out.logp_t.append(cols[3][i])
        out.logq.append(cols[4][i])
        out.observed_theta.append(cols[5][i])
        out.observed_t.append(cols[6][i])
        out.fallback.append(cols[7][i])
        # Each branch below is taken only where its feature is in use: this runs once
        # per sequence per step, and the batch job's records need none of them.
        if drawn.diag_cols:
            for name, col in zip(DIAGNOSTIC_NAMES, drawn.diag_cols, strict=False):
                seq.diag.setdefault(name, []).append(col[i])
        if drawn.top_cols:
            _keep_top(out, drawn.top_cols, i)
        item = seq.item
        if item.alternatives and drawn.alternatives is not None:
            ids, logq = drawn.alternatives[0][i], drawn.alternatives[1][i]
            n = min(item.alternatives, sum(1 for t in ids if t >= 0))  # padded with -1
            item.top.append(tuple(zip(ids[:n], logq[:n], strict=True)))
        if drawn.teacher_cols is not None and out.logp_teachers is not None and out.observed_teachers is not None:
            for name, (values, listed) in drawn.teacher_cols.items():
                out.logp_teachers[name].append(values[i])
                out.observed_teachers[name].append(listed[i])
        seq.ctx_base.append(tok)
        seq.ctx_teacher.append(tok)
        more = seq.more_teachers
        if more:
            for ctx in more:
                ctx.append(tok)
        max_base, max_teacher = self.max_model_len  # for a mixture, its teachers' least
        if tok in item.stop_token_ids or (tok in self.stop and not item.ignore_eos):
            out.finish_reason, seq.done = "stop", True
        elif (
            len(out.token_ids) >= seq.max_tokens
            or len(seq.ctx_base) >= max_base
            or len(seq.ctx_teacher) >= max_teacher
            or (more and any(len(c) >= max_teacher for c in more))
        ):
            out.finish_reason, seq.done = "length", True
        if item.on_token is not None:
            item.on_token(out)

    def _count(self, drawn: Drawn, emitted: np.ndarray) -> None:
        """Count the statistics of the rows whose tokens were emitted."""
        cfg, s, res = self.config, self.stats, drawn.res
        s.first_token_forced += int((drawn.force & emitted).sum())
        if self.sampler.top_p is not None:
            # Rows where the support constraint actually removed a candidate.
            s.constraint_applied += int(((res.n_merged > res.n_candidates) & emitted).sum())
        if self.sampler.stability_js_max is not None:
            s.stability_fallbacks += int((res.fallback & emitted).sum())
        if cfg.sampler.enable_stability_check and not cfg.sampler.auto_fallback and res.js is not None:
            s.stability_flagged += int(((res.js > cfg.sampler.stability_js_max) & emitted).sum())


def _round_lists(out: GenerationOutput) -> tuple[list[int], list[bool]]:
    """A speculative run's per-token ``round`` and ``drafted`` lists of `out`, made
    empty on its first round."""
    if out.round is None or out.drafted is None:
        out.round, out.drafted = [], []
    return out.round, out.drafted


def _law_arguments(rows: list[Sequence], lengths: list[int]) -> dict[str, Any]:
    """The kernel's per-row sampling parameters (``q_top_k``, ``q_top_p``, ``q_min_p``)
    where any sequence has them, and ``alternatives`` where any wants them; nothing
    otherwise, so the batch job's calls are unchanged."""
    items = [s.item for s in rows]
    law: dict[str, Any] = {}
    if any(i.truncation is not None for i in items):
        t = [i.truncation or Truncation() for i in items]
        law["q_top_k"] = np.repeat(np.array([x.top_k for x in t], dtype=np.int64), lengths)
        law["q_top_p"] = np.repeat(np.array([x.top_p for x in t], dtype=np.float64), lengths)
        law["q_min_p"] = np.repeat(np.array([x.min_p for x in t], dtype=np.float64), lengths)
    wanted = max((i.alternatives for i in items), default=0)
    if wanted:
        law["alternatives"] = wanted
    return law


def _most_likely(values: TopK, order_by: TopK, n: int) -> list[list[Any]]:
    """Per row, the ids of `order_by` ranked by its log probabilities (the `n` most
    likely, padding left out) and their values in `values` (rows aligned with
    `order_by`'s, e.g. the same ids scored by another model): ``[ids, logp]``."""
    order = np.argsort(-order_by.logp, axis=1, kind="stable")[:, :n]
    ids = np.take_along_axis(order_by.ids, order, axis=1)
    logp = np.take_along_axis(values.logp, order, axis=1)
    counts = (ids >= 0).sum(axis=1).tolist()
    return [
        [row[:c] for row, c in zip(ids.tolist(), counts, strict=True)],
        [row[:c] for row, c in zip(logp.tolist(), counts, strict=True)],
    ]


def _keep_top(out: GenerationOutput, cols: list[list[Any]], i: int) -> None:
    """Append row `i`'s kept top ids and values to the output's lists."""
    if out.topk_ids_t is None or out.topk_logp_t is None:
        out.topk_ids_t, out.topk_logp_t = [], []
    out.topk_ids_t.append(cols[0][i])
    out.topk_logp_t.append(cols[1][i])
    if len(cols) > 2:
        if out.topk_ids_theta is None or out.topk_logp_theta is None:
            out.topk_ids_theta, out.topk_logp_theta = [], []
        out.topk_ids_theta.append(cols[2][i])
        out.topk_logp_theta.append(cols[3][i])


def _lookup(top: TopK, tokens: np.ndarray) -> np.ndarray:
    """Each row's log probability of its token, from the lists the servers sent."""
    hit = top.ids == tokens[:, None]
    return np.where(hit.any(axis=1), top.logp[np.arange(len(tokens)), hit.argmax(axis=1)], -np.inf)


def _raw_log_probabilities(
    top: TopK, tokens: np.ndarray, observed: np.ndarray, missing: Any, res_value: np.ndarray
) -> list[float]:
    """Each row's log probability of its token as the server gave it where listed, else
    the missing rule's estimate on the same (raw) scale: log min(smallest listed
    probability, unlisted mass) for ``"bound"`` (unlisted mass at least 1e-12, as in
    the kernel), the given value for a float; ``"drop"`` keeps the kernel's value."""
    out = _lookup(top, tokens)
    rows = np.flatnonzero(~observed)
    if len(rows):
        if missing == "bound":
            out[rows] = _core.unlisted_bound(top.ids[rows], top.logp[rows])
        elif isinstance(missing, float):
            out[rows] = missing
        else:
            out[rows] = res_value[rows]
    values: list[float] = out.tolist()
    return values
