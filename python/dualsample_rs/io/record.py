"""`GenerationOutput`: one generated sequence with everything training code needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .prompts import Prompt
from .schema import DIAGNOSTIC_NAMES, FIELDS, MIXTURE_FIELDS

__all__ = ["DIAGNOSTIC_NAMES", "MIXTURE_FIELDS", "GenerationOutput", "summarise"]


def summarise(values: list[float]) -> dict[str, float]:
    """mean, std, min and max (NaN for an empty list; infinities kept)."""
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    n = len(values)
    mean = sum(values) / n
    finite = all(math.isfinite(v) for v in values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if finite else math.nan
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


@dataclass
class GenerationOutput:
    """One sequence sampled from q*.

    Per-token lists are aligned: ``token_ids[i]`` was drawn with weight ``alpha_history[i]``
    on the teacher. ``logq[i]`` is its log probability under q*, the law it was drawn
    from (after exclusion, temperature and the support constraint): the behaviour log
    probability for importance weights. ``logp_theta[i]`` and ``logp_t[i]`` are each
    model's own raw log probability of it (the log-softmax the server returned) where
    that server listed it, ``observed_theta[i]`` / ``observed_t[i]`` true; where it did
    not, they are the ``missing`` rule's estimate (an upper bound under ``"bound"``) and
    ``observed_*`` is false. With exact scoring every value is the model's. With rescoring, ``logp_theta_exact[i]`` and
    ``logp_t_exact[i]`` are the models' true raw log probabilities of the token, from
    scoring the finished sequence whole. With speculative rounds, ``round[i]`` is the
    round (0, 1, ...) that produced token i and ``drafted[i]`` whether it was a drafted
    token accepted (else a fresh or residual draw). With ``save_topk`` N,
    ``topk_ids_t[i]`` / ``topk_logp_t[i]`` are the teacher's N most likely ids at token i's
    position and their raw log probabilities, most likely first (fewer where the server
    listed fewer); ``topk_ids_theta`` / ``topk_logp_theta`` the base's, with
    ``save_topk_of="both"``, or with exact scoring the base's exact values of the
    teacher's ids. With named teachers, ``teacher`` is the one the record was routed to;
    from a mixture of teachers, ``teachers`` gives their weights, ``logp_teachers[name][i]``
    and ``observed_teachers[name][i]`` each one's raw log probability of token i as
    ``logp_t`` is given for one teacher, and ``logp_t[i]`` is Σ w·log π of the token (the
    mixed teacher, unnormalised; ``logq`` is normalised), ``observed_t[i]`` true where every
    teacher listed it; ``topk_*_t`` are then the mixed teacher's, on the same scale.
    A stop token, when one ended the sequence, is the
    last entry of ``token_ids`` and is not part of ``generated_text``.
    ``prompt_token_ids`` and ``teacher_prompt_token_ids`` are the prompts as each model
    tokenised them (None where the record was refused before; the teacher's is None for a
    mixture, whose teachers each tokenise their own). The record's keys are declared in
    :mod:`.schema`.
    """

    prompt: Prompt
    prompt_t: Prompt | None = None
    id: Any = None
    generated_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    alpha_history: list[float] = field(default_factory=list)
    logp_theta: list[float] = field(default_factory=list)
    logp_t: list[float] = field(default_factory=list)
    logq: list[float] = field(default_factory=list)
    observed_theta: list[bool] = field(default_factory=list)
    observed_t: list[bool] = field(default_factory=list)
    fallback: list[bool] = field(default_factory=list)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None
    logp_theta_exact: list[float] | None = None
    logp_t_exact: list[float] | None = None
    topk_ids_t: list[list[int]] | None = None
    topk_logp_t: list[list[float]] | None = None
    topk_ids_theta: list[list[int]] | None = None
    topk_logp_theta: list[list[float]] | None = None
    round: list[int] | None = None
    drafted: list[bool] | None = None
    teacher: str | None = None
    teachers: dict[str, float] | None = None
    logp_teachers: dict[str, list[float]] | None = None
    observed_teachers: dict[str, list[bool]] | None = None
    logp_teachers_exact: dict[str, list[float]] | None = None
    prompt_token_ids: list[int] | None = None
    teacher_prompt_token_ids: list[int] | None = None

    @property
    def generated_tokens(self) -> list[int]:
        """The generated token ids (same as ``token_ids``)."""
        return self.token_ids

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error"

    def to_record(self) -> dict[str, Any]:
        """The JSON object written per line by ``dualsample generate`` (the exact keys
        only when the sequence was rescored)."""
        record = {}
        for f in FIELDS:
            value = getattr(self, f.attr)
            if value is not None or f.always:
                record[f.name] = value
        return record
