"""Speculative rounds: several tokens of q* per round trip, with the law of one per step.

A round for a sequence takes two requests. The teacher drafts L tokens greedily past its
context, with its top-k at each of their positions; the base scores the same L
positions in one request that keeps its prefix cache (vLLM trace replay, or SGLang
scoring the tail of the input). The Rust step then computes q* at every position from
both lists, exactly as the one-token path would for that context, and tests the drafted
tokens in order: the first L − 1 are each accepted with probability q*(token) (a greedy
draft is a point mass, so min(1, q*/p_draft) = q*); the first rejected one is replaced
by a draw from the residual, q* without it, and ends the round. When all are accepted,
the L-th position's token is drawn from q* there (its draft only carries the base's
scoring of that position). Each position's draws are keyed by (seed, sequence, position),
so the records do not depend on batching or concurrency.
"""

from __future__ import annotations

import logging

import numpy as np

from .backends import Backend, Draft, TopK
from .dual_step import DualStep, narrow
from .exceptions import BadRequestError, InvalidInputError, InvalidResponseError
from .sequence import Sequence

log = logging.getLogger("dualsample_rs")

# `speculate="auto"`: the drafted tokens per round are chosen among these (few values,
# since SGLang takes one generation length per request).
AUTO_RANGE = (1, 2, 4, 8)
# A drafted position's cost relative to a round trip, for choosing K under "auto".
AUTO_POSITION_COST = 0.1


def auto_drafts(tested: int, accepted: int) -> int:
    """The K that maximises expected tokens per unit of cost at the sequence's
    acceptance rate so far (Laplace-smoothed): a round with K drafts gives
    (1 − a^(K+1)) / (1 − a) tokens and costs 1 + c·(K + 1)."""
    a = min((accepted + 1) / (tested + 2), 0.999)

    def value(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (1 + AUTO_POSITION_COST * (k + 1))

    return max(AUTO_RANGE, key=value)


async def speculation_problem(theta: Backend, teacher: Backend, recompute: bool, exact: bool, top_k: int) -> str | None:
    """Why speculative rounds cannot run on these servers (None: they can); `recompute`
    allows the base to score drafts by recomputing each context (prompt log
    probabilities), `exact` asks it to score the teacher's candidates, `top_k` is the
    entries per position."""
    return await teacher.speculation_problem(False, top_k=top_k) or await theta.speculation_problem(
        True, recompute, exact, top_k
    )


class SpeculativeRound:
    """Advances a batch of sequences by one speculative round each (one or more tokens)."""

    def __init__(self, step: DualStep, speculate: int | str) -> None:
        self.step = step
        self.speculate = speculate

    def _length(self, seq: Sequence) -> int:
        """Positions in this round: K drafts to test plus one, within the sequence's
        token budget and both servers' context lengths (so every draft fits)."""
        k = auto_drafts(seq.tested, seq.accepted) if self.speculate == "auto" else int(self.speculate)
        max_a, max_b = self.step.max_model_len
        room = min(seq.max_tokens - len(seq.out.token_ids), max_a - len(seq.ctx_theta), max_b - len(seq.ctx_t))
        return max(1, min(k + 1, room))

    async def __call__(self, batch: list[Sequence]) -> None:
        """One round for every sequence in `batch`; failures become per-sequence errors."""

        async def attempt(start: int, stop: int) -> None:
            rows = batch[start:stop]
            drafts, tops_a = await self._ask(rows)

            async def apply(a: int, b: int) -> None:
                self._apply(rows[a:b], drafts[a:b], tops_a[a:b])

            await narrow(rows, apply, InvalidInputError)

        await narrow(batch, attempt, BadRequestError)

    async def _ask(self, rows: list[Sequence]) -> tuple[list[Draft], list[TopK]]:
        step, k = self.step, self.step.config.top_k
        drafts = await step.teacher.draft([s.ctx_t for s in rows], [self._length(s) for s in rows], k)
        for d in drafts:
            if not d.tokens or len(d.tokens) != d.top.ids.shape[0]:
                raise InvalidResponseError(f"{step.teacher.base_url}: a draft without its top-k at every position")
        if step.exact:
            cap = step.theta.max_scored_ids
            drafts = [_within_cap(d, cap) for d in drafts] if cap is not None else drafts
            scores = await step.theta.continuation_scores(
                [s.ctx_theta for s in rows], [d.tokens for d in drafts], [d.top.ids for d in drafts]
            )
            return drafts, [TopK(d.top.ids, sc) for d, sc in zip(drafts, scores, strict=True)]
        tops_a = await step.theta.continuation_topk([s.ctx_theta for s in rows], [d.tokens for d in drafts], k)
        for d, t in zip(drafts, tops_a, strict=True):
            if t.ids.shape[0] != len(d.tokens):
                raise InvalidResponseError(f"{step.theta.base_url}: scored positions do not match the draft")
        return drafts, tops_a

    def _apply(self, rows: list[Sequence], drafts: list[Draft], tops_a: list[TopK]) -> None:
        step = self.step
        lengths = [len(d.tokens) for d in drafts]
        positions = np.concatenate([len(s.out.token_ids) + np.arange(n) for s, n in zip(rows, lengths, strict=True)])
        keys = np.repeat(np.fromiter((s.item.key for s in rows), dtype=np.int64, count=len(rows)), lengths)
        # Every position but the last tests its drafted token; the last draws afresh.
        tested = np.concatenate([[*d.tokens[:-1], -1] for d in drafts]).astype(np.int64)
        top_a = TopK(np.concatenate([t.ids for t in tops_a]), np.concatenate([t.logp for t in tops_a]))
        top_b = TopK(np.concatenate([d.top.ids for d in drafts]), np.concatenate([d.top.logp for d in drafts]))
        drawn = step.kernel(top_a, top_b, positions, keys, tested)
        accepted = drawn.res.accepted.tolist()
        emitted = np.zeros(len(positions), dtype=bool)
        stats = step.stats
        stats.steps += 1
        offset = 0
        for seq, n in zip(rows, lengths, strict=True):
            out = seq.out
            if out.round is None:
                out.round, out.drafted = [], []
            assert out.drafted is not None
            this_round = out.round[-1] + 1 if out.round else 0
            for i in range(offset, offset + n):
                step.emit(seq, drawn, i)
                emitted[i] = True
                out.round.append(this_round)
                out.drafted.append(accepted[i])
                if tested[i] >= 0:
                    seq.tested += 1
                    seq.accepted += accepted[i]
                    stats.drafted += 1
                    stats.accepted += accepted[i]
                if seq.done or not accepted[i]:
                    break
            stats.rounds += 1
            offset += n
        stats.round_tokens += int(emitted.sum())
        step.count(drawn, emitted)


def _within_cap(draft: Draft, cap: int) -> Draft:
    """The longest head of the draft whose positions' candidates together fit one
    scoring request (vLLM scores one list of ids for every position)."""
    union: set[int] = set()
    for n, row in enumerate(draft.top.ids):
        union |= {int(t) for t in row if t >= 0}
        if len(union) > cap:
            if n == 0:
                break  # one position over the cap: the request says so
            return Draft(draft.tokens[:n], TopK(draft.top.ids[:n], draft.top.logp[:n]))
    return draft
