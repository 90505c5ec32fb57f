"""Counts of a run, and the dictionary `get_statistics()` returns."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..backends import RequestStats
from ..io.record import GenerationOutput


@dataclass
class Statistics:
    sequences: int = 0
    errors: int = 0
    tokens: int = 0
    steps: int = 0
    first_token_forced: int = 0
    constraint_applied: int = 0
    stability_fallbacks: int = 0
    stability_flagged: int = 0
    alpha_sum: float = 0.0
    rounds: int = 0
    round_tokens: int = 0  # tokens the rounds made (finished sequences or not)
    drafted: int = 0
    accepted: int = 0
    # sequence-rounds that drafted, and their tokens (all speculative rounds but the
    # one-token rounds `speculate="auto"` chose)
    drafting_rounds: int = 0
    drafting_round_tokens: int = 0
    # batch rounds of each kind `speculate="auto"` chose, by drafts per sequence (0: one
    # token; engine/pace.py)
    mode_rounds: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    # per named teacher, and per mixture ("a=0.5,b=0.5"): [sequences, errors, tokens]
    teachers: dict[str, list[int]] = field(default_factory=dict)

    def count_finished(self, out: GenerationOutput) -> None:
        self.sequences += 1
        self.errors += out.failed
        self.tokens += len(out.token_ids)
        self.alpha_sum += sum(out.alpha_history)
        key = out.teacher
        if out.teachers is not None:
            key = ",".join(f"{name}={w:g}" for name, w in out.teachers.items())
        if key is not None:
            counts = self.teachers.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += out.failed
            counts[2] += len(out.token_ids)

    def by_teacher(self, requests: dict[str, RequestStats]) -> dict[str, dict[str, int]]:
        """Per named teacher: the ``sequences``, ``errors`` and ``tokens`` of the records
        routed to it, and its ``requests``, ``retries`` and ``failed_requests`` (its
        requests for mixtures too); then per mixture records were sampled from (named
        ``"a=0.5,b=0.5"``), its records' counts."""
        out = {}
        for name, r in requests.items():
            sequences, errors, tokens = self.teachers.get(name, (0, 0, 0))
            out[name] = {"sequences": sequences, "errors": errors, "tokens": tokens, "requests": r.requests,
                         "retries": r.retries, "failed_requests": r.failures}  # fmt: skip
        for key, (sequences, errors, tokens) in self.teachers.items():
            if key not in out:
                out[key] = {"sequences": sequences, "errors": errors, "tokens": tokens}
        return out

    def summary(self, theta: RequestStats, teachers: list[RequestStats]) -> dict[str, Any]:
        """Counts so far, each under one name: ``total_requests``, ``failed_requests``
        (requests that failed after their retries), ``retries``, and the requests and
        retries per server; ``total_tokens``, ``sequences``, ``errors``, ``success_rate``
        (sequences without error / sequences), ``steps``, ``first_token_forced``,
        ``constraint_applied`` (tokens where the support constraint removed a candidate),
        ``stability_fallbacks``, ``stability_flagged``, ``mean_alpha``, ``elapsed_s`` and
        ``tokens_per_second``.
        With speculative rounds: ``rounds``, ``drafted`` (drafted tokens tested),
        ``accepted``, ``acceptance_rate``, ``tokens_per_round`` (every round's), and the
        split: ``drafting_rounds`` and ``tokens_per_drafting_round`` (the rounds that
        drafted), ``one_token_rounds`` (rounds of one token that ``"auto"`` chose), and
        ``mode_rounds``, the batch rounds ``"auto"`` chose of each kind: ``one_token``,
        ``drafting``, and by drafts per sequence ``"K=0"``, ``"K=2"``, ...; and always
        ``requests_per_token``. The teachers' requests are counted together (``requests_t``);
        with named teachers the coordinator adds each one's under ``teachers``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        t = RequestStats(
            requests=sum(r.requests for r in teachers),
            retries=sum(r.retries for r in teachers),
            failures=sum(r.failures for r in teachers),
        )
        requests, failures = theta.requests + t.requests, theta.failures + t.failures
        return {
            "total_requests": requests,
            "failed_requests": failures,
            "total_tokens": self.tokens,
            "first_token_forced": self.first_token_forced,
            "success_rate": (self.sequences - self.errors) / self.sequences if self.sequences else math.nan,
            "retries": theta.retries + t.retries,
            "requests_theta": theta.requests,
            "requests_t": t.requests,
            "retries_theta": theta.retries,
            "retries_t": t.retries,
            "sequences": self.sequences,
            "errors": self.errors,
            "steps": self.steps,
            "constraint_applied": self.constraint_applied,
            "stability_fallbacks": self.stability_fallbacks,
            "stability_flagged": self.stability_flagged,
            "mean_alpha": self.alpha_sum / self.tokens if self.tokens else math.nan,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else math.nan,
            "tokens_per_round": self.round_tokens / self.rounds if self.rounds else math.nan,
            "drafting_rounds": self.drafting_rounds,
            "tokens_per_drafting_round": (
                self.drafting_round_tokens / self.drafting_rounds if self.drafting_rounds else math.nan
            ),
            "one_token_rounds": self.rounds - self.drafting_rounds,
            "mode_rounds": {
                "one_token": self.mode_rounds.get(0, 0),
                "drafting": sum(n for k, n in self.mode_rounds.items() if k),
                **{f"K={k}": n for k, n in sorted(self.mode_rounds.items())},
            },
            "requests_per_token": requests / self.tokens if self.tokens else math.nan,
            "elapsed_s": elapsed,
            "tokens_per_second": self.tokens / elapsed,
        }
