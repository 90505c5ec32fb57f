"""`Summary`: everything a report shows, accumulated chunk by chunk in fixed memory.

Importance weights. For a model π (the base θ or the teacher t) the per-token weight is
w = π(token)/q*(token) = exp(log π − log q*), q* being the law the token was drawn from
(the record's ``logq``). The log ratio is clamped to ±20 before exponentiating, as verl
does (``SAFETY_BOUND`` in ``verl/trainer/ppo/rollout_corr_helper.py``). The truncated
weight is min(w, C), C the threshold (default 2.0, verl's ``rollout_is_threshold``
default in ``verl/trainer/config/algorithm.py``): the token-level truncated IS that
verl applies (``compute_rollout_correction_weights``, ``rollout_is="token"``: a clamp
from above only), TRL's ``vllm_importance_sampling_mode="token_truncate"`` with no
``vllm_importance_sampling_clip_min`` (``trl/trainer/grpo_trainer.py``; TRL's default cap
is 3.0) and NeMo-RL's ``truncated_importance_sampling_type: tis`` with no
``truncated_importance_sampling_ratio_min`` (``nemo_rl/algorithms/loss/loss_functions.py``,
lower bound 0). verl's ESS metric also clamps from below at 1/C; that clamp is not
applied here, since none of the three applies it to the weights the loss uses.

Per sequence, the effective sample size of its n token weights is Kish's
(Σw)²/(n·Σw²) in (0, 1]: 1 when every token has the same weight. Across the file, the
sequence-level weight exp(Σ log ratio) (verl ``rollout_is="sequence"``, TRL
``sequence_truncate``) gets the same fraction over the N finished sequences, plain and
truncated at C.

Which log probabilities: a record's exact values (``logp_*_exact``, from ``--rescore``)
where it has them, else its served ones (exact under ``--scoring exact``, where every
``observed_*`` is true; else an estimate wherever ``observed_*`` is false). The summary
counts the tokens of each kind so the text can say which the ratios rest on.

Failed records (``finish_reason == "error"``) are counted but left out of every
per-token statistic: a trainer drops them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io.record import DIAGNOSTIC_NAMES
from .accumulate import Histogram, IntCounts, LogSumExp, PositionMeans, Reservoir
from .reading import Chunk

MODELS = ("theta", "t")
# verl clamps log ratios to ±20 before exp (rollout_corr_helper.SAFETY_BOUND)
SAFETY_BOUND = 20.0
DEFAULT_THRESHOLD = 2.0
DEFAULT_POSITIONS = 4096
LENGTH_CAP = 1 << 16
RATIO_RANGE = (-10.0, 10.0)
RATIO_BINS = 100
ALPHA_BINS = 50
ESS_BINS = 20
RESERVOIR = 10_000
ACCEPT_CAP = 64


@dataclass
class RatioStats:
    """Log ratios log π − log q* of one model, and its importance weights' ESS."""

    threshold: float
    log_ratio: Histogram = field(default_factory=lambda: Histogram(*RATIO_RANGE, RATIO_BINS))
    truncated: int = 0  # tokens whose weight exceeds the threshold
    ess: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0, ESS_BINS))
    ess_truncated: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0, ESS_BINS))
    sequence_weights: LogSumExp = field(default_factory=LogSumExp)
    sequence_truncated_sum: float = 0.0
    sequence_truncated_sumsq: float = 0.0
    exact_tokens: int = 0
    observed_tokens: int = 0
    estimated_tokens: int = 0

    def sequence_ess_truncated(self) -> float:
        n = self.sequence_weights.n
        if n == 0 or self.sequence_truncated_sumsq == 0:
            return math.nan
        return self.sequence_truncated_sum**2 / (n * self.sequence_truncated_sumsq)


@dataclass
class Speculation:
    """Tokens by round for runs with --speculate."""

    tokens: int = 0
    drafted: int = 0
    rounds: int = 0
    accepted_per_round: np.ndarray = field(default_factory=lambda: np.zeros(ACCEPT_CAP + 1, dtype=np.int64))


class Summary:
    """What a report shows about a records file, filled by :meth:`add` one chunk at a time.

    Args:
        threshold: C, the truncation of importance weights (min(w, C)).
        positions: how many positions the mean α by position covers.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, positions: int = DEFAULT_POSITIONS) -> None:
        self.threshold = threshold
        self.records = 0
        self.failed = 0
        self.finish_reasons: Counter[str] = Counter()
        self.tokens_all = 0
        self.tokens = 0  # of the finished records
        self.lengths = IntCounts(LENGTH_CAP)
        self.alpha = Histogram(0.0, 1.0, ALPHA_BINS)
        self.alpha_by_position = PositionMeans(positions)
        self.fallback_tokens = 0
        self.ratios = {m: RatioStats(threshold) for m in MODELS}
        self.has_ratios = False
        self.diagnostics: dict[str, Reservoir] = {}
        self.speculation: Speculation | None = None

    @property
    def finished(self) -> int:
        return self.records - self.failed

    def add(self, chunk: Chunk) -> None:
        n = len(chunk)
        self.records += n
        reasons = [str(r) for r in chunk.finish_reasons]
        self.finish_reasons.update(reasons)
        failed = np.fromiter((r == "error" for r in reasons), dtype=bool, count=n)
        self.failed += int(failed.sum())
        self.tokens_all += int(chunk.lengths.sum())

        kept = ~failed
        self.lengths.add(chunk.lengths[kept])
        self.tokens += int(chunk.lengths[kept].sum())
        token_kept = np.repeat(kept, chunk.lengths)
        record_of = np.repeat(np.arange(n), chunk.lengths)[token_kept]
        starts = np.cumsum(chunk.lengths) - chunk.lengths
        position = (np.arange(int(chunk.lengths.sum())) - np.repeat(starts, chunk.lengths))[token_kept]
        tokens = {name: values[token_kept] for name, values in chunk.tokens.items()}

        if "alpha" in tokens:
            self.alpha.add(tokens["alpha"])
            self.alpha_by_position.add(position, tokens["alpha"])
        if "fallback" in tokens:
            self.fallback_tokens += int(np.count_nonzero(tokens["fallback"] == 1.0))
        if "logq" in tokens:
            for model in MODELS:
                self._add_ratios(model, tokens, record_of, n)
        self._add_diagnostics(chunk, kept)
        if "round" in tokens and "drafted" in tokens:
            self._add_speculation(tokens["round"], tokens["drafted"], record_of)

    def _add_ratios(self, model: str, tokens: dict[str, np.ndarray], record_of: np.ndarray, n: int) -> None:
        served = tokens.get(f"logp_{model}")
        exact = tokens.get(f"logp_{model}_exact")
        if served is None and exact is None:
            return
        stats = self.ratios[model]
        self.has_ratios = True
        size = tokens["logq"].size
        served = served if served is not None else np.full(size, math.nan)
        is_exact = ~np.isnan(exact) if exact is not None else np.zeros(size, dtype=bool)
        logp = np.where(is_exact, exact, served) if exact is not None else served
        observed = tokens.get(f"observed_{model}")
        stats.exact_tokens += int(np.count_nonzero(is_exact))
        if observed is not None:
            stats.observed_tokens += int(np.count_nonzero(~is_exact & (observed == 1.0)))
            stats.estimated_tokens += int(np.count_nonzero(~is_exact & (observed == 0.0)))

        log_ratio = logp - tokens["logq"]
        stats.log_ratio.add(log_ratio)
        valid = ~np.isnan(log_ratio)
        clamped = np.clip(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
        weight = np.where(valid, np.exp(np.where(valid, clamped, 0.0)), 0.0)
        truncated = np.minimum(weight, self.threshold)
        stats.truncated += int(np.count_nonzero(weight > self.threshold))

        count = np.bincount(record_of, weights=valid, minlength=n)
        has = count > 0
        for target, w in ((stats.ess, weight), (stats.ess_truncated, truncated)):
            s1 = np.bincount(record_of, weights=w, minlength=n)[has]
            s2 = np.bincount(record_of, weights=w * w, minlength=n)[has]
            with np.errstate(invalid="ignore", divide="ignore"):
                target.add(s1 * s1 / (count[has] * s2))

        # sequence-level weight exp(Σ log ratio), unclamped in log space for the plain ESS
        total = np.bincount(record_of, weights=np.where(valid, log_ratio, 0.0), minlength=n)[has]
        stats.sequence_weights.add(total)
        capped = np.exp(np.minimum(total, math.log(self.threshold)))
        stats.sequence_truncated_sum += float(capped.sum())
        stats.sequence_truncated_sumsq += float((capped * capped).sum())

    def _add_diagnostics(self, chunk: Chunk, kept: np.ndarray) -> None:
        names: set[str] = set()
        for d, keep in zip(chunk.diagnostics, kept.tolist(), strict=True):
            if keep and d:
                names.update(d)
        for name in sorted(names):
            means = np.fromiter(
                (_mean_of(d.get(name)) for d, keep in zip(chunk.diagnostics, kept.tolist(), strict=True) if keep and d),
                dtype=np.float64,
            )
            if name not in self.diagnostics:
                self.diagnostics[name] = Reservoir(RESERVOIR, seed=len(self.diagnostics))
            self.diagnostics[name].add(means)

    def _add_speculation(self, rounds: np.ndarray, drafted: np.ndarray, record_of: np.ndarray) -> None:
        have = ~np.isnan(rounds)
        if not have.any():
            return
        spec = self.speculation = self.speculation or Speculation()
        rounds, drafted, record_of = rounds[have].astype(np.int64), drafted[have], record_of[have]
        spec.tokens += int(rounds.size)
        spec.drafted += int(np.count_nonzero(drafted == 1.0))
        key = record_of * (int(rounds.max()) + 1) + rounds
        _, inverse = np.unique(key, return_inverse=True)
        accepted = np.bincount(inverse, weights=(drafted == 1.0)).astype(np.int64)
        spec.rounds += int(accepted.size)
        spec.accepted_per_round += np.bincount(np.minimum(accepted, ACCEPT_CAP), minlength=ACCEPT_CAP + 1)

    def diagnostic_names(self) -> list[str]:
        """Names in the order output.py declares them, then any others."""
        known = [n for n in DIAGNOSTIC_NAMES if n in self.diagnostics]
        return known + sorted(n for n in self.diagnostics if n not in DIAGNOSTIC_NAMES)


def _mean_of(summary: Any) -> float:
    """A diagnostic's per-sequence mean (its ``summarise`` dict), NaN when absent."""
    if isinstance(summary, dict):
        value = summary.get("mean")
        if isinstance(value, (int, float)):
            return float(value)
    return math.nan
