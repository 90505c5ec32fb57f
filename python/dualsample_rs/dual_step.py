"""One step for a batch of sequences: ask both servers, one Rust `step`, apply the results.

In ``topk`` scoring both servers are asked for their top-k at once. In ``exact``
scoring the teacher is asked first and the base then scores exactly the teacher's
candidates: q* lives on the teacher's candidates, nothing is estimated, and the reported
``logp_theta``/``logp_t`` are the models' own (raw) log probabilities of the token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from .backends import Backend, TopK
from .config import CoordinatorConfig
from .exceptions import APIError, BadRequestError, DualSampleError, InvalidInputError
from .output import DIAGNOSTIC_NAMES
from .reference import unlisted_bound
from .sequence import Sequence
from .statistics import Statistics

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


class DualStep:
    """Advances a batch of sequences by one token each."""

    def __init__(
        self,
        theta: Backend,
        teacher: Backend,
        config: CoordinatorConfig,
        sampler: _core.SamplerConfig,
        stop_ids: tuple[int, ...],
        max_model_len: tuple[int, int],
        stats: Statistics,
        diagnostics: bool,
    ) -> None:
        self.theta, self.teacher = theta, teacher
        self.config, self.sampler, self.stats, self.diagnostics = config, sampler, stats, diagnostics
        self.stop = frozenset(stop_ids)
        self.max_model_len = max_model_len
        self.exact = config.scoring == "exact"

    async def __call__(self, batch: list[Sequence]) -> None:
        """One token for every sequence in `batch`; failures become per-sequence errors
        (a rejected request is split to find the sequences it was rejected for)."""

        async def attempt(start: int, stop: int) -> None:
            rows = batch[start:stop]
            top_a, top_b = await self._ask(rows)

            async def apply(a: int, b: int) -> None:
                self._apply(rows[a:b], top_a.rows(a, b), top_b.rows(a, b))

            # The kernel refuses a row the servers sent bad data for: isolate it.
            await narrow(rows, apply, InvalidInputError)

        await narrow(batch, attempt, BadRequestError)

    async def _ask(self, rows: list[Sequence]) -> tuple[TopK, TopK]:
        k = self.config.top_k
        if self.exact:
            top_b = await self.teacher.topk([s.ctx_t for s in rows], k)
            scores = await self.theta.score([s.ctx_theta for s in rows], top_b.ids)
            return TopK(top_b.ids, scores), top_b
        got = await asyncio.gather(
            self.theta.topk([s.ctx_theta for s in rows], k),
            self.teacher.topk([s.ctx_t for s in rows], k),
            return_exceptions=True,
        )
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return got[0], got[1]  # type: ignore[return-value]

    def _apply(self, rows: list[Sequence], top_a: TopK, top_b: TopK) -> None:
        positions = np.fromiter((len(s.out.token_ids) for s in rows), dtype=np.int64, count=len(rows))
        keys = np.fromiter((s.item.key for s in rows), dtype=np.int64, count=len(rows))
        drawn = self.kernel(top_a, top_b, positions, keys)
        self.stats.steps += 1
        self.count(drawn, np.ones(len(rows), dtype=bool))
        for i, seq in enumerate(rows):
            self.emit(seq, drawn, i)

    def kernel(
        self, top_a: TopK, top_b: TopK, positions: np.ndarray, keys: np.ndarray, drafts: np.ndarray | None = None
    ) -> Drawn:
        """The Rust step over rows (one per sequence and position), as Python columns."""
        force = positions == 0 if self.config.force_first_token else np.zeros(len(positions), dtype=bool)
        res = _core.step(
            top_a.ids, top_a.logp, top_b.ids, top_b.logp,
            config=self.sampler, seed=self.config.seed, positions=positions, row_keys=keys, force_teacher=force,
            drafts=drafts,
        )  # fmt: skip
        cols: list[list[Any]] = [getattr(res, name).tolist() for name in _COLUMNS]
        # The record holds each model's own log probability of the token where its server
        # listed it (the kernel's are renormalised over the candidates and tempered), and
        # the missing rule's estimate where it did not (`observed_*` false). With exact
        # scoring every candidate was scored by both models, so every value is the model's.
        missing = self.config.missing
        for c, top, observed in ((2, top_a, res.observed_theta), (3, top_b, res.observed_t)):
            cols[c] = _raw_log_probabilities(top, res.token_id, observed, missing, res_value=getattr(res, _COLUMNS[c]))
        diag_cols = [getattr(res, name).tolist() for name in DIAGNOSTIC_NAMES] if self.diagnostics else []
        return Drawn(res, force, cols, diag_cols)

    def emit(self, seq: Sequence, drawn: Drawn, i: int) -> None:
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
        for name, col in zip(DIAGNOSTIC_NAMES, drawn.diag_cols, strict=False):
            seq.diag.setdefault(name, []).append(col[i])
        seq.ctx_theta.append(tok)
        seq.ctx_t.append(tok)
        max_a, max_b = self.max_model_len
        if tok in self.stop:
            out.finish_reason, seq.done = "stop", True
        elif len(out.token_ids) >= seq.max_tokens or len(seq.ctx_theta) >= max_a or len(seq.ctx_t) >= max_b:
            out.finish_reason, seq.done = "length", True

    def count(self, drawn: Drawn, emitted: np.ndarray) -> None:
        """Count the statistics of the rows whose tokens were emitted."""
        cfg, s, res = self.config, self.stats, drawn.res
        s.first_tokens_forced += int((drawn.force & emitted).sum())
        if cfg.constraint_to_target:
            # Rows where the support constraint actually removed a candidate.
            s.constraint_applied += int(((res.n_merged > res.n_candidates) & emitted).sum())
        if self.sampler.stability_js_max is not None:
            s.stability_fallbacks += int((res.fallback & emitted).sum())
        if cfg.enable_stability_check and not cfg.auto_fallback and res.js is not None:
            s.stability_flagged += int(((res.js > cfg.stability_threshold_js) & emitted).sum())


@dataclass
class Drawn:
    """One kernel call's result: the Rust columns, and the reported ones as lists."""

    res: _core.StepResult
    force: np.ndarray
    cols: list[list[Any]]
    diag_cols: list[list[Any]]


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
            out[rows] = unlisted_bound(top.ids[rows], top.logp[rows])
        elif isinstance(missing, float):
            out[rows] = missing
        else:
            out[rows] = res_value[rows]
    return out.tolist()
